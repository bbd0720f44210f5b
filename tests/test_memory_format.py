"""engine.memory_format=channels_last trains the same steps as the default contiguous layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from training.losses import ClipLoss
from training.model.clip import build_model
from training.model.configs import MODEL_CONFIGS
from training.optim import OptimConfig, build_optimizer
from training.parallel.engines import EngineConfig, build_engine
from training.train import train_step
from test_nonfinite_steps import ENV, _batch


def _small_cnn() -> torch.nn.Module:
    """The demo's tiny_cnn at 32 px with a one-layer text tower."""
    cfg = MODEL_CONFIGS["tiny_cnn"]()
    vision = dataclasses.replace(cfg.vision, image_size=32)
    text = dataclasses.replace(cfg.text, vocab_size=64, eot_id=63, pad_id=0, context_length=16, layers=1)
    return build_model(dataclasses.replace(cfg, vision=vision, text=text))


def _engine(model: torch.nn.Module, memory_format: str):
    return build_engine(EngineConfig(precision="fp32", memory_format=memory_format), model,
                        build_optimizer(model, OptimConfig(fused=False)), ENV,
                        grad_clip=1.0, micro_batch=4, accum_steps=1)


def _first_conv(model: torch.nn.Module) -> torch.Tensor:
    return next(m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d))


def test_channels_last_lays_out_the_convolutions_only_when_asked():
    default, asked = _small_cnn(), _small_cnn()
    _engine(default, "contiguous")
    _engine(asked, "channels_last")
    assert _first_conv(default).is_contiguous()
    assert _first_conv(asked).is_contiguous(memory_format=torch.channels_last)
    assert not _first_conv(asked).is_contiguous()
    assert EngineConfig().memory_format == "contiguous"
    with pytest.raises(ValueError, match="only supported with engine.name=ddp"):
        EngineConfig(name="deepspeed", memory_format="channels_last")


def test_channels_last_takes_the_contiguous_steps():
    losses, weights = {}, {}
    for layout in ("contiguous", "channels_last"):
        torch.manual_seed(0)
        model = _small_cnn()
        engine = _engine(model, layout)
        # Each step's parameters are the optimizer's: the in-place conversion kept them.
        optimized = {id(p) for group in engine.optimizer.param_groups for p in group["params"]}
        assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
        losses[layout] = [train_step(engine, [_batch()], ClipLoss(), ENV).loss for _ in range(3)]
        weights[layout] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    assert losses["contiguous"][-1] < losses["contiguous"][0]  # the steps really train
    torch.testing.assert_close(torch.tensor(losses["channels_last"]),
                               torch.tensor(losses["contiguous"]), rtol=1e-5, atol=1e-5)
    for name, value in weights["contiguous"].items():
        torch.testing.assert_close(weights["channels_last"][name], value, rtol=1e-4, atol=1e-5)
