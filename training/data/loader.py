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

import atexit
import ctypes
import ctypes.util
import logging
import math
import multiprocessing
import os
import random
import signal
import sys
import weakref
from dataclasses import dataclass
from itertools import count
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_pipeline.shard_format import BadSample
from training.data.config import AugmentConfig, DataConfig, DataError
from training.data.decode import ShardJudge, collate, decode_sample
from training.data.sources import (
    derive_seed, expand_sources, mix_streams, read_shard_sizes, shuffle_buffer, source_stream,
)
from training.data.transforms import build_train_transform

logger = logging.getLogger(__name__)

Tokenize = Callable[[str], Sequence[int]]

# Workers report a DataError as a batch carrying only this key, and the loader raises it in the
# main process. (Raising in the worker also reaches the main process, but DataLoader rewraps the
# message with the worker's whole traceback; the CLI wants the one line.)
_DATA_ERROR_KEY = "__data_error__"
# How many skipped samples each worker logs with their reason before it goes quiet.
_SKIPS_LOGGED_PER_WORKER = 5
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
        self, cfg: DataConfig, sources: list[list[str]], weights: list[float],
        tokenize: Tokenize, pad_id: int, rank: int, world_size: int, resume: ResumePoint,
    ) -> None:
        self.cfg, self.sources, self.weights = cfg, sources, weights
        self.tokenize, self.pad_id = tokenize, pad_id
        self.rank, self.world_size, self.resume = rank, world_size, resume
        self.roles = max(cfg.workers, 1)

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
        """The post-shuffle raw sample stream of one worker role (the part replayed on resume)."""
        cfg = self.cfg
        global_worker = self.rank * self.roles + role
        visits = count()  # shared by all sources of this worker: ids stay unique
        streams = [
            source_stream(
                urls, seed=cfg.seed, source=i, resampled=cfg.resampled, shuffle=cfg.shard_shuffle,
                worker=global_worker, num_workers=self.world_size * self.roles, visits=visits,
            )
            for i, urls in enumerate(self.sources)
        ]
        mix_rng = random.Random(derive_seed(cfg.seed, "mix", global_worker))
        mixed = mix_streams(streams, self.weights, mix_rng)
        shuffle_rng = random.Random(derive_seed(cfg.seed, "shuffle", global_worker))
        return shuffle_buffer(mixed, cfg.sample_shuffle_buffer, shuffle_rng)

    def _batches(self, role: int) -> Iterator[dict[str, Any]]:
        cfg = self.cfg
        global_worker = self.rank * self.roles + role
        transform = build_train_transform(cfg.augment())
        decode_size = smallest_decode_size(cfg.augment())
        raw = self.raw_samples(role)
        judge = ShardJudge()
        consumed, skipped = self.resume.consumed[role], self.resume.skipped[role]
        for _ in range(consumed):  # resume: replay without decoding
            judge.record(next(raw), usable=None)
        images: list[torch.Tensor] = []
        token_lists: list[Sequence[int]] = []
        for item in raw:
            # Seeding per raw sample index makes augmentation independent of history (resume).
            augment_seed = derive_seed(cfg.seed, "augment", global_worker, consumed)
            consumed += 1
            try:
                pixels, tokens = decode_sample(
                    item, transform, self.tokenize, augment_seed, min_image_size=decode_size
                )
            except BadSample as skip:
                skipped += 1
                if skipped <= _SKIPS_LOGGED_PER_WORKER:
                    logger.warning("skipping sample %r of %s: %s", item.get("__key__"),
                                   item.get("__url__"), skip)
                error = judge.record(item, usable=False, reason=str(skip))
                if error:
                    raise DataError(error)
                continue
            judge.record(item, usable=True)
            images.append(pixels)
            token_lists.append(tokens)
            if len(images) == cfg.batch_size:
                batch = collate(images, token_lists, self.pad_id)
                batch.update(__role__=role, __consumed__=consumed, __skipped__=skipped)
                yield batch
                images, token_lists = [], []


def smallest_decode_size(cfg: AugmentConfig) -> int:
    """The smallest image side from which RandomResizedCrop never has to upsample: its crop keeps
    at least scale[0] of the area at an aspect ratio down to 3/4, so the crop's shorter side is at
    least sqrt(scale[0] * 3/4) of the image's (and the crop is resized to image_size)."""
    return math.ceil(cfg.image_size / math.sqrt(cfg.scale[0] * 3 / 4))


def _source_sizes(sources: list[list[str]]) -> list[int] | None:
    """Samples per source from sizes.json, or None unless every source has a positive count."""
    try:
        sizes = [sum(read_shard_sizes(urls)) for urls in sources]
    except (ValueError, OSError):
        return None
    return sizes if all(size > 0 for size in sizes) else None


