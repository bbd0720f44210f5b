"""Peak memory and time of the naive gathered CLIP loss vs the tiled ring loss, per rank.

    .venv/bin/python bench/loss_memory.py                        # 8k, 16k, 32k, 64k global batch
    .venv/bin/python bench/loss_memory.py --batches 8192,16384,32768  # ~10 min on 2 busy cores
    .venv/bin/python bench/loss_memory.py --batches 1024,2048    # quick check, ~1 min

On a 2-core, 24 GiB machine the naive loss is skipped from 32k on (memory budget) and the tiled
one takes ~3 min at 32k and ~4x that at 64k (its work is quadratic even if its memory is not).

Each (loss, global batch) runs in a fresh group of `--world` gloo processes (default 4) on this
machine, forward + backward of the loss alone on random unit-norm fp32 features (d = 512) with a
learnable logit scale, as one training step would. Writes bench/loss_memory.{md,json}.

Memory: the peak resident set size (RSS) of each rank during forward + backward, minus its RSS
just before, max over ranks and repeats. The peak is Linux's VmHWM, reset before each step by
writing 5 to /proc/self/clear_refs; where that is not allowed we fall back to ru_maxrss, which
can only under-report growth that stays below an earlier peak (said so in the output). Why RSS:
torch's CPU allocator keeps no statistics and tracemalloc does not see it. For RSS to follow live
tensors, the ranks run with glibc's MALLOC_MMAP_THRESHOLD_=65536: every block of 64 KiB or more
is its own mapping, returned to the kernel when freed. (By default glibc raises that threshold
up to 32 MiB as blocks are freed and then keeps freed blocks below it in its heap, so RSS would
also count freed, cached memory; `--default-malloc` measures that way.) The growth includes
everything the loss allocates: gathered features (naive), ring buffers (tiled), logits,
autograd's saved tensors and the feature gradients.

Time: wall clock of forward + backward between two barriers (slowest rank), and CPU time
(process time summed over ranks, which other jobs on the machine disturb far less); median of
`--repeats` steps, or one step where that takes longer than --single-step-above-s. Ranks share
the machine's cores (`--threads` each), so compare ratios, not absolutes.

A naive configuration whose predicted memory (all ranks together) exceeds --mem-budget-gb is
skipped rather than run into the kernel's OOM killer. Prediction: the naive loss keeps a few
(B_local, B_global) fp32 matrices alive at its peak, so growth ~= k * B_local * B_global * 4
bytes, with k taken from the largest naive configuration measured earlier in the same sweep
(else NAIVE_MATRICES_AT_PEAK). The table then compares the tiled loss against that prediction
and says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.losses import ClipLoss
from training.losses.tiled_clip import TiledClipLoss

MIB = 2**20
GIB = 2**30
# ClipLoss at its peak (start of backward): per direction the raw logits (saved by the scale
# multiply), the scaled logits' log-softmax (saved by cross-entropy) and the gradient being
# formed. Refined from measurements as soon as one naive configuration has run.
NAIVE_MATRICES_AT_PEAK = 6.0
WARMUP_ROWS = 64


# -- measuring one configuration (runs in each rank's process) ---------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_peak() -> bool:
    """Make VmHWM (peak RSS) start again from the current RSS; False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def _peak_kib(peak_was_reset: bool) -> int:
    if peak_was_reset:
        return _status_kib("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def _step(loss_fn, image, text, scale) -> None:
    image.grad = text.grad = scale.grad = None
    loss_fn(image, text, scale).backward()


def _rank_main(rank: int, world: int, init_file: str, out_dir: str, cfg: dict) -> None:
    torch.set_num_threads(cfg["threads"])
    torch.set_num_interop_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        local = cfg["global_batch"] // world
        gen = torch.Generator().manual_seed(rank)
        image = F.normalize(torch.randn(local, cfg["dim"], generator=gen), dim=-1)
        text = F.normalize(image + torch.randn(local, cfg["dim"], generator=gen), dim=-1)
        image.requires_grad_()
        text.requires_grad_()
        scale = torch.tensor(1 / 0.07, requires_grad=True)
        if cfg["loss"] == "tiled":
            loss_fn = TiledClipLoss(tile_size=cfg["tile_size"])
        else:
            loss_fn = ClipLoss()
        # Warm up the process group's connections and the kernels on a small slice; its peak is
        # far below the measured step's, so it does not hide growth even without a peak reset.
        warm = min(WARMUP_ROWS, local)
        _step(loss_fn, image[:warm].detach().requires_grad_(), text[:warm].detach(), scale)
        steps = []
        for _ in range(cfg["repeats"]):
            # the previous step's gradients would count in the baseline: free them first
            image.grad = text.grad = scale.grad = None
            reset = _reset_peak()
            before = _status_kib("VmRSS")
            dist.barrier()  # all ranks: start the step together
            start, cpu_start = time.perf_counter(), time.process_time()
            _step(loss_fn, image, text, scale)
            cpu = time.process_time() - cpu_start  # all of this process's threads
            dist.barrier()  # all ranks: the step ends when the slowest rank is done
            wall = time.perf_counter() - start
            steps.append(
                {
                    "growth_bytes": (_peak_kib(reset) - before) * 1024,
                    "wall_s": wall,
                    "cpu_s": cpu,
                    "peak_reset": reset,
                }
            )
            # Long steps are timed once: their noise is small next to their length. All ranks:
            # a 0-dim max in, the same decision out everywhere.
            slowest = torch.tensor(wall)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            if slowest.item() > cfg["single_step_above_s"]:
                break
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(steps))
    finally:
        dist.destroy_process_group()


