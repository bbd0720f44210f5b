"""What the curation decided, written out: the keep-list, DataComp's uid subset, the report.

The keep-list (`keep_list.parquet`) has one row per scanned pair: shard, key, kept, the step
that removed it and why (e.g. `caption` / "language: de", `exact_duplicates` / "copy of
00003.tar#000000017"), the normalised caption and the CLIP score where one was computed. It is
sorted by shard (pool order), so a reader that wants one shard's keys reads only its row groups;
the trainer reads it as `data.keep_list`.

DataComp's resharder takes a subset as a .npy of the kept uids: a structured array of dtype
"u8,u8" (the 128-bit uid's two 64-bit halves, from its 32 hex digits), sorted (DataComp's
README, "Selecting samples in the filtering track"). It is written when the pool has a uid column.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

KEEP_LIST = "keep_list.parquet"
DATACOMP_UIDS = "datacomp_uids.npy"
REPORT_JSON = "report.json"
REPORT_TEXT = "report.txt"
ROW_GROUP = 100_000


@dataclass
class StepResult:
    """One step's outcome. removed: rows this step removed, among those still in when it ran.
    would_remove: rows it flags over the whole pool (the same as `removed` for the dedup steps
    and balancing, which only make sense on what is left): the overlaps are computed from it."""

    name: str
    removed: np.ndarray
    would_remove: np.ndarray
    detail: np.ndarray  # object [N]: why, for flagged rows
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def final_reasons(n: int, steps: list[StepResult]) -> tuple[np.ndarray, np.ndarray]:
    """(object [N] step name that removed each row or None, object [N] its detail)."""
    step, detail = np.full(n, None, dtype=object), np.full(n, None, dtype=object)
    for result in steps:
        mask = result.removed & (step == None)  # noqa: E711 - elementwise on an object array
        step[mask], detail[mask] = result.name, result.detail[mask]
    return step, detail


def keep_list_frame(pool: pd.DataFrame, steps: list[StepResult]) -> pd.DataFrame:
    step, detail = final_reasons(len(pool), steps)
    frame = pd.DataFrame({
        "shard": pool["shard"].astype(str), "key": pool["key"].astype(str),
        "kept": pd.Series(step == None, dtype=bool),  # noqa: E711
        "removed_by": step, "reason": detail, "caption": pool["caption"],
    })
    if "clip_score" in pool:
        frame["clip_score"] = pool["clip_score"]
    if "uid" in pool:
        frame["uid"] = pool["uid"]
    return frame


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_keep_list(frame: pd.DataFrame, out: Path) -> Path:
    path = out / KEEP_LIST
    _atomic(path, lambda tmp: frame.to_parquet(tmp, index=False, row_group_size=ROW_GROUP))
    return path


def datacomp_uid_array(uids) -> np.ndarray:
    pairs = [(int(uid[:16], 16), int(uid[16:32], 16)) for uid in uids]
    array = np.array(pairs, dtype=np.dtype("u8,u8"))
    array.sort()
    return array


def write_datacomp_uids(frame: pd.DataFrame, out: Path) -> Path | None:
    """The kept uids in DataComp's subset format, or None when the pool has no valid uids."""
    if "uid" not in frame:
        return None
    uids = frame.loc[frame["kept"], "uid"]
    if uids.isna().any() or not uids.map(lambda u: isinstance(u, str) and len(u) == 32).all():
        return None
    path = out / DATACOMP_UIDS
    array = datacomp_uid_array(list(uids))
    _atomic(path, lambda tmp: np.save(open(tmp, "wb"), array))
    return path


def overlaps(steps: list[StepResult]) -> dict[str, dict[str, int]]:
    """Pairs flagged by both of two steps (the diagonal: flagged by the step at all)."""
    return {a.name: {b.name: int((a.would_remove & b.would_remove).sum()) for b in steps}
            for a in steps}


def report(pool_size: int, steps: list[StepResult], extra: dict) -> dict:
    remaining, rows = pool_size, []
    for result in steps:
        removed = int(result.removed.sum())
        rows.append({"step": result.name, "in": remaining, "removed": removed,
                     "kept": remaining - removed, "flagged_over_whole_pool": int(result.would_remove.sum()),
                     "seconds": round(result.seconds, 2), "notes": result.notes})
        remaining -= removed
    return {"pairs_in": pool_size, "pairs_kept": remaining, "steps": rows,
            "overlaps": overlaps(steps), **extra}


def format_report(data: dict) -> str:
    lines = [f"curation: {data['pairs_in']:,} pairs in, {data['pairs_kept']:,} kept "
             f"({100 * data['pairs_kept'] / max(1, data['pairs_in']):.1f}%)"]
    width = max([len(r["step"]) for r in data["steps"]] + [4])
    lines.append(f"  {'step':<{width}}  {'in':>9}  {'removed':>9}  {'kept':>9}  {'time':>7}")
    for row in data["steps"]:
        lines.append(f"  {row['step']:<{width}}  {row['in']:>9,}  {row['removed']:>9,}  "
                     f"{row['kept']:>9,}  {row['seconds']:>6.1f}s")
        lines.extend(f"  {'':<{width}}    {note}" for note in row["notes"])
    names = [r["step"] for r in data["steps"]]
    if len(names) > 1:
        lines.append("  overlaps (pairs flagged by both steps, over the whole pool):")
        short = [n[:10] for n in names]
        lines.append("  " + " " * (width + 2) + "".join(f"{s:>12}" for s in short))
        for a in names:
            lines.append(f"  {a:<{width}}  " + "".join(f"{data['overlaps'][a][b]:>12,}" for b in names))
    return "\n".join(lines)


def write_report(data: dict, out: Path) -> str:
    text = format_report(data)
    _atomic(out / REPORT_JSON, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2)))
    _atomic(out / REPORT_TEXT, lambda tmp: Path(tmp).write_text(text + "\n"))
    return text
