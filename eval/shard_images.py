"""One in-order pass over webdataset shards as an image dataset: (image tensor, payload) pairs.

What travels with each image is up to the caller: `payload(raw sample) -> value`, or None to
leave the sample out (e.g. no label). The payload function must be picklable (a module-level
function or a functools.partial of one), because dataloader workers receive it.

Unlike the train loader this needs no caption: ImageNet shards carry only .cls labels. Shards
are read and samples judged by `data_pipeline.shard_format`, as everywhere. Undecodable samples
are skipped and counted in a warning, never fatal, and so is a damaged (e.g. truncated) tar: the
warning names the shard, and its samples before the damage are used, as the trainer does. A
missing shard is an error before reading starts (`shard_urls`).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipeline.errors import UserError
from data_pipeline.shard_format import BadSample, RawSample, captions, decode_image, read_shard
from training.data.sources import expand_sources
from training.data.transforms import build_eval_transform

logger = logging.getLogger(__name__)

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
        skipped = broken = 0
        for url in self.urls[worker::workers]:
            for raw in read_shard(url, visit=0):
                if "__error__" in raw:
                    if raw.get("__key__"):
                        skipped += 1
                    else:  # the tar broke here: what came before it is kept, as in training
                        broken += 1
                        logger.warning("shard %s: %s; its samples before the damage are used",
                                       url, raw["__error__"])
                    continue
                value = self.payload(raw)
                if value is None:
                    continue
                try:
                    image = decode_image(raw)
                except BadSample as skip:
                    skipped += 1
                    logger.warning("skipping %s in %s: %s", raw.get("__key__"), url, skip)
                    continue
                yield transform(image), value
        if skipped or broken:
            logger.warning("%d unreadable samples skipped, %d damaged shards, of %d shards",
                           skipped, broken, len(self.urls[worker::workers]))


# -- payloads ------------------------------------------------------------------------------------


def key_and_caption(raw: RawSample) -> tuple[str, str, str]:
    """(shard URL, key, first caption) for search results."""
    found = captions(raw) or [""]
    return raw["__url__"], raw["__key__"], found[0]
