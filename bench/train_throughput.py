"""Training throughput: our trainer next to OpenCLIP's (`open_clip_train.main`), same shards.

    .venv/bin/python -m bench.train_throughput [--steps 32 --warmup 8] [--device cuda --model vit_b16]

Both run as real subprocesses on the same JPEG shards with the same architecture: ours is built
from OpenCLIP's own model-config JSON (`model.openclip_config`, e.g. its ViT-S-32.json), so the two
trainers build the same towers (and our checkpoint exports to OpenCLIP for the eval bench), same
batch, learning-rate schedule (linear warm-up then cosine), AdamW betas/eps/weight decay, bf16
autocast and dataloader worker count, one right after the other. Samples/s counts only the steps
after `--warmup` (first-step allocation, oneDNN kernel selection, worker start-up), from each
trainer's own per-step timing: OpenCLIP's "Batch (t)" (data wait + step, logged every step) and
our metrics.jsonl's data_s_per_step + compute_s_per_step (log.every=1). The per-step losses are
kept so the two loss curves can be compared.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "bench_vit_s32.toml"
# Our model name -> OpenCLIP's name for the same tower sizes.
OPENCLIP_NAMES = {"vit_s32": "ViT-S-32", "vit_b32": "ViT-B-32", "vit_b16": "ViT-B-16"}


def openclip_config_file(model: str) -> Path:
    """OpenCLIP's model-config JSON for `model`, as the installed open_clip ships it."""
    import open_clip

    return Path(open_clip.__file__).parent / "model_configs" / f"{OPENCLIP_NAMES[model]}.json"


def model_override(model: str) -> str:
    """How our trainer is told the architecture: OpenCLIP's own JSON where OpenCLIP has the
    model (the same towers in both trainers, and a checkpoint that exports to OpenCLIP), else our
    preset (the GPU check's dry run trains the small `tiny`, which OpenCLIP has no twin of)."""
    if model in OPENCLIP_NAMES:
        return f"model.openclip_config={openclip_config_file(model)}"
    return f"model.name={model}"


def model_config(model: str):
    """The ClipModelConfig that `model_override(model)` makes our trainer build."""
    from training.model.configs import MODEL_CONFIGS
    from training.model.openclip_json import from_openclip_config, read_openclip_config

    if model not in OPENCLIP_NAMES:
        return MODEL_CONFIGS[model]()
    path = str(openclip_config_file(model))
    return from_openclip_config(read_openclip_config(path), path)
_OPENCLIP_STEP = re.compile(r"Batch \(t\): ([0-9.]+).*?Loss: ([0-9.]+) \(")


def _summary(step_seconds: list[float], losses: list[float], batch: int, warmup: int) -> dict:
    timed = step_seconds[warmup:]
    if not timed:
        raise RuntimeError(f"only {len(step_seconds)} steps logged, need more than {warmup}")
    return {
        "samples_per_s": batch * len(timed) / sum(timed),
        "timed_steps": len(timed),
        "step_seconds": step_seconds,
        "losses": losses,
    }


def _run(cmd: list[str], log_path: Path, env: dict | None = None) -> str:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    output = done.stdout + done.stderr
    log_path.write_text(output)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({done.returncode}); see {log_path}:\n"
                           + output[-3000:])
    print(f"  {' '.join(cmd[1:3])}: {time.perf_counter() - started:.0f} s", flush=True)
    return output


