"""Resume on another world size: the rest of each epoch, shared out over the new workers.

A run's *layout* is how its data stream is split: ranks x worker roles per rank, each global
worker reading its own shards (`sources.epoch_shards`) through per-epoch shuffle buffers. A
checkpoint records, per global worker, how many raw samples the trainer has taken from it; with
the seed that fixes every stream's position exactly. When a run resumes on another layout (a
pre-empted job requeued onto fewer or more GPUs), the new loader replays the old streams with
(url, index) references in place of samples (nothing decoded; each shard's items are counted
once) and reads off, per old worker and source, what its epoch still owed: the samples in its
shuffle buffer, the rest of the shard it was reading, the shards it had not opened. That
*remainder* is cut into one share per new worker, sized so that the shares end together with
the epoch's last global batch; each new worker takes its share first (through its own shuffle
buffer), then the next epoch begins on the new layout. So across the change every sample of
the epoch is taken once, none twice, in an order fixed by the seed and the two layouts.

The global batch must stay the same (ranks x data.batch_size), so that steps, epochs and the LR
schedule mean what they meant. A layout that itself began with a handover records it
(`Layout.previous`), so a second change replays the first; `data.resampled` streams have no
epochs to finish and start afresh.

Cost: every new rank replays the old streams, reading each shard they touched once (bytes, not
decoded); the exact-resume replay of an unchanged layout reads the same shards.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import chain, count, islice
from typing import Any, Iterator, Sequence

from data_pipeline.shard_format import RawSample, read_shard
from training.data.sources import (
    EpochStream, derive_seed, epoch_shards, mix_streams, read_shard_sizes, resampled_stream, shuffle_buffer,
)

STREAM_VERSION = 2  # bump when the stream's structure changes: older states cannot be replayed

# A run of item indices of one shard reading: (url, start, stop); stop None = to the end.
Piece = tuple[str, int, "int | None"]


@dataclass(frozen=True)
class Layout:
    world_size: int
    workers: int  # worker roles per rank (DataLoader workers, at least 1)
    batch_size: int  # per rank
    start_epochs: tuple[int, ...]  # per source: the first epoch of this layout's own streams
    previous: Handover | None = None  # the interrupted layout whose remainder this one began with

    @property
    def num_workers(self) -> int:
        return self.world_size * self.workers

    def same_shape(self, other: Layout) -> bool:
        return (self.world_size, self.workers, self.batch_size) == (
            other.world_size, other.workers, other.batch_size)

    def to_state(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size, "workers": self.workers, "batch_size": self.batch_size,
            "start_epochs": list(self.start_epochs),
            "previous": None if self.previous is None else {
                "layout": self.previous.layout.to_state(),
                "consumed": list(self.previous.consumed),
            },
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Layout:
        previous = state.get("previous")
        return cls(
            int(state["world_size"]), int(state["workers"]), int(state["batch_size"]),
            tuple(int(e) for e in state["start_epochs"]),
            None if previous is None else Handover(
                cls.from_state(previous["layout"]), tuple(int(c) for c in previous["consumed"])),
        )


@dataclass(frozen=True)
class Handover:
    layout: Layout
    consumed: tuple[int, ...]  # raw samples taken from each of its global workers


@dataclass(frozen=True)
class StreamSpec:
    """What, besides the layout, fixes a worker's stream (all from the data config)."""

    sources: list[list[str]]
    weights: list[float]
    seed: int
    resampled: bool
    shard_shuffle: bool
    buffer_size: int
    # One shard reading: read_shard, or a keep-list's filter of it (training.data.keep_list).
    read: Any = read_shard


# ---------------------------------------------------------------------------------------------
# One global worker's stream


