"""Training on a curated subset without copying it: `data.keep_list = "OUT/keep_list.parquet"`.

`python -m data_pipeline.curate` writes a keep-list with one row per pair of the pool (shard,
key, kept). With it, the trainer reads the original shards and passes on only the kept samples,
so a multi-terabyte pool is curated without a second copy. Everything downstream (shuffle
buffer, resume, the any-world-size handover, epoch sizes) sees the filtered readings: the
reader below takes `read_shard`'s place in the stream, and epoch sizes come from the keep-list's
kept counts instead of sizes.json.

Shards are matched by their resolved path (local files) or URL, so `data/x/00000.tar` and
`/abs/data/x/00000.tar` are one shard. The kept keys are held in memory per worker process
(~100 bytes a key: 10M kept pairs ~1 GB per process; beyond that, write curated shards).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Sequence

import pyarrow.compute as pc
import pyarrow.parquet as pq

from data_pipeline.shard_format import RawSample, read_shard


class KeepListError(ValueError):
    """The keep-list cannot be used with these shards (said in one line)."""


def shard_id(url: str) -> str:
    if "://" in url or url.startswith("pipe:"):
        return url
    return os.path.realpath(url)


class KeptShards:
    """(url, visit) -> the kept items of one shard reading, in `read_shard`'s conventions (a
    damaged tar's record passes through; the last item carries `__visit_total__`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        if not Path(self.path).is_file():
            raise KeepListError(f"keep_list {self.path}: no such file")
        self._kept: dict[str, frozenset[str]] | None = None

    def __getstate__(self) -> dict:  # workers load their own copy, lazily
        return {"path": self.path, "_kept": None}

    def _load(self) -> dict[str, frozenset[str]]:
        if self._kept is None:
            try:
                table = pq.read_table(self.path, columns=["shard", "key", "kept"])
            except Exception as exn:  # noqa: BLE001 - pyarrow raises several types
                raise KeepListError(f"keep_list {self.path}: not a keep-list written by "
                                    f"data_pipeline.curate ({type(exn).__name__}: {exn})") from None
            kept: dict[str, set[str]] = {shard_id(s): set() for s in pc.unique(table["shard"]).to_pylist()}
            chosen = table.filter(table["kept"])
            for shard, key in zip(chosen["shard"].to_pylist(), chosen["key"].to_pylist()):
                kept[shard_id(shard)].add(key)
            self._kept = {shard: frozenset(keys) for shard, keys in kept.items()}
        return self._kept

    def kept_keys(self, url: str) -> frozenset[str]:
        kept = self._load().get(shard_id(url))
        if kept is None:
            raise KeepListError(f"shard {url} is not in keep_list {self.path}: the keep-list "
                                "was made for other shards")
        return kept

    def check(self, urls: Sequence[str]) -> None:
        for url in urls:
            self.kept_keys(url)

    def sizes(self, urls: Sequence[str]) -> list[int]:
        return [len(self.kept_keys(url)) for url in urls]

    def __call__(self, url: str, visit: int = 0) -> Iterator[RawSample]:
        kept = self.kept_keys(url)
        previous, total = None, 0
        for item in read_shard(url, visit):
            item.pop("__visit_total__", None)
            key = item.get("__key__")
            if key and key not in kept:
                continue
            if previous is not None:
                yield previous
            previous, total = item, total + 1
        if previous is not None:
            previous["__visit_total__"] = total
            yield previous
