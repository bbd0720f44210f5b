"""Data loader throughput: our training pipeline alone vs the raw JPEG-decode limit and
OpenCLIP's loader, on the same shards with the same number of worker processes.

    .venv/bin/python -m bench.data_loader [--workers 1 --batches 24]

- ours: `training.data.build_train_loader` exactly as the trainer builds it (tar reading,
  shuffle buffer, decode, RandomResizedCrop, tokenise with CLIP's BPE, dynamic-length collate,
  handing batches over from the worker processes).
- raw decode limit: the same JPEG bytes (already in memory) decoded to RGB in `--workers`
  processes and nothing else: no tar reading, no augmentation, no batching; once by PIL (the
  issue's yardstick) and once by libjpeg-turbo called directly (simplejpeg, the decoder ours
  uses since it decodes into numpy: `shard_format.decode_pixels`).
- OpenCLIP: `open_clip_train.data.get_wds_dataset` with OpenCLIP's own training transform and
  tokenizer, the loader its trainer uses.
"""

from __future__ import annotations

import argparse
import io
import multiprocessing
import time
from argparse import Namespace
from pathlib import Path

from braceexpand import braceexpand
import simplejpeg
from PIL import Image

from data_pipeline.shard_format import read_shard
from training.data import DataConfig, build_train_loader
from training.text.tokenizer import Tokenizer

DEFAULT_SHARDS = "data/bench/corpus/train/{00000..00007}.tar"


def _jpeg_bytes(pattern: str, limit: int) -> list[bytes]:
    images: list[bytes] = []
    for path in braceexpand(pattern):
        for raw in read_shard(path):
            if "jpg" in raw:
                images.append(raw["jpg"])
                if len(images) == limit:
                    return images
    return images


def _pil_decode(data: bytes) -> None:
    Image.open(io.BytesIO(data)).convert("RGB")  # convert() forces the full decode


def _turbo_decode(data: bytes) -> None:
    simplejpeg.decode_jpeg(data, colorspace="RGB")


# The two yardsticks: PIL (the "decode-only", what OpenCLIP's loader decodes with) and
# libjpeg-turbo called directly, which is what our loader now decodes with (decode_pixels).
DECODERS = {"pil": _pil_decode, "libjpeg-turbo": _turbo_decode}


def _decode_all(images: list[bytes], decoder: str = "pil") -> float:
    decode = DECODERS[decoder]
    started = time.perf_counter()
    for data in images:
        decode(data)
    return time.perf_counter() - started


def raw_decode_limit(pattern: str, samples: int, workers: int, decoder: str = "pil") -> float:
    """Images/s of decode alone, `workers` processes each decoding an equal share."""
    images = _jpeg_bytes(pattern, samples)
    processes = max(1, workers)
    shares = [images[i::processes] for i in range(processes)]
    _decode_all(images[:32], decoder)  # warm-up: library loading, first allocations
    if processes == 1:
        return len(images) / _decode_all(images, decoder)
    with multiprocessing.get_context("fork").Pool(processes) as pool:
        # each process times its own share
        seconds = pool.starmap(_decode_all, [(share, decoder) for share in shares])
    return len(images) / max(seconds)


def _time_batches(batches, warmup: int, timed: int, batch_size) -> float:
    iterator = iter(batches)
    for _ in range(warmup):
        next(iterator)
    started, samples = time.perf_counter(), 0
    for _ in range(timed):
        batch = next(iterator)
        samples += batch_size(batch)
    return samples / (time.perf_counter() - started)


def ours(pattern: str, tokenizer: Tokenizer, args: argparse.Namespace,
         augment_on: str = "workers") -> float:
    cfg = DataConfig(
        train_shards=pattern, num_samples=4096, batch_size=args.batch, image_size=args.image_size,
        workers=args.workers, sample_shuffle_buffer=256, scale=(0.9, 1.0), augment_on=augment_on,
    )
    loader = build_train_loader(cfg, tokenizer.encode, tokenizer.pad_id)
    try:
        return _time_batches(loader, args.warmup, args.batches, lambda b: b["image"].shape[0])
    finally:
        loader.close()


