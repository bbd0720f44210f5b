"""Zero-shot image<->text retrieval with several captions per image (Flickr30k / COCO style).

Sources:
    CSV       columns `image` and `caption`, one row per (image, caption); an image with five
              captions has five rows. Image paths are relative to the CSV's folder.
    shards    webdataset shards: an image's captions are the lines of its .txt (or a
              "captions" list in its .json); the demo corpus has one caption per image.

Metrics (CLIP_benchmark's names and meaning): image_retrieval_recall@k = a caption used as the
query finds its image in the top k; text_retrieval_recall@k = an image used as the query finds
one of its captions in the top k.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from data_pipeline.errors import UserError
from eval.config import InferenceConfig
from eval.datasets import FileImages
from eval.features import encode_images, encode_texts
from eval.metrics import retrieval_chance, retrieval_metrics
from eval.results import EvalResult
from data_pipeline.shard_format import captions
from eval.shard_images import ShardImages, shard_urls
from training.model.trained import TrainedModel

TASK = "zeroshot_retrieval"
CSV_COLUMNS = ("image", "caption")


@dataclass
class RetrievalSet:
    name: str
    images: Dataset  # yields (image tensor, list of captions)


def load_retrieval_csv(path: Path, image_size: int) -> RetrievalSet:
    if not path.is_file():
        raise UserError(f"--retrieval-csv {path}: no such file; expected a CSV with columns "
                        f"image,caption (several rows per image, paths relative to the CSV)")
    grouped: dict[str, list[str]] = {}  # insertion order = first appearance of each image
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UserError(f"--retrieval-csv {path}: missing column(s) {missing}; has "
                            f"{reader.fieldnames}")
        for row in reader:
            caption = (row["caption"] or "").strip()
            if row["image"] and caption:
                grouped.setdefault(row["image"], []).append(caption)
    if not grouped:
        raise UserError(f"--retrieval-csv {path}: no rows with both an image and a caption")
    paths = [path.parent / image for image in grouped]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise UserError(f"--retrieval-csv {path}: {len(absent)} image(s) not found, e.g. {absent[0]}")
    return RetrievalSet(path.stem, FileImages(paths, list(grouped.values()), image_size))


def load_retrieval_shards(spec: str, image_size: int, name: str | None = None) -> RetrievalSet:
    urls = shard_urls(spec, "--retrieval-shards")
    if name is None:
        name = Path(spec.rstrip("/")).name if "{" not in spec else "retrieval_shards"
    return RetrievalSet(name, ShardImages(urls, image_size, captions))


def zeroshot_retrieval(trained: TrainedModel, data: RetrievalSet, cfg: InferenceConfig) -> EvalResult:
    started = time.perf_counter()
    image_features, caption_lists = encode_images(trained.model, data.images, cfg, data.name)
    texts = [text for group in caption_lists for text in group]
    text_to_image = torch.tensor(
        [i for i, group in enumerate(caption_lists) for _ in group], dtype=torch.long
    )
    text_features = encode_texts(trained.model, trained.tokenizer, texts, cfg)
    counts = [len(group) for group in caption_lists]
    return EvalResult(
        dataset=data.name,
        task=TASK,
        metrics=retrieval_metrics(image_features @ text_features.T, text_to_image),
        chance=retrieval_chance(counts),
        num_images=len(caption_lists),
        details={"texts": len(texts), "precision": cfg.precision, "max_images": cfg.max_images},
        seconds=time.perf_counter() - started,
    )
