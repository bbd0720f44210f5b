"""The training data pipeline: webdataset shards -> batches of images and tokens, with exact resume.

Per dataloader worker, the train pipeline is an infinite stream (see `TrainStream._batches`):

    shards (pure function of seed, source, epoch, global worker id)  [training.data.sources]
      -> tar members -> raw samples (bytes, undecoded)          [data_pipeline.shard_format]
      -> mix sources by weight -> sample shuffle buffer (RNG seeded per worker)
      -> (resume: the first N raw samples are dropped here, undecoded)
      -> decode / filter / augment (RNG seeded per raw sample) -> tokenize -> batch
                                                                  [training.data.decode]

Because every step before the resume point is deterministic and cheap, and every step after it
depends only on the raw sample and its index, a resumed run sees exactly the batches an
uninterrupted run would have seen (tests/test_data.py checks this bit for bit).

Batches are dicts: image uint8 tensor [B, 3, H, W] (normalised on the trainer's device by
`training.data.transforms.normalize_images`), text LongTensor [B, L] padded with `pad_id`
to the longest caption of the batch. Workers run forever (epochs are a worker-internal notion),
so the trainer runs for a number of steps; `TrainLoader.steps_per_epoch` gives the "epoch" used
for logging and schedules.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.object_store import READ_STATS
from data_pipeline.shard_format import BadSample, read_shard
from training.data.config import AugmentConfig, DataConfig, DataError
from training.data.decode import ShardJudge, StageTimes, collate, decode_sample
from training.data.device_augment import DrawCrop
from training.data.handover import (
    STREAM_VERSION, ItemCounter, Layout, Piece, StreamSpec, handover_layout, layout_shares,
    worker_stream,
)
from training.data.keep_list import KeepListError, KeptShards
from training.data.sources import derive_seed, expand_sources, read_shard_sizes
from training.data.telemetry import LoaderTelemetry
from training.data.workers import init_worker, track_for_exit
from training.data.transforms import build_train_transform

logger = logging.getLogger(__name__)

Tokenize = Callable[[str], Sequence[int]]

# Workers report a DataError as a batch carrying only this key, and the loader raises it in the
# main process. (Raising in the worker also reaches the main process, but DataLoader rewraps the
# message with the worker's whole traceback; the CLI wants the one line.)
_DATA_ERROR_KEY = "__data_error__"
# How many skipped samples each worker logs with their reason before it goes quiet.
_SKIPS_LOGGED_PER_WORKER = 5
# Remote shards given up (object_store) in a row, with no usable sample between, after which a
# worker stops the run: one bad object is skipped, but a store that is down or unreachable would
# otherwise be retried shard after shard forever (with the default retries, this is ~10 minutes).
UNREADABLE_SHARDS_IN_A_ROW = 20


@dataclass
class ResumePoint:
    """Where each worker role stopped, counted over the batches the trainer actually received
    (batches prefetched by workers but never handed out are replayed)."""

    batches_yielded: int
    consumed: list[int]  # raw post-shuffle samples taken by each role (usable or not)
    skipped: list[int]  # of those, how many were unusable

    @classmethod
    def start(cls, roles: int) -> ResumePoint:
        return cls(0, [0] * roles, [0] * roles)


class TrainStream(IterableDataset):
    """The per-worker infinite batch stream. Built by TrainLoader; rarely useful alone."""

    def __init__(
        self, cfg: DataConfig, spec: StreamSpec, layout: Layout, shares: list[list[Piece]],
        tokenize: Tokenize, pad_id: int, rank: int, resume: ResumePoint,
    ) -> None:
        self.cfg, self.spec, self.layout, self.shares = cfg, spec, layout, shares
        self.tokenize, self.pad_id = tokenize, pad_id
        self.rank, self.resume = rank, resume
        self.roles = layout.workers

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        local_id = info.id if info is not None else 0
        # DataLoader takes batch i from worker i % workers. A loader resumed after b batches must
        # hand out the batch of role b % workers first, so its worker 0 plays that role.
        role = (local_id + self.resume.batches_yielded) % self.roles
        try:
            yield from self._batches(role)
        except DataError as exn:
            yield {_DATA_ERROR_KEY: str(exn)}

    def raw_samples(self, role: int) -> Iterator[dict[str, Any]]:
        """The raw sample stream of one worker role (the part replayed on resume)."""
        stream, _ = worker_stream(
            self.spec, self.layout, self.rank * self.roles + role, self.shares[role])
        return stream

    def _batches(self, role: int) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        global_worker = self.rank * self.roles + role
        augment = cfg.augment()
        transform = DrawCrop(augment) if augment.on == "device" else build_train_transform(augment)
        decode_size = smallest_decode_size(augment)
        raw = self.raw_samples(role)
        judge = ShardJudge()
        consumed, skipped = self.resume.consumed[role], self.resume.skipped[role]
        for _ in range(consumed):  # resume: replay without decoding
            judge.record(next(raw), usable=None)
        images: list[torch.Tensor] = []
        token_lists: list[Sequence[int]] = []
        keys: list[str] = []
        times, started = StageTimes(), time.perf_counter()
        unreadable_in_a_row = 0
        storage_before = READ_STATS.snapshot()  # this process's retries and given-up shards
        while True:
            read_from = time.perf_counter()
            item = next(raw, None)
            if item is None:
                return
            times.read += time.perf_counter() - read_from
            # Seeding per raw sample index makes augmentation independent of history (resume).
            augment_seed = derive_seed(cfg.seed, "augment", global_worker, consumed,
                                       *self.layout.start_epochs)
            consumed += 1
            try:
                pixels, tokens = decode_sample(
                    item, transform, self.tokenize, augment_seed, min_image_size=decode_size,
                    times=times,
                )
            except BadSample as skip:
                skipped += 1
                if skipped <= _SKIPS_LOGGED_PER_WORKER:
                    logger.warning("skipping sample %r of %s: %s", item.get("__key__"),
                                   item.get("__url__"), skip)
                # A shard the store would not deliver (object_store gave up on it) says nothing
                # about the dataset: skipped and counted, never judged (which could stop the run).
                usable = None if item.get("__unreadable__") else False
                error = judge.record(item, usable=usable, reason=str(skip))
                if item.get("__unreadable__"):
                    unreadable_in_a_row += 1
                    if unreadable_in_a_row >= UNREADABLE_SHARDS_IN_A_ROW:
                        error = (f"{unreadable_in_a_row} shards in a row could not be read from "
                                 f"storage, the last {item['__url__']} ({skip}); is the store "
                                 "reachable?")
                if error:
                    raise DataError(error)
                continue
            judge.record(item, usable=True)
            unreadable_in_a_row = 0
            images.append(pixels)
            token_lists.append(tokens)
            keys.append(f"{item['__url__']}#{item['__key__']}")
            if len(images) == cfg.batch_size:
                batch = collate(images, token_lists, self.pad_id)
                if "augment_params" in batch:  # data.augment_on=device: resized there
                    batch["augment_size"] = cfg.image_size
                storage_now = READ_STATS.snapshot()
                batch.update(keys=keys, __role__=role, __consumed__=consumed, __skipped__=skipped,
                             __times__=[*times.as_list(), time.perf_counter() - started],
                             __storage__=[now - before for now, before
                                          in zip(storage_now, storage_before)])
                storage_before = storage_now
                yield batch
                images, token_lists, keys = [], [], []
                # The time spent blocked on the queue (inside yield) is not the worker's work.
                times, started = StageTimes(), time.perf_counter()


def smallest_decode_size(cfg: AugmentConfig) -> int:
    """The smallest image side from which RandomResizedCrop never has to upsample: its crop keeps
    at least scale[0] of the area at an aspect ratio down to 3/4, so the crop's shorter side is at
    least sqrt(scale[0] * 3/4) of the image's (and the crop is resized to image_size)."""
    return math.ceil(cfg.image_size / math.sqrt(cfg.scale[0] * 3 / 4))