def measure(loss: str, global_batch: int, args: argparse.Namespace) -> dict:
    """Run one configuration in a fresh process group: peak growth (max over ranks and steps),
    wall time (slowest rank, median over steps), CPU time (sum over ranks, median over steps)."""
    cfg = {
        "loss": loss,
        "global_batch": global_batch,
        "dim": args.dim,
        "tile_size": args.tile_size,
        "threads": args.threads,
        "repeats": args.repeats,
        "single_step_above_s": args.single_step_above_s,
    }
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(
            _rank_main, args=(args.world, f"{tmp}/init", tmp, cfg), nprocs=args.world, join=True
        )
        ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world)]
    steps = range(len(ranks[0]))
    wall = [max(r[i]["wall_s"] for r in ranks) for i in steps]
    cpu = [sum(r[i]["cpu_s"] for r in ranks) for i in steps]
    return {
        "peak_growth_mib": max(step["growth_bytes"] for r in ranks for step in r) / MIB,
        "seconds": statistics.median(wall),
        "cpu_seconds": statistics.median(cpu),
        "seconds_per_step": wall,
        "cpu_seconds_per_step": cpu,
        "peak_reset": all(step["peak_reset"] for r in ranks for step in r),
    }


# -- the sweep -----------------------------------------------------------------------------------


def _machine(args: argparse.Namespace) -> dict:
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [
                line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")
            ]
        model = names[0] if names else model
    except OSError:
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            total = int(meminfo.readline().split()[1]) * 1024
    except OSError:
        total = 0
    return {
        "cpu_model": model,
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(total / GIB, 1),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads_per_rank": args.threads,
        "load_average_at_start": os.getloadavg(),
    }


def _naive_prediction_gib(global_batch: int, world: int, matrices: float) -> float:
    """Predicted naive peak growth of all ranks together, GiB."""
    local = global_batch // world
    return matrices * local * global_batch * 4 * world / GIB


def sweep(args: argparse.Namespace) -> dict:
    matrices = NAIVE_MATRICES_AT_PEAK
    matrices_source = "assumed"
    rows = []
    for global_batch in sorted(args.batches):
        local = global_batch // args.world
        row: dict = {"global_batch": global_batch, "local_batch": local}
        predicted = _naive_prediction_gib(global_batch, args.world, matrices)
        row["naive_predicted_total_gib"] = round(predicted, 2)
        row["naive_matrices_used_for_prediction"] = f"{matrices:.2f} ({matrices_source})"
        if predicted > args.mem_budget_gb:
            budget = f"{args.mem_budget_gb} GiB budget"
            row["naive"] = {"skipped": f"predicted {predicted:.1f} GiB > {budget}"}
        else:
            print(f"naive  global batch {global_batch} ...", flush=True)
            row["naive"] = measure("naive", global_batch, args)
            measured_bytes = row["naive"]["peak_growth_mib"] * MIB
            matrices = measured_bytes / (local * global_batch * 4)
            matrices_source = f"measured at {global_batch}"
        print(f"tiled  global batch {global_batch} ...", flush=True)
        row["tiled"] = measure("tiled", global_batch, args)
        naive, tiled = row["naive"], row["tiled"]
        if "skipped" in naive:
            # Compare against predictions. Memory: the quadratic model above, calibrated on the
            # largest measured batch. Time: the naive loss's work is also ~B_local * B_global.
            row["naive_predicted"] = {"peak_growth_mib": predicted / args.world * GIB / MIB}
            earlier = [r for r in rows if "skipped" not in r["naive"]]
            if earlier:
                last = earlier[-1]
                work = (local * global_batch) / (last["local_batch"] * last["global_batch"])
                for key in ("seconds", "cpu_seconds"):
                    row["naive_predicted"][key] = last["naive"][key] * work
            naive = row["naive_predicted"]
        for key, ratio in (
            ("peak_growth_mib", "memory_ratio"),
            ("seconds", "time_ratio"),
            ("cpu_seconds", "cpu_time_ratio"),
        ):
            if key in naive:
                row[ratio] = tiled[key] / naive[key]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return {
        "what": "ClipLoss (naive, gathered) vs TiledClipLoss (ring, tiles), forward + backward",
        "world": args.world,
        "dim": args.dim,
        "tile_size": args.tile_size,
        "dtype": "float32",
        "repeats": args.repeats,
        "mem_budget_gb": args.mem_budget_gb,
        "memory_measure": (
            "peak RSS growth (VmHWM reset via /proc/self/clear_refs)"
            if all(r["tiled"]["peak_reset"] for r in rows)
            else "ru_maxrss growth (clear_refs not permitted: may under-report)"
        )
        + (
            ", glibc default malloc"
            if args.default_malloc
            else ", glibc MALLOC_MMAP_THRESHOLD_=65536 (freed blocks go back to the kernel)"
        ),
        "machine": {**_machine(args), "load_average_at_end": os.getloadavg()},
        "rows": rows,
    }


