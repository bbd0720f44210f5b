"""Evaluate CLIP checkpoints: one checkpoint, or every checkpoint of a run as training goes.

    python -m eval.run --checkpoint runs/tiny_demo --demo data/demo
    python -m eval.run --checkpoint runs/x/checkpoints/step_00001000.pt \\
        --suite cifar10,cifar100,imagenet --cifar10 ~/data --cifar100 ~/data --imagenet ~/imagenet
    python -m eval.run --watch runs/x --suite demo,linear_probe --demo data/demo --wandb
    python -m eval.run --checkpoint runs/x --suite datacomp --wds-root ~/datacomp_eval
    python -m eval.run --pretrained ViT-B-32.pt --model vit_b32_quickgelu \\
        --bpe bpe_simple_vocab_16e6.txt.gz --cifar10 ~/data

--checkpoint takes a checkpoint file or a run folder (its newest checkpoint). --watch evaluates
each new checkpoint once, until the trainer writes RUN_DIR/finished.json (or --max-wait passes
without a new one). --pretrained scores an OpenAI/OpenCLIP checkpoint file instead (imported
by training.interop into the --model config, with CLIP's tokenizer from --bpe). Results: one
JSON per (checkpoint, dataset, task) under --out (default RUN_DIR/eval/, or eval/ beside the
--pretrained file), a summary table per checkpoint, and OUT/metrics.png. Without --suite, every
suite whose dataset option is given runs (the linear probe only when named).
"""

from __future__ import annotations

import argparse
import os
from contextlib import nullcontext
from functools import partial
from pathlib import Path
from typing import Callable

from data_pipeline.errors import UserError, run_main
from eval.config import DataPaths, InferenceConfig, LinearProbeConfig, add_precision_flag
from eval.evaluate import CheckpointEvaluator, default_out_dir
from eval.suites import SUITES, check_suites, parse_suites
from eval.wandb_log import WandbSink
from eval.watch import WatchConfig, WatchLock, watch
from training.interop.import_checkpoint import (
    check_model_name, import_pretrained, load_clip_tokenizer,
)
from training.model.trained import TrainedModel, load_trained_model, resolve_checkpoint
from training.parallel.process_group import Distributed, setup_distributed, teardown_distributed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--checkpoint", type=Path, help="checkpoint .pt, or a run folder (newest)")
    what.add_argument("--watch", type=Path, metavar="RUN_DIR", help="evaluate each new checkpoint")
    what.add_argument("--pretrained", type=Path, help="OpenAI/OpenCLIP checkpoint file "
                      "(.pt TorchScript, .bin/.pt state dict, .safetensors); needs --model, --bpe")
    imported = p.add_argument_group("--pretrained checkpoints")
    imported.add_argument("--model", help="our config name, e.g. vit_b32_quickgelu for OpenAI's "
                          "ViT-B/32 (OpenAI weights need the _quickgelu variants), or the OpenCLIP "
                          "model-config .json a custom architecture was trained from")
    imported.add_argument("--bpe", type=Path, help="CLIP's BPE: bpe_simple_vocab_16e6.txt.gz "
                          "or a folder with vocab.json + merges.txt")
    p.add_argument("--suite", help=f"comma-separated, from: {', '.join(SUITES)}")
    data = p.add_argument_group("datasets (all offline)")
    data.add_argument("--demo", type=Path, help="demo corpus root (corpus.json, val/, heldout/)")
    data.add_argument("--cifar10", type=Path, help="cifar-10-batches-py or its parent")
    data.add_argument("--cifar100", type=Path, help="cifar-100-python or its parent")
    data.add_argument("--imagenet", help="val/ synset folders, or webdataset shards with .cls")
    data.add_argument("--imagefolder", type=Path, help="one sub-folder per class")
    data.add_argument("--imagefolder-classes", type=Path, help="class names: .txt or .json")
    data.add_argument("--retrieval-csv", type=Path, help="CSV with columns image,caption")
    data.add_argument("--retrieval-shards", help="webdataset shards (captions: lines of .txt)")
    data.add_argument("--wds-root", type=Path, help="DataComp/CLIP_benchmark eval sets, one "
                      "webdataset folder per task (wds_imagenet1k/, wds_vtab-cifar100_test/, ...)")
    data.add_argument("--sugarcrepe", type=Path, help="sugar-crepe checkout (data/*.json)")
    data.add_argument("--sugarcrepe-images", type=Path, help="COCO val2017 images "
                      "(default: val2017/ or images/ beside the JSONs)")
    data.add_argument("--winoground", type=Path, help="data/examples.jsonl + data/images/")
    probe = p.add_argument_group("linear probe")
    probe.add_argument("--probe-datasets", help="comma-separated: demo,cifar10,cifar100,imagefolder")
    probe.add_argument("--probe-max-train", type=int, help="cap on training images")
    probe.add_argument("--probe-c-grid", help="comma-separated C values (default 1e-1..1e6)")
    probe.add_argument("--probe-threads", type=int, help="BLAS threads for the solver "
                       "(default: the library's; 1 is faster on a busy machine)")
    run = p.add_argument_group("inference")
    run.add_argument("--batch-size", type=int, default=256)
    run.add_argument("--workers", type=int, default=2)
    add_precision_flag(run)
    run.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (default: cuda if any)")
    run.add_argument("--max-images", type=int, help="cap per dataset, for a quick look")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, help="results folder (default RUN_DIR/eval)")
    out.add_argument("--force", action="store_true", help="re-evaluate suites already done")
    out.add_argument("--no-plot", action="store_true")
    out.add_argument("--wandb", action="store_true", help="log to the training run's W&B run")
    out.add_argument("--wandb-mode", default="auto", choices=["auto", "online", "offline"])
    loop = p.add_argument_group("watch")
    loop.add_argument("--poll", type=float, default=30.0, help="seconds between looks")
    loop.add_argument("--max-wait", type=float, help="stop after this many seconds with no new "
                      "checkpoint (default: wait for RUN_DIR/finished.json)")
    return p.parse_args(argv)


