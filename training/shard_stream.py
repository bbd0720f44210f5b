"""Raw sample streams over webdataset shards: listing, opening, scheduling, reading, shuffling.

Everything here works on *raw* samples: dicts of undecoded member bytes keyed by extension
(``{"__key__": "000123", "jpg": b"...", "txt": b"..."}``) plus bookkeeping keys:

- ``__url__``: the shard it came from;
- ``__visit__``: a per-worker counter of shard openings, so one shard read twice (resampling,
  wrap-around) is judged per reading;
- ``__visit_total__``: set on the last item of a reading, the number of items that reading gave;
- ``__error__``: the item is not a sample but a record that the tar broke (truncated, unreadable,
  empty). It travels through the shuffle buffer like a sample, so that skip counts and shard
  judging happen at the same stream position in an uninterrupted and in a resumed run.

Nothing here decodes images; that is `training.data`'s job, after the resume skip point.
Tar parsing is Python's tarfile (stream mode, so pipes work); URL opening and key splitting are
webdataset's (`gopen`, `base_plus_ext`). The member loop is ours to catch tars cut off at a
header (see `_tar_members`), the grouping to be independent of webdataset's 0.2.96 format
change, and the scheduling because exact resume needs it to be a pure function of
(seed, source, epoch, worker).
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import tarfile
from itertools import accumulate, count
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

import braceexpand
import fsspec
from webdataset.gopen import gopen
from webdataset.tariterators import base_plus_ext

RawSample = dict[str, Any]

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


def _is_url(spec: str) -> bool:
    return "://" in spec


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
    if _is_url(spec):
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
                with _open_binary(sizes_url) as f:
                    tables[folder] = json.load(f)
            except FileNotFoundError:
                raise ValueError(f"no sizes.json beside the shards ({sizes_url})") from None
        if name not in tables[folder]:
            raise ValueError(f"{name} is not listed in {folder}/sizes.json")
        sizes.append(int(tables[folder][name]))
    return sizes


# ---------------------------------------------------------------------------------------------
# Opening and reading


def _open_binary(url: str) -> BinaryIO:
    if url.startswith("pipe:"):
        return gopen(url, "rb")
    if _is_url(url):
        return fsspec.open(url, "rb").open()
    return open(url, "rb")


def _close_quietly(stream: BinaryIO) -> None:
    # A pipe closed before its command finished makes the command die of SIGPIPE, and webdataset's
    # Pipe.close() then raises; that is expected when we stop reading a shard early.
    try:
        stream.close()
    except Exception:  # noqa: BLE001 - nothing useful can be done with a failing close
        pass


class _CountingReader:
    """Counts the bytes handed to tarfile, to tell a finished tar from one cut off at a header."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.bytes_read = stream, 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.bytes_read += len(data)
        return data


def _tar_members(stream: BinaryIO, errors: list[Exception]) -> Iterator[tuple[str, bytes]]:
    """(name, data) of each regular file of a tar stream, read sequentially (works on pipes).

    Same loop as webdataset's tar_file_iterator, plus one check it lacks: tarfile treats a tar cut
    off at (or inside) a member header as a normal end, silently dropping the rest of the shard;
    here that counts as an error. Any error ends the stream (a broken member leaves the tar at an
    unknown offset) and is appended to `errors`, so the sample being grouped is still emitted.
    """
    counted = _CountingReader(stream)
    try:
        tar = tarfile.open(fileobj=counted, mode="r|*")
        for info in tar:
            if info.isreg() and not info.name.startswith("__"):  # __*__: webdataset metadata
                yield info.name, tar.extractfile(info).read()
            tar.members = []  # stream mode keeps every TarInfo otherwise: memory grows per member
        # A complete tar ends with zero blocks, so tarfile read at least one block past the last
        # header offset it tried. (Compressed tars count compressed bytes: no check there.)
        compressed = getattr(tar.fileobj, "comptype", "tar") != "tar"
        if not compressed and counted.bytes_read < tar.offset + tarfile.BLOCKSIZE:
            raise tarfile.ReadError(f"tar ends without end-of-archive blocks at byte {tar.offset}")
    except Exception as exn:  # noqa: BLE001 - truncated/garbled tar, gzip or network errors
        errors.append(exn)


def _group_members(members: Iterable[tuple[str, bytes]]) -> Iterator[RawSample]:
    """Consecutive tar members with the same key (path minus all extensions) form one sample.

    Our own grouping rather than webdataset's group_by_keys, whose output format changed in
    0.2.96; the key split is still webdataset's base_plus_ext.
    """
    current: RawSample | None = None
    for name, data in members:
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        ext = ext.lower()
        if current is None or key != current["__key__"]:
            if current is not None:
                yield current
            current = {"__key__": key}
        if ext in current:
            current["__error__"] = f"duplicate member {name}"
        current[ext] = data
    if current is not None:
        yield current


def _shard_items(url: str) -> Iterator[RawSample]:
    try:
        stream = _open_binary(url)
    except Exception as exn:  # noqa: BLE001 - any failure to open is reported as a broken shard
        yield {"__key__": "", "__error__": f"cannot open shard: {exn!r}"}
        return
    errors: list[Exception] = []
    try:
        yield from _group_members(_tar_members(stream, errors))
    finally:
        _close_quietly(stream)
    if errors:
        yield {"__key__": "", "__error__": f"tar read error: {errors[0]!r}"}


def read_shard(url: str, visit: int) -> Iterator[RawSample]:
    """All items of one shard reading, never raising: a broken tar ends with an __error__ item,
    an empty or unreadable one gives a single __error__ item. The last item carries
    ``__visit_total__`` (one-item lookahead) so consumers know when the reading is complete."""
    previous: RawSample | None = None
    total = 0
    for item in _shard_items(url):
        item["__url__"], item["__visit__"] = url, visit
        total += 1
        if previous is not None:
            yield previous
        previous = item
    if previous is None:
        previous = {"__key__": "", "__error__": "shard has no samples", "__url__": url}
        previous["__visit__"], total = visit, 1
    previous["__visit_total__"] = total
    yield previous


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


def source_stream(
    urls: Sequence[str], *, seed: int, source: int, resampled: bool, shuffle: bool,
    worker: int, num_workers: int, visits: Iterator[int],
) -> Iterator[RawSample]:
    """An infinite raw-sample stream over one source for one global worker.

    resampled: shards drawn with replacement by RNG(seed, source, worker), no epochs at all
    (for corpora so large that an epoch is never finished). Otherwise epoch after epoch of
    `epoch_shards`.
    """
    if resampled:
        rng = random.Random(derive_seed(seed, "resample", source, worker))
        while True:
            yield from read_shard(rng.choice(urls), next(visits))
    for epoch in count():
        for url in epoch_shards(
            urls, seed=seed, source=source, epoch=epoch, shuffle=shuffle,
            worker=worker, num_workers=num_workers,
        ):
            yield from read_shard(url, next(visits))


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
    if size <= 1:
        yield from items
        return
    buffer: list[RawSample] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        i = rng.randrange(size)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer
