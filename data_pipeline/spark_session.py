"""The SparkSession that `--distributor pyspark` runs img2dataset's shards on.

img2dataset's pyspark distributor takes whatever SparkSession is active and, when there is none,
starts `local[processes]` with a 16 GB driver. We open the session ourselves, around the whole
download, so the user decides where the shards run:
  * `--spark-master spark://host:7077` (or yarn, k8s://..., local[N]) binds it to that cluster,
    with `--spark-executor-memory`, `--spark-executor-cores` and `--spark-cores-max`;
  * without it, a master set by spark-submit is kept, otherwise `local[processes]`;
  * an already active session (a notebook, a spark-submit driver that made one) is joined, and
    left running afterwards; one opened here is stopped.

Executors run img2dataset's downloader, unpickled from the driver, so their Python must have the
same packages: it is PYSPARK_PYTHON when set, otherwise this interpreter's path (right for one
machine and for clusters whose nodes share a virtualenv or an image).
"""

from __future__ import annotations

import os
import re
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

from data_pipeline.errors import UserError
from data_pipeline.img2dataset_runner import _output_into

APP_NAME = "clipstream-shards"
# JVM memory sizes as Spark writes them: 512m, 4g, 1t (k/m/g/t, optional trailing b).
_MEMORY = re.compile(r"^\d+[kmgt]b?$", re.IGNORECASE)
# Seconds to wait for a spark://host:port master to accept a connection before refusing.
MASTER_CONNECT_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class SparkConfig:
    """Where and with what resources `--distributor pyspark` runs. None: Spark's own default."""

    master: str | None = None
    executor_memory: str | None = None
    executor_cores: int | None = None
    cores_max: int | None = None
    # A standalone master that cannot grant one executor (no worker with that much free memory
    # or cores) leaves the job waiting forever; after this many seconds we stop with one line.
    start_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.master is not None and not self.master.strip():
            raise UserError("--spark-master must name a master URL, e.g. spark://host:7077")
        if self.executor_memory is not None and not _MEMORY.match(self.executor_memory):
            raise UserError(
                f"--spark-executor-memory is a JVM size such as 2g or 512m, got {self.executor_memory!r}"
            )
        for flag, value in (("--spark-executor-cores", self.executor_cores),
                            ("--spark-cores-max", self.cores_max)):
            if value is not None and value <= 0:
                raise UserError(f"{flag} must be positive, got {value}")
        if self.start_timeout_s <= 0:
            raise UserError(f"--spark-start-timeout must be positive, got {self.start_timeout_s}")

    def is_default(self) -> bool:
        return self == SparkConfig()

    def settings(self) -> dict[str, str]:
        """The Spark properties these options set (nothing for the options left at None)."""
        pairs = {
            "spark.executor.memory": self.executor_memory,
            "spark.executor.cores": self.executor_cores,
            # Standalone's default hands one application every free core of the cluster.
            "spark.cores.max": self.cores_max,
        }
        return {key: str(value) for key, value in pairs.items() if value is not None}


def _check_master_reachable(master: str) -> None:
    """A standalone master that does not answer makes Spark retry for about a minute and then
    stop the context under a running job; refuse at once with one line instead."""
    if not master.startswith("spark://"):
        return
    for address in master[len("spark://"):].split(","):  # spark://a:7077,b:7077 (HA masters)
        parts = urlsplit(f"spark://{address}")
        try:
            with socket.create_connection((parts.hostname, parts.port or 7077), MASTER_CONNECT_TIMEOUT_S):
                return
        except (OSError, ValueError):
            continue
    raise UserError(f"cannot reach the Spark master {master} (is it running, and the port open?)")


def _wait_for_an_executor(session, config: SparkConfig) -> None:
    """On a standalone master, wait until one executor has registered (see start_timeout_s).

    Other masters are left alone: local mode runs tasks in the driver, and with dynamic
    allocation (YARN, Kubernetes) executors are requested only once tasks are pending."""
    context = session.sparkContext
    dynamic = context.getConf().get("spark.dynamicAllocation.enabled", "false").lower() == "true"
    if not context.master.startswith("spark://") or dynamic:
        return
    deadline = time.monotonic() + config.start_timeout_s
    # The JVM's executor list counts the driver itself, hence "more than one".
    while context._jsc.sc().getExecutorMemoryStatus().size() < 2:
        if time.monotonic() > deadline:
            asked = ", ".join(f"{k}={v}" for k, v in config.settings().items()) or "Spark's defaults"
            raise UserError(
                f"the Spark master {context.master} started no executor within "
                f"{config.start_timeout_s:.0f} s ({asked}): does a worker have that much free memory "
                "and cores? (see its web UI; --spark-start-timeout waits longer)"
            )
        time.sleep(0.5)


def _default_master(processes: int) -> str:
    """The master spark-submit set (in the JVM's system properties), else local[processes]."""
    from pyspark import SparkConf  # starts the JVM gateway, which getOrCreate then reuses

    return SparkConf().get("spark.master", f"local[{processes}]")


def _import_pyspark():
    try:
        from pyspark.sql import SparkSession
    except ImportError as exc:
        raise UserError(
            "--distributor pyspark needs pyspark: pip install 'clipstream[spark]' (and Java 17+)"
        ) from exc
    return SparkSession


@contextmanager
def spark_session(config: SparkConfig, processes: int) -> Iterator[object]:
    """Yield the active SparkSession for img2dataset's pyspark distributor (see the docstring)."""
    SparkSession = _import_pyspark()
    active = SparkSession.getActiveSession()
    if active is not None:
        if not config.is_default():
            raise UserError(
                "a SparkSession is already active; its master and resources stand, "
                "so drop the --spark-* options (or set them on that session)"
            )
        yield active
        return
    if config.master:
        _check_master_reachable(config.master)
    # The RDD API starts executors' Python from PYSPARK_PYTHON (read when the context is made),
    # not from spark.pyspark.python; without either it is `python3` on PATH, which lacks our venv.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(APP_NAME).config("spark.ui.showConsoleProgress", "false")
    for key, value in config.settings().items():
        builder = builder.config(key, value)
    # The driver's JVM inherits fds 1 and 2 when it starts and writes its start-up notes and log
    # there for good: point them at a log file while it starts, so the console keeps our lines.
    log = os.path.join(tempfile.gettempdir(), f"{APP_NAME}-driver-{os.getpid()}.log")
    try:
        with _output_into(log):
            builder = builder.master(config.master or _default_master(processes))
            session = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - pyspark raises its own types for a JVM that won't start
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not start Spark (Java 17+ installed? JAVA_HOME set?): {first}; see {log}") from exc
    context = session.sparkContext
    print(f"spark: {context.master}, application {context.applicationId} (driver log: {log})", flush=True)
    # Our progress line per shard says what matters; Spark's INFO/WARN lines would drown it.
    session.sparkContext.setLogLevel("ERROR")
    try:
        _wait_for_an_executor(session, config)
        yield session
    finally:
        session.stop()
