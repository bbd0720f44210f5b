"""The prepared GPU check (issue #17): every GPU figure in one short run -> bench/results_gpu.md.

    bash bench/gpu_check.sh              # on one H100/H200, < 8 min from a bare machine
    bash bench/gpu_check.sh --dry-run    # each step once on the CPU, tiny: checks the plumbing

Steps, each recorded even when another fails (a device lease is too short to rerun for one bug):
1. bf16 matmul peak of this GPU (and the vendor's dense bf16 figure).
2. Our trainer on ViT-B/32 and ViT-B/16 at bf16: samples/s, MFU against the vendor peak and the
   measured one (model FLOPs from bench.flops on the corpus's real caption lengths).
3. `open_clip_train` on the same shards, model, batch, precision and workers (ViT-B/16): the ratio.
4. Ours with torch.compile on (engine.compile=true), and with fused attention off
   (engine.attention=math) to show what the fused kernels give.
5. The GPU augmentation path (data.augment_on=device): trainer samples/s and data-wait share,
   and the loader's CPU side alone next to PIL's decode-only rate on the same JPEGs.
6. The DeepSpeed engine at ZeRO-2 on the one GPU.
7. Zero-shot eval images/s of our ViT-B/32 checkpoint (bench.eval_throughput, ours vs
   CLIP_benchmark on the same model, exported).
GPU goals: ViT-B/16 bf16 MFU >= 45% and >= 1.5x open_clip_train.

--dry-run runs the same steps on the CPU, batch 4, two steps each, with ViT-S/32 in B/32's place
and the `tiny` ViT in B/16's (OpenCLIP's side: ViT-S/32), all but compiling
(fp32 or the CPU's native bf16), and writes to data/bench/gpu_check_dry (not the results file):
its numbers mean nothing, it proves every step runs.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
import traceback
from argparse import Namespace
from pathlib import Path

from bench import data_loader, eval_throughput, machine, matmul_peak, run_all, train_throughput
from bench.corpus import ROOT as BENCH_CORPUS, ensure_corpus
from bench.flops import mfu
from training.parallel.precision import choose_precision

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def _shard_pattern(train: Path, count: int) -> str:
    """A brace list of the first `count` tars: a pattern both trainers (and braceexpand) read."""
    names = sorted(p.stem for p in train.glob("*.tar"))[:count]
    if not names:
        raise FileNotFoundError(f"no .tar shards in {train}")
    return str(train / ("{" + ",".join(names) + "}.tar" if len(names) > 1 else f"{names[0]}.tar"))


class Check:
    """Runs the steps, keeps each one's result or error."""

    def __init__(self, args: Namespace) -> None:
        self.args = args
        self.device = "cpu" if args.dry_run else "cuda"
        self.precision = choose_precision("auto" if args.dry_run else "bf16", self.device).name
        self.work = args.work or REPO / "data" / "bench" / (
            "gpu_check_dry" if args.dry_run else "gpu_check")
        self.results: dict = {"dry_run": args.dry_run, "precision": self.precision,
                              "machine": machine.describe(self.device), "steps": {}}
        self.corpus = args.corpus or BENCH_CORPUS
        self.shards = ""  # set in run(), once the corpus exists

    def step(self, name: str, fn) -> None:
        started = time.perf_counter()
        print(f"[gpu_check] {name} ...", flush=True)
        try:
            result = fn()
            status = "ok"
        except Exception as exn:  # noqa: BLE001 - one failed step must not cost the others
            result = {"error": f"{type(exn).__name__}: {exn}"[:2000]}
            status = "failed"
            traceback.print_exc()
        result["seconds"] = round(time.perf_counter() - started, 1)
        self.results["steps"][name] = {"status": status, **result}
        print(f"[gpu_check] {name}: {status} ({result['seconds']} s)", flush=True)

    def trainer_args(self, model: str, **changes) -> Namespace:
        dry = self.args.dry_run
        args = Namespace(
            shards=self.shards, model=model, image_size=64 if model == "tiny" else 224,
            batch=4 if dry else 256,
            workers=1 if dry else 8, steps=2 if dry else 40, warmup=1 if dry else 10,
            lr=5e-4, lr_warmup=10, device=self.device, precision=self.precision,
            precision_name=self.precision, ablate=False)
        for key, value in changes.items():
            setattr(args, key, value)
        return args

    def train_ours(self, label: str, model: str, *overrides: str) -> dict:
        args = self.trainer_args(model)
        workdir = self.work / label
        shutil.rmtree(workdir, ignore_errors=True)
        result = train_throughput.run_ours(args, workdir, overrides)
        flops = run_all.model_flops(Namespace(
            model=model, tokenizer=str(self.corpus / "tokenizer.json"),
            image_size=args.image_size, shards=self.shards, batch=args.batch))["total"]
        peak = self.results.get("peak", {})
        out = {"model": model, "batch": args.batch, "overrides": list(overrides),
               "samples_per_s": result["samples_per_s"], "data_wait_frac": result["data_wait_frac"],
               "flops_per_sample": flops, "last_loss": result["losses"][-1]}
        for key in ("vendor_flops", "measured_flops"):
            if peak.get(key):
                out[f"mfu_vs_{key.split('_')[0]}"] = mfu(result["samples_per_s"], flops, peak[key])
        return out

    def run(self) -> dict:
        dry = self.args.dry_run
        if self.args.corpus is None:
            ensure_corpus()
        self.shards = _shard_pattern(self.corpus / "train", 2 if dry else 8)
        self.results["shards"] = self.shards
        # The dry run trains the small `tiny` ViT (64 px) in B/16's place; B/32's place (and the
        # eval, which needs a model CLIP_benchmark can load) and OpenCLIP's side take ViT-S/32.
        b16 = "tiny" if dry else "vit_b16"
        b32 = "vit_s32" if dry else "vit_b32"

        def peak() -> dict:
            reading = matmul_peak.measure(self.device, size=512 if dry else 8192,
                                          min_seconds=0.1 if dry else 1.0)
            key = "fp32_gflops" if self.precision == "fp32" else "bf16_gflops"
            self.results["peak"] = {"measured_flops": reading[key] * 1e9,
                                    "vendor_flops": (reading["vendor_bf16_gflops"] or 0) * 1e9}
            return reading

        self.step("matmul_peak", peak)
        self.step("ours_vit_b32", lambda: self.train_ours("ours_b32", b32))
        self.step("ours_vit_b16", lambda: self.train_ours("ours_b16", b16))

        def openclip() -> dict:
            args = self.trainer_args("vit_s32" if dry else b16)
            workdir = self.work / "openclip_b16"
            shutil.rmtree(workdir, ignore_errors=True)
            workdir.mkdir(parents=True)
            theirs = train_throughput.run_openclip(args, workdir)
            ours = self.results["steps"].get("ours_vit_b16", {}).get("samples_per_s")
            return {"samples_per_s": theirs["samples_per_s"],
                    "ours_over_openclip": ours / theirs["samples_per_s"] if ours else None}

        self.step("open_clip_train_vit_b16", openclip)
        if dry:
            # Inductor compiles the whole step for minutes on 2 CPU cores, and the trainer's
            # compiled path is tested on its own (tests/test_compile.py).
            self.results["steps"]["ours_vit_b16_compiled"] = {
                "status": "skipped", "seconds": 0.0,
                "why": "dry run: compiling takes minutes on a CPU; tests/test_compile.py covers it"}
        else:
            self.step("ours_vit_b16_compiled", lambda: self.train_ours(
                "ours_b16_compile", b16, "engine.compile=true"))
        self.step("ours_vit_b16_math_attention", lambda: self.train_ours(
            "ours_b16_math", b16, "engine.attention=math"))
        # On the CPU the trainer refuses augment_on=device (it would take the workers' cores),
        # so the dry run checks the worker side and the batched ops through the loader bench.
        if not dry:
            self.step("ours_vit_b16_gpu_augment", lambda: self.train_ours(
                "ours_b16_gpu_aug", b16, "data.augment_on=device"))

        def loader_cpu_side() -> dict:
            args = Namespace(loader_shards=self.shards, tokenizer=str(self.corpus / "tokenizer.json"),
                             batches=2 if dry else 24, warmup=1 if dry else 2, workers=1,
                             batch=16 if dry else 64, image_size=224)
            return data_loader.measure_device_path(args, self.device)

        self.step("loader_cpu_side_of_gpu_augment", loader_cpu_side)
        self.step("ours_vit_b16_deepspeed_zero2", lambda: self.train_ours(
            "ours_b16_zero2", b16, "engine.name=deepspeed", "engine.zero_stage=2"))

        def evaluation() -> dict:
            checkpoint = self.work / "ours_b32" / "ours"  # CLIP_benchmark's usual model size
            return eval_throughput.measure(
                str(checkpoint), str(self.corpus), shards=1, batch=16 if dry else 256,
                workers=1 if dry else 8, device=self.device, precision=self.precision)

        self.step("eval_images_per_s", evaluation)
        return self.results


