"""The hang watchdog: one rank's data stalls (injected through the loader seam) -> every rank dumps its
stacks and the phase it was in, and exits with HANG_EXIT_CODE long before the stall would end."""

import os
import time

import pytest

from tests.helpers.faults import Faults
from tests.helpers.train_harness import start_ranks
from train.faults import HANG_EXIT_CODE, HangWatchdog


def test_limit_is_off_during_warm_up_then_the_larger_of_floor_and_factor_x_median():
    w = HangWatchdog(factor=10, min_s=1.0, warmup_steps=3, poll_s=60)
    for d in (5.0, 0.2):
        w.durations.append(d)
        assert w.limit() is None  # compiling / warming up: no deadline yet
    w.durations.append(0.3)
    assert w.limit() == pytest.approx(3.0)  # 10 x median(5, 0.2, 0.3)
    w.durations.extend([0.01] * 10)
    assert w.limit() == 1.0  # the floor
    w.close()
    assert HangWatchdog(factor=0, min_s=1.0, warmup_steps=1)._thread is None  # off: no thread at all


@pytest.mark.multiprocess
@pytest.mark.parametrize("async_save, latest", [(False, "step00000004"), (True, "step00000002")])
def test_stalled_rank_dumps_stacks_and_exits_for_requeue(tmp_path, async_save, latest):
    """Both ranks exit for requeue with their stacks. ``latest`` is the last checkpoint every rank agreed on:
    a blocking save at step 4 is committed before step 5 starts; one written beside the training is
    committed at a later step boundary that every rank reaches, and rank 1 never reaches step 5's end, so
    the run keeps step 2's (the one the step-4 save waited for)."""
    run = str(tmp_path)
    overrides = [
        f"checkpoint.async_save={str(async_save).lower()}",
        "model.experts.ep_size=2",
        "logging.images_every=0",
        "train.steps=50",
        "checkpoint.every=2",
        "guards.hang_factor=5",
        "guards.hang_min_s=1.5",
        "guards.hang_warmup_steps=2",
    ]
    t0 = time.time()
    ranks = start_ranks(2, run, overrides, faults=Faults(stall_at_step=5, stall_rank=1, stall_s=120))
    codes = ranks.wait(60)
    assert codes == [HANG_EXIT_CODE] * 2, ranks.output(0)[-3000:] + ranks.output(1)[-3000:]
    assert time.time() - t0 < 60
    waiting, stalled = ranks.output(0), ranks.output(1)
    assert "hang watchdog: rank 0: step 5 has run" in waiting
    assert "last phase entered: 'forward (expert all-to-alls)'" in waiting  # waiting for rank 1's tokens...
    assert "in all_to_all_single" in waiting  # ...in the MoE layer's all-to-all, as its stack shows
    assert "hang watchdog: rank 1: step 5" in stalled and "last phase entered: 'data'" in stalled
    for out in (waiting, stalled):
        assert "Thread" in out and "train/loop.py" in out and "in train_step" in out  # faulthandler's stacks
    assert 'tests/helpers/faults.py", line' in stalled  # where rank 1 really is: the injected sleep
    with open(os.path.join(run, "toy", "checkpoints", "latest")) as f:
        assert f.read() == latest


@pytest.mark.slow
@pytest.mark.multiprocess
def test_a_collective_deadlock_is_reported_with_each_ranks_collective(tmp_path):
    """A data-dependent graph deadlocks the ranks: at step 3 rank 1 runs the adapter (before the MoE
    layer) without autograd, so its backward skips the MoE dispatch's all-to-all that rank 0 waits in,
    and goes on to DeepSpeed's gradient all-reduce. Nothing errors; the watchdog ends both ranks and
    their stacks show the two different collectives."""
    run = str(tmp_path)
    overrides = [
        "model.experts.ep_size=2",
        "logging.images_every=0",
        "train.steps=6",
        "checkpoint.every=100",
        "guards.hang_factor=5",
        "guards.hang_min_s=2",
        "guards.hang_warmup_steps=2",
    ]
    ranks = start_ranks(2, run, overrides, faults=Faults(unused_at_step=3, unused_rank=1, unused_module="adapter"))
    assert ranks.wait(90) == [HANG_EXIT_CODE] * 2, ranks.output(0)[-3000:] + ranks.output(1)[-3000:]
    assert "in all_to_all_single" in ranks.output(0)
    assert "in allreduce_bucket" in ranks.output(1)
