"""Writing one rank's files of one checkpoint: at once, or from a thread beside the training.

Every file DeepSpeed writes goes through ``engine.checkpoint_engine.save`` (``torch.save`` in its
``TorchCheckpointEngine``), and its directories through ``checkpoint_engine.makedirs``;
``through_engine`` routes both, and DeepSpeed's copy of its recovery scripts, through a ``RankWrites``:

* blocking (``divert=None``): each file is written where DeepSpeed asks, then fsynced and its size
  recorded (a later truncation is then detectable);
* asynchronous (``divert=[...]``): each file's state is copied to host memory (``snapshot.py``) and
  a job that writes it with DeepSpeed's own ``save`` is queued; ``RankWrites.start`` runs the jobs in a
  thread, so the step loop goes on while the bytes go to disk.

A failed write (a full disk, above all) is recorded, not raised: DeepSpeed's save has barriers and
collectives between its files, so a rank that raised in the middle would leave the others waiting. The
ranks agree on the outcome afterwards (``Checkpointer``), and every rank then stops with the same
error. A write that fails for lack of space (``ENOSPC``, ``EDQUOT``, or ``torch.save``'s zip writer
reporting a short write, "unexpected pos ...") is marked ``disk_full``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from train.checkpoint.disk import fsync_dir, fsync_file
from train.checkpoint.snapshot import Snapshot, snapshot, storage_bytes

DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# torch.save's zip writer (caffe2/serialize/inline_container.cc) turns a short write into these
SHORT_WRITE_MESSAGES = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")


def is_disk_full(exc: BaseException) -> bool:
    """A write that failed for lack of space: ENOSPC / EDQUOT, or a short write seen by torch's zip writer."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(e, RuntimeError) and any(m in str(e) for m in SHORT_WRITE_MESSAGES):
            return True
    return False


def _chain(exc: Optional[BaseException]) -> Iterator[BaseException]:
    while exc is not None:
        yield exc
        exc = exc.__cause__ or exc.__context__


def free_bytes(path: str) -> Optional[int]:
    """Free bytes on the file system of ``path`` (or of its nearest existing parent), None if unknown."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path or ".").free
    except OSError:
        return None


@dataclass
class WriteFailure:
    """The first write of a rank that failed: which file, the error, whether the disk was full, and the free
    space on that file system right after the failure."""

    file: str
    error: str
    disk_full: bool
    free: Optional[int]


@dataclass
class RankWrites:
    """What this rank writes for one checkpoint: the files written ({name: size}), the bytes it was to
    write, the first failure, and (asynchronous) the jobs and the thread that runs them."""

    root: str  # the checkpoint's temporary directory
    written: dict[str, int] = field(default_factory=dict)
    planned: int = 0  # bytes of tensor data this rank's files hold (known before any byte is written)
    failure: Optional[WriteFailure] = None
    exception: Optional[BaseException] = None  # the failure's exception (raised, chained, on this rank)
    seconds: float = 0.0  # time spent writing and fsyncing
    jobs: list[tuple[str, Callable[[], None]]] = field(default_factory=list)  # (file, write it) for the thread
    thread: Optional[threading.Thread] = None

    def attempt(self, name: str, fn: Callable[[], Any]) -> None:
        """Run one write unless an earlier one failed; record an OSError or a zip-writer failure instead of
        raising it (any other exception is a bug and propagates)."""
        if self.failure is not None:
            return
        try:
            fn()
        except (OSError, RuntimeError) as e:
            if isinstance(e, RuntimeError) and not is_disk_full(e):
                raise
            self.exception = e
            self.failure = WriteFailure(name, f"{type(e).__name__}: {e}", is_disk_full(e), free_bytes(self.root))

    def file_job(self, name: str, write: Callable[[Any], None]) -> Callable[[], None]:
        """A job that writes ``<root>/<name>`` through ``write(binary file)``, fsyncs it and records its size."""

        def job() -> None:
            with open(os.path.join(self.root, name), "wb") as f:
                write(f)
                self.written[name] = fsync_file(f)

        return job

    # ---- asynchronous: the queued jobs in a thread
    def start(self) -> None:
        self.thread = threading.Thread(target=self.run_jobs, name="checkpoint-writer", daemon=True)
        self.thread.start()

    def run_jobs(self) -> None:
        t0 = time.perf_counter()
        try:
            for name, job in self.jobs:
                self.attempt(name, job)
            self.attempt(".", lambda: fsync_dir(self.root))
        except BaseException as e:  # a bug in a job: recorded, raised on this rank by the checkpointer
            self.exception = e
            self.failure = WriteFailure("?", f"{type(e).__name__}: {e}", False, None)
        finally:
            self.jobs = []  # the host copies go as soon as they are on disk
            self.seconds += time.perf_counter() - t0

    def done(self) -> bool:
        return self.thread is None or not self.thread.is_alive()

    def join(self) -> None:
        if self.thread is not None:
            self.thread.join()


@contextlib.contextmanager
def through_engine(engine: Any, writes: RankWrites, divert: bool) -> Iterator[None]:
    """Route DeepSpeed's file writes in ``engine.save_checkpoint`` through ``writes`` (module docstring):
    written and fsynced at once, or (``divert``) copied to host memory and queued in ``writes.jobs``."""
    ce = engine.checkpoint_engine
    save, makedirs = ce.save, ce.makedirs
    copy_scripts = engine._copy_recovery_script

    def routed_save(state_dict: Any, path: str) -> None:
        name = os.path.relpath(path, writes.root)
        if divert:
            snap = snapshot(state_dict)
            writes.planned += snap.nbytes
            writes.jobs.append((name, _deferred(save, snap, path, name, writes)))
            return
        writes.planned += storage_bytes(state_dict)

        def now() -> None:
            save(state_dict, path)
            with open(path, "rb") as f:  # fsync through a read-only descriptor flushes the same file
                writes.written[name] = fsync_file(f)

        writes.attempt(name, now)

    ce.save = routed_save
    ce.makedirs = lambda path, exist_ok=False: writes.attempt(os.path.basename(path), lambda: makedirs(path, exist_ok))
    engine._copy_recovery_script = lambda path: writes.attempt("zero_to_fp32.py", lambda: copy_scripts(path))
    try:
        yield
    finally:
        del ce.save, ce.makedirs, engine._copy_recovery_script


def _deferred(save: Callable[[Any, str], None], snap: Snapshot, path: str, name: str, writes: RankWrites) -> Callable:
    """A queued write of a snapshot with DeepSpeed's own ``save`` (so the file is the one it writes)."""

    def job() -> None:
        snap.wait()
        save(snap.state, path)
        with open(path, "rb") as f:
            writes.written[name] = fsync_file(f)

    return job


def save_torch(state: Any) -> Callable[[Any], None]:
    """A ``write_file`` writer of ``torch.save(state)``."""
    return lambda f: torch.save(state, f)
