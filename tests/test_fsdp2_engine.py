"""The fsdp2 engine under real torchrun processes (gloo, CPU): FSDP2 == DDP step for step, its
sharded checkpoints written in the background while training goes on, resharded onto 1 and 2
ranks exactly, a trainer run that stops on 2 ranks and finishes on 1 like DDP, the stop signal
waiting for the checkpoint, and the conversion to the single-file format (and back)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training import checkpoint as ckpt
from training.convert_checkpoint import convert
from training.model.trained import load_trained_model, resolve_checkpoint
from trainer_cli import (REPO_ROOT, losses, run, subprocess_env, torchrun, train_args, wait_for,
                         writable_corpus)
from test_world_size_resume import _args, _ok, even_corpus  # noqa: F401 - a fixture, reused

pytestmark = pytest.mark.slow


def _check(mode: str, nproc: int, run_dir: Path, out: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
         str(nproc), "tests/fsdp2_check.py", mode, str(run_dir), str(out)],
        cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def _assert_same_state(got: dict, want: dict) -> None:
    model, optim = got["model"], got["optimizer"]
    assert model.keys() == want["model"].keys()
    for name, value in want["model"].items():
        assert torch.equal(model[name], value), name
    assert optim["state"].keys() == want["optimizer"]["state"].keys()
    for name, moments in want["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(optim["state"][name][key], value), (name, key)


def test_fsdp2_takes_ddps_steps_and_its_sharded_checkpoint_reshards_onto_1_and_2_ranks(tmp_path):
    run_dir = tmp_path / "run"
    two = _check("train", 2, run_dir, tmp_path / "train.pt")
    # FSDP2 == DDP on the same global batch and initial weights (fp32, 2 gloo ranks): losses, and
    # weights after 3 AdamW steps (tolerance as test_ddp_equivalence: summation order only).
    assert two["losses"][-1] < two["losses"][0]
    for curve in ("losses", "recompute_losses"):
        torch.testing.assert_close(torch.tensor(two[curve]), torch.tensor(two["ddp_losses"]),
                                   rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(two["accum_losses"]), torch.tensor(two["ddp_accum_losses"]),
                               rtol=1e-5, atol=1e-6)
    assert two["accum_losses"] != two["losses"]  # the micro-batches did change the steps
    for name, value in two["ddp_model"].items():
        torch.testing.assert_close(two["model"][name].reshape(value.shape), value, rtol=1e-5, atol=1e-5)
    saved = Path(two["saved_at"])
    assert saved == ckpt.latest_checkpoint(run_dir, sharded=True) and saved.name == "step_00000003.dcp"
    assert sorted(p.name for p in saved.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "run_state.pt"]
    assert not list(saved.parent.glob(".tmp_*"))
    # The checkpoint holds the state at the save, though two steps ran while it was written; a
    # resume on 1 rank and on 2 ranks restores that state exactly and takes the same next steps.
    for nproc in (1, 2):
        resumed = _check("resume", nproc, run_dir, tmp_path / f"resume{nproc}.pt")
        assert resumed["loaded_step"] == 3
        _assert_same_state(resumed, two)
        torch.testing.assert_close(torch.tensor(resumed["losses_after"]),
                                   torch.tensor(two["losses_after"]), rtol=1e-5, atol=1e-6)
    # The same checkpoint read whole in one process (the converter's path) holds the same.
    whole = ckpt.read_full(saved)
    for name, value in two["model"].items():
        assert torch.equal(whole["model"][name].reshape(value.shape), value), name


def test_trainer_run_stops_on_2_ranks_finishes_on_1_like_ddp_and_converts(even_corpus, tmp_path):  # noqa: F811
    curves = {}
    for engine in ("ddp", "fsdp2"):
        run_dir = tmp_path / engine
        common = ("model.name=tiny", "engine.precision=fp32", "train.steps=4", f"engine.name={engine}",
                  "checkpoint.every=1", "checkpoint.keep=2")
        _ok(torchrun(2, *_args(even_corpus, run_dir, 2, *common, "train.stop_at_step=2")))
        # A save that died mid-write (kill -9) leaves a temporary folder: never resumed from,
        # removed by the next save.
        (ckpt.checkpoint_dir(run_dir) / ".tmp_step_00000009.dcp").mkdir()
        result = torchrun(1, *_args(even_corpus, run_dir, 1, *common))
        _ok(result)
        assert "checkpoint was written by 2 ranks, resuming on 1" in result.stdout
        assert "resumed from" in result.stdout and "at step 2" in result.stdout
        curves[engine] = torch.tensor(losses(run_dir))
    # Same data (the handed-over epoch), same steps: the curves agree (fp32, summation order).
    assert len(curves["fsdp2"]) == 4
    torch.testing.assert_close(curves["fsdp2"], curves["ddp"], rtol=1e-5, atol=1e-5)

    run_dir = tmp_path / "fsdp2"
    sharded = ckpt.list_checkpoints(run_dir, sharded=True)
    assert [p.name for p in sharded] == ["step_00000003.dcp", "step_00000004.dcp"]  # keep=2
    assert ckpt.list_checkpoints(run_dir) == []  # single files only
    assert not list(ckpt.checkpoint_dir(run_dir).glob(".tmp_*"))
    # Eval, its watcher, search and the export read the sharded folders as they are: the run
    # folder resolves to its newest, read whole into the same model the converted file holds.
    assert ckpt.evaluable_checkpoints(run_dir) == sharded
    assert resolve_checkpoint(run_dir) == sharded[-1]
    from_folder = load_trained_model(sharded[-1])

    # Sharded -> single file: the file eval, search and the export read, equal to the DDP run's
    # final checkpoint (weights and AdamW moments, keyed alike), and resumable by the ddp engine.
    single = Path(convert(sharded[-1]))
    assert single.name == "step_00000004.pt" and ckpt.list_checkpoints(run_dir) == [single]
    assert ckpt.latest_checkpoint(run_dir, sharded=True) == sharded[-1]  # a resume takes the folder
    ddp_state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path / "ddp"))
    state = ckpt.load_checkpoint(single)
    assert state["engine"] == "ddp" and state["step"] == 4 and state["world_size"] == 1
    for name, value in ddp_state["model"].items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-5, atol=1e-5)
    assert state["optimizer"]["param_groups"] == ddp_state["optimizer"]["param_groups"]
    for index, moments in ddp_state["optimizer"]["state"].items():
        for key, value in moments.items():
            torch.testing.assert_close(state["optimizer"]["state"][index][key], value,
                                       rtol=1e-4, atol=1e-6)
    trained = load_trained_model(single)
    for name, value in trained.model.state_dict().items():
        assert torch.equal(value, state["model"][name]), name
        assert torch.equal(from_folder.model.state_dict()[name], value), name
    assert from_folder.step == trained.step == 4
    # One per step for eval: the file converted from a folder stands in for it.
    assert ckpt.evaluable_checkpoints(run_dir) == [sharded[0], single]

    # And back: the single file as a sharded folder holds exactly what the original held.
    back = Path(convert(single, tmp_path / "back" / "step_00000004.dcp"))
    again = ckpt.read_full(back)
    for name, value in state["model"].items():
        assert torch.equal(again["model"][name], value), name
    for index, moments in state["optimizer"]["state"].items():
        for key, value in moments.items():
            assert torch.equal(again["optimizer"]["state"][index][key], value), (index, key)

    # User mistakes are one line: converting onto an existing checkpoint, fsdp2 given a file.
    result = run("training.convert_checkpoint", str(sharded[-1]))
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
    result = run("training.main", *_args(even_corpus, tmp_path / "other", 1, "model.name=tiny",
                                         "engine.name=fsdp2", "train.steps=5",
                                         f"checkpoint.resume={single}"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "single-file checkpoint" in result.stderr and "convert_checkpoint" in result.stderr


@pytest.mark.timeout(300)
def test_stop_signal_waits_for_the_background_checkpoint(demo_shards, tmp_path_factory, tmp_path):
    """SLURM's pre-emption warning (USR1) mid-run: the stop checkpoint is written in the
    background like any other, and the process exits only once it is complete and in place."""
    corpus = writable_corpus(demo_shards, tmp_path_factory)
    run_dir = tmp_path / "run"
    args = train_args(corpus, run_dir, "model.name=tiny", "engine.name=fsdp2", "train.steps=400",
                      "checkpoint.every=2")
    proc = subprocess.Popen([sys.executable, "-m", "training.main", *args], cwd=REPO_ROOT,
                            env=subprocess_env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: ckpt.latest_checkpoint(run_dir, sharded=True) is not None, 240, proc,
                 "the first sharded checkpoint")
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stdout = proc.stdout.read().decode()
    assert "stop signal received" in stdout
    latest = ckpt.latest_checkpoint(run_dir, sharded=True)
    stopped_at = int(stdout.split("stop signal received: checkpointing at step ")[1].split()[0])
    assert latest.name == f"step_{stopped_at:08d}.dcp"
    assert ckpt.read_full(latest)["step"] == stopped_at
    assert not list(latest.parent.glob(".tmp_*"))
    result = run("training.main", *args, "checkpoint.resume=latest", f"train.stop_at_step={stopped_at + 1}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"at step {stopped_at}" in result.stdout