def worker_stream(
    spec: StreamSpec, layout: Layout, worker: int, share: list[Piece], reader: Any = None,
) -> tuple[Iterator[Any], list[EpochStream]]:
    """The raw-sample stream of global worker `worker`: its share of the previous layout's
    remainder (emptied through its own shuffle buffer), then its own epochs, sources mixed by
    weight. `reader` None reads samples; an `ItemCounter` gives (url, index) references, for
    the replay. Also returns the per-source streams, whose position the replay reads off."""
    visits = count()  # shared by the share and all sources of this worker: ids stay unique
    if spec.resampled:
        streams: list[Any] = [
            resampled_stream(urls, seed=spec.seed, source=i, worker=worker,
                             buffer_size=spec.buffer_size, visits=visits, read=spec.read)
            for i, urls in enumerate(spec.sources)
        ]
    else:
        read = spec.read if reader is None else reader.references
        streams = [
            EpochStream(urls, seed=spec.seed, source=i, shuffle=spec.shard_shuffle, worker=worker,
                        num_workers=layout.num_workers, buffer_size=spec.buffer_size,
                        start_epoch=layout.start_epochs[i], visits=visits, read=read)
            for i, urls in enumerate(spec.sources)
        ]
    mixed = mix_streams(streams, spec.weights,
                        random.Random(derive_seed(spec.seed, "mix", worker, *layout.start_epochs)))
    if not share:
        return mixed, streams
    items = read_pieces(share, visits, spec.read) if reader is None else reader.piece_references(share)
    share_rng = random.Random(derive_seed(spec.seed, "handover", worker, *layout.start_epochs))
    return chain(shuffle_buffer(items, spec.buffer_size, share_rng), mixed), streams


def read_pieces(pieces: Sequence[Piece], visits: Iterator[int], read: Any = read_shard) -> Iterator[RawSample]:
    """The samples a share names, shard by shard. They carry no `__visit_total__`: a share holds
    parts of readings, which the shard judge must not mistake for whole ones."""
    for url, start, stop in pieces:
        for index, item in enumerate(read(url, next(visits))):
            if stop is not None and index >= stop:
                break
            if index >= start:
                item.pop("__visit_total__", None)
                yield item


class ItemCounter:
    """Item counts of shard readings (as `read_shard` gives them, broken-tar records included),
    each shard read once; and (url, index) references in place of the items."""

    def __init__(self, read: Any = read_shard) -> None:
        self.read = read
        self.counts: dict[str, int] = {}
        # Replays already done (`remainder`): the handover note and the shares need the same one.
        self.remainders: dict[Handover, tuple[list[Piece], tuple[int, ...]]] = {}

    def count(self, url: str) -> int:
        if url not in self.counts:
            self.counts[url] = sum(1 for _ in self.read(url, 0))
        return self.counts[url]

    def references(self, url: str, visit: int) -> list[tuple[str, int]]:
        return [(url, i) for i in range(self.count(url))]

    def piece_references(self, pieces: Sequence[Piece]) -> Iterator[tuple[str, int]]:
        for url, start, stop in pieces:
            end = self.count(url) if stop is None else min(stop, self.count(url))
            yield from ((url, i) for i in range(start, end))


# ---------------------------------------------------------------------------------------------
# The remainder of an interrupted layout, and the shares of a new one


def _as_pieces(references: Sequence[tuple[str, int]]) -> list[Piece]:
    """References -> pieces, consecutive indices of one shard merged."""
    pieces: list[list[Any]] = []
    for url, index in references:
        if pieces and pieces[-1][0] == url and pieces[-1][2] == index:
            pieces[-1][2] = index + 1
        else:
            pieces.append([url, index, index + 1])
    return [(url, start, stop) for url, start, stop in pieces]


def remainder(
    spec: StreamSpec, handover: Handover, counter: ItemCounter,
) -> tuple[list[Piece], tuple[int, ...]]:
    """What the interrupted layout's epochs still owed, in a fixed order, and the epoch (per
    source) the next layout's own streams begin with."""
    if handover in counter.remainders:
        return counter.remainders[handover]
    old = handover.layout
    shares = layout_shares(spec, old, counter)
    owed: list[Piece] = []
    unstarted: list[list[Piece]] = [[] for _ in spec.sources]
    reached: list[list[int]] = [[] for _ in spec.sources]
    for worker in range(old.num_workers):
        taken = handover.consumed[worker]
        stream, sources = worker_stream(spec, old, worker, shares[worker], counter)
        emitted = set(islice(stream, taken))
        owed += _as_pieces([r for r in counter.piece_references(shares[worker]) if r not in emitted])
        for i, source in enumerate(sources):
            if source.epoch is None:  # never drawn from: its epoch owes all its shards
                unstarted[i] += [(url, 0, None) for url in epoch_shard_list(spec, old, worker, i)]
                continue
            reached[i].append(source.epoch)
            owed += _as_pieces(list(reversed(source.buffer)) if source.draining else source.buffer)
            rest = list(source.reading)
            if rest:
                owed.append((rest[0][0], rest[0][1], None))
            owed += [(url, 0, None) for url in reversed(source.shards)]
    next_epochs = []
    for i, epochs in enumerate(reached):
        if epochs:  # some worker began this source's epoch: the others' shards of it are owed
            owed += unstarted[i]
            next_epochs.append(max(epochs) + 1)
        else:
            next_epochs.append(old.start_epochs[i])
    counter.remainders[handover] = owed, tuple(next_epochs)
    return counter.remainders[handover]


