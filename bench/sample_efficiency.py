"""Sample efficiency: does our trainer learn as much per sample, and per second, as OpenCLIP's?

Both trainers train the same architecture (one OpenCLIP model-config JSON: OpenCLIP reads it
with `open_clip.add_model_config`, ours with `model.openclip_config`), on the same shards, with
the same batch size, lr schedule (linear warm-up, cosine to 0), AdamW betas/eps, weight decay,
precision, augmentation (OpenCLIP's RandomResizedCrop scale 0.9-1.0), CLIP's BPE, one data
worker, no gradient clipping (OpenCLIP's default) and the same number of samples. Each epoch's
checkpoint of both is scored by the same code: OpenCLIP's through our importer
(training.interop.import_checkpoint, which maps its weights onto our towers exactly), ours
directly, both by eval.demo's zero-shot protocol (prompt-ensembled colour x shape classes on the
val/ and heldout/ images, never seen in training).

    .venv/bin/python -m bench.sample_efficiency                  # quick preset, ~20 min, 2 cores
    .venv/bin/python -m bench.sample_efficiency --preset issue    # issue #16's settings, ~2.5 h

-> bench/sample_efficiency.md and .json. Work files go to data/bench/learning (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
WORK = REPO / "data" / "bench" / "learning"


@dataclass(frozen=True)
class Preset:
    """Corpus and architecture sizes; the optimisation settings are shared (see `Settings`)."""

    samples: int  # training pairs in the corpus (one epoch)
    render_size: int
    image_size: int  # shard image size; the model's input size
    model_size: int  # the ViT's input size (RandomResizedCrop target)
    vision: dict
    text: dict
    embed_dim: int
    epochs: int


PRESETS = {
    # Issue #16's measurement: 20k pairs at 256 px, ViT 6 x 256 at 128 px (patch 16), text 4 x 256.
    "issue": Preset(20_000, 256, 256, 128,
                    dict(layers=6, width=256, patch_size=16, head_width=64),
                    dict(width=256, heads=4, layers=4), 256, 3),
    # The same recipe shrunk to fit a CPU session: 64 px, ViT 4 x 128 (patch 8: the same 64
    # tokens), text 3 x 128.
    "quick": Preset(10_000, 128, 64, 64,
                    dict(layers=4, width=128, patch_size=8, head_width=32),
                    dict(width=128, heads=4, layers=3), 128, 2),
    # Only checks that the bench runs end to end (a minute); its numbers mean nothing.
    "smoke": Preset(512, 64, 32, 32, dict(layers=1, width=64, patch_size=8, head_width=32),
                    dict(width=64, heads=2, layers=1), 64, 2),
}


@dataclass(frozen=True)
class Settings:
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.2
    workers: int = 1


def openclip_json(preset: Preset) -> dict:
    return {
        "embed_dim": preset.embed_dim,
        "vision_cfg": {"image_size": preset.model_size, **preset.vision},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, **preset.text},
    }


def build_corpus(preset: Preset, root: Path) -> Path:
    from bench.corpus import clip_bpe_path
    from training.text.tokenizer import Tokenizer

    subprocess.run(
        [sys.executable, "-m", "data_pipeline.shards", "--output", str(root),
         "--num-samples", str(preset.samples), "--image-size", str(preset.image_size),
         "--render-size", str(preset.render_size), "--samples-per-shard", "2000",
         "--incremental"],
        cwd=REPO, check=True, stdout=subprocess.DEVNULL,
    )
    tokenizer = root / "tokenizer.json"
    if not tokenizer.is_file():
        Tokenizer.from_clip_bpe(clip_bpe_path()).save(tokenizer)
    return root


def train_samples(root: Path) -> int:
    return sum(json.loads((root / "train" / "sizes.json").read_text()).values())


def _run(cmd: list[str], log: Path, env: dict | None = None) -> float:
    """Run a trainer; returns its start time (epoch seconds) for the checkpoint wall times."""
    started = time.time()
    with log.open("w") as out:
        done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({done.returncode}); see {log}")
    print(f"  {cmd[2]}: {time.time() - started:.0f} s", flush=True)
    return started


def run_ours(root: Path, arch: Path, preset: Preset, s: Settings, seed: int, work: Path,
             precision: str, label: str = "ours", extra: tuple[str, ...] = ()
             ) -> list[tuple[int, Path, float]]:
    """(epoch, checkpoint, seconds since start) per epoch."""
    steps_per_epoch = train_samples(root) // s.batch
    run_dir = work / f"{label}_seed{seed}"
    cmd = [
        sys.executable, "-m", "training.main",
        f"data.train_shards={root / 'train'}", f"data.image_size={preset.model_size}",
        f"data.batch_size={s.batch}", f"data.workers={s.workers}", f"data.seed={seed}",
        "data.scale=[0.9, 1.0]", f"model.openclip_config={arch}",
        f"optim.lr={s.lr}", f"optim.warmup_steps={s.warmup}",
        f"optim.weight_decay={s.weight_decay}", "optim.grad_clip=0",
        f"engine.precision={precision}", f"train.epochs={preset.epochs}", f"train.seed={seed}",
        f"train.run_dir={run_dir}", f"checkpoint.every={steps_per_epoch}",
        f"checkpoint.keep={preset.epochs + 1}", "log.every=10", "log.progress_bar=false", *extra,
    ]
    if run_dir.exists():  # a finished run would only be reported, not retrained
        shutil.rmtree(run_dir)
    started = _run(cmd, work / f"{label}_seed{seed}.log")
    return _epoch_checkpoints(
        lambda epoch: run_dir / "checkpoints" / f"step_{epoch * steps_per_epoch:08d}.pt",
        preset.epochs, started)


def _epoch_checkpoints(path_of, epochs: int, started: float) -> list[tuple[int, Path, float]]:
    """(epoch, checkpoint, seconds from the trainer's start to the checkpoint's write)."""
    return [(e, path_of(e), path_of(e).stat().st_mtime - started) for e in range(1, epochs + 1)]


def run_openclip(root: Path, arch: Path, preset: Preset, s: Settings, seed: int, work: Path,
                 precision: str, label: str = "openclip", extra: tuple[str, ...] = ()
                 ) -> list[tuple[int, Path, float]]:
    from bench.train_throughput import OPENCLIP_PRECISION

    shards = "::".join(str(p) for p in sorted((root / "train").glob("*.tar")))
    logs = work / "openclip_logs"
    name = f"{label}_seed{seed}"
    # open_clip_train knows only the configs registered with open_clip: register ours first.
    launcher = ("import sys, open_clip; open_clip.add_model_config(sys.argv[1]); "
                "from open_clip_train.main import main; main(sys.argv[2:])")
    cmd = [
        sys.executable, "-c", launcher, str(arch),
        "--model", arch.stem, "--train-data", shards, "--dataset-type", "webdataset",
        "--train-num-samples", str(train_samples(root)), "--epochs", str(preset.epochs),
        "--batch-size", str(s.batch), "--workers", str(s.workers),
        "--precision", OPENCLIP_PRECISION[precision], "--device", "cpu",
        "--lr", str(s.lr), "--warmup", str(s.warmup), "--wd", str(s.weight_decay),
        "--beta1", "0.9", "--beta2", "0.98", "--eps", "1e-6", "--seed", str(seed),
        "--save-frequency", "1", "--report-to", "", "--log-every-n-steps", "10",
        "--logs", str(logs), "--name", name, *extra,  # extra: more open_clip_train arguments
    ]
    if (logs / name).exists():  # open_clip_train refuses to reuse an experiment name
        shutil.rmtree(logs / name)
    started = _run(cmd, work / f"{name}.log", env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return _epoch_checkpoints(lambda epoch: logs / name / "checkpoints" / f"epoch_{epoch}.pt",
                              preset.epochs, started)


def score(trained, root: Path) -> dict[str, float]:
    from eval.config import InferenceConfig
    from eval.demo import evaluate_demo

    results = evaluate_demo(trained, root, InferenceConfig(batch_size=256, workers=1))
    by_name = {(r.dataset, r.task): r.metrics for r in results}
    heldout = by_name[("demo_heldout", "zeroshot_classification")]
    val = by_name[("demo_val", "zeroshot_classification")]
    return {"val_acc1": val["acc1"], "val_shape_acc1": val["shape_acc1"],
            "heldout_acc1": heldout["acc1"], "heldout_shape_acc1": heldout["shape_acc1"]}


def evaluate(kind: str, checkpoints, root: Path, arch: Path) -> list[dict]:
    from bench.corpus import clip_bpe_path
    from training.interop.import_checkpoint import import_pretrained
    from training.model.trained import load_trained_model

    rows = []
    for epoch, path, seconds in checkpoints:
        if kind != "openclip":
            trained = load_trained_model(path)
        else:
            trained = import_pretrained(path, str(arch), clip_bpe_path())
        rows.append({"epoch": epoch, "seconds": round(seconds, 1), **score(trained, root)})
    return rows


def _mean_spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{100 * mean:.1f}%"
    return f"{100 * mean:.1f}% ({100 * min(values):.1f}-{100 * max(values):.1f})"


def _at_time(curve: list[tuple[float, float]], seconds: float) -> float | None:
    """Accuracy of a trainer at `seconds`, linear between its checkpoints (from 0 at 0 s,
    which is below chance but only used before the first checkpoint); None past its end."""
    points = [(0.0, 0.0), *curve]
    for (t0, a0), (t1, a1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return a0 + (a1 - a0) * (seconds - t0) / (t1 - t0)
    return None


TITLES = {"openclip": "OpenCLIP", "ours": "ours", "ours_timm_init": "ours, timm init"}


def _title(kind: str) -> str:
    return TITLES.get(kind, f"ours, {kind}")


def to_markdown(report: dict) -> str:
    preset, seeds = report["preset"], report["seeds"]
    kinds = list(report["runs"])
    lines = [
        "# Sample efficiency: ours vs OpenCLIP 3.3's open_clip_train, same architecture and recipe",
        "",
        f"Machine: {report['machine']}. Precision: {report['precision']} for both. Preset "
        f"`{report['preset_name']}`: {preset['samples']} training pairs per epoch, "
        f"{preset['epochs']} epochs, model input {preset['model_size']} px, architecture "
        f"`{report['architecture']}`; batch {report['settings']['batch']}, lr "
        f"{report['settings']['lr']}, warm-up {report['settings']['warmup']} steps, weight decay "
        f"{report['settings']['weight_decay']}, {report['settings']['workers']} data worker, "
        f"seeds {seeds}. Zero-shot accuracy over the 48 colour x shape classes on fresh images "
        "(val: pairs seen in training; held-out: the 8 pairs never seen), mean over seeds "
        "(min-max).",
        "",
        *[f"- `{_title(k)}`: ours with `{' '.join(v)}`" for k, v in report.get("variants", {}).items()],
        "",
        "## At equal samples",
        "",
        "| epoch | samples | " + " | ".join(f"{_title(k)} {m}" for m in ("val acc1", "held-out acc1")
                                             for k in kinds) + " | "
        + " | ".join(f"{_title(k)} wall s" for k in kinds) + " |",
        "|---|---|" + "---|" * (3 * len(kinds)),
    ]
    for epoch in range(1, preset["epochs"] + 1):
        cells = {k: [r for runs in report["runs"][k].values() for r in runs if r["epoch"] == epoch]
                 for k in kinds}
        accuracies = [_mean_spread([r[metric] for r in cells[k]])
                      for metric in ("val_acc1", "heldout_acc1") for k in kinds]
        seconds = [f"{statistics.fmean(r['seconds'] for r in cells[k]):.0f}" for k in kinds]
        lines.append(f"| {epoch} | {epoch * preset['samples']} | " + " | ".join(accuracies + seconds)
                     + " |")
    lines += [
        "",
        "## At equal wall time",
        "",
        "Ours at each of its checkpoints, next to OpenCLIP at the same time and at twice the time "
        "(linear between OpenCLIP's checkpoints; '-' past its last one). Val acc1, mean over seeds.",
        "",
        "| ours at | ours | OpenCLIP at the same time | OpenCLIP at 2x the time |",
        "|---|---|---|---|",
    ]
    for row in report["equal_time"]:
        same = "-" if row["openclip_same"] is None else f"{100 * row['openclip_same']:.1f}%"
        double = "-" if row["openclip_double"] is None else f"{100 * row['openclip_double']:.1f}%"
        lines.append(f"| {row['seconds']:.0f} s | {100 * row['ours']:.1f}% | {same} | {double} |")
    lines += ["", report["note"], ""]
    return "\n".join(lines)


def equal_time(runs: dict) -> list[dict]:
    def mean_curve(kind: str) -> list[tuple[float, float]]:
        per_seed = list(runs[kind].values())
        epochs = len(per_seed[0])
        return [(statistics.fmean(s[e]["seconds"] for s in per_seed),
                 statistics.fmean(s[e]["val_acc1"] for s in per_seed)) for e in range(epochs)]

    ours, theirs = mean_curve("ours"), mean_curve("openclip")
    return [{"seconds": t, "ours": acc, "openclip_same": _at_time(theirs, t),
             "openclip_double": _at_time(theirs, 2 * t)} for t, acc in ours]


def _reused(report: Path, kinds: list[str], preset: str, seeds: list[int]) -> dict:
    """`kinds`' runs from an earlier report of the same preset and seeds."""
    if not kinds:
        return {}
    old = json.loads(report.read_text()) if report.is_file() else {}
    if old.get("preset_name") != preset or old.get("seeds") != seeds:
        raise SystemExit(f"--reuse: {report} is not a report of preset {preset} seeds {seeds}")
    missing = [k for k in kinds if k not in old["runs"]]
    if missing:
        raise SystemExit(f"--reuse: {report} has no runs of {', '.join(missing)}")
    return {k: old["runs"][k] for k in kinds}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--precision", default="auto",
                        help="auto (from the hardware, as the trainer chooses), bf16, fp16, fp32")
    parser.add_argument("--out", type=Path, default=BENCH / "sample_efficiency")
    parser.add_argument("--timm-init", action="store_true",
                        help="also train ours with timm's ViT init (model.vision.init=timm)")
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL=K=V[;K=V]",
                        help="also train ours with these run-config overrides, as column LABEL "
                             "(e.g. shuffle5k=data.sample_shuffle_buffer=5000); repeatable")
    parser.add_argument("--reuse", action="append", default=[], metavar="KIND",
                        help="take KIND's runs (openclip, ours, a variant) from the report "
                             "already at --out (same preset and seeds) instead of training")
    args = parser.parse_args(argv)

    from bench import machine
    from training.parallel.precision import choose_precision

    preset, settings = PRESETS[args.preset], Settings()
    precision = choose_precision(args.precision, "cpu")
    work = WORK / args.preset
    work.mkdir(parents=True, exist_ok=True)
    root = build_corpus(preset, work / "corpus")
    arch = work / f"bench-vit-{args.preset}.json"
    arch.write_text(json.dumps(openclip_json(preset), indent=2))
    print(f"precision {precision.name} ({precision.reason}); corpus {root}", flush=True)

    trainers = [("openclip", run_openclip, ()), ("ours", run_ours, ())]
    if args.timm_init:
        # What issue #16 measured before the CLIP init: the same run with timm's ViT init.
        trainers.append(("ours_timm_init", run_ours, ("model.vision.init=timm",)))
    for variant in args.variant:
        label, _, overrides = variant.partition("=")
        if not label or not overrides:
            parser.error(f"--variant {variant!r}: expected LABEL=KEY=VALUE[;KEY=VALUE]")
        trainers.append((label, run_ours, tuple(overrides.split(";"))))
    runs: dict[str, dict[str, list[dict]]] = {kind: {} for kind, _, _ in trainers}
    runs.update(_reused(args.out.with_suffix(".json"), args.reuse, args.preset, args.seeds))
    for seed in args.seeds:
        for kind, trainer, extra in trainers:
            if kind in args.reuse:
                continue
            checkpoints = trainer(root, arch, preset, settings, seed, work, precision.name,
                                  kind, extra)
            runs[kind][str(seed)] = evaluate(kind, checkpoints, root, arch)
            print(f"  {kind} seed {seed}: {runs[kind][str(seed)]}", flush=True)

    report = {
        "preset_name": args.preset, "preset": asdict(preset), "settings": asdict(settings),
        "seeds": args.seeds, "precision": f"{precision.name} ({precision.reason})",
        "machine": machine.one_line(machine.describe()),
        "architecture": json.dumps(openclip_json(preset)),
        "variants": {kind: list(extra) for kind, _, extra in trainers if extra},
        "runs": runs, "equal_time": equal_time(runs),
        "note": "Both trainers' wall times include their start-up (imports, first shard) and the "
                "per-epoch checkpoint write; evaluation runs afterwards and is not counted.",
    }
    args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))


if __name__ == "__main__":
    main()