class TrainLoader:
    """Infinite iterator of training batches for one rank, with exact resume.

    state_dict() after the trainer has taken k batches, passed back as `state=`, gives a loader
    whose batches are exactly batches k, k+1, ... of the uninterrupted run. The state is per rank
    (each rank must save its own) and JSON-serializable; the data config, rank, world size and
    worker count must not change across the resume (checked, DataError otherwise).
    """

    def __init__(
        self, cfg: DataConfig, tokenize: Tokenize, pad_id: int, rank: int = 0,
        world_size: int = 1, state: dict[str, Any] | None = None,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got {rank=} {world_size=}")
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.roles = max(cfg.workers, 1)
        try:
            sources = expand_sources(cfg.train_shards)
        except (ValueError, OSError) as exn:
            raise DataError(f"train_shards: {exn}") from None
        # sizes.json is only needed for defaults (and may be remote): read it only then.
        need_sizes = cfg.num_samples is None or cfg.train_data_weights is None
        sizes = _source_sizes(sources) if need_sizes else None
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
        self._resume = (
            ResumePoint.start(self.roles) if state is None else self._resume_point(state)
        )
        self._progress = ResumePoint(
            self._resume.batches_yielded, list(self._resume.consumed), list(self._resume.skipped)
        )
        stream = TrainStream(
            cfg, sources, list(weights), tokenize, pad_id, rank, world_size, self._resume
        )
        self._loader = DataLoader(
            stream,
            batch_size=None,  # batches are built in the workers (dynamic padding, bookkeeping)
            num_workers=cfg.workers,
            persistent_workers=cfg.workers > 0,
            pin_memory=torch.cuda.is_available(),
            worker_init_fn=_init_worker,
        )
        self._iterator: Iterator[dict[str, Any]] | None = None
        _track_for_exit(self)

    def _resume_point(self, state: dict[str, Any]) -> ResumePoint:
        expected = {
            "rank": self.rank, "world_size": self.world_size, "config": self.cfg.fingerprint(),
        }
        changed = [key for key, value in expected.items() if state.get(key) != value]
        if changed or len(state.get("consumed", [])) != self.roles:
            if "config" in changed:
                old = state.get("config") or {}
                changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in expected["config"].items()
                           if old.get(k) != v] + [c for c in changed if c != "config"]
            raise DataError(f"cannot resume the data stream exactly, changed: {', '.join(changed)}")
        return ResumePoint(
            state["batches_yielded"], list(state["consumed"]), list(state["skipped"])
        )

    def __iter__(self) -> TrainLoader:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = iter(self._loader)
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
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {
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


def build_train_loader(
    cfg: DataConfig, tokenize: Tokenize, pad_id: int, rank: int = 0, world_size: int = 1,
    state: dict[str, Any] | None = None,
) -> TrainLoader:
    """tokenize must be picklable (it is sent to worker processes); state from state_dict()."""
    return TrainLoader(cfg, tokenize, pad_id, rank=rank, world_size=world_size, state=state)


def _init_worker(worker_id: int) -> None:
    """SLURM sends SIGTERM (scancel, time limit) or its USR1 warning to every process of a job
    step, workers included. A worker that dies of it makes the trainer crash before its last
    checkpoint; the trainer stops its workers itself once it has saved, so they ignore both.
    And a worker never outlives its trainer (`_die_with_parent`)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    _die_with_parent()


def _die_with_parent() -> None:
    """Linux: the kernel sends this worker SIGKILL when the trainer dies, however it dies (a
    worker blocked on a full queue otherwise outlived a `kill -9`ed trainer). Elsewhere, torch's
    own watchdog (a parent-alive check between batches) is all there is."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before prctl took effect
        os._exit(0)


# Loaders whose workers `_kill_loader_workers_at_exit` stops; the handler is registered when the
# first loader is built, so importing this module (e.g. to read a run config) installs nothing.
_live_loaders: weakref.WeakSet[TrainLoader] = weakref.WeakSet()
_exit_handler_registered = False


def _track_for_exit(loader: TrainLoader) -> None:
    global _exit_handler_registered
    _live_loaders.add(loader)
    if not _exit_handler_registered:
        atexit.register(_kill_loader_workers_at_exit)
        _exit_handler_registered = True


def _kill_loader_workers_at_exit() -> None:
    """The other half of `_init_worker`. At interpreter exit multiprocessing stops daemon
    children with SIGTERM and then waits for them, so a trainer leaving by an exception (a dead
    peer under torchrun, a bad batch mid-run) would wait forever on workers that ignore it. A
    loader worker holds nothing worth saving: it gets SIGKILL. atexit runs the last-registered
    handler first, so this runs before multiprocessing's (registered when torch imported it)."""
    children = [w for loader in list(_live_loaders) for w in loader.worker_processes() if w.is_alive()]
    if children:
        # The DataLoader's SIGCHLD handler would report each kill as a second, misleading error.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()

