"""The loader's worker processes: how they start, and that they never outlive or block their
trainer (SLURM signals, a SIGKILLed trainer, an exception at exit)."""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import multiprocessing
import os
import signal
import sys
import weakref
from typing import Any

import cv2

_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def init_worker(worker_id: int) -> None:
    """SLURM sends SIGTERM (scancel, time limit) or its USR1 warning to every process of a job
    step, workers included. A worker that dies of it makes the trainer crash before its last
    checkpoint; the trainer stops its workers itself once it has saved, so they ignore both.
    And a worker never outlives its trainer (`_die_with_parent`)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    cv2.setNumThreads(1)  # a worker is one core's worth of decoding: no thread pool per resize
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
_live_loaders: weakref.WeakSet[Any] = weakref.WeakSet()
_exit_handler_registered = False


def track_for_exit(loader: Any) -> None:
    """loader: anything with worker_processes() (a TrainLoader)."""
    global _exit_handler_registered
    _live_loaders.add(loader)
    if not _exit_handler_registered:
        atexit.register(_kill_loader_workers_at_exit)
        _exit_handler_registered = True


def _kill_loader_workers_at_exit() -> None:
    """The other half of `init_worker`. At interpreter exit multiprocessing stops daemon
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

