"""Atomic, self-describing training checkpoints.

Layout: `RUN_DIR/checkpoints/step_00001000.pt`, one file per saved step, written to a temporary
file in the same folder and renamed into place, so a crash mid-write never leaves a truncated
checkpoint under a real name. Only the newest `keep` are kept.

Format (a dict that loads with `torch.load(path, weights_only=True)`: tensors and plain Python
data only):
    format_version  int, currently 1
    step            optimizer steps completed
    model           state dict of the bare model (no DDP/compile prefixes)
    optimizer       torch optimizer state dict
    scaler          GradScaler state dict (empty unless fp16)
    rng             list over ranks of {"torch", "numpy", "python"} generator states
    data            list over ranks of the train loader's resume state
    config          the run's full config as plain data; config["model_config"] is the fitted
                    ClipModelConfig (training.model.trained rebuilds the model from it)
    tokenizer       the tokenizer as its JSON string (checkpoints are self-contained)
    world_size      ranks that wrote it (rng and data hold one entry per rank)
    wandb_run_id    so a resumed run continues the same W&B run (or None)
    metrics         counters that must survive a restart (skipped steps, samples seen, ...)
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"^step_(\d{8})\.pt$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary files are never listed)."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step_{step:08d}.pt"
    state = {"format_version": FORMAT_VERSION, "step": step, **state}
    # A writer killed mid-write (kill -9, node loss) leaves its temporary file behind; only one
    # process (rank 0) ever writes here, so any that remain are stale.
    for stale in folder.glob(".tmp_*"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)  # atomic on POSIX: readers see the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return target


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    version = state.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {version} is not supported (expected {FORMAT_VERSION})")
    return state


def capture_rng() -> dict[str, Any]:
    """This process's generator states, as weights_only-loadable data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    python_state = state["python"]
    random.setstate((python_state[0], tuple(python_state[1]), python_state[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
