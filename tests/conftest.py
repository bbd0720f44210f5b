"""Shared fixtures: a small demo corpus built by the real pipeline, and a CLI runner.

`demo_shards` runs `python -m data_pipeline.shards` once per test session (img2dataset for real,
against a loopback server) and returns the corpus root:
    ROOT/train/    4 shards, DEMO_TRAIN_SAMPLES samples, DEMO_IMAGE_SIZE px JPEGs
    ROOT/val/      1 shard, 64 samples (colour x shape pairs seen in training)
    ROOT/heldout/  1 shard, 64 samples (only the HELD_OUT pairs)
    ROOT/corpus.json
Each sample is KEY.jpg, KEY.txt (caption), KEY.json (with colour, shape, size, count, position,
background). Treat it as read-only: copy it (shutil.copytree) before modifying anything.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_TRAIN_SAMPLES = 300
DEMO_IMAGE_SIZE = 32
DEMO_SEED = 0
# 304 train URLs (300 good + 4 planted failures) / 76 = exactly 4 train shards.
DEMO_SAMPLES_PER_SHARD = 76


def run_module(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python -m module args` from the repository root, capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def demo_shard_args(output: Path, *extra: str) -> list[str]:
    return [
        "--output",
        str(output),
        "--num-samples",
        str(DEMO_TRAIN_SAMPLES),
        "--seed",
        str(DEMO_SEED),
        "--image-size",
        str(DEMO_IMAGE_SIZE),
        "--samples-per-shard",
        str(DEMO_SAMPLES_PER_SHARD),
        "--processes",
        "2",
        "--threads",
        "16",
        *extra,
    ]


def train_tiny_run(shards: Path, work: Path, *overrides: str) -> Path:
    """A tokenizer trained on `shards` and a few-step tiny_demo run on them (32 px, batch 32, no
    workers), for tests that need a real checkpoint; -> the run folder (work/run)."""
    tokenizer = work / "tokenizer.json"
    result = run_module("training.text.tokenizer", "--shards", str(shards), "--out", str(tokenizer))
    assert result.returncode == 0, result.stderr
    result = run_module(
        "training.main", "--config", "configs/tiny_demo.toml", f"data.train_shards={shards}",
        "data.image_size=32", "data.batch_size=32", "data.workers=0", f"train.run_dir={work / 'run'}",
        "log.progress_bar=false", "train.epochs=1", f"tokenizer={tokenizer}", *overrides,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return work / "run"


# Tests that run img2dataset (directly or through these fixtures) pay for its worker processes,
# which import torch: ~10 s per run on 2 cores. `pytest -m "not slow"` skips them.
SLOW_FIXTURES = frozenset({"demo_shards", "url_shards"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def run_cli():
    """`run_cli("data_pipeline.validate", str(path))` -> CompletedProcess with text output."""
    return run_module


@pytest.fixture(scope="session")
def demo_args():
    """`demo_args(output, *extra)`: the CLI arguments that built `demo_shards`, for `output`."""
    return demo_shard_args


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo_shards") / "corpus"
    result = run_module("data_pipeline.shards", *demo_shard_args(root))
    if result.returncode != 0:
        raise RuntimeError(f"building the demo corpus failed:\n{result.stdout}\n{result.stderr}")
    return root


@pytest.fixture(scope="session")
def trained_run(demo_shards, tmp_path_factory) -> Path:
    """A tiny run trained on the demo shards: checkpoints at steps 2, 4 and 6 (the eval tests)."""
    return train_tiny_run(demo_shards / "train", tmp_path_factory.mktemp("eval_trained"),
                          "train.steps=6", "checkpoint.every=2", "checkpoint.keep=10")
