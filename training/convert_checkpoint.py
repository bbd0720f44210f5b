"""Convert between sharded checkpoints (engine.name=fsdp2) and our single-file format.

    python -m training.convert_checkpoint RUN/checkpoints/step_00001000.dcp   # -> step_00001000.pt
    python -m training.convert_checkpoint RUN/checkpoints/step_00001000.pt    # -> step_00001000.dcp

A sharded folder becomes one file that eval, search, the OpenCLIP export and the ddp engine read
(full weights, AdamW state keyed by position); a single file becomes a sharded folder the fsdp2
engine resumes from on any number of ranks. Runs in one process, no torchrun: the whole model and
optimizer state must fit in this machine's memory. The output is written beside the input unless
--out says otherwise, atomically, and never over an existing checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from data_pipeline.errors import UserError
from training import checkpoint as ckpt
from training.checkpoint import RUN_STATE, read_full
from training.parallel.dcp_checkpoint import from_single_file


def sharded_to_single_file(source: Path, out: Path) -> Path:
    state = read_full(source)
    # The single-file format is the ddp engine's: the file resumes there too.
    state = {**state, "engine": "ddp", "converted_from": "fsdp2"}
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=".tmp_", suffix=".pt")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def single_file_to_sharded(source: Path, out: Path) -> Path:
    state = ckpt.load_checkpoint(source)
    if not (state.get("optimizer") or {}).get("state"):
        raise UserError(f"{source} holds no optimizer state (a DeepSpeed run's model-only file, or "
                        f"one saved before the first step), so a resume from it could not continue "
                        f"AdamW; nothing written")
    scalars = {name for name, value in state["model"].items() if value.dim() == 0}
    model, optimizer, run_state = from_single_file(state, scalars)
    tmp = out.with_name(".tmp_" + out.name)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.save({"format_version": ckpt.FORMAT_VERSION, "step": state["step"], **run_state,
                    "engine": "fsdp2", "scaler": {}, "scalar_params": sorted(scalars)}, tmp / RUN_STATE)
        # One process holds everything: DCP writes it as one shard; loading reshards it.
        with warnings.catch_warnings():  # DCP warns that no process group means one process: yes
            warnings.simplefilter("ignore", UserWarning)
            dcp.save({"model": model, "optimizer": optimizer}, checkpoint_id=str(tmp), no_dist=True)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def convert(source: Path, out: Path | None = None) -> Path:
    if source.is_dir() and source.suffix == ckpt.SHARDED_SUFFIX:
        target, to_single = out or source.with_suffix(".pt"), True
    elif source.is_file():
        target, to_single = out or source.with_suffix(ckpt.SHARDED_SUFFIX), False
    else:
        raise UserError(f"{source}: neither a checkpoint file nor a sharded checkpoint folder (step_N.dcp)")
    if target.exists():
        raise UserError(f"{target} already exists; pass --out to write elsewhere (nothing is overwritten)")
    target.parent.mkdir(parents=True, exist_ok=True)
    return sharded_to_single_file(source, target) if to_single else single_file_to_sharded(source, target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.convert_checkpoint",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("source", type=Path, help="a step_N.dcp folder or a step_N.pt file")
    parser.add_argument("--out", type=Path, help="where to write (default: beside the source)")
    args = parser.parse_args(argv)
    try:
        written = convert(args.source, args.out)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {written}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
