"""Curation measured: each filter against the planted truth, and curated vs raw training.

The pool is the demo corpus with web-like noise planted (`data_pipeline.shards --noise`, the
truth in noise.json: data_pipeline.demo_noise); the trusted seed set for the bootstrapped filter
model is a separate clean demo corpus (another seed, drawn like the pool), as DFN trains its filter on curated data.
The curation runs as a user would run it (`python -m data_pipeline.curate` with `--bootstrap`).
Then the same trainer, config and number of steps trains on the raw pool and on the curated
keep-list, for each seed, and both are scored by eval.demo's zero-shot protocol on the pool's
own val/ and heldout/ images (which decontamination keeps out of training).

    .venv/bin/python -m bench.curation            # the demo's 20k-pair pool, 3 seeds, ~30 min on 2 cores
    .venv/bin/python -m bench.curation --quick    # 2k pairs, 1 seed: a smoke run, not for quoting

-> bench/curation.md and .json. Work files in data/bench/curation (gitignored).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pandas as pd

from data_pipeline.curate.truth import filter_scores, truth_by_key
from data_pipeline.demo_build import NOISE_FILE

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = REPO / "data" / "bench" / "curation"


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
    # The trusted set is drawn like the pool (over a random colour field, --texture) but holds
    # no noise, so the filter model learns on images that look like the ones it will score.
    _run(["data_pipeline.shards", "--output", str(trusted), "--num-samples", str(seed_samples),
          "--seed", "101", "--texture", *common], WORK / "seed.log")
    return pool, trusted


def uncontaminated_eval_root(pool: Path) -> Path:
    """The pool's val/ and heldout/ without the images that a planted train pair copies.

    The raw pool trains on ~1% copies of eval images with their own captions (planted
    "contamination"), some of them of the held-out colour x shape pairs: scored on every eval
    image, raw is no longer zero-shot on those, so both arms are also scored on the eval images
    no train pair copies."""
    dest = WORK / "eval_uncontaminated"
    rows = json.loads((pool / NOISE_FILE).read_text())["rows"].values()
    copied = {info["of"] for info in rows if info["kind"] == "contamination"}
    for split in ("val", "heldout"):
        (dest / split).mkdir(parents=True, exist_ok=True)
        for shard in sorted((pool / split).glob("*.tar")):
            with tarfile.open(shard) as src, tarfile.open(dest / split / shard.name, "w") as out:
                members = src.getmembers()
                drop = {m.name.split(".", 1)[0] for m in members if m.name.endswith(".json")
                        and json.load(src.extractfile(m)).get("url", "").rsplit("/", 1)[-1] in copied}
                for member in members:
                    if member.name.split(".", 1)[0] not in drop:
                        out.addfile(member, src.extractfile(member))
    shutil.copy(pool / "corpus.json", dest / "corpus.json")
    return dest


def score(run_dir: Path, pool: Path, clean_eval: Path) -> dict:
    """Zero-shot on all of the pool's eval images, and on those no train pair copies."""
    from eval.config import InferenceConfig
    from eval.demo import evaluate_demo
    from training.model.trained import load_trained_model, resolve_checkpoint

    trained = load_trained_model(resolve_checkpoint(run_dir))
    scores = {}
    for suffix, root in (("", pool), ("_uncontaminated", clean_eval)):
        results = evaluate_demo(trained, root, InferenceConfig(batch_size=256, workers=1))
        by = {(r.dataset, r.task): r.metrics for r in results}
        held, val = by[("demo_heldout", "zeroshot_classification")], by[("demo_val", "zeroshot_classification")]
        scores |= {f"heldout_acc1{suffix}": held["acc1"], f"heldout_shape_acc1{suffix}": held["shape_acc1"],
                   f"val_acc1{suffix}": val["acc1"]}
    return scores


def train_and_score(pool: Path, run_dir: Path, steps: int, seed: int, keep_list: Path | None,
                    clean_eval: Path) -> dict:
    args = ["training.main", "--config", "configs/tiny_demo.toml", f"data.train_shards={pool / 'train'}",
            f"tokenizer={WORK / 'tokenizer.json'}", f"train.run_dir={run_dir}", f"train.steps={steps}",
            f"train.seed={seed}", f"data.seed={seed}", "log.progress_bar=false", "checkpoint.resume=latest",
            f"checkpoint.every={steps}"]
    if keep_list is not None:
        args.append(f"data.keep_list={keep_list}")
    seconds = _run(args, run_dir.with_suffix(".log"))
    return {"seed": seed, "train_s": round(seconds, 1), **score(run_dir, pool, clean_eval)}