def _source_sizes(sources: list[list[str]], read: Any) -> list[int] | None:
    """Samples per source from sizes.json (or the keep-list's kept counts), or None unless every
    source has a positive count."""
    sizes_of = getattr(read, "sizes", read_shard_sizes)
    try:
        sizes = [sum(sizes_of(urls)) for urls in sources]
    except (ValueError, OSError):
        return None
    return sizes if all(size > 0 for size in sizes) else None


class TrainLoader:
    """Infinite iterator of training batches for one rank, with exact resume.

    `states`: every rank's state_dict() from a checkpoint (a list over ranks). On the same
    layout (ranks, workers, batch size) the loader continues exactly: after k batches, batches
    k, k+1, ... of the uninterrupted run. On another layout with the same global batch it hands
    over the rest of the epoch (`training.data.handover`) and says so in `resume_note`. Any
    other change of the data config is a DataError naming it. States are JSON-serializable.
    Batches carry `keys` ("shard url#sample key") for the trainer's sample log.
    """

    def __init__(
        self, cfg: DataConfig, tokenize: Tokenize, pad_id: int, rank: int = 0,
        world_size: int = 1, states: Sequence[dict[str, Any]] | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank=} {world_size=}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.roles = max(cfg.workers, 1)
        try:
            sources = expand_sources(cfg.train_shards)
        except (ValueError, OSError) as exn:
            raise DataError(f"train_shards: {exn}") from None
        read: Any = functools.partial(read_shard, retry=cfg.read_retry())
        if cfg.keep_list is not None:
            try:
                read = KeptShards(cfg.keep_list)
                for urls in sources:
                    read.check(urls)
            except KeepListError as exn:
                raise DataError(str(exn)) from None
        # sizes.json is only needed for defaults (and may be remote): read it only then.
        need_sizes = cfg.num_samples is None or cfg.train_data_weights is None
        sizes = _source_sizes(sources, read) if need_sizes else None
        if cfg.num_samples is not None:
            self.num_samples = cfg.num_samples
        elif sizes is not None:
            self.num_samples = sum(sizes)
        else:
            raise DataError(
                "num_samples is not set and sizes.json is missing or incomplete beside the "
                f"shards of {cfg.train_shards!r}; set num_samples"
            )
        weights = cfg.train_data_weights or sizes or [len(urls) for urls in sources]
        self.spec = StreamSpec(sources, list(weights), cfg.seed, cfg.resampled, cfg.shard_shuffle,
                               cfg.sample_shuffle_buffer, read)
        self.resume_note: str | None = None
        self.layout = Layout(world_size, self.roles, cfg.batch_size, (0,) * len(sources))
        self._counter = ItemCounter(read)  # shard item counts, shared by the replays below
        self._resume = ResumePoint.start(self.roles)
        if states is not None:
            self._resume_from(list(states))
        self._progress = ResumePoint(
            self._resume.batches_yielded, list(self._resume.consumed), list(self._resume.skipped)
        )
        shares = layout_shares(self.spec, self.layout, self._counter)
        mine = shares[rank * self.roles:(rank + 1) * self.roles]
        stream = TrainStream(cfg, self.spec, self.layout, mine, tokenize, pad_id, rank, self._resume)
        self._loader = DataLoader(
            stream,
            batch_size=None,  # batches are built in the workers (dynamic padding, bookkeeping)
            num_workers=cfg.workers,
            persistent_workers=cfg.workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=init_worker,
        )
        self._iterator: Iterator[dict[str, Any]] | None = None
        self._telemetry = LoaderTelemetry()
        # Storage events behind the batches handed out (object_store.READ_STATS of the workers):
        # reads retried, and shards whose rest was skipped after every retry failed.
        self.read_retries = self.shards_given_up = 0
        track_for_exit(self)

    def _resume_from(self, states: list[dict[str, Any]]) -> None:
        """Set the layout and resume point from a checkpoint's per-rank states."""
        if any(s.get("stream_version") != STREAM_VERSION for s in states):
            self.resume_note = ("data: the checkpoint's stream state is from an older version "
                                "of the loader; the data order starts afresh")
            return
        old_fingerprint = states[0].get("config") or {}
        mine = self.cfg.fingerprint()
        shape_fields = ("workers", "batch_size")
        changed = [f"{k}: {old_fingerprint.get(k)!r} -> {v!r}" for k, v in mine.items()
                   if k not in shape_fields and old_fingerprint.get(k) != v]
        if changed:
            raise DataError(f"cannot resume the data stream exactly, changed: {', '.join(changed)}")
        old = Layout.from_state(states[0]["layout"])
        if old.same_shape(self.layout):
            state = states[self.rank]
            self.layout = old
            self._resume = ResumePoint(
                state["batches_yielded"], list(state["consumed"]), list(state["skipped"]))
            return
        self.layout, owed = handover_layout(self.spec, states, self.layout, self._counter)
        shape = lambda l: f"{l.world_size} ranks x {l.workers} workers x batch {l.batch_size}"  # noqa: E731
        if self.spec.resampled:
            self.resume_note = (f"data: {shape(old)} -> {shape(self.layout)}; resampled shards "
                                "have no epoch to finish, so the draws start afresh")
        else:
            epochs = ", ".join(str(e) for e in self.layout.start_epochs)
            self.resume_note = (f"data: {shape(old)} -> {shape(self.layout)}: the {owed} samples "
                                f"the epoch still owed are shared out anew, then epoch {epochs} "
                                "begins")

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = iter(self._loader)
        self._telemetry.add_depth(_ready_batches(self._iterator))
        batch = next(self._iterator)
        if _DATA_ERROR_KEY in batch:
            self.close()
            raise DataError(batch[_DATA_ERROR_KEY])
        role = batch.pop("__role__")
        progress = self._progress
        expected_role = progress.batches_yielded % self.roles
        if role != expected_role:
            # Exact resume rests on DataLoader's round-robin over workers; fail loudly if not.
            raise RuntimeError(f"batch from worker role {role}, expected role {expected_role}")
        progress.consumed[role] = batch.pop("__consumed__")
        progress.skipped[role] = batch.pop("__skipped__")
        progress.batches_yielded += 1
        self._telemetry.add_batch(batch["text"].shape[0], batch.pop("__times__"))
        retries, gave_up = batch.pop("__storage__")
        self._telemetry.add_storage(retries, gave_up)
        self.read_retries += retries
        self.shards_given_up += gave_up
        return batch

    def telemetry(self) -> dict[str, float]:
        """Loader metrics since the last call (training.data.telemetry), then starts anew."""
        window, self._telemetry = self._telemetry, LoaderTelemetry()
        return window.record()

    def state_dict(self) -> dict[str, Any]:
        return {
            "stream_version": STREAM_VERSION,
            "layout": self.layout.to_state(),
            "batches_yielded": self._progress.batches_yielded,
            "consumed": list(self._progress.consumed),
            "skipped": list(self._progress.skipped),
            "rank": self.rank,
            "world_size": self.world_size,
            "config": self.cfg.fingerprint(),
        }

    @property
    def skipped_samples(self) -> int:
        """Unusable samples met so far by this rank's workers (for the batches handed out)."""
        return sum(self._progress.skipped)

    def steps_per_epoch(self, global_batch: int) -> int:
        """The trainer's "epoch" for logging and LR schedules: num_samples // global batch."""
        if global_batch <= 0:
            raise ValueError(f"global_batch must be > 0, got {global_batch}")
        return max(1, self.num_samples // global_batch)

    def worker_processes(self) -> list:
        """The worker processes this loader started (none before the first batch)."""
        return list(getattr(self._iterator, "_workers", []))

    def close(self) -> None:
        """Stop the worker processes (also happens when the loader is garbage-collected)."""
        iterator, self._iterator = self._iterator, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if shutdown is not None:
            shutdown()


def _ready_batches(iterator) -> int | None:
    """Batches already made and waiting when the trainer asks (None: no worker processes, or a
    platform whose queues cannot count). DataLoader's queue is private API, hence the guard."""
    queue = getattr(iterator, "_data_queue", None)
    try:
        return queue.qsize() if queue is not None else None
    except (NotImplementedError, OSError):
        return None


def build_train_loader(
    cfg: DataConfig, tokenize: Tokenize, pad_id: int, rank: int = 0, world_size: int = 1,
    states: Sequence[dict[str, Any]] | None = None,
) -> TrainLoader:
    """tokenize must be picklable (it is sent to worker processes); states: every rank's
    state_dict() from the checkpoint being resumed."""
    return TrainLoader(cfg, tokenize, pad_id, rank=rank, world_size=world_size, states=states)
