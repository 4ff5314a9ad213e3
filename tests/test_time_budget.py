"""train.time_budget_s: a run sized by wall-clock time decides its step count once, the same on every
rank, ends its schedule there, and keeps the count when it is resumed on a faster machine."""

from __future__ import annotations

import re
import signal

import pytest

from tests.helpers.faults import Faults
from tests.helpers.train_harness import read_losses, run_ranks, start_ranks, wait_for_step
from train.timing.budget import MARGIN, TimeBudget, budget_steps

EP2 = ["model.experts.ep_size=2"]


def test_budget_steps_fill_the_budget_and_stay_in_bounds():
    # 100 s left of 120 (less the margin: 114 - 20 = 94 s) at 0.5 s a step: 188 more steps
    assert budget_steps(120, 20, 0.5, done=60, most=10_000) == 60 + int((120 * (1 - MARGIN) - 20) / 0.5)
    assert budget_steps(120, 20, 0.5, done=60, most=100) == 100  # train.steps caps it
    assert budget_steps(10, 20, 0.5, done=60, most=1000) == 60  # the budget is spent: stop where it is


def test_the_decision_comes_once_at_the_end_of_the_calibration():
    calls = []
    budget = TimeBudget(budget_s=100, calibration=8, most=1000, start_step=0)
    for step in range(1, 12):
        budget.step_started(step)
        decision = budget.decide(step, lambda m: calls.append(m) or m)
        assert (decision is not None) == (step == 8)
    assert len(calls) == 1 and not budget.active
    assert not TimeBudget(budget_s=100, calibration=8, most=1000, start_step=8).active  # resumed past it
    assert not TimeBudget(budget_s=0, calibration=8, most=1000, start_step=0).active  # no budget
    assert not TimeBudget(budget_s=100, calibration=8, most=8, start_step=0).active  # a run that short just runs


def _decided(output: str) -> int:
    found = re.findall(r"time budget \d+ s: [\d.]+ s a step after \d+ s for (\d+) steps -> (\d+) steps", output)
    assert len(found) == 1, output[-3000:]
    assert int(found[0][0]) == 10
    return int(found[0][1])


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_budgeted_run_stops_where_the_budget_says_on_every_rank_and_resumes_with_the_same_count(tmp_path):
    run = str(tmp_path)
    overrides = EP2 + ["train.steps=1000", "train.time_budget_s=6", "train.time_budget_calibration=10"]
    # every step lasts at least 0.25 s: 10 steps take ~2.5-3 s, so the budget holds about 12-16 more
    ranks = run_ranks(2, run, overrides + ["checkpoint.every=1000"], faults=Faults(step_sleep_s=0.25), timeout=180)
    steps = _decided(ranks.output(0))
    assert 16 <= steps <= 30, steps
    assert max(read_losses(run)) == steps and f"done: step {steps}," in ranks.output(0)
    took = int(re.search(r"(\d+) s of training", ranks.output(0)).group(1))
    assert took <= 6 + 2, ranks.output(0)[-2000:]  # the margin absorbs the final checkpoint, nearly
    # the same run killed after its decision and its checkpoint at step 11, resumed where steps take a
    # tenth of the time: the count comes back with the schedule's state; nothing is decided again
    again = str(tmp_path / "again")
    killed = start_ranks(2, again, overrides + ["checkpoint.every=11"], faults=Faults(step_sleep_s=0.25))
    wait_for_step(again, 13, killed)
    for p in killed.procs:
        p.send_signal(signal.SIGKILL)
    killed.wait(60)
    first = _decided(killed.output(0))
    resumed = run_ranks(
        2, again, overrides + ["checkpoint.every=11"], resume="auto", faults=Faults(step_sleep_s=0.02), tag="resume"
    )
    assert "resumed from step00000011 at step 11" in resumed.output(0)
    assert "time budget" not in resumed.output(0)
    assert max(read_losses(again)) == first and f"done: step {first}," in resumed.output(0)