def _fmt_batch(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def to_markdown(result: dict) -> str:
    m = result["machine"]
    lines = [
        "# Naive vs tiled CLIP loss: peak memory and time per rank",
        "",
        f"`bench/loss_memory.py`, {result['world']} gloo ranks on one machine, "
        f"d = {result['dim']}, "
        f"fp32, tile size {result['tile_size']}, forward + backward of the loss alone "
        f"(median of up to {result['repeats']} steps).",
        "",
        f"Machine: {m['cpu_model']}, {m['cpu_cores_usable']} usable cores shared by the ranks "
        f"({m['threads_per_rank']} thread(s) each), {m['memory_gib']} GiB RAM, torch {m['torch']}, "
        f"Python {m['python']}; load average {m['load_average_at_start'][0]:.1f} at start, "
        f"{m['load_average_at_end'][0]:.1f} at end.",
        "",
        f"- Memory: {result['memory_measure']}; max over ranks. It includes gathered features "
        "(naive) or ring buffers (tiled), logits, saved tensors and feature gradients.",
        "- Wall: slowest rank, between barriers. CPU: process time summed over ranks, which is "
        "what to read when other jobs share the cores (wall time then mostly measures them).",
        "- *pred.*: the naive configuration was not run (predicted memory over the budget); its "
        "numbers scale the largest measured naive configuration by B_local * B_global "
        "(memory and work are both quadratic in the batch).",
        "",
        "| global batch | per rank | naive peak | tiled peak | tiled / naive memory "
        "| naive wall | tiled wall | tiled / naive wall "
        "| naive CPU | tiled CPU | tiled / naive CPU |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(value, fmt: str, predicted: bool) -> str:
        if value is None:
            return "-"
        return fmt.format(value) + (" *pred.*" if predicted else "")

    for row in result["rows"]:
        naive, tiled = row["naive"], row["tiled"]
        predicted = "skipped" in naive
        if predicted:
            naive = row.get("naive_predicted", {})
            naive_mem = (
                f"skipped ({row['naive']['skipped']}); "
                f"{naive['peak_growth_mib']:,.0f} MiB *pred.*"
            )
        else:
            naive_mem = f"{naive['peak_growth_mib']:,.0f} MiB"
        mem_ratio = row["memory_ratio"]
        cells = [
            _fmt_batch(row["global_batch"]),
            _fmt_batch(row["local_batch"]),
            naive_mem,
            f"{tiled['peak_growth_mib']:,.0f} MiB",
            f"{mem_ratio:.3f}" + (f" (1/{1 / mem_ratio:.0f})" if mem_ratio < 0.5 else "")
            + (" *pred.*" if predicted else ""),
            cell(naive.get("seconds"), "{:.1f} s", predicted),
            f"{tiled['seconds']:.1f} s",
            cell(row.get("time_ratio"), "{:.2f}", predicted),
            cell(naive.get("cpu_seconds"), "{:.1f} s", predicted),
            f"{tiled['cpu_seconds']:.1f} s",
            cell(row.get("cpu_time_ratio"), "{:.2f}", predicted),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Targets (scale-out issue): at global batch 32k on 4 ranks, tiled memory <= 1/20 of the "
        "naive loss's and time <= 1.2x.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--batches",
        default="8192,16384,32768,65536",
        type=lambda s: [int(x) for x in s.split(",")],
        help="global batch sizes, comma-separated",
    )
    parser.add_argument("--world", type=int, default=4, help="gloo ranks")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--tile-size", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per configuration")
    parser.add_argument(
        "--single-step-above-s",
        type=float,
        default=60.0,
        help="time only one step of configurations whose first step takes longer",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per rank (0: usable cores / world)"
    )
    parser.add_argument(
        "--mem-budget-gb",
        type=float,
        default=16.0,
        help="skip naive configurations predicted to need more, all ranks together",
    )
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's adaptive mmap threshold (RSS then includes freed, cached heap)",
    )
    parser.add_argument("--out", default=str(Path(__file__).with_name("loss_memory")))
    args = parser.parse_args(argv)
    if args.threads <= 0:
        # more threads than cores would only make the ranks fight over them
        args.threads = max(1, len(os.sched_getaffinity(0)) // args.world)
    for batch in args.batches:
        if batch % args.world:
            parser.error(f"global batch {batch} is not divisible by --world {args.world}")

    if not args.default_malloc:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc in each spawned rank
    result = sweep(args)
    Path(args.out + ".json").write_text(json.dumps(result, indent=2) + "\n")
    Path(args.out + ".md").write_text(to_markdown(result))
    print(to_markdown(result))
    print(f"wrote {args.out}.md and {args.out}.json", file=sys.stderr)


if __name__ == "__main__":
    main()
