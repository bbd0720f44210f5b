"""`make bench`: every speed figure of the pipeline next to its yardstick, measured in one run on
this machine, written to bench/results.md (table) and bench/results.json.

    .venv/bin/python -m bench.run_all            # ~9 min (bf16 CPUs) to ~35 min (fp32 CPUs) on 2 cores
    .venv/bin/python -m bench.run_all --quick    # smoke test, a few minutes; not for quoting
    .venv/bin/python -m bench.run_all --device cuda --model vit_b16 --batch 256   # on a GPU

Figures (issue #7), each a ratio against a yardstick measured in the same run:
1. training samples/s, ours vs `open_clip_train.main` (bench.train_throughput);
2. MFU: model FLOPs from the real caption lengths (bench.flops) x samples/s over the bf16
   matmul peak measured at the start and end of the run (bench.matmul_peak, the higher reading);
3. data loader samples/s vs the raw JPEG-decode limit and OpenCLIP's loader (bench.data_loader),
   and the data-wait share of the training runs (ViT-S/32 and the tiny demo model);
4. naive vs tiled loss memory and time (bench/loss_memory.py: the committed 32k table, plus a
   fresh smaller measurement);
5. zero-shot eval images/s, ours vs CLIP_benchmark (bench.eval_throughput).
Work files (runs, logs, checkpoints) go to data/bench/work (gitignored).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench import data_loader, eval_throughput, machine, matmul_peak, train_throughput
from bench.corpus import caption_lengths, ensure_corpus
from bench.flops import mfu, train_flops_per_sample
from bench.results_table import to_markdown
from training.parallel.precision import choose_precision

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = REPO / "data" / "bench" / "work"


def model_flops(args: argparse.Namespace) -> dict:
    """Per-sample training FLOPs of the bench model on the corpus's real caption lengths."""
    import dataclasses

    from training.model import build_model
    from training.model.configs import with_tokenizer
    from training.text.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(args.tokenizer)
    cfg = with_tokenizer(train_throughput.model_config(args.model), tokenizer)
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=args.image_size))
    lengths = caption_lengths(args.shards, Path(args.tokenizer))
    flops = train_flops_per_sample(build_model(cfg), cfg, lengths, args.batch)
    flops["mean_caption_tokens"] = sum(lengths) / len(lengths)
    flops["max_caption_tokens"] = max(lengths)
    return flops


def tiny_run(args: argparse.Namespace) -> dict:
    """The demo model (tiny_cnn, 64 px, batch 128) on the bench shards: is it data-bound?"""
    run_dir = WORK / "tiny"
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = 8 if args.quick else 16
    subprocess.run(
        [sys.executable, "-m", "training.main", "--config", "configs/tiny_demo.toml",
         f"data.train_shards={args.shards}", "data.num_samples=4056", f"tokenizer={args.tokenizer}",
         f"train.steps={steps}", f"train.run_dir={run_dir}", "log.every=1",
         "log.progress_bar=false", f"engine.device={args.device}",
         f"engine.precision={args.precision_name}"],
        cwd=REPO, check=True, capture_output=True,
    )
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if "data_s_per_step" in r][2:]  # after worker start-up
    data_s = sum(r["data_s_per_step"] for r in timed)
    total = data_s + sum(r["compute_s_per_step"] for r in timed)
    return {"data_wait_frac": data_s / total, "samples_per_s": 128 * len(timed) / total}


def loss_memory(args: argparse.Namespace) -> dict:
    """The committed 32k sweep (minutes per configuration) plus a fresh, smaller one now."""
    committed = json.loads((BENCH / "loss_memory.json").read_text())
    out = WORK / "loss_memory"
    batches = "2048" if args.quick else "8192"
    subprocess.run(
        [sys.executable, str(BENCH / "loss_memory.py"), "--batches", batches, "--repeats", "1",
         "--out", str(out)],
        cwd=REPO, check=True, capture_output=True,
    )
    fresh = json.loads(out.with_suffix(".json").read_text())
    return {"committed_rows": committed["rows"], "fresh_rows": fresh["rows"]}


def run(args: argparse.Namespace) -> dict:
    WORK.mkdir(parents=True, exist_ok=True)
    ensure_corpus()
    started = time.perf_counter()
    choice = choose_precision(args.precision, args.device)
    args.precision_name = choice.name
    results: dict = {"machine": machine.describe(args.device), "quick": args.quick,
                     "precision": {"requested": args.precision, "chosen": choice.name,
                                   "reason": choice.reason}}
    print(f"precision {choice.name} ({choice.reason})", flush=True)
    peak_seconds = 0.3 if args.quick else 1.0
    print("matmul peak ...", flush=True)
    peaks = [matmul_peak.measure(args.device, min_seconds=peak_seconds)]
    print("model FLOPs ...", flush=True)
    results["flops"] = model_flops(args)
    print("training throughput (OpenCLIP, then ours) ...", flush=True)
    train_dir = WORK / "train"
    shutil.rmtree(train_dir, ignore_errors=True)
    train_dir.mkdir(parents=True)
    results["train"] = train_throughput.measure(args, train_dir)
    print("tiny model data-wait share ...", flush=True)
    results["tiny"] = tiny_run(args)
    print("data loader ...", flush=True)
    results["data_loader"] = data_loader.measure(args)
    print("eval throughput ...", flush=True)
    results["eval"] = eval_throughput.measure(
        str(train_dir / "ours"), str(REPO / "data" / "bench" / "corpus"),
        shards=1 if args.quick else 2, batch=args.batch, workers=args.workers, device=args.device,
        precision=args.precision_name,
    )
    print("loss memory ...", flush=True)
    results["loss_memory"] = loss_memory(args)
    peaks.append(matmul_peak.measure(args.device, min_seconds=peak_seconds))
    results["matmul_peak"] = {"readings": peaks, "bf16_gflops": max(p["bf16_gflops"] for p in peaks),
                              "fp32_gflops": max(p["fp32_gflops"] for p in peaks),
                              "vendor_bf16_gflops": peaks[0]["vendor_bf16_gflops"]}
    # MFU against the matmul peak of the precision the runs used (bf16 and fp16 share a peak).
    peak_key = "fp32_gflops" if choice.name == "fp32" else "bf16_gflops"
    results["matmul_peak"]["used"] = peak_key
    flops = results["flops"]["total"]
    for side in ("ours", "openclip"):
        samples_per_s = results["train"][side]["samples_per_s"]
        results["train"][side]["model_gflops_per_s"] = samples_per_s * flops / 1e9
        results["train"][side]["mfu"] = mfu(
            samples_per_s, flops, results["matmul_peak"][peak_key] * 1e9)
    results["machine"]["load_average_1min_end"] = machine.load_average()
    results["seconds"] = time.perf_counter() - started
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    train_throughput.add_arguments(parser)
    data_loader.add_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="few steps: a smoke test")
    parser.add_argument("--out", default=str(BENCH / "results"))
    args = parser.parse_args(argv)
    args.loader_shards = args.shards
    if args.quick:
        args.steps, args.warmup, args.batches = 8, 3, 6
    else:
        args.ablate = True  # the full run also measures the fused AdamW's effect
    results = run(args)
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    out.with_suffix(".md").write_text(to_markdown(results))
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
