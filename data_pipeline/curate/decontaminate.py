"""Decontamination: training pairs whose image is a near copy of an evaluation image.

A zero-shot score means little if the test images were in the training pool (Radford et al.
2021, section 5, measured overlaps of up to 20% on some sets). The eval sets are read by eval's
own readers (`eval.datasets`, `eval.shard_images`), so a set that eval accepts is a set that can
be decontaminated against, with the same layout checks and the same one-line errors. Matching is
by perceptual hash (`hash_duplicates.matches_by_hash`) and, when the embedding pass ran, also by
image-embedding cosine, since a re-crop or re-colour can move a hash further than a model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from data_pipeline.curate.config import DecontaminationConfig
from data_pipeline.curate.embedding_duplicates import matches_by_embedding
from data_pipeline.curate.hash_duplicates import matches_by_hash, perceptual_hash
from data_pipeline.shard_format import BadSample, decode_image, read_shard


def _key(raw) -> str:
    return raw["__key__"]


def _demo_dataset(path: Path, image_size: int):
    """A demo root (its val/ and heldout/ splits) or any shard folder / shard spec."""
    from eval.shard_images import ShardImages, shard_urls

    splits = [path / name for name in ("val", "heldout") if (path / name).is_dir()]
    spec = "::".join(str(s) for s in splits) if splits else str(path)
    return ShardImages(shard_urls(spec, "--decontaminate demo"), image_size, _key)


def eval_dataset(kind: str, path: Path, image_size: int):
    """The test images of an eval set, as eval reads them."""
    from eval import datasets

    if kind == "demo":
        return _demo_dataset(path, image_size)
    if kind in ("cifar10", "cifar100"):
        return datasets.load_cifar(kind, path, image_size).test
    if kind == "imagenet":
        return datasets.load_imagenet(path, image_size).test
    return datasets.load_imagefolder(path, image_size).test


def raw_images(dataset) -> Iterator[Image.Image]:
    """The untransformed images behind one of eval's datasets (the hash needs the pixels, not
    the model's normalised crop)."""
    from eval.datasets import ArrayImages, FileImages

    if isinstance(dataset, ArrayImages):
        for pixels in dataset.pixels:
            yield Image.fromarray(pixels)
    elif isinstance(dataset, FileImages):
        for path in dataset.paths:
            with Image.open(path) as image:
                yield image.convert("RGB")
    else:  # ShardImages
        for url in dataset.urls:
            for raw in read_shard(url):
                if raw.get("__error__"):
                    continue
                try:
                    yield decode_image(raw)
                except BadSample:
                    continue


def find_contamination(
    cfg: DecontaminationConfig, pool_hashes: np.ndarray, pool_image: np.ndarray | None,
    embedder=None, pool_tiny: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, int], dict[str, int]]:
    """-> (object [N]: the eval set a pool image copies, or None; images per eval set; pool
    matches per eval set). The first set listed wins when an image is in two."""
    found = np.full(len(pool_hashes), None, dtype=object)
    sizes, matches = {}, {}
    for name, path in cfg.sets.items():
        image_size = embedder.image_size if embedder is not None else 224
        dataset = eval_dataset(name, Path(path), image_size)
        hit = np.zeros(len(pool_hashes), dtype=bool)
        by_pixels = cfg.by_pixels and pool_tiny is not None
        if cfg.by_hash or by_pixels:
            from data_pipeline.curate.scan import tiny_image

            # One decode of the eval images serves both checks (ImageNet val is 50k images).
            hashes, tiny = [], []
            for image in raw_images(dataset):
                if cfg.by_hash:
                    hashes.append(perceptual_hash(image))
                if by_pixels:
                    tiny.append(tiny_image(image))
            sizes[name] = max(len(hashes), len(tiny))
            if cfg.by_hash:
                reference = np.array(hashes, dtype=np.uint64)
                hit |= matches_by_hash(pool_hashes, reference, cfg.hash_radius) >= 0
            if by_pixels and tiny:
                matched, _ = matches_by_embedding(pool_tiny, np.stack(tiny), cfg.pixel_threshold, index="flat")
                hit |= matched >= 0
        if cfg.by_model and embedder is not None and pool_image is not None:
            from eval.features import encode_images

            features, _ = encode_images(embedder.model, dataset, embedder.inference, desc=name)
            sizes[name] = len(features)
            by_model, _ = matches_by_embedding(pool_image, features.numpy(), cfg.embedding_threshold)
            hit |= by_model >= 0
        new = hit & (found == None)  # noqa: E711 - elementwise on an object array
        found[new] = name
        matches[name] = int(hit.sum())
    return found, sizes, matches
