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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator
from urllib.parse import urlsplit

from data_pipeline.errors import UserError

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
    if config.master:
        builder = builder.master(config.master)
    else:
        from pyspark import SparkConf

        if not SparkConf().contains("spark.master"):  # spark-submit sets it; a plain run does not
            builder = builder.master(f"local[{processes}]")
    for key, value in config.settings().items():
        builder = builder.config(key, value)
    try:
        session = builder.getOrCreate()
    except Exception as exc:  # noqa: BLE001 - pyspark raises its own types for a JVM that won't start
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not start Spark (Java 17+ installed? JAVA_HOME set?): {first}") from exc
    # Our progress line per shard says what matters; Spark's INFO/WARN lines would drown it.
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()
