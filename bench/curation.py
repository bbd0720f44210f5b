"""Curation measured: each filter against the planted truth, and curated vs raw training.

The pool is the demo corpus with web-like noise planted (`data_pipeline.shards --noise`, the
truth in noise.json: data_pipeline.demo_noise); the trusted seed set for the bootstrapped filter
model is a separate clean demo corpus (another seed), as DFN trains its filter on curated data.
The curation runs as a user would run it (`python -m data_pipeline.curate` with `--bootstrap`).
Then the same trainer, config and number of steps trains on the raw pool and on the curated
keep-list, for each seed, and both are scored by eval.demo's zero-shot protocol on the pool's
own val/ and heldout/ images (which decontamination keeps out of training).

    .venv/bin/python -m bench.curation            # 10k-pair pool, 3 seeds, ~25 min on 2 cores
    .venv/bin/python -m bench.curation --quick    # 2k pairs, 1 seed: a smoke run, not for quoting

-> bench/curation.md and .json. Work files in data/bench/curation (gitignored).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = REPO / "data" / "bench" / "curation"
# Which step is meant to catch each planted kind (the precision/recall pairing).
STEP_FOR = {
    "exact_duplicate": "exact_duplicates",
    "near_duplicate": "near_duplicates_pixels",
    "mismatched_caption": "alignment",
    "other_language": "captions",
    "boilerplate": "captions",
    "contamination": "decontaminate",
}


def _run(args: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run([sys.executable, "-m", *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} ... failed ({done.returncode}); see {log}")
    return time.perf_counter() - started


def build(samples: int, seed_samples: int) -> tuple[Path, Path]:
    pool, trusted = WORK / "pool", WORK / "seed"
    common = ["--image-size", "64", "--samples-per-shard", "2000", "--incremental"]
    _run(["data_pipeline.shards", "--output", str(pool), "--num-samples", str(samples), "--noise", *common],
         WORK / "pool.log")
    _run(["data_pipeline.shards", "--output", str(trusted), "--num-samples", str(seed_samples),
          "--seed", "101", *common], WORK / "seed.log")
    return pool, trusted


def truth_by_key(pool: Path) -> pd.DataFrame:
    """(shard, key, file, kind, of) for every train sample; kind "clean" for unplanted ones,
    `of` the file a planted copy copies."""
    planted = json.loads((pool / "noise.json").read_text())["rows"]
    rows = []
    for parquet in sorted((pool / "train").glob("*.parquet")):
        table = pq.read_table(parquet, columns=["key", "url", "status"]).to_pydict()
        tar = str(parquet.with_suffix(".tar"))
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
    merged = keep.merge(truth, on=["shard", "key"], how="left")
    by_file = merged.set_index("file")
    clean = merged["kind"] == "clean"
    rows = []
    for kind, step in STEP_FOR.items():
        planted = merged[merged["kind"] == kind]
        by_step = merged["removed_by"] == step
        if kind in ("exact_duplicate", "near_duplicate"):
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


def train_and_score(pool: Path, run_dir: Path, steps: int, seed: int, keep_list: Path | None) -> dict:
    from eval.config import InferenceConfig
    from eval.demo import evaluate_demo
    from training.model.trained import load_trained_model, resolve_checkpoint

    args = ["training.main", "--config", "configs/tiny_demo.toml", f"data.train_shards={pool / 'train'}",
            f"tokenizer={WORK / 'tokenizer.json'}", f"train.run_dir={run_dir}", f"train.steps={steps}",
            f"train.seed={seed}", f"data.seed={seed}", "log.progress_bar=false", "checkpoint.resume=latest",
            f"checkpoint.every={steps}"]
    if keep_list is not None:
        args.append(f"data.keep_list={keep_list}")
    seconds = _run(args, run_dir.with_suffix(".log"))
    trained = load_trained_model(resolve_checkpoint(run_dir))
    results = evaluate_demo(trained, pool, InferenceConfig(batch_size=256, workers=1))
    by = {(r.dataset, r.task): r.metrics for r in results}
    held, val = by[("demo_heldout", "zeroshot_classification")], by[("demo_val", "zeroshot_classification")]
    return {"seed": seed, "train_s": round(seconds, 1), "heldout_acc1": held["acc1"],
            "heldout_shape_acc1": held["shape_acc1"], "val_acc1": val["acc1"]}


def _mean_range(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.1f}% ({100 * min(values):.1f}-{100 * max(values):.1f})"


def to_markdown(report: dict) -> str:
    lines = ["# Curation: filters against planted truth, curated vs raw training", "",
             f"Machine: {report['machine']}. Pool: {report['pool_pairs']:,} train pairs "
             f"({report['clean_pairs']:,} clean + planted noise, data_pipeline.demo_noise); trusted seed "
             f"set {report['seed_pairs']:,} clean pairs (another seed). Curation: `{report['curate_command']}` "
             f"({report['curate_s']:.0f} s, filter model training included).", "",
             "## Each filter against the planted truth", "",
             "| planted kind | n | its step | recall (removed at all) | caught by its step | step precision | clean pairs the step removed |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in report["filters"]:
        lines.append(f"| {r['kind']} | {r['planted']} | {r['step']} | {100 * r['recall']:.1f}% | "
                     f"{100 * r['caught_by_its_step']:.1f}% | {100 * r['step_precision']:.1f}% | "
                     f"{100 * r['clean_removed_by_step']:.2f}% |")
    lines += ["", "```", report["curation_report"], "```", "",
              f"## Curated vs raw, {report['steps']} steps of batch 128 each (same config, same steps)", "",
              "| data | held-out acc1 (mean, min-max) | held-out shape acc1 | val acc1 |", "|---|---:|---:|---:|"]
    for name in ("raw", "curated"):
        runs = report["training"][name]
        lines.append(f"| {name} | {_mean_range([r['heldout_acc1'] for r in runs])} | "
                     f"{_mean_range([r['heldout_shape_acc1'] for r in runs])} | {_mean_range([r['val_acc1'] for r in runs])} |")
    margin = [c["heldout_acc1"] - r["heldout_acc1"] for c, r in zip(report["training"]["curated"], report["training"]["raw"])]
    lines += ["", f"Held-out margin, curated - raw, per seed: {', '.join(f'{100 * m:+.1f}' for m in margin)} points "
              f"(mean {100 * statistics.mean(margin):+.1f}).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    args = parser.parse_args(argv)
    global WORK
    WORK = WORK / ("quick" if args.quick else "full")  # each size its own corpus and runs
    # The filter model: the demo's tiny_cnn, ~150 steps on the trusted set (what the demo needs
    # to tell colours apart, which is what a mismatched caption gets wrong first).
    samples, seed_samples, seeds, filter_epochs = (2000, 1000, 1, 2) if args.quick else (10_000, 4000, 3, 5)
    seeds = args.seeds or seeds
    WORK.mkdir(parents=True, exist_ok=True)
    pool, trusted = build(samples, seed_samples)
    from bench.machine import describe, one_line
    from training.text.tokenizer import main as train_tokenizer

    if not (WORK / "tokenizer.json").is_file():  # one tokenizer for both arms: the raw pool's captions
        train_tokenizer(["--shards", str(pool / "train"), "--out", str(WORK / "tokenizer.json")])
    curated = WORK / "curated"
    command = ["data_pipeline.curate", "--shards", str(pool / "train"), "--out", str(curated),
               "--bootstrap", str(trusted / "train"), "--bootstrap-set", f"train.epochs={filter_epochs}",
               "--clip-score-top", "0.9", "--no-hash-dedup", "--pixel-dedup", "--no-shards",
               "--decontaminate", f"demo={pool}", "--no-model-dedup"]
    curate_s = _run(command, WORK / "curate.log")
    keep = pd.read_parquet(curated / "keep_list.parquet")
    truth = truth_by_key(pool)
    report = {
        "machine": one_line(describe()), "pool_pairs": len(truth), "clean_pairs": int((truth["kind"] == "clean").sum()),
        "seed_pairs": seed_samples, "curate_command": "python -m " + " ".join(command), "curate_s": curate_s,
        "filters": filter_scores(keep, truth), "curation_report": (curated / "report.txt").read_text().rstrip(),
    }
    kept = int(keep["kept"].sum())
    report["steps"] = steps = 2 * kept // 128  # two passes over the curated set; raw gets the same steps
    report["training"] = {"raw": [], "curated": []}
    for seed in range(seeds):
        report["training"]["raw"].append(train_and_score(pool, WORK / f"raw_{seed}", steps, seed, None))
        report["training"]["curated"].append(
            train_and_score(pool, WORK / f"curated_{seed}", steps, seed, curated / "keep_list.parquet"))
        print(json.dumps({k: v[-1] for k, v in report["training"].items()}), flush=True)
    out = BENCH / ("curation_quick" if args.quick else "curation")
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