def epoch_shard_list(spec: StreamSpec, layout: Layout, worker: int, source: int) -> list[str]:
    return epoch_shards(
        spec.sources[source], seed=spec.seed, source=source, epoch=layout.start_epochs[source],
        shuffle=spec.shard_shuffle, worker=worker, num_workers=layout.num_workers,
    )


def layout_shares(spec: StreamSpec, layout: Layout, counter: ItemCounter) -> list[list[Piece]]:
    """Each global worker's share of the previous layout's remainder (all empty without one)."""
    if layout.previous is None or spec.resampled:
        return [[] for _ in range(layout.num_workers)]
    owed, _ = remainder(spec, layout.previous, counter)
    return cut_shares(owed, layout, _PieceSizer(counter))


class _PieceSizer:
    """Items in a piece: exact for shards the replay read, else from sizes.json, else counted."""

    def __init__(self, counter: ItemCounter) -> None:
        self.counter = counter

    def __call__(self, piece: Piece) -> int:
        url, start, stop = piece
        if stop is not None:
            return stop - start
        total = self.counter.counts.get(url)
        if total is None:
            try:
                total = getattr(self.counter.read, "sizes", read_shard_sizes)([url])[0]
            except (ValueError, OSError):
                total = self.counter.count(url)
        return max(0, total - start)


def cut_shares(owed: list[Piece], layout: Layout, size: Any) -> list[list[Piece]]:
    """Cut the remainder, in order, into one contiguous share per global worker of `layout`.

    Rank r takes its batch t from worker role t % workers, so over the T whole global batches
    the remainder fills, role k of every rank supplies len(range(k, T, workers)) batches: its
    share is that many local batches, and the epoch's owed samples end with global batch T. The
    few left over (fewer than a global batch) go to the last worker, whose last piece of each
    shard stays open-ended, so a size estimate that fell short loses nothing."""
    total = sum(size(p) for p in owed)
    global_batch = layout.world_size * layout.batch_size
    batches = total // global_batch
    targets = []
    for _rank in range(layout.world_size):
        for role in range(layout.workers):
            targets.append(len(range(role, batches, layout.workers)) * layout.batch_size)
    targets[-1] += total - sum(targets)
    shares: list[list[Piece]] = [[] for _ in targets]
    worker, room = 0, targets[0]
    for piece in owed:
        left = size(piece)
        url, start, stop = piece
        while worker < len(targets) - 1 and left > room:
            if room:
                shares[worker].append((url, start, start + room))
                start, left = start + room, left - room
            worker += 1
            room = targets[worker]
        shares[worker].append((url, start, stop))
        room -= left
    return shares


def handover_layout(
    spec: StreamSpec, old_states: Sequence[dict[str, Any]], new: Layout, counter: ItemCounter,
) -> tuple[Layout, int]:
    """The layout that continues the run whose ranks saved `old_states`, with the new shape
    (`new`'s start epochs are ignored), and the number of owed samples it begins with."""
    old = Layout.from_state(old_states[0]["layout"])
    consumed = tuple(c for state in old_states for c in state["consumed"])
    handover = Handover(old, consumed)
    if spec.resampled:
        return Layout(new.world_size, new.workers, new.batch_size, new.start_epochs), 0
    owed, next_epochs = remainder(spec, handover, counter)
    return (Layout(new.world_size, new.workers, new.batch_size, next_epochs, handover),
            sum(_PieceSizer(counter)(p) for p in owed))
