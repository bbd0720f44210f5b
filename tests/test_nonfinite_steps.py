"""A non-finite loss skips the update: the weights (and the optimizer state) stay as they were,
the next finite step trains, and too many in a row end the run. Checked for both engines by
injecting a NaN loss (issue: DeepSpeed's engine used to be trusted to skip)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

from training.losses import ClipLoss
from training.model import MODEL_CONFIGS, build_model
from training.optim import OptimConfig, build_optimizer
from training.parallel.engines import EngineConfig, build_engine
from training.parallel.process_group import Distributed
from training.train import NonFiniteLossError, Progress, StepResult, count_step, train_step
from trainer_cli import REPO_ROOT, subprocess_env

ENV = Distributed(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _small_model() -> torch.nn.Module:
    cfg = MODEL_CONFIGS["tiny"]()
    cfg = dataclasses.replace(
        cfg, vision=dataclasses.replace(cfg.vision, image_size=32),
        text=dataclasses.replace(cfg.text, vocab_size=64, eot_id=63, pad_id=0, context_length=16),
    )
    return build_model(cfg)


def _batch(size: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A fixed batch for `_small_model` (also the global batch of the torchrun step checks)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(1, 62, (size, 8), generator=g)
    text[:, -1] = 63
    return {"image": torch.randn(size, 3, 32, 32, generator=g), "text": text}


def rank_rows(batch: dict[str, torch.Tensor], env) -> dict[str, torch.Tensor]:
    """This rank's contiguous share of a global batch's rows."""
    size = len(batch["text"])
    rows = slice(env.rank * size // env.world_size, (env.rank + 1) * size // env.world_size)
    return {key: value[rows] for key, value in batch.items()}


def _nan_loss(*args):
    return ClipLoss()(*args) * float("nan")


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_ddp_engine_skips_a_nan_step_and_trains_on_the_next(precision):
    torch.manual_seed(0)
    model = _small_model()
    optimizer = build_optimizer(model, OptimConfig(fused=False))
    engine = build_engine(EngineConfig(precision=precision), model, optimizer, ENV,
                          grad_clip=1.0, micro_batch=4, accum_steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_step(engine, [_batch()], _nan_loss, ENV)
    assert not result.finite
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert not optimizer.state  # no AdamW moments were touched
    # fp16: the GradScaler starts at 2^16; a finite step whose scaled gradients overflow is
    # skipped by the scaler itself, which halves the scale, until one fits (how many depends on
    # the init); fp32 trains at once.
    scaler = engine.precision.scaler
    for steps in range(1, 21):
        assert train_step(engine, [_batch()], ClipLoss(), ENV).finite
        if any(not torch.equal(v, before[n]) for n, v in model.state_dict().items()):
            break
    else:
        raise AssertionError("no finite step ever updated the weights")
    if precision == "fp16":
        # the NaN step never reached the scaler; each of the steps - 1 skipped ones halved it
        assert scaler.get_scale() == 2.0**16 * 0.5 ** (steps - 1)
    else:
        assert steps == 1
    assert len(optimizer.state) > 0


def test_too_many_nonfinite_steps_in_a_row_end_the_run():
    class Quiet:
        def message(self, text):
            pass

    progress = Progress()
    bad = StepResult(loss=float("nan"), grad_norm=float("nan"), finite=False, stop_requested=False)
    good = StepResult(loss=1.0, grad_norm=1.0, finite=True, stop_requested=False)
    count_step(progress, bad, 8, max_nonfinite=2, log=Quiet())
    count_step(progress, good, 8, max_nonfinite=2, log=Quiet())  # a finite step resets the run
    count_step(progress, bad, 8, max_nonfinite=2, log=Quiet())
    with pytest.raises(NonFiniteLossError, match="2 non-finite losses in a row at step 4"):
        count_step(progress, bad, 8, max_nonfinite=2, log=Quiet())
    assert (progress.skipped_steps, progress.samples_seen) == (3, 32)


_DEEPSPEED_CHECK = r"""
import os, sys, torch
sys.path[:0] = [os.getcwd(), os.path.join(os.getcwd(), "tests")]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                  MASTER_PORT=sys.argv[3])
import torch.distributed as dist
dist.init_process_group("gloo")
from test_nonfinite_steps import _small_model, _batch, _nan_loss, ENV
from training.losses import ClipLoss
from training.optim import OptimConfig, build_optimizer
from training.parallel.engines import EngineConfig, build_engine
from training.train import train_step
torch.manual_seed(0)
model = _small_model()
engine = build_engine(EngineConfig(name="deepspeed", zero_stage=int(sys.argv[1]), precision=sys.argv[2]),
                      model, build_optimizer(model, OptimConfig(fused=False)), ENV,
                      grad_clip=1.0, micro_batch=4, accum_steps=1)
before = {k: v.detach().float().clone() for k, v in engine.module.state_dict().items()}
assert not train_step(engine, [_batch()], _nan_loss, ENV).finite
moved = [k for k, v in engine.module.state_dict().items() if not torch.equal(v.float(), before[k])]
assert not moved, f"a skipped step changed {moved[:3]}"
assert train_step(engine, [_batch()], ClipLoss(), ENV).finite
print("OK")
"""


@pytest.mark.slow
@pytest.mark.parametrize("stage, precision", [
    pytest.param(0, "fp16", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="GPU only: DeepSpeed's CPU accelerator has no fp16 "
        "(on CPU the engine refuses it in one line: test_deepspeed_fp16_on_cpu_is_one_line)")),
    (1, "fp32"), (2, "bf16"), (3, "fp32"),
])
def test_deepspeed_engine_skips_a_nan_step(stage, precision, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run([sys.executable, "-c", _DEEPSPEED_CHECK, str(stage), precision, str(port)],
                            cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_deepspeed_fp16_on_cpu_is_one_line():
    from data_pipeline.errors import UserError
    from training.optim import OptimConfig, build_optimizer
    from training.parallel.engines import EngineConfig, build_engine

    model = _small_model()
    with pytest.raises(UserError, match="CPU accelerator has no fp16"):
        build_engine(EngineConfig(name="deepspeed", zero_stage=0, precision="fp16"), model,
                     build_optimizer(model, OptimConfig(fused=False)), ENV, grad_clip=1.0,
                     micro_batch=4, accum_steps=1)