def _mean_range(values: list[float]) -> str:
    return f"{100 * statistics.mean(values):.1f}% ({100 * min(values):.1f}-{100 * max(values):.1f})"


def to_markdown(report: dict) -> str:
    lines = ["# Curation: filters against planted truth, curated vs raw training", "",
             f"Machine: {report['machine']}. Pool: {report['pool_pairs']:,} train pairs "
             f"({report['clean_pairs']:,} clean + planted noise, data_pipeline.demo_noise); trusted seed "
             f"set {report['seed_pairs']:,} clean pairs (another seed, drawn like the pool). Curation: `{report['curate_command']}` "
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
              "Scored on all of the pool's eval images, and (uncontaminated) on those that no planted "
              "train pair copies: raw trains on the copies, so on all images it is partly not zero-shot.", "",
              "| data | held-out acc1 (mean, min-max) | held-out shape acc1 | val acc1 "
              "| held-out acc1, uncontaminated | val acc1, uncontaminated |", "|---|---:|---:|---:|---:|---:|"]
    for name in ("raw", "curated"):
        runs = report["training"][name]
        cells = [_mean_range([r[k] for r in runs]) for k in ("heldout_acc1", "heldout_shape_acc1", "val_acc1")]
        cells += [_mean_range([r[k] for r in runs]) if all(k in r for r in runs) else "-"
                  for k in ("heldout_acc1_uncontaminated", "val_acc1_uncontaminated")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for key, what in (("heldout_acc1", "Held-out"), ("heldout_acc1_uncontaminated", "Held-out, uncontaminated,"),
                      ("val_acc1_uncontaminated", "Val, uncontaminated,")):
        pairs = list(zip(report["training"]["curated"], report["training"]["raw"]))
        if not all(key in c and key in r for c, r in pairs):
            continue
        margin = [c[key] - r[key] for c, r in pairs]
        lines.append(f"{what} margin, curated - raw, per seed: {', '.join(f'{100 * m:+.1f}' for m in margin)} "
                     f"points (mean {100 * statistics.mean(margin):+.1f}).")
    lines.append("")
    return "\n".join(lines)


def _write(report: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    text = to_markdown(report)
    out.with_suffix(".md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--clip-score-top", type=float, default=0.7,
                        help="the alignment cut, as `make demo` makes it (a top fraction of the pool)")
    parser.add_argument("--rescore", action="store_true",
                        help="score the finished runs of the last report again (no training), e.g. "
                             "after a change to the scoring, and rewrite the report")
    args = parser.parse_args(argv)
    global WORK
    WORK = WORK / ("quick" if args.quick else "full")  # each size its own corpus and runs
    out = BENCH / ("curation_quick" if args.quick else "curation")
    if args.rescore:
        report = json.loads(out.with_suffix(".json").read_text())
        pool = WORK / "pool"
        clean_eval = uncontaminated_eval_root(pool)
        for arm, runs in report["training"].items():
            for run in runs:
                run.update(score(WORK / f"{arm}_{run['seed']}", pool, clean_eval))
        _write(report, out)
        return
    # The filter model: the demo's tiny_cnn, ~150 steps on the trusted set (what the demo needs
    # to tell colours apart, which is what a mismatched caption gets wrong first).
    # The full size is `make demo`'s: its 20k-pair pool and 4k seed set, and training for as many
    # passes over the curated set as the demo's 5 epochs (shape is learnt in the last ones; at
    # 2 passes neither arm had started on it and held-out accuracy was colour alone).
    samples, seed_samples, seeds, filter_epochs, passes = (
        (2000, 1000, 1, 2, 2) if args.quick else (20_000, 4000, 3, 5, 5))
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
               "--clip-score-top", str(args.clip_score_top), "--no-hash-dedup", "--pixel-dedup", "--no-shards",
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
    report["steps"] = steps = passes * kept // 128  # raw gets the same steps
    report["training"] = {"raw": [], "curated": []}
    clean_eval = uncontaminated_eval_root(pool)
    for seed in range(seeds):
        report["training"]["raw"].append(train_and_score(pool, WORK / f"raw_{seed}", steps, seed, None, clean_eval))
        report["training"]["curated"].append(
            train_and_score(pool, WORK / f"curated_{seed}", steps, seed, curated / "keep_list.parquet", clean_eval))
        print(json.dumps({k: v[-1] for k, v in report["training"].items()}), flush=True)
    _write(report, out)


if __name__ == "__main__":
    main()
