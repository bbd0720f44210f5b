"""Which shards a training worker reads, in which order: listing sources, sizes.json, the
per-epoch shard schedule and sample shuffle (`EpochStream`), and mixing sources by weight.

Works on raw samples as `data_pipeline.shard_format.read_shard` gives them (undecoded member
bytes plus bookkeeping keys, described there); nothing here decodes images, that happens after
the resume skip point (`training.data.loader`). The scheduling is ours because exact resume
needs it to be a pure function of (seed, source, epoch, worker).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
from itertools import accumulate
from typing import Any, Callable, Iterable, Iterator, Sequence

import braceexpand
import fsspec

from data_pipeline.shard_format import RawSample, is_url, open_binary, read_shard

# `::` separates sources, as in OpenCLIP. This rules out fsspec's own `::` URL chaining
# (e.g. `simplecache::s3://...`); use a `pipe:` command for such cases.
SOURCE_SEPARATOR = "::"


def derive_seed(*parts: object) -> int:
    """A 64-bit seed from any tuple of ints/strings, stable across processes and Python runs
    (unlike hash(), which is salted per process for strings)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


# ---------------------------------------------------------------------------------------------
# Listing


def expand_source(spec: str) -> list[str]:
    """One source spec -> its shard URLs, in a fixed order.

    `pipe:` commands and URLs are brace-expanded; a local directory or an fsspec URL naming a
    directory means every `*.tar` directly inside it (sorted); anything else is brace-expanded.
    Local files must exist (checked here, cheaply, so a typo fails at startup, not in a worker).
    """
    spec = spec.strip()
    if not spec:
        raise ValueError("empty shard source (check for a stray '::')")
    if spec.startswith("pipe:"):
        return list(braceexpand.braceexpand(spec))
    if is_url(spec):
        fs, path = fsspec.core.url_to_fs(spec)
        if "{" not in spec and fs.isdir(path):
            urls = sorted(fs.unstrip_protocol(p) for p in fs.glob(path.rstrip("/") + "/*.tar"))
            if not urls:
                raise ValueError(f"no *.tar shards in directory {spec}")
            return urls
        return list(braceexpand.braceexpand(spec))
    if os.path.isdir(spec):
        urls = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not urls:
            raise ValueError(f"no *.tar shards in directory {spec}")
        return urls
    urls = list(braceexpand.braceexpand(spec))
    missing = [u for u in urls if not os.path.isfile(u)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"shard not found: {missing[0]}{more}")
    return urls


def expand_sources(spec: str) -> list[list[str]]:
    """`a/{0..9}.tar::b/` -> one URL list per source."""
    return [expand_source(part) for part in spec.split(SOURCE_SEPARATOR)]


def read_shard_sizes(urls: Sequence[str]) -> list[int]:
    """Samples per shard from the `sizes.json` beside each shard ({"00000.tar": n, ...}).

    Raises ValueError naming what is missing; `pipe:` sources have no "beside".
    """
    tables: dict[str, dict[str, int]] = {}
    sizes = []
    for url in urls:
        if url.startswith("pipe:"):
            raise ValueError(f"cannot locate sizes.json for a pipe: source ({url})")
        folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
        if folder not in tables:
            sizes_url = f"{folder}/sizes.json"
            try:
                with open_binary(sizes_url) as f:
                    tables[folder] = json.load(f)
            except FileNotFoundError:
                raise ValueError(f"no sizes.json beside the shards ({sizes_url})") from None
        if name not in tables[folder]:
            raise ValueError(f"{name} is not listed in {folder}/sizes.json")
        sizes.append(int(tables[folder][name]))
    return sizes


# ---------------------------------------------------------------------------------------------
# Scheduling: which shards a worker reads, in which order


def epoch_shards(
    urls: Sequence[str], *, seed: int, source: int, epoch: int, shuffle: bool,
    worker: int, num_workers: int,
) -> list[str]:
    """The shards global worker `worker` (rank * workers + local id) reads in `epoch`.

    Every worker shuffles the full list with the same RNG(seed, source, epoch) and takes every
    `num_workers`-th shard from its own offset, so the workers' sets are disjoint and cover the
    list. With fewer shards than workers, worker w reads shard w % len(urls): every worker has
    data, at the price that some shards are read by several workers per epoch (duplicated
    samples, though in a different order and with different augmentation per worker).
    """
    order = list(urls)
    if shuffle:
        random.Random(derive_seed(seed, "shards", source, epoch)).shuffle(order)
    if len(order) >= num_workers:
        return order[worker::num_workers]
    return [order[worker % len(order)]]


Reader = Callable[[str, int], Iterable[RawSample]]  # (url, visit) -> the items of one reading


