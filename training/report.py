"""Print what a run built and how well it learned, as one table a newcomer can read.

    python -m training.report --run-dir runs/tiny_demo --shards data/demo
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from training import checkpoint as ckpt


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _shard_rows(root: Path) -> list[tuple[str, str]]:
    rows = []
    folders = [root / name for name in ("train", "val", "heldout") if (root / name).is_dir()] or [root]
    for folder in folders:
        sizes = _read_json(folder / "sizes.json") or {}
        manifest = _read_json(folder / "manifest.json") or {}
        samples = sum(sizes.values())
        text = f"{samples:,} image-text pairs in {len(sizes)} shards"
        totals = manifest.get("totals", {})
        if "success_rate" in totals:
            failed = totals.get("urls", 0) - totals.get("success", 0)
            reasons = ", ".join(f"{n} {why}" for why, n in manifest.get("failure_reasons", {}).items())
            text += f"; {100 * totals['success_rate']:.1f}% of URLs downloaded"
            if failed:
                text += f", {failed} failed ({reasons})" if reasons else f", {failed} failed"
        rows.append((f"shards: {folder.name}", text))
    return rows


def _curation_rows(keep_list: str | None, shards: Path | None) -> list[tuple[str, str]]:
    """What curation removed before training (a run on a keep-list): its report's per-step
    counts, and, for a noisy demo pool, how much of each planted kind is gone."""
    if not keep_list:
        return []
    from data_pipeline.curate import truth
    from data_pipeline.curate.decisions import REPORT_JSON

    data = _read_json(Path(keep_list).parent / REPORT_JSON)
    if data is None:
        return [("curation", f"trained on the keep-list {keep_list} (no {REPORT_JSON} beside it)")]
    steps = ", ".join(f"{r['step']} -{r['removed']:,}" for r in data["steps"])
    rows = [("curation", f"{data['pairs_in']:,} pairs in -> {data['pairs_kept']:,} kept "
                         f"({100 * data['pairs_kept'] / max(1, data['pairs_in']):.1f}%): {steps}")]
    if shards is not None and truth.has_truth(shards):
        import pandas as pd

        keep = pd.read_parquet(keep_list)
        rows.append(("planted noise removed", truth.summary_line(keep, truth.truth_by_key(shards))))
    return rows


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r]  # in-training eval records carry no loss


def _precision(config: dict) -> str:
    # Runs saved before [engine] held the precision kept it in [train].
    return (config.get("engine") or {}).get("precision") or config["train"]["precision"]


def build_rows(run_dir: Path, shards: Path | None) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    if shards is not None:
        rows += _shard_rows(shards)
    found = ckpt.evaluable_checkpoints(run_dir)
    latest = found[-1] if found else None
    records = _metrics(run_dir)
    if latest is None or not records:
        rows.append(("training", f"no finished run in {run_dir}"))
        return rows
    state = ckpt.load_checkpoint(latest)
    config = state["config"]
    params = sum(t.numel() for t in state["model"].values())
    batch = config["data"]["batch_size"] * state.get("world_size", 1) * config["train"]["accum_steps"]
    chance = math.log(batch)
    first, last = records[0], records[-1]
    speeds = [r["samples_per_s"] for r in records[1:]] or [first["samples_per_s"]]
    rows += _curation_rows(config["data"].get("keep_list"), shards)
    rows += [
        ("model", f"{config['model']['name']}: {params / 1e6:.2f}M parameters, "
                  f"{_precision(config)} on {state.get('world_size', 1)} rank(s)"),
        ("training", f"{state['step']} steps x batch {batch} = {state['metrics']['samples_seen']:,} "
                     f"samples, {sum(speeds) / len(speeds):.0f} samples/s"),
        ("contrastive loss", f"{first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at "
                             f"step {last['step']} (chance level ln({batch}) = {chance:.3f})"),
        ("temperature", f"logit scale {first['logit_scale']:.1f} -> {last['logit_scale']:.1f}"),
        ("skipped", f"{int(last.get('skipped_samples', 0))} corrupt samples, "
                    f"{int(last.get('skipped_steps', 0))} non-finite steps"),
        ("checkpoint", str(latest)),
    ]
    return rows


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 3 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k.ljust(width)} | {v}" for k, v in rows), line])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.report", description=__doc__)
    parser.add_argument("--run-dir", required=True, type=Path)
    parser.add_argument("--shards", type=Path, default=None)
    args = parser.parse_args(argv)
    print(format_table(build_rows(args.run_dir, args.shards)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
