"""Results as plain JSON: one file per (checkpoint, dataset, task), the record of which
checkpoints were evaluated with which suites, and the printed summary table.

Layout under the output folder (default RUN_DIR/eval/):
    step_00001000/demo_heldout.zeroshot_classification.json
    step_00001000/demo_val.zeroshot_retrieval.json
    done.json            {"checkpoints": {"step_00001000.pt": {"step": 1000, "suites": {...}}}}
    metrics.png          every metric against training step (eval.plots)

A result file:
    {"checkpoint": ".../step_00001000.pt", "step": 1000, "dataset": "cifar10",
     "task": "zeroshot_classification", "metrics": {"acc1": 0.41, ...},
     "chance": {"acc1": 0.1, ...}, "num_images": 10000, "details": {...}, "seconds": 12.3}
Metric values are fractions in [0, 1] (CLIP_benchmark's convention); tables print percent.
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

DONE_FILE = "done.json"


@dataclass
class EvalResult:
    dataset: str
    task: str  # "zeroshot_classification", "zeroshot_retrieval", "zeroshot_association", "linear_probe", ...
    metrics: dict[str, float]
    chance: dict[str, float] = field(default_factory=dict)
    num_images: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def write_json_atomic(path: Path, data: Any) -> None:
    """Write to a temporary file and rename: a reader (or a crash) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=False)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def result_path(out_dir: Path, checkpoint: Path, result: EvalResult) -> Path:
    return out_dir / checkpoint.stem / f"{result.dataset}.{result.task}.json"


def write_result(out_dir: Path, checkpoint: Path, step: int, result: EvalResult) -> Path:
    path = result_path(out_dir, checkpoint, result)
    write_json_atomic(path, {"checkpoint": str(checkpoint), "step": step, **asdict(result)})
    return path


def read_results(out_dir: Path) -> list[dict[str, Any]]:
    """Every result file under out_dir, sorted by step, then dataset, then task."""
    found = []
    for path in Path(out_dir).glob("*/*.json"):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and {"step", "dataset", "task", "metrics"} <= data.keys():
            found.append(data)
    return sorted(found, key=lambda r: (r["step"], r["dataset"], r["task"]))


# -- done records --------------------------------------------------------------------------------


def read_done(out_dir: Path) -> dict[str, Any]:
    path = Path(out_dir) / DONE_FILE
    if not path.is_file():
        return {"checkpoints": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def suites_done(out_dir: Path, checkpoint: Path) -> set[str]:
    entry = read_done(out_dir)["checkpoints"].get(checkpoint.name, {})
    return set(entry.get("suites", {}))


def mark_done(out_dir: Path, checkpoint: Path, step: int, suites: list[str]) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A watcher and a one-off `eval.run --checkpoint` may share an output folder: the
    # read-modify-write happens under an exclusive lock so neither loses the other's entry.
    with open(out_dir / f"{DONE_FILE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done = read_done(out_dir)
        entry = done["checkpoints"].setdefault(checkpoint.name, {"step": step, "suites": {}})
        for suite in suites:
            entry["suites"][suite] = time.time()
        write_json_atomic(out_dir / DONE_FILE, done)


# -- tables --------------------------------------------------------------------------------------


def summary_rows(results: list[EvalResult]) -> list[tuple[str, str, str, str, str]]:
    rows = []
    for r in results:
        for name, value in r.metrics.items():
            chance = r.chance.get(name)
            rows.append((
                r.dataset, r.task, name, f"{100 * value:6.2f}%",
                f"{100 * chance:6.2f}%" if chance is not None else "",
            ))
    return rows


def format_summary(results: list[EvalResult], title: str) -> str:
    header = ("dataset", "task", "metric", "value", "chance")
    rows = [header, *summary_rows(results)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows[1:]]
    return "\n".join(lines)
