"""Atomic, self-describing training checkpoints.

Layout: `RUN_DIR/checkpoints/step_00001000.pt`, one file per saved step, written to a temporary
file in the same folder and renamed into place, so a crash mid-write never leaves a truncated
checkpoint under a real name. Only the newest `keep` are kept. The fsdp2 engine writes sharded
checkpoints instead, folders `step_00001000.dcp/` (training/parallel/dcp_checkpoint.py), listed
here with `sharded=True`; `python -m training.convert_checkpoint` turns one into this format.

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
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data_pipeline.errors import UserError

FORMAT_VERSION = 1
SHARDED_SUFFIX = ".dcp"
RUN_STATE = "run_state.pt"  # in a sharded folder: rank 0's run state beside DCP's shards
_NAME = re.compile(r"^step_(\d{8})\.pt$")
_SHARDED_NAME = re.compile(r"^step_(\d{8})\.dcp$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | Path, sharded: bool = False) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary files and folders are never
    listed). Single files only, unless `sharded`: then sharded folders too, a folder after a file
    of the same step (a file converted from it), so a resume picks the folder."""
    folder = checkpoint_dir(run_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), 0, p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    if sharded:
        found += [(int(m.group(1)), 1, p) for p in folder.iterdir()
                  if (m := _SHARDED_NAME.match(p.name)) and p.is_dir()]
    return [p for _, _, p in sorted(found)]


def evaluable_checkpoints(run_dir: str | Path) -> list[Path]:
    """One finished checkpoint per saved step, oldest first, for readers of the model only (eval,
    its watcher, search, export): the single file where there is one, else the sharded folder
    (an fsdp2 run's), which `load_checkpoint` reads whole."""
    by_step = {}
    for path in list_checkpoints(run_dir, sharded=True):
        by_step.setdefault(int(path.name[5:13]), path)  # a file is listed before its folder
    return [by_step[step] for step in sorted(by_step)]


def is_sharded_checkpoint(path: Path) -> bool:
    return path.is_dir() and _SHARDED_NAME.match(path.name) is not None


def latest_checkpoint(run_dir: str | Path, sharded: bool = False) -> Path | None:
    found = list_checkpoints(run_dir, sharded)
    return found[-1] if found else None


def remove_checkpoint(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def save_checkpoint(run_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    folder = checkpoint_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step_{step:08d}.pt"
    state = {"format_version": FORMAT_VERSION, "step": step, **state}
    # A writer killed mid-write (kill -9, node loss) leaves its temporary file behind; only one
    # process (rank 0) ever writes here, so any that remain are stale.
    for stale in folder.glob(".tmp_*.pt"):
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


class CheckpointError(UserError):
    """A file that is not a loadable checkpoint of ours (one line: names the file, says why)."""


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Our checkpoint at `path`, loaded with weights_only=True: a file holding code (a pickled
    object) is refused, never run. Truncated, garbled or foreign files raise CheckpointError.
    A sharded folder (step_N.dcp) is read whole into the same format."""
    if Path(path).is_dir() and Path(path).suffix == SHARDED_SUFFIX:
        return read_full(Path(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except Exception as exc:  # noqa: BLE001 - torch raises many types for damaged or hostile files
        raise CheckpointError(f"{path}: not a loadable checkpoint ({_short_reason(exc)})") from None
    version = state.get("format_version") if isinstance(state, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format {version} is not supported (expected {FORMAT_VERSION})"
        )
    return state


# -- sharded folders (engine fsdp2; written by training/parallel/dcp_checkpoint.py), read whole


def read_run_state(path: Path) -> dict[str, Any]:
    """A sharded checkpoint's run_state.pt (small; every rank may read it)."""
    if not (path / ".metadata").is_file() or not (path / RUN_STATE).is_file():
        raise CheckpointError(f"{path}: not a complete sharded checkpoint (no .metadata or {RUN_STATE})")
    return load_checkpoint(path / RUN_STATE)


def read_full(path: Path) -> dict[str, Any]:
    """The whole checkpoint in one process, as the single-file format holds it: full tensors,
    the optimizer keyed by position, scalar parameters back to 0-dim. No process group needed."""
    # DCP's own DCP-to-torch.save converter reads this way (an empty state dict that the planner
    # fills from the metadata, no_dist); we keep the result in memory instead of writing it.
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state = read_run_state(path)
    tensors: dict[str, Any] = {}
    try:
        _load_state_dict(tensors, storage_reader=FileSystemReader(str(path)),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    except Exception as exc:  # noqa: BLE001 - DCP raises its own types for damaged folders
        raise CheckpointError(f"{path}: shards unreadable ({type(exc).__name__}: "
                                   f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ''})") from None
    return to_single_file(state, tensors["model"], tensors["optimizer"])


def to_single_file(run_state: dict[str, Any], model: dict[str, torch.Tensor],
                   optimizer: dict[str, Any]) -> dict[str, Any]:
    scalars = set(run_state.get("scalar_params", ()))
    model = {k: v.reshape(()) if k in scalars else v for k, v in model.items()}
    index: dict[str, int] = {}
    groups = []
    for group in optimizer.get("param_groups", []):
        ids = [index.setdefault(name, len(index)) for name in group["params"]]
        groups.append({**group, "params": ids})
    per_param = {
        index[name]: {k: v.reshape(()) if name in scalars and k != "step" else v for k, v in s.items()}
        for name, s in optimizer.get("state", {}).items()
    }
    state = {k: v for k, v in run_state.items() if k != "scalar_params"}
    return {**state, "model": model, "optimizer": {"state": per_param, "param_groups": groups}}


def _short_reason(exc: Exception) -> str:
    """The first line of torch's message, without its advice to load with weights_only=False
    (which would execute whatever the file holds)."""
    text = str(exc).strip()
    if "weights_only" in text or "Weights only load failed" in text:
        return "it holds objects other than tensors and plain data, which are never unpickled here"
    first = text.splitlines()[0] if text else type(exc).__name__
    return f"{type(exc).__name__}: {first[:200]}"


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
