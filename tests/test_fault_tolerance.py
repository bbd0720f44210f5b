"""Fault tolerance with real processes: a checkpoint writer killed mid-write.

Not here yet: a rank killed with SIGKILL under `torchrun --max-restarts` (the surviving rank sits
in a gloo collective with its dead peer, and the restarted round failed to rendezvous in our
attempts)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from training import checkpoint as ckpt
from trainer_cli import REPO_ROOT


def _wait_for(condition, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def test_checkpoint_writer_killed_mid_write_leaves_the_previous_one_loadable(tmp_path):
    import torch

    ckpt.save_checkpoint(tmp_path, 1, {"model": {"w": torch.ones(4)}}, keep=3)
    writer = (
        "import torch\n"
        "from training import checkpoint as c\n"
        f"c.save_checkpoint({str(tmp_path)!r}, 2, {{'model': {{'w': torch.ones(300_000_000, dtype=torch.uint8)}}}}, keep=3)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer], cwd=REPO_ROOT)
    folder = ckpt.checkpoint_dir(tmp_path)

    def writing() -> bool:
        return any(p.stat().st_size > 1_000_000 for p in folder.glob(".tmp_*"))

    _wait_for(writing, 120, proc, "the write to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001.pt"]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))  # what resume=latest picks
    assert state["step"] == 1
    ckpt.save_checkpoint(tmp_path, 3, {"model": {"w": torch.ones(4)}}, keep=3)
    assert not list(folder.glob(".tmp_*"))  # the dead writer's leftovers are cleaned up
