"""Which samples trained the model: `log.sample_keys=true` writes, per rank, one line per sample
taken, `STEP<TAB>SHARD#KEY`, to RUN_DIR/sample_keys/rank_NNNNN.tsv.

An audit trail (a test set leaking into training, a takedown request: was this image used, and
when?) that webdataset and OpenCLIP do not keep. Lines are buffered and written when a
checkpoint is, so the log never costs a step; on resume, lines past the checkpoint's step (the
steps a crash lost, which are trained again) are dropped first, so each step appears once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


class SampleLog:
    def __init__(self, run_dir: Path, rank: int, resumed_step: int) -> None:
        self.path = Path(run_dir) / "sample_keys" / f"rank_{rank:05d}.tsv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._pending: list[str] = []
        if self.path.exists():
            # A line cut short by a crash mid-write has no newline: dropped with the lost steps.
            kept = [line for line in self.path.read_text(encoding="utf-8").splitlines(True)
                    if line.endswith("\n") and int(line.split("\t", 1)[0]) <= resumed_step]
            partial = self.path.with_suffix(".tsv.partial")
            partial.write_text("".join(kept), encoding="utf-8")
            os.replace(partial, self.path)

    def record(self, step: int, keys: Sequence[str]) -> None:
        self._pending += [f"{step}\t{key}\n" for key in keys]

    def flush(self) -> None:
        if self._pending:
            with self.path.open("a", encoding="utf-8") as f:
                f.write("".join(self._pending))
            self._pending = []


def read_sample_log(run_dir: Path) -> dict[int, list[tuple[int, str]]]:
    """rank -> [(step, key), ...] of a run's sample log."""
    logs = {}
    for path in sorted((Path(run_dir) / "sample_keys").glob("rank_*.tsv")):
        rows = [line.rstrip("\n").split("\t", 1) for line in path.read_text(encoding="utf-8").splitlines()]
        logs[int(path.stem.split("_")[1])] = [(int(step), key) for step, key in rows]
    return logs
