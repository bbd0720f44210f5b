"""An embedded image collection for search: every image of some shards, encoded once, cached.

The cache file is named by a hash of what determines its content: the checkpoint (resolved
path, size, modification time), each shard (URL, and size and modification time for local
files) and the image size. A retrained checkpoint or a rewritten shard therefore gets a new
entry instead of stale features. Entries hold plain tensors and lists (weights_only loads).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from eval.config import InferenceConfig
from eval.features import encode_images
from eval.shard_images import ShardImages, key_and_caption, shard_urls
from data_pipeline.shard_format import BadSample, decode_image, read_shard
from training.model.trained import TrainedModel

CACHE_FORMAT = 1
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "clipstream" / "search"


@dataclass
class ImageIndex:
    features: torch.Tensor  # [N, D], L2-normalised
    urls: list[str]  # shard of each image
    keys: list[str]
    captions: list[str]

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [Q, D] (normalised) -> (scores [Q, k], indices [Q, k]), best first."""
        scores = queries @ self.features.T
        return scores.topk(min(k, len(self.keys)), dim=1)


def _stamp(location: str) -> list:
    if "://" in location or location.startswith("pipe:") or not os.path.exists(location):
        return [location]
    stat = os.stat(location)
    return [str(Path(location).resolve()), stat.st_size, stat.st_mtime_ns]


def cache_key(checkpoint: Path, urls: Sequence[str], image_size: int, precision: str) -> str:
    identity = {
        "format": CACHE_FORMAT,
        "checkpoint": _stamp(str(checkpoint)),
        "shards": [_stamp(url) for url in urls],
        "image_size": image_size,
    }
    if precision != "fp32":  # bf16 features differ in the 3rd digit: their own entry
        identity["precision"] = precision
    return hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:24]


def load_or_build_index(
    trained: TrainedModel, shards: str, cfg: InferenceConfig, cache_dir: Path | None,
) -> tuple[ImageIndex, Path | None, bool]:
    """-> (index, cache file or None, whether it came from the cache)."""
    urls = shard_urls(shards, "--shards")
    cache_file = None
    if cache_dir is not None:
        cache_file = Path(cache_dir) / f"{cache_key(trained.path, urls, trained.image_size, cfg.precision)}.pt"
        if cache_file.is_file():
            entry = torch.load(cache_file, map_location="cpu", weights_only=True)
            index = ImageIndex(entry["features"], entry["urls"], entry["keys"], entry["captions"])
            return index, cache_file, True
    features, payloads = encode_images(
        trained.model, ShardImages(urls, trained.image_size, key_and_caption), cfg, "index"
    )
    index = ImageIndex(features, [p[0] for p in payloads], [p[1] for p in payloads],
                       [p[2] for p in payloads])
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".tmp{os.getpid()}")
        torch.save({"features": index.features, "urls": index.urls, "keys": index.keys,
                    "captions": index.captions, "checkpoint": str(trained.path),
                    "shards": shards}, tmp)
        os.replace(tmp, cache_file)  # atomic: a concurrent reader sees no half-written entry
    return index, cache_file, False


def fetch_images(index: ImageIndex, positions: Sequence[int]) -> dict[int, Image.Image]:
    """The decoded images at `positions` of the index, read back from their shards (only the
    shards that hold one of them)."""
    wanted: dict[str, dict[str, int]] = {}
    for position in positions:
        wanted.setdefault(index.urls[position], {})[index.keys[position]] = position
    found: dict[int, Image.Image] = {}
    for url, keys in wanted.items():
        for raw in read_shard(url, visit=0):
            position = keys.get(raw.get("__key__"))
            if position is None or "__error__" in raw:
                continue
            try:
                found[position] = decode_image(raw)
            except BadSample:
                continue
            if len(found) == len(positions):
                return found
    return found
