"""A throwaway one-node SLURM cluster on localhost, for tests/test_slurm.py and for trying launch/.

    python tests/slurm_cluster.py up /tmp/slurm    # prints export SLURM_CONF=/tmp/slurm/slurm.conf
    python tests/slurm_cluster.py down /tmp/slurm

Needs root and Debian's `slurm-wlm` and `munge` packages (`.ci/run` installs them). Everything
lives in one folder: a fresh munge key and munged socket, slurm.conf, spool and state directories,
daemon logs. Free ports are picked each time, so several clusters (or other users of the default
ports 6817/6818) do not collide. The settings that make SLURM run in a container without cgroups:
proctrack/linuxproc and task/none, accounting off, SlurmUser=root.
`missing_reason()` says why a cluster cannot start here (not root, packages absent).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from local_daemons import pids_with_env, signal_all, stop_daemons

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "sinfo", "scancel", "srun")


def missing_reason() -> str | None:
    """None when a local cluster can start; otherwise why not (for pytest's skip message)."""
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs jobs as any user)"
    absent = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if absent:
        return (f"SLURM is not installed ({', '.join(absent)} not found); "
                f"apt-get install slurm-wlm munge")
    return None


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SLURM_CONF_TEMPLATE = """\
# Written by tests/slurm_cluster.py: one node, localhost, no cgroups, no accounting.
ClusterName=clipstream-test
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobRequeue=1
ReturnToService=2
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
# Finished jobs stay visible to `scontrol show job` for 10 minutes (the tests read Restarts).
MinJobAge=600
NodeName=localhost CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """munged + slurmctld + slurmd as background processes (each its own process group)."""

    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 2000):
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.conf = self.root / "slurm.conf"
        self.munge_socket = self.root / "munge" / "munge.socket"
        self._daemons: dict[str, subprocess.Popen] = {}

    @property
    def env(self) -> dict[str, str]:
        """The environment for SLURM commands (and the jobs they submit) on this cluster."""
        path = os.environ.get("PATH", "/usr/bin:/bin")
        return dict(os.environ, SLURM_CONF=str(self.conf), PATH=f"{path}:/usr/sbin")

    def start(self, timeout: float = 60.0) -> LocalSlurm:
        reason = missing_reason()
        if reason:
            raise RuntimeError(reason)
        for sub in ("munge", "state", "spool", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.conf.write_text(SLURM_CONF_TEMPLATE.format(
            root=self.root, munge_socket=self.munge_socket, cpus=self.cpus,
            memory_mb=self.memory_mb, ctld_port=free_port(), slurmd_port=free_port(),
        ))
        try:
            self._spawn("munged", "-F", "--force", f"--key-file={key}",
                        f"--socket={self.munge_socket}",
                        f"--pid-file={self.root / 'munge' / 'munged.pid'}",
                        f"--log-file={self.root / 'log' / 'munged.log'}",
                        f"--seed-file={self.root / 'munge' / 'munged.seed'}")
            self._wait(lambda: self.munge_socket.exists(), timeout, "munged socket")
            self._spawn("slurmctld", "-D", "-i")
            self._wait(lambda: "UP" in self._out("scontrol", "ping"), timeout,
                       "slurmctld answering `scontrol ping`")
            self._spawn("slurmd", "-D", "-N", "localhost")
            self._wait(lambda: self.node_state() == "idle", timeout, "node localhost idle in sinfo")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel every job, stop the daemons, then end any process still running for this
        cluster (job processes, slurmstepd) found by the SLURM_CONF in its environment."""
        if "slurmctld" in self._daemons and self._daemons["slurmctld"].poll() is None:
            self._quiet("scancel", "--full", "--user", "root")
            deadline = time.monotonic() + 45
            while time.monotonic() < deadline and self._out("squeue", "-h").strip():
                time.sleep(1)
        stop_daemons(self._daemons, 10.0, self._marker)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # Commands -----------------------------------------------------------------------------------

    def run(self, *cmd: str, check: bool = True, env: dict[str, str] | None = None,
            cwd: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                                env={**self.env, **(env or {})}, cwd=cwd)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}")
        return result

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        """Submit; returns the job id."""
        return int(self.run("sbatch", "--parsable", *args, env=env, cwd=cwd).stdout.split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, StartTime, ...)."""
        out = self.run("scontrol", "-o", "show", "job", str(job_id)).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def node_state(self) -> str:
        return self._out("sinfo", "-h", "-n", "localhost", "-o", "%t").strip()

    def wait_job(self, job_id: int, until: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job's state is one of `until`; returns its last `job()`."""
        deadline = time.monotonic() + timeout
        while True:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after "
                                   f"{timeout:.0f} s (waiting for {sorted(until)}): {info}")
            time.sleep(1)

    # Internals ----------------------------------------------------------------------------------

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")
        self._daemons[name] = subprocess.Popen(
            [_which(name), *args], stdout=log, stderr=subprocess.STDOUT, env=self.env,
            cwd=self.root, start_new_session=True,
        )
        log.close()

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [n for n, p in self._daemons.items() if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}"
                                 for p in sorted((self.root / "log").glob("*.out")))
                why = f"{', '.join(dead)} exited" if dead else f"no {what} after {timeout:.0f} s"
                raise RuntimeError(f"local SLURM did not start: {why}\n{logs}")
            time.sleep(0.5)

    def _out(self, *cmd: str) -> str:
        try:
            return self.run(*cmd, check=False, timeout=20).stdout
        except subprocess.TimeoutExpired:
            return ""

    def _quiet(self, *cmd: str) -> bool:
        try:
            return self.run(*cmd, check=False, timeout=20).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    @property
    def _marker(self) -> str:
        return f"SLURM_CONF={self.conf}"


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        print(__doc__.split("\n\n")[1], file=sys.stderr)
        return 2
    cluster = LocalSlurm(Path(argv[1]))
    if argv[0] == "up":
        # The daemons must outlive this command: detach them and forget the handles.
        cluster.start()
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    signal_all(pids_with_env(cluster._marker), signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
