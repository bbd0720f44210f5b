"""The DeepSpeed engine against the DDP engine, and its own checkpoints, under real torchrun
processes on the CPU (DeepSpeed picks its CPU accelerator when there is no GPU, and JIT-builds a
small shared-memory op the first time)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training import checkpoint as ckpt
from trainer_cli import losses, torchrun, train_args, writable_corpus

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def corpus(demo_shards, tmp_path_factory) -> Path:
    return writable_corpus(demo_shards, tmp_path_factory)


def _ok(result) -> None:
    assert result.returncode == 0, (result.stdout[-2000:], result.stderr[-4000:])


# The bf16 resume test runs the demo's `tiny_cnn`, whose BatchNorm buffers must be cast with the
# weights (DeepSpeed 0.19 keeps buffers fp32 by default).
# The engines' equality in fp32 (ZeRO-1 == DDP, loss by loss, on 2 ranks and after a resume on
# 1) is tests/test_world_size_resume.py::test_deepspeed_resumes_on_another_world_size_like_ddp.


def test_zero2_bf16_run_resumes_from_its_checkpoint(corpus, tmp_path):
    common = ("train.steps=4", "engine.name=deepspeed", "engine.zero_stage=2", "engine.precision=bf16",
              "model.name=tiny_cnn")
    split, straight = tmp_path / "split", tmp_path / "straight"
    _ok(torchrun(2, *train_args(corpus, split, *common, "train.stop_at_step=2")))
    assert (split / "deepspeed" / "step_00000002").is_dir()
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(split))
    assert state["engine"] == "deepspeed" and state["step"] == 2 and state["world_size"] == 2
    result = torchrun(2, *train_args(corpus, split, *common, "checkpoint.resume=latest"))
    _ok(result)
    assert "resumed from" in result.stdout
    assert (split / "finished.json").is_file()
    _ok(torchrun(2, *train_args(corpus, straight, *common)))
    # ZeRO's bf16 weights with fp32 master copies: resumed and uninterrupted runs take the same
    # steps on the same batches, so their losses agree (bf16 forward, so a loose tolerance).
    torch.testing.assert_close(
        torch.tensor(losses(split)), torch.tensor(losses(straight)), rtol=2e-2, atol=2e-2
    )


def test_user_json_and_the_run_have_one_precision(tmp_path):
    """engine.deepspeed_config used to override the run's precision silently while the log and
    checkpoint recorded the run's; now a JSON that disagrees is an error, one that is silent
    gets the run's precision."""
    from data_pipeline.errors import UserError
    from training.parallel.deepspeed_engine import deepspeed_config

    path = tmp_path / "ds.json"
    geometry = dict(micro_batch=4, accum_steps=1, grad_clip=1.0)
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "bf16": {"enabled": True}}))
    with pytest.raises(UserError, match="sets precision bf16 but engine.precision is fp32"):
        deepspeed_config(str(path), 1, "fp32", **geometry)
    agreed = deepspeed_config(str(path), 1, "bf16", **geometry)
    assert agreed["bf16"]["enabled"] and not agreed["fp16"]["enabled"]
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    silent = deepspeed_config(str(path), 1, "fp16", **geometry)
    assert silent["fp16"]["enabled"] and not silent["bf16"]["enabled"]
    assert silent["zero_optimization"] == {"stage": 2}
    # ZeRO-0 outside fp16 has no overflow check: refused, not trained on.
    with pytest.raises(UserError, match="never skips a non-finite step"):
        deepspeed_config("", 0, "fp32", **geometry)
    assert deepspeed_config("", 0, "fp16", **geometry)["fp16"]["enabled"]
