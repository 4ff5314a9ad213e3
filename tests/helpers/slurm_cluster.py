"""A real one-node SLURM cluster (munged + slurmctld + slurmd) in a temporary directory, for tests.

Why a real one and not a mock: the things that break on clusters are SLURM's own behaviours (which
process a ``--signal=B:`` signal reaches, what ``scontrol requeue`` does to a running batch script,
which variables an ``srun`` step sees, ``--open-mode`` on requeue). Debian's ``slurm-wlm`` and
``munge`` run as root on one machine with a private config: every path (state, spool, logs, pid
files, the munge socket and key) lives under ``root``, so nothing outside it is touched and the
system's own ``/etc/slurm`` / ``/run/munge`` are not used. Clients find the cluster through the
``SLURM_CONF`` variable that ``Cluster.env()`` returns.

Daemons run in the foreground (``-D`` / ``-F``) as children of this process, so they are stopped by
their own PIDs (SIGTERM, then SIGKILL), even when a test fails.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Optional

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "srun", "sinfo")


class SlurmUnavailable(RuntimeError):
    """SLURM is not installed here or could not be started (tests skip with this message)."""


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def missing_programs() -> list[str]:
    return [n for n in DAEMONS + CLIENTS if _which(n) is None]


@dataclass
class Cluster:
    root: str
    conf: str
    hostname: str
    cpus: int
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = self.conf
        env.update(extra)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        p = subprocess.run(
            list(cmd), env=kw.pop("env", None) or self.env(), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} -> {p.returncode}\n{p.stdout}\n{p.stderr}\n" + self.daemon_logs())
        return p

    def sbatch(self, *args: str, cwd: Optional[str] = None, env: Optional[dict] = None) -> int:
        """Submit; returns the job id (``--parsable``)."""
        out = self.run(_which("sbatch"), "--parsable", *args, cwd=cwd, env=env).stdout.strip()
        return int(out.split(";")[0].split("_")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (first record; for an array, use ``jobs``)."""
        jobs = self.jobs(job_id)
        return jobs[0] if jobs else {}

    def jobs(self, job_id: int | str) -> list[dict[str, str]]:
        p = self.run(_which("scontrol"), "-o", "show", "job", str(job_id), check=False)
        if p.returncode != 0:
            return []
        # first occurrence wins: the Command=... field echoes the script's key=value arguments
        return [dict(reversed(re.findall(r"(\w+)=(\S*)", line))) for line in p.stdout.splitlines() if line.strip()]

    def wait_done(self, job_id: int | str, timeout: float = 240) -> list[dict[str, str]]:
        """Block until every task of the job is in a final state; returns their records."""
        final = (
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
            "PREEMPTED",
        )
        deadline = time.time() + timeout
        while time.time() < deadline:
            jobs = self.jobs(job_id)
            if jobs and all(j.get("JobState") in final for j in jobs):
                return jobs
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not finished in {timeout} s: {self.jobs(job_id)}\n" + self.daemon_logs())

    def daemon_logs(self, tail: int = 30) -> str:
        out = []
        for name in DAEMONS:
            path = os.path.join(self.root, "log", f"{name}.log")
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    lines = f.read().splitlines()[-tail:]
                out.append(f"--- {name}.log (last {tail} lines)\n" + "\n".join(lines))
        return "\n".join(out)

    def cancel_all(self, timeout: float = 60) -> None:
        """Cancel every job and wait until the queue is empty (slurmstepd and the job's processes are not
        children of slurmd: stopping the daemons alone would leave training processes running)."""
        if "slurmctld" not in self.procs or self.procs["slurmctld"].poll() is not None:
            return
        self.run(_which("scancel"), "--partition=test", check=False)
        deadline = time.time() + timeout
        while time.time() < deadline:
            p = self.run(_which("squeue"), "-h", "-o", "%i", check=False, timeout=10)
            if p.returncode != 0 or not p.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the daemons by PID (reverse start order): SIGTERM, then SIGKILL after a grace period."""
        for name in reversed(list(self.procs)):
            p = self.procs[name]
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()
        self.kill_leftovers()

    def kill_leftovers(self) -> list[int]:
        """SIGKILL, by PID, processes this cluster started that outlived it: slurmstepd and job processes
        carry ``SLURM_CONF=<this cluster's conf>`` in their environment (inherited from our slurmd)."""
        marker = f"SLURM_CONF={self.conf}".encode()
        killed = []
        for pid in (int(d) for d in os.listdir("/proc") if d.isdigit()):
            if pid == os.getpid():
                continue
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if marker not in f.read().split(b"\0"):
                        continue
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except (OSError, ProcessLookupError):
                continue
        return killed


