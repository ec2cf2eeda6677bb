"""A real SLURM cluster on localhost for tests: munged + slurmctld + slurmd nodes (n1, n2, ...) on loopback.

Everything (keys, state, spool, logs, pid files) lives in one temporary directory. The Debian packages
``slurm-wlm`` and ``munge`` are installed on first use when missing (CI runs as root on a fresh machine).
Start-up problems raise :class:`ClusterUnavailable` with the exact reason (the failing command and the
tail of the daemon's log), so a test can report it instead of failing obscurely.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

NODES = ("n1", "n2")  # the default cluster; a test that needs a spare node asks for more
CPUS_PER_NODE = 2  # declared, not real: lets one branch share a node with the main path's rank
PARTITION = "debug"


class ClusterUnavailable(RuntimeError):
    """The local cluster could not be installed or started; the message says why."""


def _run(cmd: list[str], env: dict | None = None, timeout: float = 60, check: bool = True) -> str:
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ClusterUnavailable(f"`{' '.join(cmd)}` failed: {exc}") from None
    if check and proc.returncode != 0:
        raise ClusterUnavailable(
            f"`{' '.join(cmd)}` exited {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-2000:]}"
        )
    return proc.stdout


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt when slurmctld is not on PATH (cached by that check)."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "munged", "sbatch")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterUnavailable(
            "slurm-wlm/munge are not installed and cannot be installed here (needs root and apt-get); "
            "install them with: apt-get install -y --no-install-recommends slurm-wlm munge"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update"], env=env, timeout=600)
    # The packages' service starts fail without systemd; the binaries are installed regardless.
    _run(["apt-get", "install", "-y", "--no-install-recommends", "slurm-wlm", "munge"], env=env,
         timeout=900, check=False)
    if not shutil.which("slurmctld"):
        raise ClusterUnavailable("apt-get install slurm-wlm munge did not provide slurmctld")


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@dataclass
class LocalSlurmCluster:
    root: Path
    nodes: tuple = NODES
    conf: Path = field(init=False)
    env: dict = field(init=False)
    _munge_pid_file: Path = field(init=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.conf = self.root / "slurm.conf"
        self._munge_pid_file = self.root / "munge" / "munged.pid"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    # -- start -------------------------------------------------------------------------------------
    def start(self) -> "LocalSlurmCluster":
        ensure_installed()
        socket_path = self._start_munge()
        self._write_conf(socket_path)
        _run(["slurmctld", "-f", str(self.conf)], env=self.env)
        for node in self.nodes:
            _run(["slurmd", "-f", str(self.conf), "-N", node], env=self.env)
        self._wait_idle()
        return self

    def _start_munge(self) -> Path:
        mdir = self.root / "munge"
        mdir.mkdir(parents=True)
        os.chmod(self.root, 0o755)
        os.chmod(mdir, 0o755)  # munge clients (slurmstepd, srun) must reach the socket
        key_dir = self.root / "munge-key"
        key_dir.mkdir(mode=0o700)
        key = key_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        sock = mdir / "munge.socket"
        _run(["munged", "--force", f"--key-file={key}", f"--socket={sock}", f"--pid-file={self._munge_pid_file}",
              f"--log-file={mdir / 'munged.log'}", f"--seed-file={mdir / 'munged.seed'}"])
        out = subprocess.run(f"munge -n -S {sock} | unmunge -S {sock}", shell=True, capture_output=True, text=True)
        if out.returncode != 0:
            raise ClusterUnavailable(f"munge credential round trip failed: {out.stderr.strip()}")
        return sock

    def _write_conf(self, munge_socket: Path) -> None:
        ctld_port, *node_ports = _free_ports(1 + len(self.nodes))
        r = self.root
        (r / "state").mkdir()
        (r / "spool").mkdir()
        nodes = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs={CPUS_PER_NODE} State=UNKNOWN"
            for n, p in zip(self.nodes, node_ports)
        )
        self.conf.write_text(f"""\
ClusterName=lrpathtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool/%n
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd-%n.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
MinJobAge=3600
KillWait=30
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerParameters=batch_sched_delay=0,sched_interval=2
DependencyParameters=kill_invalid_depend
{nodes}
PartitionName={PARTITION} Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def _wait_idle(self, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        out = ""
        while time.time() < deadline:
            out = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, check=False)
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if all(states.get(n) == "idle" for n in self.nodes):
                return
            time.sleep(0.3)
        raise ClusterUnavailable(f"nodes not idle after {timeout}s (sinfo: {out.strip()!r}); "
                                 f"slurmctld.log tail:\n{self.log_tail('slurmctld.log')}")

    # -- use -----------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True) -> str:
        return _run(list(cmd), env=self.env, check=check)

    def job_info(self, job_id: str) -> dict[str, str]:
        """``scontrol show job -o`` as a dict (JobState, StartTime, EndTime, Restarts, ExitCode ...)."""
        for attempt in range(5):  # a loaded slurmctld sometimes drops a client connection (SIGPIPE)
            try:
                line = self.run("scontrol", "show", "job", "-o", job_id)
                break
            except ClusterUnavailable:
                if attempt == 4:
                    raise
                time.sleep(1)
        info = {}
        for token in line.split():
            key, sep, value = token.partition("=")
            if sep:
                info[key] = value
        return info

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.root / name
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else "(no log)"

    # -- stop ----------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Kill all jobs first (their steps outlive a shutdown), then the daemons, then munged."""
        if self.conf.exists():
            _run(["scancel", "--signal=KILL", f"--partition={PARTITION}"], env=self.env, check=False, timeout=15)
            deadline = time.time() + 15
            while time.time() < deadline and _run(["squeue", "-h"], env=self.env, check=False, timeout=15).strip():
                time.sleep(0.5)
            _run(["scontrol", "shutdown"], env=self.env, check=False, timeout=15)
        for pid_file in [self.root / "slurmctld.pid"] + [self.root / f"slurmd-{n}.pid" for n in self.nodes]:
            _stop_pid(_read_pid(pid_file), grace=3)
        for pid in self._step_daemons():  # a step stuck on its I/O survives all of the above
            _stop_pid(pid, grace=0)
        _stop_pid(_read_pid(self._munge_pid_file), grace=0)

    def _step_daemons(self) -> list[int]:
        """slurmstepd processes of this cluster (they carry its SLURM_CONF in their environment)."""
        mark = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if (proc / "cmdline").read_bytes().startswith(b"slurmstepd") and \
                        mark in (proc / "environ").read_bytes().split(b"\0"):
                    pids.append(int(proc.name))
            except OSError:
                continue
        return pids


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    """Running (a zombie waiting to be reaped by init counts as ended)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _stop_pid(pid: int | None, grace: float) -> None:
    """Wait up to ``grace`` s for the process to end by itself, then SIGTERM, then SIGKILL."""
    if pid is None:
        return
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        if sig is not None and _alive(pid):
            os.kill(pid, sig)
        deadline = time.time() + (grace if sig is None else 3)
        while time.time() < deadline and _alive(pid):
            time.sleep(0.1)
        if not _alive(pid):
            return


@pytest.fixture(scope="module")
def slurm_cluster_or_reason(tmp_path_factory):
    """A started :class:`LocalSlurmCluster`, or the exact reason (a str) why none could start here."""
    cluster = LocalSlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except ClusterUnavailable as exc:
        cluster.stop()
        yield str(exc)
        return
    try:
        yield cluster
    finally:
        cluster.stop()
