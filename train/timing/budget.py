"""A training run sized by wall-clock time instead of a step count (``train.time_budget_s``).

Why: the same recipe trains at different speeds on different machines (``make train`` took 4:52 on one
2-core machine and 7:53 on another), and a fixed step count makes "about five minutes" untrue on the slow
one. With a budget, the run times its steps ``1 .. train.time_budget_calibration`` and then, once, sets
its step count to what fills the budget (at most ``train.steps``), ends the learning-rate schedule there
and says so. Deciding once keeps the run deterministic after that point; the count travels with the
schedule's state in every checkpoint, so a resumed run keeps it.

The estimate leaves :data:`MARGIN` of the budget for what a step time does not show (held-out
evaluations, checkpoints, the final save); the run's last line reports the time it actually took.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Optional

MARGIN = 0.05
WARMUP_STEPS = 5  # steps left out of the timing (first-step costs: allocation, lazy init, compilation)


def budget_steps(budget_s: float, elapsed_s: float, step_s: float, done: int, most: int) -> int:
    """The step count that fills ``budget_s`` (less :data:`MARGIN`) after ``done`` steps took ``elapsed_s``,
    at ``step_s`` seconds a step; between ``done`` and ``most``."""
    left = budget_s * (1 - MARGIN) - elapsed_s
    more = math.floor(left / step_s) if step_s > 0 else most
    return max(done, min(most, done + max(0, more)))


@dataclass
class BudgetDecision:
    steps: int
    step_s: float  # the measured seconds a step
    elapsed_s: float  # seconds from the first step's start to the decision


class TimeBudget:
    """Times the first steps of a run and decides its step count once (:func:`budget_steps`).

    ``measure`` reduces the timings over ranks (every rank must decide the same count): it takes and
    returns ``{"elapsed": seconds, "timed": seconds}``, e.g. a mean over ranks."""

    def __init__(self, budget_s: float, calibration: int, most: int, start_step: int) -> None:
        self.budget_s, self.calibration, self.most = float(budget_s), int(calibration), int(most)
        self.start_step = int(start_step)
        self.t0: Optional[float] = None
        self.t_timed: Optional[float] = None

    @property
    def active(self) -> bool:
        """Whether a decision is still to come (a run resumed past the calibration keeps its count)."""
        return self.budget_s > 0 and self.start_step < self.calibration < self.most

    def step_started(self, step: int) -> None:
        """Call before step ``step`` (1-based) runs."""
        now = time.perf_counter()
        if self.t0 is None:
            self.t0 = now
        if step == self.start_step + WARMUP_STEPS + 1:
            self.t_timed = now

    def decide(self, step: int, measure) -> Optional[BudgetDecision]:
        """After step ``step``: the decision at the calibration's last step, None before and after it."""
        if not self.active or step != self.calibration:
            return None
        now = time.perf_counter()
        timed_from = self.t_timed if self.t_timed is not None else self.t0
        timed_steps = step - (self.start_step + WARMUP_STEPS if self.t_timed is not None else self.start_step)
        m = measure({"elapsed": now - self.t0, "timed": (now - timed_from) / max(1, timed_steps)})
        steps = budget_steps(self.budget_s, m["elapsed"], m["timed"], step, self.most)
        self.start_step = self.calibration  # decided: inactive from here on
        return BudgetDecision(steps=steps, step_s=m["timed"], elapsed_s=m["elapsed"])
