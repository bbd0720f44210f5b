"""engine.compile=true (torch.compile, inductor on the CPU) trains the same steps as eager."""

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

pytestmark = pytest.mark.slow  # inductor compiles forward and backward: ~50 s on 2 cores


def _one_layer_model() -> torch.nn.Module:
    """The ViT `tiny` cut to one layer per tower: compile time grows with the graph."""
    cfg = MODEL_CONFIGS["tiny"]()
    vision = dataclasses.replace(cfg.vision, image_size=32,
                                 timm_kwargs=dict(patch_size=8, embed_dim=64, depth=1, num_heads=2))
    text = dataclasses.replace(cfg.text, vocab_size=64, eot_id=63, pad_id=0, context_length=16, layers=1)
    return build_model(dataclasses.replace(cfg, vision=vision, text=text))


def test_compiled_engine_takes_the_eager_steps():
    losses, weights = {}, {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = _one_layer_model()
        engine = build_engine(EngineConfig(compile=compiled, precision="fp32"), model,
                              build_optimizer(model, OptimConfig(fused=False)), ENV,
                              grad_clip=1.0, micro_batch=4, accum_steps=1)
        assert (engine.wrapped is not engine.module) == compiled
        losses[compiled] = [train_step(engine, [_batch()], ClipLoss(), ENV).loss for _ in range(3)]
        weights[compiled] = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    assert losses[False][-1] < 0.5 * losses[False][0]  # the steps really train
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]), rtol=1e-5, atol=1e-5)
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-4, atol=1e-5)
