"""Helpers for tests that run the trainer through its real command line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def writable_corpus(demo_shards: Path, tmp_path_factory) -> Path:
    """A copy of the session's demo corpus with a tokenizer trained on its captions."""
    root = tmp_path_factory.mktemp("train_corpus") / "corpus"
    shutil.copytree(demo_shards, root)
    result = run("training.text.tokenizer", "--shards", str(root / "train"), "--out", str(root / "tokenizer.json"))
    assert result.returncode == 0, result.stderr
    return root


def subprocess_env() -> dict[str, str]:
    # One thread per process: the tests start several processes on a 2-core machine.
    return dict(os.environ, OMP_NUM_THREADS="1", WANDB_MODE="disabled")


def run(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=subprocess_env(),
    )


def torchrun(nproc: int, *args: str, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
        "-m", "training.main", *args,
    ]
    return subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env=subprocess_env())


def train_args(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    """Tiny, fast settings on the demo corpus; `extra` overrides come last and win."""
    return [
        "--config", "configs/tiny_demo.toml",
        f"data.train_shards={corpus / 'train'}",
        "data.image_size=32",
        "data.batch_size=16",
        "data.workers=1",
        "data.sample_shuffle_buffer=64",
        "optim.warmup_steps=2",
        f"train.run_dir={run_dir}",
        "checkpoint.every=0",
        "log.every=1",
        "log.progress_bar=false",
        *extra,
    ]


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["last_loss"] for r in records if "last_loss" in r]  # eval records have no loss


def wait_for(condition, timeout: float, proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"process ended (status {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)
