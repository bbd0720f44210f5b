"""What the local test clusters (tests/slurm_cluster.py, tests/spark_cluster.py) share: stopping a
daemon's process group, and finding the daemons that outlived their handles by a marker they
carry in their environment."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path


def pids_with_env(marker: str) -> list[int]:
    """Processes (other than this one) whose environment holds the `NAME=value` string."""
    wanted = marker.encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted in environ:
            pids.append(int(entry.name))
    return pids


def end_group(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM the daemon's process group, SIGKILL it if it lingers."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def stop_daemons(daemons: dict[str, subprocess.Popen], grace: float, marker: str) -> None:
    """End the daemons last-started first, forget their handles, then SIGKILL any process that
    still carries the cluster's environment marker (job processes, executors)."""
    for name in reversed(list(daemons)):
        end_group(daemons[name], grace)
    daemons.clear()
    signal_all(pids_with_env(marker), signal.SIGKILL)
