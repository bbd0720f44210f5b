"""Where a training step's time goes: py-spy over our whole trainer (main process and data
worker) and torch.profiler over one step, summarised as text into bench/profiles/.

    .venv/bin/python -m bench.profile_trainer [--steps 12]

Writes bench/profiles/trainer_pyspy_vit_s32.txt (share of samples per process, per training
phase, and the hottest functions), bench/profiles/train_step_torch_vit_s32.txt (torch
operators of one step by self CPU time) and bench/profiles/data_loader_cprofile_vit_s32.txt (the
data pipeline by function). Raw files stay in data/bench/work.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = REPO / "data" / "bench" / "work" / "profile"
PROFILES = BENCH / "profiles"
CONFIG = "configs/bench_vit_s32.toml"
# Frames (function names, as py-spy prints them) that mark a phase of the training loop. A
# forked worker's stacks start with the main process's frames at the fork, so worker stacks
# (those holding _worker_loop) are matched against the worker phases only.
MAIN_PHASES = [
    ("data wait (next batch from the worker)", "_timed_batches"),
    ("forward", "forward (training/parallel/engines.py"),
    ("backward", "backward (training/parallel/engines.py"),
    ("clip + optimizer step", "finish_step"),
    ("checkpoint", "save (training/parallel/engines.py"),
]
WORKER_PHASES = [
    ("worker: JPEG decode", "decode_image"),
    ("worker: crop + resize + to uint8", "__call__ (torchvision/transforms/transforms.py"),
    ("worker: tokenise", "encode (training/text/tokenizer.py"),
    ("worker: collate", "collate (training/data/decode.py"),
    ("worker: other (tar reading, shuffle buffer, queue)", "_worker_loop"),
]


def _pyspy(steps: int, rate: int) -> Path:
    raw = WORK / "pyspy_raw.txt"
    run_dir = WORK / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    pyspy = Path(sys.executable).with_name("py-spy")
    subprocess.run(
        [str(pyspy), "record", "--subprocesses", "--format", "raw", "--rate", str(rate),
         "-o", str(raw), "--", sys.executable, "-m", "training.main", "--config", CONFIG,
         f"train.steps={steps}", f"train.run_dir={run_dir}", "log.every=1"],
        cwd=REPO, check=True, capture_output=True,
    )
    return raw


def summarise_pyspy(raw: Path, steps: int) -> str:
    processes: collections.Counter = collections.Counter()
    phases: collections.Counter = collections.Counter()
    leaves: collections.Counter = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        worker = "_worker_loop" in stack
        processes["data worker" if worker else "main"] += n
        for name, marker in WORKER_PHASES if worker else MAIN_PHASES:
            if marker in stack:
                phases[name] += n
                break
        leaves[frames[-1]] += n
    lines = [
        f"py-spy record --subprocesses over `python -m training.main --config {CONFIG} "
        f"train.steps={steps}` (whole run: start-up, {steps} steps, checkpoint); {total} samples.",
        "Shares are of all samples (both processes; a process waiting on the other is idle, "
        "and py-spy samples idle threads too).",
        "",
        "By process:",
        *(f"  {n / total:6.1%}  {name}" for name, n in processes.most_common()),
        "",
        "By training phase (first matching frame; the rest is start-up, imports, idle):",
        *(f"  {phases[name] / total:6.1%}  {name}" for name, _ in MAIN_PHASES + WORKER_PHASES),
        "",
        "Hottest leaf frames (self time):",
        *(f"  {n / total:6.1%}  {frame}" for frame, n in leaves.most_common(25)),
    ]
    return "\n".join(lines) + "\n"


def torch_profile_step(args: argparse.Namespace) -> str:
    """One real training step (after two warm-up steps) under torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    from training.data import build_train_loader
    from training.losses import build_loss
    from training.main import build_model_config
    from training.model import build_model
    from training.optim import build_optimizer
    from training.parallel.precision import Precision, choose_precision
    from training.run_config import load_run_config
    from training.text.tokenizer import Tokenizer
    from training.train import batch_to_device

    cfg = load_run_config(CONFIG, ["data.workers=0"])
    tokenizer = Tokenizer.from_file(cfg.tokenizer_path())
    model_cfg = build_model_config(cfg, tokenizer)
    model = build_model(model_cfg)
    optimizer = build_optimizer(model, cfg.optim)
    precision = Precision(choose_precision("auto", "cpu").name, "cpu")
    loss_fn = build_loss(cfg.loss)
    loader = build_train_loader(cfg.data, tokenizer.encode, tokenizer.pad_id)
    batch = batch_to_device(next(loader), torch.device("cpu"))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with precision.autocast():
            out = model(batch["image"], batch["text"])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()

    step()
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30,
                                      max_name_column_width=55)
    return (f"torch.profiler, one training step of {CONFIG} (batch {cfg.data.batch_size}, text "
            f"length {batch['text'].shape[1]}, {precision.name}, {torch.get_num_threads()} threads), "
            f"after two warm-up steps; sorted by self CPU time.\n\n{table}\n")


def loader_profile(batches: int = 8) -> str:
    """cProfile of the training data pipeline in-process (workers=0), by self time: what the
    loader spends per sample besides the JPEG decode."""
    import cProfile
    import io
    import pstats

    from training.data import build_train_loader
    from training.run_config import load_run_config
    from training.text.tokenizer import Tokenizer

    cfg = load_run_config(CONFIG, ["data.workers=0"])
    tokenizer = Tokenizer.from_file(cfg.tokenizer_path())
    loader = build_train_loader(cfg.data, tokenizer.encode, tokenizer.pad_id)
    next(loader)  # shard opening, shuffle buffer fill
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(batches):
        next(loader)
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(15)
    samples = batches * cfg.data.batch_size
    return (f"cProfile of {batches} batches ({samples} samples) of the {CONFIG} data pipeline "
            f"in one process (decode, RandomResizedCrop 256 -> 224 bicubic, tokenise, collate), "
            f"sorted by self time.\n{out.getvalue()}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--rate", type=int, default=20, help="py-spy samples per second")
    args = parser.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    PROFILES.mkdir(exist_ok=True)
    (PROFILES / "data_loader_cprofile_vit_s32.txt").write_text(loader_profile())
    (PROFILES / "train_step_torch_vit_s32.txt").write_text(torch_profile_step(args))
    raw = _pyspy(args.steps, args.rate)
    (PROFILES / "trainer_pyspy_vit_s32.txt").write_text(summarise_pyspy(raw, args.steps))
    print((PROFILES / "trainer_pyspy_vit_s32.txt").read_text())


if __name__ == "__main__":
    main()