class EpochStream:
    """One source's raw-sample stream for one global worker: epoch after epoch of `epoch_shards`,
    each epoch through its own shuffle buffer, emptied before the next epoch starts.

    Emptying the buffer at each epoch's end keeps an epoch's samples out of the next one's
    batches, which is what lets a resume on another world size finish an epoch exactly
    (`training.data.handover`). The position is kept in attributes rather than in a generator's
    frame so that the handover can read it off after a replay: `epoch` (None before the first
    item), the shards still to read, the reading in progress and the buffer.

    `read` gives the items of one shard reading: `read_shard` for real; the handover replays the
    same schedule with a reader of (url, index) references, so both follow one piece of code.
    """

    def __init__(
        self, urls: Sequence[str], *, seed: int, source: int, shuffle: bool, worker: int,
        num_workers: int, buffer_size: int, start_epoch: int, visits: Iterator[int],
        read: Reader = read_shard,
    ) -> None:
        self.urls, self.seed, self.source, self.shuffle = list(urls), seed, source, shuffle
        self.worker, self.num_workers, self.buffer_size = worker, num_workers, buffer_size
        self.start_epoch, self.visits, self.read = start_epoch, visits, read
        self.epoch: int | None = None
        self.shards: list[str] = []  # this epoch's shards not yet opened
        self.reading: Iterator[RawSample] = iter(())
        self.reading_url: str | None = None
        self.buffer: list[RawSample] = []
        self.draining = False  # the epoch's shards are all read; the buffer empties in order

    def _begin_epoch(self) -> None:
        self.epoch = self.start_epoch if self.epoch is None else self.epoch + 1
        self.shards = epoch_shards(
            self.urls, seed=self.seed, source=self.source, epoch=self.epoch, shuffle=self.shuffle,
            worker=self.worker, num_workers=self.num_workers,
        )
        self.shards.reverse()  # popped from the end
        self.rng = random.Random(derive_seed(self.seed, "shuffle", self.source, self.worker, self.epoch))
        self.buffer, self.draining = [], False

    def _read_item(self) -> RawSample | None:
        """The next item of this epoch's shards in read order, None once they are all read."""
        while True:
            item = next(self.reading, None)
            if item is not None:
                return item
            if not self.shards:
                self.reading_url = None
                return None
            self.reading_url = self.shards.pop()
            self.reading = iter(self.read(self.reading_url, next(self.visits)))

    def __iter__(self) -> EpochStream:
        return self

    def __next__(self) -> RawSample:
        while True:
            if self.epoch is None:
                self._begin_epoch()
            if not self.draining:
                item = self._read_item()
                if item is None:
                    self.buffer = _drain(self.buffer, self.rng)[::-1]  # popped from the end
                    self.draining = True
                else:
                    out = _swap_in(self.buffer, item, self.buffer_size, self.rng)
                    if out is not None:
                        return out
                    continue
            if self.buffer:
                return self.buffer.pop()
            if not self.urls:
                raise StopIteration
            self._begin_epoch()


def resampled_stream(
    urls: Sequence[str], *, seed: int, source: int, worker: int, buffer_size: int,
    visits: Iterator[int], read: Reader = read_shard,
) -> Iterator[RawSample]:
    """Shards drawn with replacement by RNG(seed, source, worker), no epochs at all (for corpora
    so large that an epoch is never finished), through one endless shuffle buffer."""
    rng = random.Random(derive_seed(seed, "resample", source, worker))

    def draws() -> Iterator[RawSample]:
        while True:
            yield from read(rng.choice(urls), next(visits))

    shuffle_rng = random.Random(derive_seed(seed, "shuffle", source, worker))
    return shuffle_buffer(draws(), buffer_size, shuffle_rng)


def mix_streams(
    streams: Sequence[Iterator[RawSample]], weights: Sequence[float], rng: random.Random
) -> Iterator[RawSample]:
    """Interleave infinite streams sample by sample; stream i supplies a weights[i] share.

    Mixing per sample (not per shard) keeps the proportions right even over short spans and
    when sources have very different shard sizes.
    """
    if len(streams) == 1:
        yield from streams[0]
        return
    cumulative = list(accumulate(weights))
    indices = range(len(streams))
    while True:
        yield next(streams[rng.choices(indices, cum_weights=cumulative)[0]])


def shuffle_buffer(
    items: Iterable[RawSample], size: int, rng: random.Random
) -> Iterator[RawSample]:
    """Reservoir-style shuffle: fill `size` items, then emit a random one per new arrival.
    size <= 1 passes items through. Memory: `size` raw (encoded) samples per worker."""
    buffer: list[RawSample] = []
    for item in items:
        out = _swap_in(buffer, item, size, rng)
        if out is not None:
            yield out
    yield from _drain(buffer, rng)


def _swap_in(buffer: list, item: Any, size: int, rng: random.Random) -> Any:
    """One arrival at a reservoir shuffle buffer (`shuffle_buffer`, `EpochStream`): the item to
    emit now, or None while the buffer is still filling."""
    if size <= 1:
        return item
    if len(buffer) < size:
        buffer.append(item)
        return None
    i = rng.randrange(size)
    buffer[i], item = item, buffer[i]
    return item


def _drain(buffer: list, rng: random.Random) -> list:
    """The end of the input: what is left, in random order."""
    rng.shuffle(buffer)
    return buffer
