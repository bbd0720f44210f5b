"""The DeepSpeed engine against the DDP engine, and its own checkpoints, under real torchrun
processes on the CPU (DeepSpeed picks its CPU accelerator when there is no GPU, and JIT-builds a
small shared-memory op the first time)."""

from __future__ import annotations

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


# The fp32 comparison runs the ViT `tiny`; the bf16 resume test runs the demo's `tiny_cnn`, whose
# BatchNorm buffers must be cast with the weights (DeepSpeed 0.19 keeps buffers fp32 by default).
MODEL = "model.name=tiny"


def test_first_loss_matches_the_ddp_engine(corpus, tmp_path):
    # Same seed, same first batch, fp32 everywhere: the engines must agree on the loss.
    common = ("train.steps=2", "engine.precision=fp32", MODEL)
    _ok(torchrun(2, *train_args(corpus, tmp_path / "ddp", *common)))
    _ok(torchrun(2, *train_args(corpus, tmp_path / "ds", *common, "engine.name=deepspeed", "engine.zero_stage=1")))
    ddp, ds = losses(tmp_path / "ddp"), losses(tmp_path / "ds")
    torch.testing.assert_close(torch.tensor(ds[0]), torch.tensor(ddp[0]), rtol=1e-5, atol=1e-5)
    # After one AdamW step from identical weights and gradients the second loss agrees too.
    torch.testing.assert_close(torch.tensor(ds[1]), torch.tensor(ddp[1]), rtol=1e-4, atol=1e-4)


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
