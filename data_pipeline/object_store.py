"""Reading shards from object storage (s3://, gs://, any fsspec URL) so that a storage hiccup
costs a retry, not a run.

Shards on S3 are commonly streamed through `pipe:aws s3 cp ... -`, where a connection reset
mid-object ends the pipe and the run with it (webdataset issues #473 and #184, OpenCLIP #1018).
Here an object is read through fsspec natively and `ResumingReader` keeps the byte offset it has
handed out; when a read fails (connection reset, 5xx, a stalled read that times out) it waits
(exponential backoff with jitter), reopens the object and seeks to that offset, so the tar parser
above it sees one unbroken byte stream and the samples are exactly those of a clean read (which
is what keeps exact mid-epoch resume exact on a flaky store). After `ReadRetry.retries` failed
attempts in a row it raises `ShardUnreadable`; `shard_format` turns that into the broken-shard
record that the trainer skips and counts like a truncated tar. Answers that no retry changes
(no such object, access denied) are raised at once.

One retry layer: for s3:// the reads go through an S3FileSystem of their own on which botocore's
and s3fs's internal retries are off. Left on, they re-fetch a whole range a few times within
about two seconds, silently, and only then fail; this layer waits longer, resumes mid-range and
counts every retry (`READ_STATS`, reported by the trainer into metrics.jsonl).

Endpoints of S3-compatible stores (MinIO, Ceph, moto) come from the standard variables, which
botocore, s3fs, img2dataset's fsspec output and the aws CLI all honour: AWS_ENDPOINT_URL (or
AWS_ENDPOINT_URL_S3), with AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Callable

import fsspec

logger = logging.getLogger(__name__)

# Answers from the store that a retry does not change: the shard is reported at once.
DEFINITIVE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# Protocols on this machine's own disks: nothing to retry.
LOCAL_PROTOCOLS = frozenset({"file", "local"})


@dataclass(frozen=True)
class ReadRetry:
    """How a failed read of an object is retried before its shard is skipped.

    retries: reopenings after failed reads in a row (a read that succeeds resets the count).
    backoff_s: the first wait; doubled on each further retry, capped at max_backoff_s, each wait
        drawn from [1/2, 1] of that (jitter, so many workers do not retry in lockstep).
    timeout_s: s3://: a connect or a read that stalls this long fails (and is retried).
    block_size: bytes per ranged GET (None: the filesystem's default, 50 MiB for s3fs).
    """

    retries: int = 5
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0
    block_size: int | None = None

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"read retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError(f"need 0 <= backoff_s <= max_backoff_s, got {self.backoff_s}, "
                             f"{self.max_backoff_s}")
        if self.timeout_s <= 0:
            raise ValueError(f"read timeout_s must be > 0, got {self.timeout_s}")
        if self.block_size is not None and self.block_size <= 0:
            raise ValueError(f"block_size must be > 0, got {self.block_size}")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (1-based)."""
        ceiling = min(self.max_backoff_s, self.backoff_s * 2 ** (retry - 1))
        return ceiling * random.uniform(0.5, 1.0)


@dataclass
class ReadStats:
    """Storage events in this process (each dataloader worker has its own)."""

    retries: int = 0  # reopenings after a failed read
    gave_up: int = 0  # objects abandoned after `retries` failures in a row

    def snapshot(self) -> tuple[int, int]:
        return self.retries, self.gave_up


READ_STATS = ReadStats()


class ShardUnreadable(OSError):
    """An object kept failing to read; its shard is skipped (and counted) by the readers."""


def is_remote(url: str) -> bool:
    """An fsspec URL on something other than the local disk."""
    return "://" in url and url.split("://", 1)[0].lower() not in LOCAL_PROTOCOLS


def _filesystem(url: str, retry: ReadRetry) -> tuple[fsspec.AbstractFileSystem, str]:
    protocol = url.split("://", 1)[0].lower()
    if protocol not in ("s3", "s3a"):
        return fsspec.core.url_to_fs(url)
    configured = dict(fsspec.config.conf.get("s3", {}).get("config_kwargs", {}))
    configured.update(
        retries={"total_max_attempts": 1},  # botocore: no retry of its own (see module doc)
        connect_timeout=retry.timeout_s, read_timeout=retry.timeout_s,
    )
    # A config of its own makes fsspec build (and cache) an instance of its own, so turning off
    # s3fs's body retries here leaves listing, writing, sizes.json on the shared one untouched.
    fs, path = fsspec.core.url_to_fs(url, config_kwargs=configured)
    fs.retries = 1  # s3fs's retry loop around each ranged GET: one attempt (a class attribute)
    return fs, path


class ResumingReader:
    """A read-only binary stream over one remote object that survives failed reads (module doc).

    Opening happens in the constructor, with the same retries, so a missing object raises
    FileNotFoundError there. `offset` is the number of bytes handed out so far.
    """

    def __init__(self, url: str, retry: ReadRetry = ReadRetry(),
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.url, self.retry, self._sleep = url, retry, sleep
        self.offset = 0
        self._file: Any = None
        self._fs, self._path = _filesystem(url, retry)
        self._attempt(lambda: None)

    def _open(self) -> None:
        options = {} if self.retry.block_size is None else {"block_size": self.retry.block_size}
        handle = self._fs.open(self._path, "rb", **options)
        if self.offset:
            handle.seek(self.offset)
        self._file = handle

    def _discard(self) -> None:
        handle, self._file = self._file, None
        if handle is not None:
            try:
                handle.close()
            except Exception:  # noqa: BLE001 - the connection is already broken
                pass

    def _attempt(self, operation: Callable[[], Any]) -> Any:
        failures = 0
        while True:
            try:
                if self._file is None:
                    self._open()
                return operation()
            except DEFINITIVE_ERRORS:
                self._discard()
                raise
            except Exception as exn:  # noqa: BLE001 - resets, 5xx, timeouts: all retried
                self._discard()
                failures += 1
                reason = f"{type(exn).__name__}: {exn}".strip().rstrip(":")
                if failures > self.retry.retries:
                    READ_STATS.gave_up += 1
                    message = (f"{self.url}: gave up at byte {self.offset} after "
                               f"{self.retry.retries} retries ({reason})")
                    logger.warning("skipping shard %s", message)
                    raise ShardUnreadable(message) from None
                READ_STATS.retries += 1
                wait = self.retry.delay(failures)
                logger.info("retrying %s from byte %d in %.2f s (%s)", self.url, self.offset,
                            wait, reason)
                self._sleep(wait)

    def read(self, size: int = -1) -> bytes:
        data = self._attempt(lambda: self._file.read(size))
        self.offset += len(data)
        return data

    def close(self) -> None:
        self._discard()

    def __enter__(self) -> ResumingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_remote(url: str, retry: ReadRetry | None = None) -> BinaryIO:
    """A remote object opened for a sequential read that resumes after failures."""
    return ResumingReader(url, retry or ReadRetry())  # type: ignore[return-value]
