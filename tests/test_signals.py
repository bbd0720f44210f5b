"""Signals and dying parents, with real processes: nothing a signal does may lose a checkpoint,
and nothing the trainer started may outlive it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import psutil
import pytest

from training import checkpoint as ckpt
from trainer_cli import REPO_ROOT, subprocess_env, train_args, wait_for, writable_corpus


@pytest.fixture(scope="module")
def corpus(demo_shards, tmp_path_factory):
    return writable_corpus(demo_shards, tmp_path_factory)


def _steps_logged(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line]
    return max(steps, default=0)


def _start(corpus, run_dir, **popen):
    args = train_args(corpus, run_dir, "train.steps=400")
    return subprocess.Popen([sys.executable, "-m", "training.main", *args], cwd=REPO_ROOT,
                            env=subprocess_env(), start_new_session=True, **popen)


@pytest.mark.timeout(300)
def test_stop_signal_with_a_dead_stdout_reader_still_checkpoints(corpus, tmp_path):
    """`trainer | tee log` and SIGTERM to the process group: the reader dies first, and the
    trainer's "stop signal received" line used to raise BrokenPipeError before the checkpoint."""
    run_dir = tmp_path / "run"
    proc = _start(corpus, run_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _steps_logged(run_dir) >= 3, 240, proc, "three steps")
        proc.stdout.close()  # the reader is gone: the next print gets EPIPE
        os.killpg(proc.pid, signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
        stderr = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert "Traceback" not in stderr, stderr
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None, "the stop checkpoint was lost"
    assert ckpt.load_checkpoint(latest)["step"] >= 3


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1])
def test_stop_signals_without_slurm_checkpoint_and_resume(corpus, tmp_path, sig):
    """SIGTERM (scancel, a time limit) and SIGUSR1 (SLURM's warning) from any sender: the run
    stops between steps with a checkpoint, and checkpoint.resume=latest continues it."""
    run_dir = tmp_path / "run"
    proc = _start(corpus, run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: _steps_logged(run_dir) >= 2, 240, proc, "two steps")
        os.kill(proc.pid, sig)  # the trainer only; its workers ignore these signals
        assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))["step"]
    assert 2 <= stopped < 400 and not (run_dir / "finished.json").exists()
    args = train_args(corpus, run_dir, f"train.steps={stopped + 2}", "checkpoint.resume=latest")
    resumed = subprocess.run([sys.executable, "-m", "training.main", *args], cwd=REPO_ROOT,
                             env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {stopped}" in resumed.stdout
    assert json.loads((run_dir / "finished.json").read_text())["step"] == stopped + 2


@pytest.mark.timeout(300)
def test_loader_workers_exit_when_the_trainer_is_killed(corpus, tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(corpus, run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _steps_logged(run_dir) >= 1, 240, proc, "the first step")
        workers = psutil.Process(proc.pid).children(recursive=True)
        assert workers, "expected a DataLoader worker (data.workers=1)"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(workers, timeout=30)
        assert not alive, f"workers outlived the trainer: {[p.pid for p in alive]}"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in psutil.Process().children(recursive=True):
            p.kill()