def to_markdown(results: dict) -> str:
    steps = results["steps"]
    title = "GPU check (dry run on the CPU: numbers mean nothing)" if results["dry_run"] \
        else "GPU check"
    lines = [f"# {title}", "",
             f"Written by `bash bench/gpu_check.sh` (bench/gpu_check.py). Machine: "
             f"{machine.one_line(results['machine'])}; precision {results['precision']}.", "",
             "| step | status | figure | goal | s |", "|---|---|---|---|---:|"]

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    for name, row in steps.items():
        if row["status"] == "skipped":
            figure, goal = row["why"], ""
        elif row["status"] != "ok":
            figure, goal = row["error"].splitlines()[0][:200], ""
        elif "samples_per_s" in row and "flops_per_sample" in row:
            figure = (f"{row['samples_per_s']:.1f} samples/s; MFU {pct(row.get('mfu_vs_vendor'))} "
                      f"of the vendor peak, {pct(row.get('mfu_vs_measured'))} of the measured; "
                      f"data wait {pct(row['data_wait_frac'])}")
            goal = "MFU >= 45%" if name == "ours_vit_b16" else ""
        elif name == "open_clip_train_vit_b16":
            ratio = row["ours_over_openclip"]
            figure = (f"{row['samples_per_s']:.1f} samples/s; ours "
                      f"{'-' if ratio is None else f'{ratio:.2f}x'}")
            goal = "ours >= 1.5x"
        elif name == "matmul_peak":
            figure = (f"bf16 {row['bf16_gflops'] / 1e3:.1f} TFLOP/s, fp32 "
                      f"{row['fp32_gflops'] / 1e3:.1f} TFLOP/s; vendor bf16 "
                      f"{(row['vendor_bf16_gflops'] or 0) / 1e3:.0f} TFLOP/s")
            goal = ""
        elif name == "loader_cpu_side_of_gpu_augment":
            figure = (f"{row['device_path_samples_per_s']:.0f} samples/s per worker vs "
                      f"{row['raw_decode_samples_per_s']:.0f} decode-only "
                      f"({row['ratio_to_raw_decode']:.2f}); batched augmentation "
                      f"{row['augment_samples_per_s']:.0f} samples/s on {row['device']}")
            goal = "within 1.5x of decode-only"
        elif name == "eval_images_per_s":
            figure = json.dumps({k: v for k, v in row.items() if k != "seconds"})[:200]
            goal = ""
        else:
            figure, goal = json.dumps(row)[:200], ""
        lines.append(f"| {name} | {row['status']} | {figure} | {goal} | {row['seconds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="every step once on the CPU, tiny (checks the plumbing)")
    parser.add_argument("--corpus", type=Path, default=None,
                        help="shards (train/, val/, heldout/, tokenizer.json with CLIP's BPE) in "
                             "the bench corpus layout; default: data/bench/corpus, built if absent")
    parser.add_argument("--work", type=Path, default=None,
                        help="runs and logs; default: data/bench/gpu_check (dry run: _dry)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: bench/results_gpu (dry run: data/bench/gpu_check_dry/results)")
    args = parser.parse_args(argv)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no GPU here (torch.cuda.is_available() is False); "
                  "use --dry-run to check the steps on the CPU", flush=True)
            return 2
    check = Check(args)
    out = args.out or (check.work / "results" if args.dry_run else BENCH / "results_gpu")
    results = check.run()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(to_markdown(results))
    print(out.with_suffix(".md").read_text())
    failed = [name for name, row in results["steps"].items() if row["status"] == "failed"]
    if failed:
        print(f"gpu_check: {len(failed)} step(s) failed: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