def run_ours(args: argparse.Namespace, workdir: Path, overrides: tuple[str, ...] = ()) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    run_dir = workdir / "ours"
    cmd = [
        sys.executable, "-m", "training.main", "--config", str(CONFIG),
        f"data.train_shards={args.shards}", f"data.num_samples={args.steps * args.batch}",
        f"data.batch_size={args.batch}", f"data.workers={args.workers}",
        model_override(args.model), f"data.image_size={args.image_size}",
        f"train.steps={args.steps}", f"train.run_dir={run_dir}", f"engine.device={args.device}",
        f"optim.lr={args.lr}", f"optim.warmup_steps={args.lr_warmup}", "log.every=1",
        "log.progress_bar=false", f"engine.precision={args.precision_name}", *overrides,
    ]
    _run(cmd, workdir / "ours.log")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "compute_s_per_step" in r]
    seconds = [r["data_s_per_step"] + r["compute_s_per_step"] for r in records]
    result = _summary(seconds, [r["last_loss"] for r in records], args.batch, args.warmup)
    result["data_wait_frac"] = sum(r["data_s_per_step"] for r in records[args.warmup:]) / sum(
        seconds[args.warmup:])
    return result


def run_openclip(args: argparse.Namespace, workdir: Path) -> dict:
    cmd = [
        sys.executable, "-m", "open_clip_train.main",
        "--train-data", args.shards, "--dataset-type", "webdataset",
        "--train-num-samples", str(args.steps * args.batch), "--epochs", "1",
        "--model", OPENCLIP_NAMES[args.model], "--batch-size", str(args.batch),
        "--workers", str(args.workers), "--precision", OPENCLIP_PRECISION[args.precision_name], "--device", args.device,
        "--lr", str(args.lr), "--warmup", str(args.lr_warmup), "--wd", "0.2",
        "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6",
        "--log-every-n-steps", "1", "--save-frequency", "0", "--report-to", "",
        "--logs", str(workdir / "openclip_logs"), "--name", "bench", "--seed", "0",
    ]
    # OpenCLIP resizes to the model's 224 px itself; pretrained weights are never fetched.
    output = _run(cmd, workdir / "openclip.log", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    steps = [(float(t), float(loss)) for t, loss in _OPENCLIP_STEP.findall(output)]
    return _summary([t for t, _ in steps], [loss for _, loss in steps], args.batch, args.warmup)


# Our precision names -> open_clip_train's --precision values for the same arithmetic.
OPENCLIP_PRECISION = {"bf16": "amp_bf16", "fp16": "amp", "fp32": "fp32"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shards", default="data/bench/corpus/train/{00000..00007}.tar")
    parser.add_argument("--model", default="vit_s32", choices=sorted(OPENCLIP_NAMES))
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=8, help="steps left out of samples/s")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--lr-warmup", type=int, default=10, help="learning-rate warm-up steps")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                        help="both trainers' precision; auto = chosen from the hardware, as "
                             "the trainer does (so ratios mean the same on every machine)")
    parser.add_argument("--ablate", action="store_true",
                        help="also run ours with optim.fused=false (the fused AdamW's effect)")


def measure(args: argparse.Namespace, workdir: Path, overrides: tuple[str, ...] = ()) -> dict:
    """OpenCLIP first, then ours, back to back; the ratio is the figure to read. With
    --ablate, ours once more with the reference (non-fused) AdamW, for that change's effect."""
    openclip = run_openclip(args, workdir)
    ours = run_ours(args, workdir, overrides)
    ablation = {}
    if args.ablate:
        unfused = run_ours(args, workdir / "unfused", (*overrides, "optim.fused=false"))
        ablation = {"ours_unfused_adamw": unfused,
                    "fused_adamw_speedup": ours["samples_per_s"] / unfused["samples_per_s"]}
    return {
        "ours": ours,
        "openclip": openclip,
        **ablation,
        "ratio": ours["samples_per_s"] / openclip["samples_per_s"],
        "settings": {k: getattr(args, k) for k in
                     ("model", "batch", "workers", "steps", "warmup", "lr", "lr_warmup", "device")},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        result = measure(args, Path(tmp))
    for name in ("ours", "openclip"):
        print(f"{name:9s} {result[name]['samples_per_s']:.2f} samples/s")
    print(f"ratio     {result['ratio']:.2f}x")


if __name__ == "__main__":
    main()