def _default_suites(paths: DataPaths) -> list[str]:
    given = [name for name in ("demo", "cifar10", "cifar100", "imagenet", "imagefolder")
             if getattr(paths, name) is not None]
    if paths.retrieval_csv is not None or paths.retrieval_shards is not None:
        given.append("retrieval")
    if paths.wds_root is not None:
        given.append("datacomp")
    given += [name for name in ("sugarcrepe", "winoground") if getattr(paths, name) is not None]
    if not given:
        raise UserError("nothing to evaluate: give --suite and the dataset options it needs "
                        "(e.g. --suite demo --demo data/demo)")
    return given


def _csv(text: str | None, cast=str) -> list | None:
    if text is None:
        return None
    try:
        return [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"cannot read {text!r} as a comma-separated list of {cast.__name__}") from None


def _model_loader(args: argparse.Namespace) -> Callable[..., TrainedModel]:
    """How to turn the checkpoint path into a model: ours, or an imported OpenAI/OpenCLIP file."""
    if args.pretrained is None:
        if args.model is not None or args.bpe is not None:
            raise UserError("--model and --bpe go with --pretrained (our checkpoints carry both)")
        return load_trained_model
    if args.model is None or args.bpe is None:
        raise UserError("--pretrained needs --model (e.g. vit_b32_quickgelu for OpenAI's ViT-B/32) "
                        "and --bpe (CLIP's bpe_simple_vocab_16e6.txt.gz)")
    check_model_name(args.model)
    load_clip_tokenizer(args.bpe)  # a wrong --bpe fails now, not after the datasets are read
    return partial(import_pretrained, model_name=args.model, bpe_path=args.bpe)


def _pretrained_file(path: Path) -> Path:
    if not path.is_file():
        raise UserError(f"--pretrained {path}: no such file")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Under torchrun: one process per rank, each embedding a slice of every dataset (eval.sharding).
    env = setup_distributed(args.device) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    try:
        return _main(args, env)
    finally:
        teardown_distributed()


def _main(args: argparse.Namespace, env: Distributed | None) -> int:
    paths = DataPaths(
        demo=args.demo, cifar10=args.cifar10, cifar100=args.cifar100, imagenet=args.imagenet,
        imagefolder=args.imagefolder, imagefolder_classes=args.imagefolder_classes,
        retrieval_csv=args.retrieval_csv, retrieval_shards=args.retrieval_shards,
        wds_root=args.wds_root, sugarcrepe=args.sugarcrepe,
        sugarcrepe_images=args.sugarcrepe_images, winoground=args.winoground,
    )
    probe_kwargs = {"datasets": _csv(args.probe_datasets),
                    "max_train_images": args.probe_max_train, "blas_threads": args.probe_threads}
    if args.probe_c_grid:
        probe_kwargs["c_grid"] = _csv(args.probe_c_grid, float)
    probe = LinearProbeConfig(**probe_kwargs)
    infer = InferenceConfig(batch_size=args.batch_size, workers=args.workers,
                            precision=args.precision,
                            device=args.device if env is None else str(env.device),
                            max_images=args.max_images, sharded=env is not None)
    suites = parse_suites(args.suite) if args.suite else _default_suites(paths)
    check_suites(suites, paths, probe)  # every dataset problem surfaces before any model loads
    load = _model_loader(args)

    if args.watch is not None:
        cfg = WatchConfig(args.watch, poll_seconds=args.poll, max_wait=args.max_wait)
        out_dir = args.out or cfg.run_dir / "eval"
        run_dir = cfg.run_dir
    else:
        checkpoint = (resolve_checkpoint(args.checkpoint) if args.pretrained is None
                      else _pretrained_file(args.pretrained))
        out_dir = args.out or default_out_dir(checkpoint)
        run_dir = out_dir.parent
    main_rank = env is None or env.is_main
    sink = WandbSink(args.wandb_mode, run_dir) if args.wandb and main_rank else None
    evaluator = CheckpointEvaluator(suites, infer, paths, probe, out_dir, force=args.force,
                                    plot=not args.no_plot, wandb=sink, load=load)
    try:
        if args.watch is not None:
            with WatchLock(out_dir) if main_rank else nullcontext():  # rank 0 owns the folder
                watch(cfg, evaluator.pending, evaluator)
        else:
            evaluator(checkpoint)
    finally:
        if sink is not None:
            sink.close()
    return 0


if __name__ == "__main__":
    run_main(main, interrupted_hint="finished suites are recorded in OUT/done.json; rerun to go on")
