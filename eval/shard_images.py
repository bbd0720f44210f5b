"""One in-order pass over webdataset shards as an image dataset: (image tensor, payload) pairs.

What travels with each image is up to the caller: `payload(raw sample) -> value`, or None to
leave the sample out (e.g. no label). The payload function must be picklable (a module-level
function or a functools.partial of one), because dataloader workers receive it.

Unlike training's EvalStream this needs no caption: ImageNet shards carry only .cls labels.
Undecodable samples are skipped and counted in a warning, never fatal; a shard that cannot be
read at all is an error (a wrong path or a broken download should not shrink a test set quietly).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.errors import UserError
from training.sample_decode import SkipSample, decode_image
from training.shard_stream import expand_sources, read_shard
from training.transforms import build_eval_transform

logger = logging.getLogger(__name__)

RawSample = dict[str, Any]
Payload = Callable[[RawSample], Any]


def shard_urls(spec: str, what: str) -> list[str]:
    """A shard spec (directory, brace pattern, URL, `::`-joined) -> its shard URLs."""
    try:
        urls = [url for source in expand_sources(str(spec)) for url in source]
    except (ValueError, OSError) as exn:
        raise UserError(f"{what}: {exn}") from None
    if not urls:
        raise UserError(f"{what}: no shards in {spec}")
    return urls


class ShardImages(IterableDataset):
    def __init__(self, urls: list[str], image_size: int, payload: Payload) -> None:
        self.urls, self.image_size, self.payload = list(urls), image_size, payload

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        transform = build_eval_transform(self.image_size)
        skipped = 0
        for url in self.urls[worker::workers]:
            for raw in read_shard(url, visit=0):
                if "__error__" in raw:
                    if raw.get("__key__"):
                        skipped += 1
                        continue
                    raise RuntimeError(f"{url}: {raw['__error__']}")
                value = self.payload(raw)
                if value is None:
                    continue
                try:
                    image = decode_image(raw)
                except SkipSample as skip:
                    skipped += 1
                    logger.warning("skipping %s in %s: %s", raw.get("__key__"), url, skip)
                    continue
                yield transform(image), value
        if skipped:
            logger.warning("%d unreadable samples skipped in %d shards", skipped, len(self.urls))


# -- payloads ------------------------------------------------------------------------------------


def read_json_member(raw: RawSample) -> dict[str, Any]:
    try:
        meta = json.loads(raw["json"]) if "json" in raw else {}
    except ValueError:
        return {}
    return meta if isinstance(meta, dict) else {}


def class_label(raw: RawSample) -> int | None:
    """The integer of a `.cls` member (webdataset's classification convention)."""
    data = raw.get("cls")
    if data is None:
        return None
    try:
        return int(data.decode("utf-8").strip())
    except ValueError:
        return None


def captions(raw: RawSample) -> list[str] | None:
    """Every caption of an image: a `captions` list in its .json if present, else one per
    non-empty line of its .txt (Flickr30k/COCO shards hold five per image)."""
    listed = read_json_member(raw).get("captions")
    if isinstance(listed, list) and listed:
        found = [str(c).strip() for c in listed if str(c).strip()]
    else:
        text = raw.get("txt", b"").decode("utf-8", errors="replace")
        found = [line.strip() for line in text.splitlines() if line.strip()]
    return found or None


def key_and_caption(raw: RawSample) -> tuple[str, str, str]:
    """(shard URL, key, first caption) for search results."""
    found = captions(raw) or [""]
    return raw["__url__"], raw["__key__"], found[0]
