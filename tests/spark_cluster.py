"""A throwaway standalone Spark cluster on 127.0.0.1 (one master, one worker), for
tests/test_spark_sharding.py, bench/spark_sharding.py and for trying `--distributor pyspark`.

    python tests/spark_cluster.py up /tmp/spark     # prints the master URL; daemons keep running
    python tests/spark_cluster.py down /tmp/spark

Needs Java 17+ (Debian's openjdk-17-jre-headless; `.ci/run` installs it) and pyspark from PyPI,
whose wheel carries Spark's jars and `bin/spark-class`, the launcher we start both daemons with
(the wheel has no sbin/start-master.sh). Everything lives in one folder: daemon logs, the worker's
application folders (executor stdout/stderr). Ports are picked free each time and every socket is
bound to 127.0.0.1 (SPARK_LOCAL_IP), so nothing is exposed and parallel clusters do not collide.
`missing_reason()` says why a cluster cannot start here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from local_daemons import pids_with_env, signal_all, stop_daemons

# Every process of a cluster (daemons, executors, their Python workers) carries this variable,
# so stop() can find the ones that left the daemons' process groups.
MARKER = "CLIPSTREAM_SPARK_CLUSTER"


def spark_home() -> Path | None:
    try:
        import pyspark
    except ImportError:
        return None
    return Path(pyspark.__file__).resolve().parent


def java_major() -> int | None:
    java = shutil.which("java")
    if java is None:
        return None
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    if not match:
        return None
    major = int(match.group(1))
    return int(match.group(2)) if major == 1 and match.group(2) else major  # "1.8" is Java 8


def missing_reason() -> str | None:
    """None when a local cluster can start; otherwise why not (for pytest's skip message)."""
    home = spark_home()
    if home is None:
        return "pyspark is not installed (pip install 'clipstream[spark]')"
    if not (home / "bin" / "spark-class").is_file():
        return f"pyspark at {home} has no bin/spark-class"
    major = java_major()
    if major is None:
        return "no Java runtime (apt-get install openjdk-17-jre-headless)"
    if major < 17:
        return f"Spark 4 needs Java 17+, found Java {major} (apt-get install openjdk-17-jre-headless)"
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalSpark:
    """Master + one worker as background JVMs, each in its own process group."""

    def __init__(self, root: Path, cores: int = 2, worker_memory: str = "1g",
                 daemon_memory: str = "256m"):
        self.root = Path(root).resolve()
        self.cores = cores
        self.worker_memory = worker_memory
        self.daemon_memory = daemon_memory  # heap of the master and worker JVMs themselves
        self.port = 0
        self.ui_port = 0
        self._daemons: dict[str, subprocess.Popen] = {}

    @property
    def master_url(self) -> str:
        return f"spark://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The environment for the daemons and for drivers that talk to this cluster."""
        return dict(
            os.environ,
            SPARK_HOME=str(spark_home()),
            SPARK_LOCAL_IP="127.0.0.1",
            SPARK_LOG_DIR=str(self.root / "log"),
            SPARK_DAEMON_MEMORY=self.daemon_memory,
            # Scratch files and the drivers' JVM logs (data_pipeline.spark_session) stay here too.
            TMPDIR=str(self.root / "tmp"),
            # The Python that executors start: the one with img2dataset installed.
            PYSPARK_PYTHON=os.environ.get("PYSPARK_PYTHON", sys.executable),
        )

    def start(self, timeout: float = 90.0) -> LocalSpark:
        reason = missing_reason()
        if reason:
            raise RuntimeError(reason)
        for sub in ("log", "work", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.port, self.ui_port = free_port(), free_port()
        try:
            self._spawn("master", "org.apache.spark.deploy.master.Master",
                        "--host", "127.0.0.1", "--port", str(self.port),
                        "--webui-port", str(self.ui_port))
            self._wait(lambda: self.state() is not None, timeout, "master answering on its web UI")
            self._spawn("worker", "org.apache.spark.deploy.worker.Worker", self.master_url,
                        "--host", "127.0.0.1", "--port", str(free_port()),
                        "--webui-port", str(free_port()), "--cores", str(self.cores),
                        "--memory", self.worker_memory, "--work-dir", str(self.root / "work"))
            self._wait(lambda: (self.state() or {}).get("aliveworkers", 0) >= 1, timeout,
                       "worker registered with the master")
        except BaseException:
            self.stop()
            raise
        return self

    def state(self) -> dict | None:
        """The master's /json/ view (workers, cores, running and completed apps), or None."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.ui_port}/json/", timeout=5) as resp:
                return json.load(resp)
        except (OSError, ValueError):
            return None

    def stop(self) -> None:
        """Stop the worker (and with it its executors), then the master, then any process of
        this cluster still alive (found by MARKER in its environment)."""
        stop_daemons(self._daemons, 15.0, self._marker)

    def __enter__(self) -> LocalSpark:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _spawn(self, name: str, main_class: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self._daemons[name] = subprocess.Popen(
            [str(spark_home() / "bin" / "spark-class"), main_class, *args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**self.env, MARKER: str(self.root)}, cwd=self.root, start_new_session=True,
        )
        log.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self._daemons.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"no {what} after {timeout:.0f} s"
                raise RuntimeError(f"local Spark did not start: {why}\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 2000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted((self.root / "log").glob("*.out")))

    @property
    def _marker(self) -> str:
        return f"{MARKER}={self.root}"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    cluster = LocalSpark(Path(argv[1]))
    if argv[0] == "up":
        # The daemons must outlive this command: start them and forget the handles.
        cluster.start()
        (cluster.root / "master_url").write_text(cluster.master_url + "\n")
        print(cluster.master_url)
        return 0
    signal_all(pids_with_env(cluster._marker), signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
