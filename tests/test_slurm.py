"""launch/'s sbatch scripts (train_multinode, eval_watch, curate) on a real SLURM: a one-node cluster
on localhost (tests/slurm_cluster.py: munged, slurmctld, slurmd from Debian's slurm-wlm), two CPU
ranks under torchrun with gloo, the time-limit warning that makes the job checkpoint, requeue
itself and resume.

Skipped when SLURM is not installed or we are not root; `.ci/run` installs slurm-wlm and munge.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from slurm_cluster import LocalSlurm, free_port, missing_reason
from training import checkpoint as ckpt

REPO_ROOT = Path(__file__).resolve().parents[1]
MISSING = missing_reason()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(MISSING is not None, reason=f"needs a local SLURM: {MISSING}"),
]
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"}


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"), cpus=2)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def corpus(demo_shards, tmp_path_factory) -> Path:
    """A writable copy of the demo corpus with a tokenizer trained on its captions."""
    root = tmp_path_factory.mktemp("slurm_corpus") / "corpus"
    shutil.copytree(demo_shards, root)
    result = subprocess.run(
        [sys.executable, "-m", "training.text.tokenizer", "--shards", str(root / "train"),
         "--out", str(root / "tokenizer.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return root


def _submit_training(slurm: LocalSlurm, corpus: Path, run_dir: Path, log: Path, *extra: str,
                     workers: int = 1) -> int:
    """The real sbatch script: one node, torchrun with two CPU ranks, a tiny model."""
    env = {
        "PY": sys.executable, "NPROC_PER_NODE": "2", "RDZV_PORT": str(free_port()),
        "WANDB_MODE": "disabled",
    }
    return slurm.sbatch(
        "--nodes=1", "--cpus-per-task=2", f"--output={log}",
        "launch/train_multinode.sbatch",
        "--config", "configs/tiny_demo.toml",
        f"data.train_shards={corpus / 'train'}",
        "data.image_size=32", "data.batch_size=16", f"data.workers={workers}",
        "data.sample_shuffle_buffer=64", "optim.warmup_steps=2",
        f"train.run_dir={run_dir}", "engine.device=cpu", "checkpoint.every=0",
        "log.every=1", "log.progress_bar=false",
        *extra,
        env=env, cwd=REPO_ROOT,
    )


def _logged_steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def _wait_until(condition, timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            text = log.read_text() if log.is_file() else "(no log yet)"
            raise TimeoutError(f"no {what} after {timeout:.0f} s; job log:\n{text[-4000:]}")
        time.sleep(0.5)


def test_sbatch_script_trains_two_ranks_to_the_end(slurm, corpus, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    job = _submit_training(slurm, corpus, run_dir, log, "train.steps=4")
    info = slurm.wait_job(job, ENDED, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert "1 node(s) x 2 worker(s)" in text and "2 rank(s) on cpu" in text
    assert json.loads((run_dir / "finished.json").read_text())["step"] == 4
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert state["metrics"]["step"] == 4
    assert info["Restarts"] == "0"


def test_time_limit_warning_checkpoints_requeues_and_resumes(slurm, corpus, tmp_path):
    run_dir, log, eval_log = tmp_path / "run", tmp_path / "train.log", tmp_path / "eval.log"
    steps = 10
    job = _submit_training(slurm, corpus, run_dir, log, f"train.steps={steps}")
    # The eval job waits for the training job to succeed: a self-requeue must not release it.
    eval_job = slurm.sbatch(
        f"--dependency=afterok:{job}", "--cpus-per-task=2", f"--output={eval_log}",
        "launch/eval_watch.sbatch", str(run_dir),
        "--suite", "demo", "--demo", str(corpus), "--device", "cpu", "--workers", "0",
        "--poll", "1", "--no-plot",
        env={"PY": sys.executable, "WANDB_MODE": "disabled"}, cwd=REPO_ROOT,
    )
    _wait_until(lambda: len(_logged_steps(run_dir)) >= 2, 240, "second training step", log)

    # What SLURM does `--signal=B:USR1@120` before the time limit: USR1 to the batch shell only.
    slurm.run("scancel", "--signal=USR1", "--batch", str(job))
    _wait_until(
        lambda: (lambda i: i["JobState"] == "PENDING" and int(i["Restarts"]) >= 1)(slurm.job(job)),
        120, "requeued job (PENDING, Restarts>=1)", log,
    )
    text = log.read_text()
    stopped = re.search(r"stopped at step (\d+) \(SIGUSR1\)", text)
    assert stopped, text[-4000:]
    stop_step = int(stopped.group(1))
    assert 2 <= stop_step < steps
    saved = ckpt.latest_checkpoint(run_dir)
    assert saved is not None and saved.name == f"step_{stop_step:08d}.pt"
    assert f"requeueing job {job}" in text
    assert not (run_dir / "finished.json").exists()
    assert slurm.job(eval_job)["JobState"] == "PENDING"

    # SLURM holds a requeued job for 2 minutes (BeginTime); release it now to keep the test short,
    # though not within the second of the requeue: slurmd refuses a job credential issued no later
    # than the old one's revocation ("Job credential revoked").
    time.sleep(2)
    slurm.run("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = slurm.wait_job(job, ENDED, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert int(info["Restarts"]) == 1
    assert f"job {job} start 2:" in text
    assert f"resumed from {saved} at step {stop_step}" in text
    assert _logged_steps(run_dir) == list(range(1, steps + 1))  # no step lost or repeated
    assert json.loads((run_dir / "finished.json").read_text())["step"] == steps
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(run_dir))
    assert state["world_size"] == 2 and state["metrics"]["step"] == steps

    eval_info = slurm.wait_job(eval_job, ENDED, timeout=240)
    assert eval_info["JobState"] == "COMPLETED", eval_log.read_text()[-4000:]
    assert eval_info["StartTime"] >= info["EndTime"]  # ISO timestamps compare as strings
    done = json.loads((run_dir / "eval" / "done.json").read_text())["checkpoints"]
    assert "demo" in done[f"step_{steps:08d}.pt"]["suites"], done


def test_scancel_sigterm_leaves_a_new_checkpoint(slurm, corpus, tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "train.log"
    job = _submit_training(slurm, corpus, run_dir, log, "train.steps=40")
    _wait_until(lambda: len(_logged_steps(run_dir)) >= 2, 240, "second training step", log)
    slurm.run("scancel", str(job))  # SIGTERM to all, SIGKILL after KillWait (30 s)
    info = slurm.wait_job(job, ENDED, timeout=120)
    assert info["JobState"] == "CANCELLED"
    assert int(info["Restarts"]) == 0  # a cancelled job is not requeued
    saved = ckpt.latest_checkpoint(run_dir)
    assert saved is not None, log.read_text()[-4000:]
    assert ckpt.load_checkpoint(saved)["world_size"] == 2


def test_curate_sbatch_script_runs_two_ranks_like_one_process(slurm, corpus, tmp_path):
    """launch/curate.sbatch on the real cluster: torchrun, two CPU ranks, each its slice of
    the shards; the keep-list equals the one-process run's."""
    log = tmp_path / "curate.log"
    args = ["--shards", str(corpus / "train"), "--no-hash-dedup", "--languages", "en", "--workers", "1"]
    env = {"PY": sys.executable, "NPROC_PER_NODE": "2", "RDZV_PORT": str(free_port())}
    job = slurm.sbatch("--nodes=1", "--cpus-per-task=2", f"--output={log}", "launch/curate.sbatch",
                       *args, "--out", str(tmp_path / "two"), env=env, cwd=REPO_ROOT)
    info = slurm.wait_job(job, ENDED, timeout=300)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", text[-4000:]
    assert "1 node(s) x 2 rank(s)" in text and "curation:" in text
    one = subprocess.run([sys.executable, "-m", "data_pipeline.curate", *args, "--out", str(tmp_path / "one")],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    import pandas as pd

    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "two" / "keep_list.parquet"),
                                  pd.read_parquet(tmp_path / "one" / "keep_list.parquet"))
