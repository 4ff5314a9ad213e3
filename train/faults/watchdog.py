"""Hang watchdog: a training step that takes far longer than the recent ones ends the process.

Why: a rank stuck in a collective (a peer died, a mismatched all-reduce under NCCL, a stuck file
system) holds the whole allocation until the job's time limit; NCCL's own timeout is long and does
not say where the ranks were. Each rank runs a daemon thread that watches its own step: once a step
has run longer than ``max(hang_min_s, hang_factor x median of the last steps)`` it writes which step
and which phase the loop last entered (``phase()``: the data, forward, a named all-reduce, ...),
the Python stack of every thread (``faulthandler``), and exits the process with ``HANG_EXIT_CODE``, so the batch script can requeue the job, which
resumes from the last checkpoint. The ranks waiting for a stalled one in a collective pass their
own deadlines at about the same time (steps are in lockstep) and dump their own stacks: that is why
a rank that fired waits a short grace period before it exits (its exit would otherwise break its
peers' collectives before they dump), and why it exits with ``HANG_EXIT_CODE`` even if the main
thread fails meanwhile (an ``atexit`` hook).

Only the training step is timed; checkpoint saves and image grids (phases outside ``step()``) are
recorded as the last phase but have no deadline. ``hang_factor = 0`` turns the watchdog off.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import os
import statistics
import sys
import threading
import time
from collections import deque
from typing import Iterator, Optional, TextIO

HANG_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" (launch/slurm requeues on it)


class HangWatchdog:
    def __init__(
        self,
        factor: float,
        min_s: float,
        warmup_steps: int,
        rank: int = 0,
        window: int = 50,
        poll_s: float = 0.2,
        out: Optional[TextIO] = None,
    ) -> None:
        self.factor, self.min_s, self.warmup_steps, self.rank = factor, min_s, warmup_steps, rank
        self.durations: deque[float] = deque(maxlen=window)
        self.out = out or sys.stderr
        self._phase, self._phase_t = "start-up", time.monotonic()
        self._step: Optional[int] = None
        self._deadline: Optional[float] = None  # monotonic time; None: not armed
        self._limit = 0.0
        self._stop = threading.Event()
        self._fired = False
        self._thread: Optional[threading.Thread] = None
        if factor > 0:
            atexit.register(self._exit_if_fired)
            self._thread = threading.Thread(target=self._watch, args=(poll_s,), name="hang-watchdog", daemon=True)
            self._thread.start()

    def phase(self, name: str) -> None:
        """Record what the loop is entering (cheap: two assignments)."""
        self._phase, self._phase_t = name, time.monotonic()

    def limit(self) -> Optional[float]:
        """Seconds a step may take now; None before ``warmup_steps`` steps were timed (compiling, warming up)."""
        if len(self.durations) < max(1, self.warmup_steps):
            return None
        return max(self.min_s, self.factor * statistics.median(self.durations))

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Time one training step against the limit."""
        start = time.monotonic()
        self._step = step
        limit = self.limit() if self._thread is not None else None
        if limit is not None:
            self._limit, self._deadline = limit, start + limit
        try:
            yield
        finally:
            self._deadline = None
            self.durations.append(time.monotonic() - start)
            self.phase(f"after step {step}")

    def _watch(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            deadline = self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._fire()

    def _fire(self) -> None:
        now = time.monotonic()
        median = statistics.median(self.durations) if self.durations else float("nan")
        self.out.write(
            f"\nhang watchdog: rank {self.rank}: step {self._step} has run {self._limit + now - self._deadline:.1f} s, "
            f"over its limit of {self._limit:.1f} s (max(guards.hang_min_s={self.min_s:g}, guards.hang_factor="
            f"{self.factor:g} x median {median:.3f} s of the last {len(self.durations)} steps)); last phase entered: "
            f"'{self._phase}', {now - self._phase_t:.1f} s ago. Python stacks of every thread follow; exiting with "
            f"code {HANG_EXIT_CODE} so the job can be requeued and resume from its last checkpoint.\n"
        )
        self.out.flush()
        faulthandler.dump_traceback(file=self.out, all_threads=True)
        self.out.flush()
        self._fired = True
        time.sleep(max(1.0, min(30.0, self._limit / 4)))  # grace: let the peers waiting for us dump too
        os._exit(HANG_EXIT_CODE)

    def _exit_if_fired(self) -> None:
        if self._fired:  # the main thread ended (e.g. a peer's exit broke a collective) during the grace period
            os._exit(HANG_EXIT_CODE)

    def close(self) -> None:
        """Stop and join the thread (none left running while the interpreter shuts down)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
