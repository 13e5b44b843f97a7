"""A real two-node Slurm cluster on this host, for tests/test_slurm.py.

The ``slurm_cluster`` fixture (session-scoped) installs Slurm and munge with apt-get when they are
missing and the tests run as root (as in CI, where these tests must run, not skip); a failed
install is an error, not a skip. As any other user (the daemons must run as root), or without
Slurm and apt-get, the tests skip and say why.
The install lives here rather than in the Makefile so that ``pytest tests/test_slurm.py`` alone
brings the cluster up too, and a run that deselects these tests (``-m "not slow"``) pays nothing.

Everything the cluster writes is under its own scratch folder: its munge key and socket, the
slurm.conf (clients find it through ``SLURM_CONF``, so ``/etc/slurm`` is never read or written),
state, spool, pid and log files. It runs munged, slurmctld and two slurmd (``node1``, ``node2``,
both on this host, at 127.0.0.1) in the foreground as children of the test process, on free ports;
teardown cancels the cluster's jobs and stops exactly those processes.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers import free_ports, stop_process

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo")
NODES = ("node1", "node2")
START_TIMEOUT = 60.0
CRED_EXPIRE = 10  # seconds


def install_slurm() -> str | None:
    """None once the Slurm and munge programs are on PATH; otherwise why they cannot be."""
    if os.geteuid() != 0:
        return "a local Slurm cluster needs root (slurmd starts every job as its user); run as root"
    missing = [name for name in BINARIES if shutil.which(name) is None]
    if not missing:
        return None
    if shutil.which("apt-get") is None:
        return (f"Slurm is not installed ({', '.join(missing)} missing) and there is no apt-get to "
                f"install it ({' '.join(PACKAGES)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *PACKAGES]):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return None



def slurm_conf(root: Path, munge_socket: Path, ports: list[int]) -> str:
    host = socket.gethostname().split(".")[0]
    cpus = os.cpu_count() or 1
    # The node names do not resolve: every node is reached at 127.0.0.1 on its own slurmd port.
    nodes = "\n".join(
        f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={cpus} "
        "RealMemory=1000 State=UNKNOWN"
        for name, port in zip(NODES, ports[1:], strict=True)
    )
    return f"""\
ClusterName=advdit-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ports[0]}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long Slurm holds a requeued job (Reason=BeginTime; 120 s by default)
# before it may start again on the nodes whose credentials for it were revoked.
AuthInfo=socket={munge_socket},cred_expire={CRED_EXPIRE}
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
# Trust the CPU counts above whatever this host's topology is (both slurmd share its cores).
SlurmdParameters=config_overrides
# Finished jobs stay visible to `scontrol show job` for the whole test session.
MinJobAge=3600
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
{nodes}
PartitionName=debug Nodes={",".join(NODES)} Default=YES MaxTime=INFINITE State=UP
"""


class SlurmCluster:
    """munged, slurmctld and the slurmd of each node, started from ``root``; see the module doc."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []

    def _daemon(self, name: str, command: list[str]) -> None:
        log = (self.root / "log" / f"{name}.out").open("w")
        self.processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                               env=self.env, start_new_session=True))

    def start(self) -> None:
        munge = self.root / "munge"
        for folder in ("log", "state", "spool", "munge"):
            (self.root / folder).mkdir(mode=0o700)
        key = munge / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        munge_socket = munge / "munge.socket"
        self._daemon("munged", ["munged", "--foreground", "--force", f"--key-file={key}",
                                f"--socket={munge_socket}", f"--pid-file={munge / 'munged.pid'}",
                                f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'munged.seed'}"])
        self._wait(munge_socket.exists, "munged's socket")
        self.conf.write_text(slurm_conf(self.root, munge_socket, free_ports(1 + len(NODES))))
        self._daemon("slurmctld", ["slurmctld", "-D", "-c", "-i", "-f", str(self.conf)])
        for node in NODES:
            self._daemon(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait(self._nodes_idle, "both nodes idle in sinfo")

    def _nodes_idle(self) -> bool:
        done = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False)
        states = dict(line.split() for line in done.stdout.splitlines() if line.strip())
        return all(states.get(node) == "idle" for node in NODES)

    def _wait(self, ready, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while not ready():
            for process in self.processes:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited ({process.returncode}) while waiting "
                                       f"for {what}; logs in {self.root / 'log'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {what} after {START_TIMEOUT:.0f} s; logs in {self.root / 'log'}")
            time.sleep(0.2)

    def run(self, *command: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster."""
        done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        if check and done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr}")
        return done

    def job(self, job_id: str) -> dict[str, str]:
        """``scontrol show job`` of one job as a dict (JobState, Reason, Restarts, ...)."""
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(item.split("=", 1) for item in text.split() if "=" in item)

    def stop(self) -> None:
        self.run("scancel", "--full", "--user", "root", check=False)  # only this cluster's jobs
        deadline = time.monotonic() + 30
        while self.run("squeue", "-h", check=False).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.5)
        for process in reversed(self.processes):
            stop_process(process)


@pytest.fixture(scope="session", name="slurm_cluster")
def slurm_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    reason = install_slurm()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
