"""Zero-shot eval throughput: our eval (eval.zeroshot) vs CLIP_benchmark on the same images.

    .venv/bin/python -m bench.eval_throughput --checkpoint runs/x [--shards 2]

Both score zero-shot classification of the bench corpus's colour x shape classes with the
corpus's prompt templates, on the same images read by the same dataset (our eval transform is
OpenCLIP's: bicubic resize, centre crop, CLIP normalisation), batch size, worker count and
precision (auto: bf16 autocast where the hardware has it, else fp32). CLIP_benchmark (the classifier and classification calls of
`clip_benchmark.metrics.zeroshot_classification.evaluate`) runs the
OpenCLIP export of the same checkpoint (training.interop) when that export is possible, else an
untrained OpenCLIP model of the same size (said so in the result). Images/s counts the whole call:
classifier from the prompts, then every image. Ours, CLIP_benchmark, ours again.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from eval.config import InferenceConfig
from eval.datasets import ClassificationSet
from eval.demo import demo_label, read_corpus
from eval.shard_images import ShardImages
from eval.zeroshot import zeroshot_classification
from training.parallel.precision import choose_precision
from training.model.trained import load_trained_model, resolve_checkpoint


def _openclip_model(trained, workdir: Path):
    """(model, tokenizer, what it is): the export of our checkpoint, else same-size random."""
    import open_clip

    try:
        from training.interop.export_checkpoint import export_openclip

        files = export_openclip(trained, workdir / "openclip_export")
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{workdir / 'openclip_export'}")
        return model, open_clip.get_tokenizer(f"local-dir:{workdir / 'openclip_export'}"), \
            f"OpenCLIP export of the same checkpoint ({files.openclip_name})"
    except Exception as exn:  # noqa: BLE001 - the export is optional; say why it was not used
        name = "ViT-S-32"
        model = open_clip.create_model(name, pretrained=None)
        return model, open_clip.get_tokenizer(name), \
            f"untrained OpenCLIP {name} (same sizes; export not possible: {type(exn).__name__}: {exn})"


def measure(
    checkpoint: str, corpus_root: str, shards: int, batch: int, workers: int, device: str = "cpu",
    precision: str = "auto",
) -> dict:
    precision = choose_precision(precision, device).name
    amp = precision != "fp32"  # CLIP_benchmark's amp is torch.autocast's default half dtype
    trained = load_trained_model(resolve_checkpoint(Path(checkpoint)), device=device)
    corpus = read_corpus(Path(corpus_root))
    urls = corpus.split("train")[:shards]
    size = trained.model_config.vision.image_size
    dataset = ShardImages(urls, size, partial(demo_label, corpus.index))
    dataset.classes = corpus.classnames  # CLIP_benchmark reads the class list off the dataset
    data = ClassificationSet("bench", corpus.classnames, corpus.templates, dataset)
    cfg = InferenceConfig(batch_size=batch, workers=workers, precision=precision, device=device)

    images = {}

    def ours() -> tuple[float, float]:
        result = zeroshot_classification(trained, data, cfg)
        images["count"] = result.num_images  # the same dataset feeds CLIP_benchmark
        return result.num_images / result.seconds, result.metrics["acc1"]

    from clip_benchmark.metrics import zeroshot_classification as cb

    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        model, tokenizer, reference_model = _openclip_model(trained, Path(tmp))
    model.to(device).eval()

    def clip_benchmark() -> tuple[float, float]:
        loader = DataLoader(dataset, batch_size=batch, num_workers=workers)
        started = time.perf_counter()
        # CLIP_benchmark's templates name their slot {c}; ours are positional {}.
        templates = [t.replace("{}", "{c}") for t in corpus.templates]
        # The two calls of its `evaluate` that do the work (its accuracy helper fails on
        # numpy 2: float() of a 1-element array), then top-1 from its logits.
        classifier = cb.zero_shot_classifier(model, tokenizer, corpus.classnames, templates,
                                             device, amp=amp)
        logits, target = cb.run_classification(model, classifier, loader, device, amp=amp)
        seconds = time.perf_counter() - started
        return images["count"] / seconds, (logits.argmax(1) == target).float().mean().item()

    first, acc = ours()
    reference, reference_acc = clip_benchmark()
    second, _ = ours()
    mean = (first + second) / 2
    return {
        "ours_images_per_s": mean,
        "ours_readings": [first, second],
        "clip_benchmark_images_per_s": reference,
        "ratio": mean / reference,
        "ours_acc1": acc,
        "clip_benchmark_acc1": reference_acc,
        "clip_benchmark_model": reference_model,
        "batch": batch,
        "workers": workers,
        "shards": shards,
        "precision": precision,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--corpus", default="data/bench/corpus")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"])
    args = parser.parse_args(argv)
    result = measure(args.checkpoint, args.corpus, args.shards, args.batch, args.workers,
                     precision=args.precision)
    for key, value in result.items():
        print(f"{key:28s} {value}")


if __name__ == "__main__":
    main()
