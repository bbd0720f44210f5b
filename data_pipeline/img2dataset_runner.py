"""One call of img2dataset's Python API, with its console noise sent to a log file.

img2dataset prints per-shard tracebacks, tqdm bars and speed lines from several processes; we
point file descriptors 1 and 2 at a log for the duration (its spawned workers inherit them) and
print a short progress line per finished shard instead.

Two of its behaviours are fenced off here:
  * it is always called with incremental_mode="incremental". "overwrite" would `rm -r` the
    output folder, foreign files included; our own checks decide whether a folder may be used.
  * it installs a SIGINT handler that deletes its scratch folder and exits with status 0: Ctrl-C
    would look like success, and when it lands while the list is being cut into shards, the
    reader thread retries writing into the deleted folder for minutes while the pool waits for
    it. We keep Python's own handler instead (KeyboardInterrupt), then stop the processes it
    started and remove its scratch folder ourselves.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.pool
import os
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Iterator, TextIO

import fsspec
from fsspec.implementations.local import LocalFileSystem

from data_pipeline.errors import UserError
from data_pipeline.shard_config import ShardConfig
from data_pipeline.shard_files import LOG_FILE, finished_shard_ids


def log_path_for(output: str) -> str:
    """Local path of the img2dataset log: in the shard folder when that is local."""
    fs, path = fsspec.core.url_to_fs(output)
    if isinstance(fs, LocalFileSystem):
        return os.path.join(path, LOG_FILE)
    safe = path.strip("/").replace("/", "_")
    return os.path.join(tempfile.gettempdir(), f"img2dataset-{safe}.log")


@contextmanager
def _output_into(log_path: str) -> Iterator[TextIO]:
    """Send fds 1 and 2 (ours and our children's) to `log_path`; yield the real stdout."""
    os.makedirs(os.path.dirname(log_path) or ".", exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved_out, saved_err = os.dup(1), os.dup(2)
    real_stdout = os.fdopen(os.dup(saved_out), "w", buffering=1)
    try:
        with open(log_path, "ab") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield real_stdout
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved_out, 1)
                os.dup2(saved_err, 2)
    finally:
        os.close(saved_out)
        os.close(saved_err)
        real_stdout.close()


@contextmanager
def _progress(output: str, label: str, total_shards: int, already_done: int, out: TextIO) -> Iterator[None]:
    """Print 'label: k/n shards' from a thread whenever another shard finishes."""
    stop = threading.Event()

    def report() -> None:
        last = already_done
        while not stop.wait(2.0):
            done = len(finished_shard_ids(output))
            if done != last:
                last = done
                out.write(f"  {label}: {done}/{total_shards} shards finished\n")

    thread = threading.Thread(target=report, name="shard-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


class _SignalModuleKeepingSigint:
    """Stands in for the `signal` module inside img2dataset.main: installing a SIGINT handler
    becomes a no-op, everything else goes to the real module."""

    def __getattr__(self, name: str) -> object:
        return getattr(signal, name)

    @staticmethod
    def signal(signum: int, handler: object) -> object:
        if signum == signal.SIGINT:
            return signal.getsignal(signal.SIGINT)
        return signal.signal(signum, handler)  # type: ignore[arg-type]


@contextmanager
def _img2dataset_without_sigint_handler() -> Iterator[None]:
    module = sys.modules["img2dataset.main"]
    original = module.signal
    module.signal = _SignalModuleKeepingSigint()
    try:
        yield
    finally:
        module.signal = original


def _preloaded_forkserver(method: str | None = None) -> multiprocessing.context.BaseContext:
    """img2dataset's worker pool starts its processes with "spawn": each worker imports
    img2dataset afresh (torch through webdataset, albumentations, wandb: ~4 s of CPU), and the
    pool does it again per split, per run and every 5 shards (maxtasksperchild). A forkserver
    that has imported img2dataset once forks ready workers instead: as clean as spawn (the
    server is a fresh interpreter, never a fork of this threaded process), without the imports.
    The demo's test corpus (300 images, 3 splits, 2 processes): 20.3 -> 17.7 s wall per build
    (farm-bench, 3 pairs, median). img2dataset's logger process is a SpawnProcess subclass
    and still imports it once per split."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["img2dataset"])
    return context


@contextmanager
def _workers_from_a_preloaded_server() -> Iterator[None]:
    module = sys.modules["img2dataset.distributor"]
    original = module.get_context
    module.get_context = _preloaded_forkserver
    try:
        yield
    finally:
        module.get_context = original


@contextmanager
def _pools_started_here() -> Iterator[list[multiprocessing.pool.Pool]]:
    """Collects the process pools created inside the block (img2dataset's), and only those, by
    wrapping Pool's constructor for the duration, so a clean-up can stop exactly them."""
    started: list[multiprocessing.pool.Pool] = []
    original = multiprocessing.pool.Pool.__init__

    def recording_init(pool, *args, **kwargs):
        started.append(pool)
        original(pool, *args, **kwargs)

    multiprocessing.pool.Pool.__init__ = recording_init
    try:
        yield started
    finally:
        multiprocessing.pool.Pool.__init__ = original


def _clean_up_after_interruption(
    output: str, pools: list[multiprocessing.pool.Pool], children_before: set
) -> None:
    """Stop the pools and child processes this run started (img2dataset's pool, logger process
    and workers), then drop its scratch folder.

    Best effort, never raising: the interruption is what the caller must see."""
    for pool in pools:
        try:
            pool.terminate()  # joins the pool's threads, so nothing respawns a worker afterwards
        except Exception:  # noqa: BLE001 - a pool interrupted inside its constructor
            pass  # has no finaliser yet; its workers are stopped just below
    ours = [c for c in multiprocessing.active_children() if c not in children_before]
    for child in ours:
        child.terminate()
    for child in ours:
        child.join(timeout=10)
    try:
        fs, path = fsspec.core.url_to_fs(output)
        if fs.exists(f"{path}/_tmp"):
            fs.rm(f"{path}/_tmp", recursive=True)
    except OSError:
        pass  # img2dataset reuses _tmp on the next run, and the folder checks accept it


def _check_distributor(config: ShardConfig) -> None:
    if config.distributor == "pyspark":
        try:
            import pyspark  # noqa: F401  (only checking that it is installed)
        except ImportError as exc:
            raise UserError("--distributor pyspark needs pyspark: pip install pyspark") from exc


def run_img2dataset(config: ShardConfig, url_list: str, label: str, total_shards: int) -> float:
    """Download `url_list` into config.output as webdataset shards; return the seconds it took."""
    _check_distributor(config)
    # albumentations (imported by img2dataset) asks PyPI for a newer version at import time: a
    # network call and a warning we do not want on an offline machine. Workers inherit this.
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset import download  # heavy (torch, cv2, wandb): imported only when needed

    already_done = len(finished_shard_ids(config.output))
    started = time.perf_counter()
    children_before = set(multiprocessing.active_children())
    with (
        _output_into(log_path_for(config.output)) as real_stdout,
        _progress(config.output, label, total_shards, already_done, real_stdout),
        _img2dataset_without_sigint_handler(),
        _workers_from_a_preloaded_server(),
        _pools_started_here() as pools,
    ):
        try:
            download(
                url_list=url_list,
                output_folder=config.output,
                output_format="webdataset",
                input_format=config.input_format,
                url_col=config.url_col,
                caption_col=config.caption_col,
                save_additional_columns=list(config.extra_columns) or None,
                image_size=config.image_size,
                resize_mode=config.resize_mode,
                encode_format="jpg",
                encode_quality=config.encode_quality,
                min_image_size=config.min_image_size,
                processes_count=config.processes,
                thread_count=config.threads,
                number_sample_per_shard=config.samples_per_shard,
                retries=config.retries,
                timeout=config.timeout,
                distributor=config.distributor,
                enable_wandb=config.wandb,
                wandb_project=config.wandb_project,
                incremental_mode="incremental",  # never "overwrite": see the module docstring
            )
        except BaseException:
            _clean_up_after_interruption(config.output, pools, children_before)
            raise
    return time.perf_counter() - started
