"""Step time of the engines on the same model: ddp, fsdp2, DeepSpeed ZeRO-2 and ZeRO-3.

    .venv/bin/python bench/engine_step_time.py                   # ViT-S/32 at 64 px, ~5 min
    .venv/bin/python bench/engine_step_time.py --model tiny --steps 3   # quick check

Each engine runs in its own group of `--world` gloo ranks (torchrun on this machine: one fresh
launch per engine, as a run would be), fp32, the same model, initial weights and per-rank batch,
a full train_step (forward, gathered contrastive loss, backward, clip, AdamW). After 2 warm-up
steps, `--steps` steps are timed between barriers; the slowest rank's median counts, with the
process CPU time summed over ranks beside it (what to read when other jobs share the cores).
On CPU with gloo this measures the engines' own overhead (sharding, gathers, bookkeeping), not
what they buy on GPUs (memory: ZeRO/FSDP keep 1/world of the optimizer state, and overlap of
communication with compute). Writes bench/engine_step_time.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))  # run as a script: the repository's packages (bench, training)

ENGINES = {  # label -> EngineConfig overrides
    "ddp": {"name": "ddp"},
    "fsdp2": {"name": "fsdp2"},
    "deepspeed ZeRO-2": {"name": "deepspeed", "zero_stage": 2},
    "deepspeed ZeRO-3": {"name": "deepspeed", "zero_stage": 3},
}


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from bench.checkpoint_stall import _model
    from training.losses import ClipLoss
    from training.optim import OptimConfig, build_optimizer
    from training.parallel.engines import EngineConfig, build_engine
    from training.parallel.process_group import setup_distributed
    from training.train import train_step

    env = setup_distributed("cpu")
    gen = torch.Generator().manual_seed(env.rank)
    batch = {"image": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen),
             "text": torch.randint(1, 1000, (args.batch, 16), generator=gen)}
    torch.manual_seed(0)
    model = _model(args.model, args.image_size)
    engine = build_engine(EngineConfig(precision="fp32", **ENGINES[args.engine]), model,
                          build_optimizer(model, OptimConfig(fused=False)), env,
                          grad_clip=1.0, micro_batch=args.batch, accum_steps=1)
    walls, cpus = [], []
    for index in range(2 + args.steps):
        dist.barrier()
        wall, cpu = time.perf_counter(), time.process_time()
        train_step(engine, [batch], ClipLoss(), env)
        dist.barrier()
        times = torch.tensor([time.perf_counter() - wall, time.process_time() - cpu])
        slowest, total = times.clone(), times.clone()
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        dist.all_reduce(total)
        if index >= 2:
            walls.append(float(slowest[0]))
            cpus.append(float(total[1]))
    if env.is_main:
        Path(args.out).write_text(json.dumps({
            "params": sum(p.numel() for p in engine.module.parameters()) if args.engine == "ddp" else None,
            "step_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "walls": walls}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_s32")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16, help="per rank")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine:
        worker(args)
        return
    from bench.machine import describe, one_line

    machine = describe()
    work = Path(tempfile.mkdtemp(prefix="engine_step_time_"))
    rows = {}
    try:
        for label in ENGINES:
            out = work / "row.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(args.world), str(Path(__file__).resolve()), "--engine", label, "--out", str(out),
                   "--model", args.model, "--image-size", str(args.image_size),
                   "--batch", str(args.batch), "--steps", str(args.steps)]
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
            subprocess.run(cmd, cwd=REPO, env=env, check=True)
            rows[label] = json.loads(out.read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows["ddp"]
    lines = [
        "# Step time: ddp vs fsdp2 vs DeepSpeed ZeRO-2 / ZeRO-3, same model", "",
        f"`bench/engine_step_time.py --model {args.model} --image-size {args.image_size} --batch "
        f"{args.batch} --world {args.world} --steps {args.steps}`: {base['params'] / 1e6:.1f}M parameters, "
        f"fp32, global batch {args.batch * args.world}, {args.world} gloo ranks on this CPU (1 thread each), "
        f"one torchrun launch per engine; median of {args.steps} steps after 2 warm-up steps.", "",
        f"Machine: {one_line(machine)}; load average {machine.get('load_average_1min')} at start "
        f"(the cores are shared with other jobs: read the ratios, and CPU time over wall time).", "",
        "| engine | step (wall, slowest rank) | / ddp | CPU s per step (all ranks) | / ddp |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        lines.append(f"| {label} | {row['step_s']:.3f} s | {row['step_s'] / base['step_s']:.2f} | "
                     f"{row['cpu_s']:.3f} s | {row['cpu_s'] / base['cpu_s']:.2f} |")
    lines += ["", "What this does not show: the engines' reason to exist on GPUs. FSDP2 and ZeRO-3 "
              "hold 1/world of weights, gradients and AdamW state per rank (ZeRO-2: of gradients "
              "and AdamW state) and overlap their gathers with compute on NCCL; on 2 CPU ranks "
              "over gloo their extra collectives are pure cost."]
    (BENCH / "engine_step_time.md").write_text("\n".join(lines) + "\n")
    (BENCH / "engine_step_time.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items() if k not in ("engine", "out")},
         "machine": machine, "engines": rows,
         "step_ratio_over_ddp": {k: r["step_s"] / base["step_s"] for k, r in rows.items()}}, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
