"""A noisy demo pool's planted truth (noise.json, data_pipeline.demo_noise) against a keep-list.

Scores each curation step as a filter: per planted kind, how much of it is gone (recall), how
much its own step caught, that step's precision, and how many clean pairs it took. Used by the
demo's closing report (training.report) and by bench/curation.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

from data_pipeline.demo_build import NOISE_FILE

# Which step is meant to catch each planted kind (the precision/recall pairing).
STEP_FOR = {
    "exact_duplicate": "exact_duplicates",
    "near_duplicate": "near_duplicates_pixels",
    "mismatched_caption": "alignment",
    "other_language": "captions",
    "boilerplate": "captions",
    "contamination": "decontaminate",
}
# Planted copies of another train image: found when at most one of copy and source survives.
COPY_KINDS = ("exact_duplicate", "near_duplicate")


def _shard_id(shard: str) -> str:
    """A local shard path made absolute, so a keep-list written from `--shards data/x` meets
    the truth read from another working directory or spelling of the path."""
    return shard if "://" in shard else str(Path(shard).resolve())


def _with_truth(keep: pd.DataFrame, truth: pd.DataFrame) -> pd.DataFrame:
    return keep.assign(shard=keep["shard"].map(_shard_id)).merge(truth, on=["shard", "key"], how="left")


def truth_by_key(pool: Path) -> pd.DataFrame:
    """(shard, key, file, kind, of) for every train sample; kind "clean" for unplanted ones,
    `of` the file a planted copy copies."""
    planted = json.loads((Path(pool) / NOISE_FILE).read_text())["rows"]
    rows = []
    for parquet in sorted((Path(pool) / "train").glob("*.parquet")):
        table = pq.read_table(parquet, columns=["key", "url", "status"]).to_pydict()
        tar = _shard_id(str(parquet.with_suffix(".tar")))
        for key, url, status in zip(table["key"], table["url"], table["status"]):
            if status == "success":
                name = url.rsplit("/", 1)[1]
                info = planted.get(name, {})
                rows.append({"shard": tar, "key": key, "file": name, "kind": info.get("kind", "clean"),
                             "of": info.get("of")})
    return pd.DataFrame(rows)


def filter_scores(keep: pd.DataFrame, truth: pd.DataFrame) -> list[dict]:
    """Per planted kind: recall, the share its own step caught, that step's precision, and the
    share of clean pairs the step removed. A planted copy and its source are one image: the
    copy counts as found when at most one of the two survives (whichever it is), and a
    dedup step's removal is correct when it removes a copy or a source of one."""
    merged = _with_truth(keep, truth)
    by_file = merged.set_index("file")
    clean = merged["kind"] == "clean"
    rows = []
    for kind, step in STEP_FOR.items():
        planted = merged[merged["kind"] == kind]
        by_step = merged["removed_by"] == step
        if kind in COPY_KINDS:
            pairs = [(c, o) for c, o in zip(planted["file"], planted["of"]) if o in by_file.index]
            found = sum(not by_file.loc[[c, o], "kept"].all() for c, o in pairs)
            recall = found / max(1, len(pairs))
            caught = sum((by_file.loc[[c, o], "removed_by"] == step).any() for c, o in pairs) / max(1, len(pairs))
            involved = set(planted["file"]) | set(planted["of"])
            correct = (by_step & merged["file"].isin(involved)).sum()
            clean_removed = (by_step & clean & ~merged["file"].isin(involved)).sum()
        else:
            recall = (~planted["kept"]).mean() if len(planted) else 0.0
            caught = (planted["removed_by"] == step).mean() if len(planted) else 0.0
            meant = merged["kind"].isin([k for k, s in STEP_FOR.items() if s == step])
            correct = (by_step & meant).sum()
            clean_removed = (by_step & clean).sum()
        rows.append({
            "kind": kind, "step": step, "planted": len(planted), "recall": round(float(recall), 3),
            "caught_by_its_step": round(float(caught), 3),
            "step_precision": round(float(correct / max(1, by_step.sum())), 3),
            "clean_removed_by_step": round(float(clean_removed / max(1, clean.sum())), 4),
        })
    return rows


KIND_NAMES = {"exact_duplicate": "exact dups", "near_duplicate": "near dups",
              "mismatched_caption": "mismatched captions", "other_language": "other languages",
              "boilerplate": "boilerplate", "contamination": "eval copies"}


def has_truth(pool: Path) -> bool:
    return (Path(pool) / NOISE_FILE).is_file()


def clean_removed(keep: pd.DataFrame, truth: pd.DataFrame) -> float:
    """Share of clean pairs that curation removed, a planted copy's source excepted (removing
    the source instead of the copy still leaves one copy)."""
    merged = _with_truth(keep, truth)
    sources = set(merged.loc[merged["kind"].isin(COPY_KINDS), "of"])
    clean = (merged["kind"] == "clean") & ~merged["file"].isin(sources)
    return float((clean & ~merged["kept"]).sum() / max(1, clean.sum()))


def summary_line(keep: pd.DataFrame, truth: pd.DataFrame) -> str:
    """One line: the share of each planted kind removed, and of the clean pairs."""
    parts = [f"{KIND_NAMES[r['kind']]} {100 * r['recall']:.0f}% of {r['planted']:,}"
             for r in filter_scores(keep, truth)]
    return f"{', '.join(parts)}; clean pairs {100 * clean_removed(keep, truth):.1f}%"
