"""Checkpoint stall: how long a save blocks the training loop, synchronous single file (the ddp
engine: rank 0 gathers nothing, but writes model + AdamW state alone while the other ranks wait
for it at the next step's all-reduce) vs sharded asynchronous DCP (the fsdp2 engine: every rank
stages its shard in memory and writes it in a background thread while training goes on).

    .venv/bin/python bench/checkpoint_stall.py                  # ViT-B/32 (151M params), ~4 min
    .venv/bin/python bench/checkpoint_stall.py --model tiny     # quick check, ~1 min

Both engines run in the same `--world` gloo ranks (torchrun on this machine), same model, same
fp32 AdamW state, one after the other. Per save, on each rank: the time inside `engine.save`,
plus how much longer the next step took than a plain step (a rank that returned at once waits
there for the writer, or shares the cores with the background thread); the slowest rank counts
("stalled"). "complete" is save start to the checkpoint in place (the async save's background
write included). Writes bench/checkpoint_stall.{md,json}.
"""

from __future__ import annotations

import argparse
import dataclasses
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


def _model(name: str, image_size: int):
    from training.model import build_model
    from training.model.configs import MODEL_CONFIGS

    cfg = MODEL_CONFIGS[name]()
    return build_model(dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=image_size)))


def _disk_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from training.losses import ClipLoss
    from training.optim import OptimConfig, build_optimizer
    from training.parallel.engines import EngineConfig, build_engine
    from training.parallel.process_group import setup_distributed
    from training.train import train_step

    env = setup_distributed("cpu")
    gen = torch.Generator().manual_seed(env.rank)
    batch = {"image": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen),
             "text": torch.randint(1, 1000, (args.batch, 16), generator=gen)}
    rows = {}

    def timed_step(engine) -> float:
        dist.barrier()
        started = time.perf_counter()
        train_step(engine, [batch], ClipLoss(), env)
        return time.perf_counter() - started

    def slowest(value: float) -> float:
        tensor = torch.tensor(value)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    for name in ("ddp", "fsdp2"):
        torch.manual_seed(0)
        model = _model(args.model, args.image_size)
        params = sum(p.numel() for p in model.parameters())
        engine = build_engine(EngineConfig(name=name, precision="fp32"), model,
                              build_optimizer(model, OptimConfig(fused=False)), env,
                              grad_clip=1.0, micro_batch=args.batch, accum_steps=1)
        for _ in range(2):  # AdamW's moments exist from the first step on
            timed_step(engine)
        plain = statistics.median(timed_step(engine) for _ in range(3))
        run_dir = Path(args.run_dir) / name
        saves = []
        for index in range(args.saves):
            dist.barrier()
            started = time.perf_counter()
            engine.save(run_dir, index + 1, {"metrics": {}, "world_size": env.world_size}, keep=2)
            in_save = time.perf_counter() - started
            next_step = timed_step(engine)
            wait = getattr(engine, "wait_for_checkpoint", None)
            if wait is not None:
                wait()
            dist.barrier()  # the single file is complete when rank 0 is past its save
            complete = time.perf_counter() - started
            saves.append({"in_save_s": slowest(in_save),
                          "stalled_s": slowest(in_save + max(0.0, next_step - plain)),
                          "complete_s": slowest(complete)})
        from training import checkpoint as ckpt

        latest = ckpt.latest_checkpoint(run_dir, sharded=True)
        rows[name] = {"params": params, "plain_step_s": slowest(plain), "saves": saves,
                      "checkpoint_bytes": _disk_bytes(latest) if env.is_main else 0}
        del engine, model
    if env.is_main:
        Path(args.out).write_text(json.dumps(rows))


def report(args: argparse.Namespace, rows: dict, machine: dict) -> None:
    from bench.machine import one_line

    def med(name: str, key: str) -> float:
        return statistics.median(s[key] for s in rows[name]["saves"])

    lines = [
        "# Checkpoint stall: synchronous single file (ddp) vs sharded async DCP (fsdp2)", "",
        f"`bench/checkpoint_stall.py --model {args.model} --image-size {args.image_size} --batch "
        f"{args.batch} --world {args.world} --saves {args.saves}`: {rows['ddp']['params'] / 1e6:.0f}M "
        f"parameters, fp32 weights + AdamW moments, {args.world} gloo ranks, checkpoints on the local disk.", "",
        f"Machine: {one_line(machine)}; load average {machine.get('load_average_1min')} at start "
        f"(the cores are shared with other jobs: read the ratios).", "",
        "| engine | checkpoint on disk | plain step | loop stalled per save (median) | in save() | save complete after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, label in (("ddp", "ddp: one file, rank 0, synchronous"),
                        ("fsdp2", "fsdp2: DCP shards, async")):
        r = rows[name]
        lines.append(f"| {label} | {r['checkpoint_bytes'] / 2**20:,.0f} MiB | {r['plain_step_s']:.2f} s | "
                     f"{med(name, 'stalled_s'):.2f} s | {med(name, 'in_save_s'):.2f} s | {med(name, 'complete_s'):.2f} s |")
    ratio = med("fsdp2", "stalled_s") / med("ddp", "stalled_s")
    lines += ["", f"Stall, async sharded / synchronous single file: **{ratio:.2f}** "
              f"({med('fsdp2', 'stalled_s'):.2f} s vs {med('ddp', 'stalled_s'):.2f} s per save).", "",
              "Stalled = time in save() + how much longer the next step took than a plain one, "
              "slowest rank. The async save's remaining cost is its staging copy (a memcpy of "
              "this rank's shard) and the cores its writer thread shares with training."]
    (BENCH / "checkpoint_stall.md").write_text("\n".join(lines) + "\n")
    (BENCH / "checkpoint_stall.json").write_text(json.dumps(
        {"args": {k: v for k, v in vars(args).items() if k not in ("worker", "run_dir", "out")},
         "machine": machine, "engines": rows, "stall_ratio_async_over_sync": ratio}, indent=1) + "\n")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="vit_b32")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4, help="per rank")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--saves", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    from bench.machine import describe

    machine = describe()
    work = Path(tempfile.mkdtemp(prefix="checkpoint_stall_"))
    try:
        out = work / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(args.world), str(Path(__file__).resolve()), "--worker", "--run-dir", str(work),
               "--out", str(out), "--model", args.model, "--image-size", str(args.image_size),
               "--batch", str(args.batch), "--saves", str(args.saves)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        subprocess.run(cmd, cwd=REPO, env=env, check=True)
        report(args, json.loads(out.read_text()), machine)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
