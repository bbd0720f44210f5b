"""Sharded checkpoints with torch.distributed.checkpoint (DCP): every rank writes its own shard,
in the background, and a checkpoint loads onto any number of ranks (DCP reshards on load).

Layout, beside the single files of training/checkpoint.py:
    RUN_DIR/checkpoints/step_00001000.dcp/
        .metadata, __0_0.distcp, __1_0.distcp, ...   DCP's: {"model": ..., "optimizer": ...}
        run_state.pt                                 rank 0's: everything else a single-file
                                                     checkpoint holds (step, rng, data, config,
                                                     tokenizer, metrics, ...), weights_only data
A save goes to `.tmp_step_00001000.dcp/` and is renamed into place by rank 0 only once every
rank's shard and DCP's metadata are on disk, so a crash mid-save leaves the previous checkpoint
as the newest one and nothing half-written under a real name (listings skip `.tmp_*`).

The model and optimizer states are keyed by parameter name (DCP's convention). The single-file
format keys the optimizer's per-parameter state by position; `checkpoint.to_single_file`/`from_single_file`
translate between the two (the order is the optimizer's parameter order in both), so a sharded
checkpoint converts to a file every reader of ours takes, and back.

Trust: DCP reads its `.metadata` with pickle (torch 2.14's FileSystemReader), so unlike our
single files (weights_only) a sharded checkpoint from someone else can run code when loaded or
converted: load only your own runs' folders.
"""

from __future__ import annotations

import shutil
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from data_pipeline.errors import UserError
from training import checkpoint as ckpt



def sharded_path(run_dir: str | Path, step: int) -> Path:
    return ckpt.checkpoint_dir(run_dir) / f"step_{step:08d}{ckpt.SHARDED_SUFFIX}"


class PendingSave:
    """A checkpoint being written in the background. On rank 0, once DCP's future completes (all
    shards and the metadata written: DCP's coordinator gathers every rank's write result before it
    writes the metadata), the folder is renamed into place and older ones beyond `keep` removed."""

    def __init__(self, future: Future, tmp: Path, final: Path, run_dir: Path, keep: int, is_main: bool):
        self.final = final
        self._future = future
        self._finished = threading.Event()
        self._error: BaseException | None = None
        self._tmp, self._run_dir, self._keep, self._is_main = tmp, run_dir, keep, is_main
        # Runs in DCP's writer thread when the write ends, so the checkpoint appears as soon as
        # it is complete even if the loop does not ask for hours.
        future.add_done_callback(self._finish)

    def _finish(self, future: Future) -> None:
        try:
            if future.exception() is None and self._is_main:
                if self.final.exists():  # the same step saved before (a re-run): replaced whole
                    shutil.rmtree(self.final)
                self._tmp.rename(self.final)
                sharded = [p for p in ckpt.list_checkpoints(self._run_dir, sharded=True) if p.is_dir()]
                for old in sharded[:-self._keep]:
                    ckpt.remove_checkpoint(old)
        except BaseException as exc:  # noqa: BLE001 - re-raised in wait(), on the loop's thread
            self._error = exc
        finally:
            self._finished.set()

    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self) -> Path:
        """Block until the checkpoint is complete (and, on rank 0, in place); raise its error."""
        self._future.result()
        self._finished.wait()
        if self._error is not None:
            raise self._error
        return self.final


def start_save(
    model_state: dict[str, Any], optimizer_state: dict[str, Any], run_state: dict[str, Any],
    run_dir: Path, step: int, keep: int, is_main: bool, group: dist.ProcessGroup | None,
) -> PendingSave:
    """Stage the states (DCP copies them, so training may change the weights right after this
    returns) and write them in a background thread. Every rank calls this (collective)."""
    final = sharded_path(run_dir, step)
    tmp = final.with_name(".tmp_" + final.name)
    if is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        # A save killed mid-write leaves its temporary folder; only this run writes here and no
        # save is in flight now (the caller waited for the previous one), so any that remain are stale.
        for stale in final.parent.glob(f".tmp_*{ckpt.SHARDED_SUFFIX}"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        torch.save({"format_version": ckpt.FORMAT_VERSION, "step": step, **run_state}, tmp / ckpt.RUN_STATE)
    # All ranks (in `group`): no rank writes its shard before rank 0 has made the folder afresh.
    dist.barrier(group=group)
    future = dcp.async_save({"model": model_state, "optimizer": optimizer_state},
                            checkpoint_id=str(tmp), process_group=group)
    return PendingSave(future, tmp, final, run_dir, keep, is_main)


def load_into(model_state: dict[str, Any], optimizer_state: dict[str, Any], path: Path,
              group: dist.ProcessGroup | None) -> None:
    """Fill the (sharded) states in place from `path`, whatever world size wrote it. Every rank
    calls this (collective); each reads the parts of the saved tensors its shards cover."""
    dcp.load({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(path),
             process_group=group)


def from_single_file(state: dict[str, Any], scalar_names: set[str]) -> tuple[dict, dict, dict]:
    """(model, optimizer keyed by name, run state) from a single-file checkpoint, scalar
    parameters as shape [1] (how the sharded engine holds them)."""
    names: dict[int, str] = {}
    groups = []
    optimizer = state.get("optimizer") or {}
    param_names = _parameter_names(state)
    for group in optimizer.get("param_groups", []):
        for i in group["params"]:
            names[i] = param_names[i]
        groups.append({**group, "params": [names[i] for i in group["params"]]})
    per_param = {
        names[i]: {k: v.reshape(1) if names[i] in scalar_names and k != "step" else v for k, v in s.items()}
        for i, s in optimizer.get("state", {}).items()
    }
    model = {k: v.reshape(1) if k in scalar_names else v for k, v in state["model"].items()}
    run_state = {k: v for k, v in state.items() if k not in ("model", "optimizer", "format_version", "step")}
    return model, {"state": per_param, "param_groups": groups}, run_state


def _parameter_names(state: dict[str, Any]) -> list[str]:
    """Parameter names in the optimizer's order, rebuilt from the checkpoint's own config (the
    single-file format numbers the optimizer's parameters; a name is needed to shard them)."""
    from training.model import build_model
    from training.model.configs import ClipModelConfig
    from training.optim import OptimConfig, build_optimizer

    try:
        model_cfg = ClipModelConfig.from_dict(state["config"]["model_config"])
        optim_cfg = OptimConfig(**state["config"]["optim"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"the checkpoint's config cannot rebuild its optimizer ({exc})") from None
    with torch.device("meta"):  # names and order only: no memory, no initialisation
        model = build_model(model_cfg)
    by_id = {id(p): n for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, optim_cfg)
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]