def _write(path: str, text: str, mode: int = 0o644) -> None:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


def node_line() -> tuple[str, int, str]:
    """(hostname, cpus, NodeName=... line) from ``slurmd -C`` (the node's real hardware)."""
    out = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True, timeout=30).stdout
    line = next((ln for ln in out.splitlines() if ln.startswith("NodeName=")), None)
    if line is None:
        raise SlurmUnavailable(f"`slurmd -C` printed no NodeName line: {out!r}")
    host = re.search(r"NodeName=(\S+)", line).group(1)
    cpus = int(re.search(r"CPUs=(\d+)", line).group(1))
    return host, cpus, line.strip()


def slurm_conf(root: str, host: str, node: str, ctld_port: int, slurmd_port: int, cred_expire: int = 10) -> str:
    """``cred_expire`` also sets how long a requeued job waits before it may start again (SLURM's default
    120 s; 10 here keeps the requeue tests short)."""
    return f"""# one-node test cluster, generated by tests/helpers/slurm_cluster.py
ClusterName=careedit-test
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire={cred_expire}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
PlugStackConfig={root}/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2
MpiDefault=none
MailProg=/bin/true
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
KillWait=10
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
SlurmctldDebug=info
SlurmdDebug=info
{node} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(root: str, timeout: float = 60) -> Cluster:
    """Start munged, slurmctld and slurmd under ``root``; raises SlurmUnavailable with the reason."""
    missing = missing_programs()
    if missing:
        raise SlurmUnavailable(
            f"SLURM/munge not installed (missing {', '.join(missing)}); on Debian: apt-get install -y slurm-wlm munge"
        )
    if os.geteuid() != 0:
        raise SlurmUnavailable("the test cluster runs slurmd as SlurmUser=root; run the tests as root")
    for d in ("munge", "state", "spool", "run", "log"):
        os.makedirs(os.path.join(root, d), mode=0o700, exist_ok=True)
    os.chmod(os.path.join(root, "munge"), 0o755)  # munged wants the socket's directory traversable by all
    host, cpus, node = node_line()
    conf = os.path.join(root, "slurm.conf")
    _write(conf, slurm_conf(root, host, node, _free_port(), _free_port()))
    _write(os.path.join(root, "plugstack.conf"), "")
    key = os.path.join(root, "munge", "munge.key")
    _write(key, os.urandom(1024).hex(), mode=0o600)
    cluster = Cluster(root=root, conf=conf, hostname=host, cpus=cpus)
    log = os.path.join(root, "log")
    try:
        cluster.procs["munged"] = subprocess.Popen(
            [
                _which("munged"),
                "-F",
                "--force",
                f"--socket={root}/munge/munge.socket",
                f"--key-file={key}",
                f"--log-file={log}/munged.log",
                f"--pid-file={root}/run/munged.pid",
                f"--seed-file={root}/munge/munged.seed",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(f"{log}/munged.stderr", "w"),
        )
        _wait_for(lambda: os.path.exists(f"{root}/munge/munge.socket"), cluster, "munged", timeout)
        env = cluster.env()
        cluster.procs["slurmctld"] = subprocess.Popen(
            [_which("slurmctld"), "-D", "-i", "-f", conf],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(f"{log}/slurmctld.stderr", "w"),
        )
        cluster.procs["slurmd"] = subprocess.Popen(
            [_which("slurmd"), "-D", "-f", conf],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(f"{log}/slurmd.stderr", "w"),
        )

        def node_idle() -> bool:
            p = cluster.run(_which("sinfo"), "-h", "-N", "-o", "%t", check=False, timeout=10)
            return p.returncode == 0 and p.stdout.strip().rstrip("*") in ("idle", "mix", "alloc")

        _wait_for(node_idle, cluster, "slurmctld/slurmd (node idle)", timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(cond, cluster: Cluster, what: str, timeout: float) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        dead = [n for n, p in cluster.procs.items() if p.poll() is not None]
        if dead:
            raise SlurmUnavailable(
                f"{', '.join(dead)} exited while starting:\n" + _stderrs(cluster) + cluster.daemon_logs()
            )
        if cond():
            return
        time.sleep(0.3)
    raise SlurmUnavailable(f"{what} not ready in {timeout} s:\n" + _stderrs(cluster) + cluster.daemon_logs())


def _stderrs(cluster: Cluster) -> str:
    out = []
    for name in cluster.procs:
        path = os.path.join(cluster.root, "log", f"{name}.stderr")
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                text = f.read().strip()
            if text:
                out.append(f"--- {name} stderr\n{text[-2000:]}")
    return "\n".join(out) + "\n"
