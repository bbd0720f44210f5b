"""Fault tolerance with real processes: a rank killed with SIGKILL under `torchrun
--max-restarts` (the job restarts and resumes from its last checkpoint), and a checkpoint writer
killed mid-write (the previous checkpoint still loads)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from training import checkpoint as ckpt
from trainer_cli import REPO_ROOT, subprocess_env, train_args, wait_for, writable_corpus


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

    wait_for(writing, 120, proc, "the write to start")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000001.pt"]
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))  # what resume=latest picks
    assert state["step"] == 1
    ckpt.save_checkpoint(tmp_path, 3, {"model": {"w": torch.ones(4)}}, keep=3)
    assert not list(folder.glob(".tmp_*"))  # the dead writer's leftovers are cleaned up


@pytest.mark.slow
def test_rank_killed_with_sigkill_restarts_and_resumes_from_the_last_checkpoint(
    demo_shards, tmp_path_factory, tmp_path
):
    corpus = writable_corpus(demo_shards, tmp_path_factory)
    run_dir = tmp_path / "run"
    env = dict(subprocess_env(), NPROC="2", MAX_RESTARTS="1", PY=sys.executable)
    args = train_args(corpus, run_dir, "train.steps=12", "checkpoint.every=4", "checkpoint.resume=latest")
    log = (tmp_path / "torchrun.log").open("w")
    agent = subprocess.Popen(
        ["bash", "launch/torchrun_single_node.sh", *args],
        cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        first = ckpt.checkpoint_dir(run_dir) / "step_00000004.pt"
        wait_for(first.is_file, 240, agent, "the first checkpoint")
        victim = _rank_process(agent.pid, rank=1)
        victim.send_signal(signal.SIGKILL)
        assert agent.wait(timeout=400) == 0, (tmp_path / "torchrun.log").read_text()[-4000:]
    finally:
        if agent.poll() is None:
            agent.kill()
        log.close()
    output = (tmp_path / "torchrun.log").read_text()
    assert "failed (exitcode: -9) local_rank: 1" in output  # torchrun saw the SIGKILL
    resumed = [line for line in output.splitlines() if line.startswith("resumed from")]
    assert len(resumed) == 1, output[-4000:]
    assert resumed[0].split()[-1] in {"4", "8"}  # the newest checkpoint when rank 1 died
    assert json.loads((run_dir / "finished.json").read_text())["step"] == 12
    # The restarted round logged the steps after the checkpoint, up to the last one.
    steps = [json.loads(line).get("step") for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(s for s in steps if s is not None) == 12


def _rank_process(agent_pid: int, rank: int) -> psutil.Process:
    """The trainer process torchrun started for `rank` (not one of its DataLoader workers)."""
    agent = psutil.Process(agent_pid)
    for child in agent.children():
        try:
            if child.environ().get("RANK") == str(rank):
                return child
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no rank {rank} process under torchrun (pid {agent_pid})")