def batched_augment_rate(pattern: str, tokenizer: Tokenizer, args: argparse.Namespace,
                         device: str) -> float:
    """Samples/s of the device half of data.augment_on=device (resize, normalise) on `device`,
    over batches the loader's worker half made beforehand."""
    import torch

    from training.data.device_augment import augment_on_device

    cfg = DataConfig(
        train_shards=pattern, num_samples=4096, batch_size=args.batch, image_size=args.image_size,
        workers=0, sample_shuffle_buffer=0, scale=(0.9, 1.0), augment_on="device",
    )
    loader = build_train_loader(cfg, tokenizer.encode, tokenizer.pad_id)
    batches = [next(loader) for _ in range(max(2, args.warmup + 1))]
    target = torch.device(device)
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    for batch in batches[:1]:  # warm-up: kernels, allocator
        augment_on_device(batch["image"], batch["augment_params"], args.image_size, target)
    sync()
    started = time.perf_counter()
    rounds = 3 if target.type == "cpu" else 20
    for _ in range(rounds):
        for batch in batches:
            augment_on_device(batch["image"], batch["augment_params"], args.image_size, target)
    sync()
    return rounds * len(batches) * args.batch / (time.perf_counter() - started)


def measure_device_path(args: argparse.Namespace, device: str = "cpu") -> dict:
    """data.augment_on=device: what the CPU side makes per worker (decode, draws, crop), next
    to PIL's decode-only rate on the same JPEGs (issue #17's goal: within 1.5x), and what the
    batched half does on `device`."""
    tokenizer = Tokenizer.from_file(args.tokenizer)
    cpu_side = ours(args.loader_shards, tokenizer, args, augment_on="device")
    raw = raw_decode_limit(args.loader_shards, args.batches * args.batch, args.workers)
    turbo = raw_decode_limit(args.loader_shards, args.batches * args.batch, args.workers,
                             "libjpeg-turbo")
    return {
        "device_path_samples_per_s": cpu_side,
        "raw_decode_samples_per_s": raw,
        "ratio_to_raw_decode": cpu_side / raw,
        "raw_turbo_decode_samples_per_s": turbo,
        "ratio_to_turbo_decode": cpu_side / turbo,
        "augment_samples_per_s": batched_augment_rate(
            args.loader_shards, tokenizer, args, device),
        "device": device,
        "workers": args.workers,
    }


def openclip(pattern: str, args: argparse.Namespace) -> float:
    import open_clip
    from open_clip_train.data import get_wds_dataset

    preprocess = open_clip.image_transform(args.image_size, is_train=True)
    options = Namespace(
        train_data=pattern, train_data_upsampling_factors=None, dataset_resampled=False,
        train_num_samples=64 * 4096, batch_size=args.batch, workers=args.workers,
        world_size=1, seed=0, distributed=False, val_data=None,
    )
    data = get_wds_dataset(options, preprocess, is_train=True, tokenizer=open_clip.get_tokenizer("ViT-S-32"))
    return _time_batches(data.dataloader, args.warmup, args.batches, lambda b: b[0].shape[0])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loader-shards", default=DEFAULT_SHARDS)
    parser.add_argument("--tokenizer", default="data/bench/corpus/tokenizer.json")
    parser.add_argument("--loader-batches", dest="batches", type=int, default=24)
    parser.add_argument("--loader-warmup", dest="warmup", type=int, default=2)


def measure(args: argparse.Namespace) -> dict:
    tokenizer = Tokenizer.from_file(args.tokenizer)
    samples = args.batches * args.batch
    # Interleaved (ours, raw, OpenCLIP, ours) so a load change from other jobs shows up as a
    # spread between ours' two readings instead of biasing one side.
    first = ours(args.loader_shards, tokenizer, args)
    raw = raw_decode_limit(args.loader_shards, samples, args.workers)
    turbo = raw_decode_limit(args.loader_shards, samples, args.workers, "libjpeg-turbo")
    reference = openclip(args.loader_shards, args)
    second = ours(args.loader_shards, tokenizer, args)
    device_side = ours(args.loader_shards, tokenizer, args, augment_on="device")
    mean = (first + second) / 2
    return {
        # data.augment_on=device: the workers' side alone (the resize runs on the GPU).
        "device_path_samples_per_s": device_side,
        "device_path_ratio_to_raw_decode": device_side / raw,
        "device_path_ratio_to_turbo_decode": device_side / turbo,
        "ours_samples_per_s": mean,
        "ours_readings": [first, second],
        "raw_decode_samples_per_s": raw,
        "openclip_samples_per_s": reference,
        "ratio_to_raw_decode": mean / raw,
        "raw_turbo_decode_samples_per_s": turbo,
        "ratio_to_turbo_decode": mean / turbo,
        "ratio_to_openclip": mean / reference,
        "workers": args.workers,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=224)
    result = measure(parser.parse_args(argv))
    for key, value in result.items():
        print(f"{key:28s} {value}")


if __name__ == "__main__":
    main()
