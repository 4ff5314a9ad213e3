"""A run lock: one process tree writes a run directory at a time.

Why: a second copy of the same run (a resubmitted job, a requeue that starts while the old job is
still writing, two sweeps naming the same run) would interleave checkpoints and ``latest`` updates
of two diverging trainings. Rank 0 creates ``<run dir>/run.lock`` exclusively (``O_CREAT|O_EXCL``)
holding its pid, host, start time and SLURM job id / restart count, and a daemon thread refreshes
the file's mtime (a heartbeat) while the run lives. All ranks agree on the outcome before anything
is written. An existing lock is taken over, with a message, only when its holder is known gone:

* same host and its pid no longer exists (a killed run on this machine);
* same SLURM job id with a lower restart count (SLURM requeued this job: the old incarnation is over);
* no heartbeat for ``STALE_S`` seconds (its node died).

Otherwise the run stops with ``RunLocked`` naming the holder and how to remove the lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Optional

from train.distributed import DistInfo, all_ranks_any

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # no heartbeat for this long: the holder is gone


class RunLocked(RuntimeError):
    """Another live process holds this run directory."""


@dataclass
class Holder:
    pid: int
    host: str
    started: float
    slurm_job_id: Optional[str] = None
    slurm_restart_count: int = 0

    @classmethod
    def me(cls) -> "Holder":
        return cls(
            pid=os.getpid(),
            host=socket.gethostname(),
            started=time.time(),
            slurm_job_id=os.environ.get("SLURM_JOB_ID"),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
        )

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job_id} restart {self.slurm_restart_count}" if self.slurm_job_id else ""
        return f"pid {self.pid} on {self.host}{job}, started {time.strftime('%F %T', time.localtime(self.started))}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def gone_reason(holder: Holder, me: Holder, age_s: float) -> Optional[str]:
    """Why ``holder`` can no longer be writing (None: it may be)."""
    if holder.host == me.host and (holder.pid == me.pid or not _pid_alive(holder.pid)):
        return "its process is gone"  # (a pid equal to ours on this host is a dead predecessor's, reused)
    if (
        holder.slurm_job_id
        and holder.slurm_job_id == me.slurm_job_id
        and holder.slurm_restart_count < me.slurm_restart_count
    ):
        return "SLURM requeued that job (this is a later restart of it)"
    if age_s > STALE_S:
        return f"no heartbeat for {age_s:.0f} s"
    return None


class RunLock:
    """Held by rank 0 of a run (the other ranks hold a no-op lock)."""

    def __init__(self, path: Optional[str], note: str = "") -> None:
        self.path = path
        self.note = note  # a lock that was taken over: from whom (printed by the loop)
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if path is not None:
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.path is not None:
            try:
                with open(self.path) as f:
                    mine = json.load(f).get("pid") == os.getpid()
                if mine:
                    os.remove(self.path)
            except (OSError, ValueError):
                pass
            self.path = None


def _try_lock(path: str, me: Holder) -> str:
    """Create the lock file or take over a dead holder's; '' or the take-over note. Raises RunLocked."""
    for _ in range(3):  # a racing taker may remove or replace the file between our calls
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = Holder(**json.load(f))
                age = time.time() - os.path.getmtime(path)
            except FileNotFoundError:
                continue
            except (OSError, ValueError, TypeError):
                raise RunLocked(
                    f"{path} exists but cannot be read; if no other copy of this run is writing, delete it"
                ) from None
            reason = gone_reason(holder, me, age)
            if reason is None:
                raise RunLocked(
                    f"{os.path.dirname(path)} is in use by another copy of this run ({holder.describe()}); "
                    f"not writing to it. If that process is gone, delete {path}"
                ) from None
            os.remove(path)
            note = f"took over the run lock of {holder.describe()}: {reason}"
            _create(path, me)
            return note
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(me), f)
            f.flush()
            os.fsync(f.fileno())
        return ""
    raise RunLocked(f"could not lock {path}: it kept changing (another copy of this run starting?)")


def _create(path: str, me: Holder) -> None:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(me), f)
        f.flush()
        os.fsync(f.fileno())


def acquire_run_lock(run_dir: str, dist: DistInfo) -> RunLock:
    """Collective: rank 0 locks ``run_dir``; every rank raises RunLocked if it could not."""
    os.makedirs(run_dir, exist_ok=True)
    path, note, error = os.path.join(run_dir, LOCK_NAME), "", ""
    if dist.is_main:
        try:
            note = _try_lock(path, Holder.me())
        except (RunLocked, FileExistsError) as e:
            error = str(e) if isinstance(e, RunLocked) else f"{path}: another copy of this run took the lock first"
    if all_ranks_any(bool(error), dist.device):
        raise RunLocked(error or f"rank 0 could not lock {run_dir} (its message says why)")
    return RunLock(path if dist.is_main else None, note)
