"""Failure paths: kill during a checkpoint save, preemption signal, NaN steps (gloo, 2 ranks, ep 2).

The faults are injected through the entry's factories and a patched save (tests/helpers/faults.py).
"""

import math
import os
import signal

import pytest

from tests.helpers.faults import Faults
from tests.helpers.train_harness import ROOT, read_losses, read_records, run_ranks, start_ranks, wait_for_step

pytestmark = pytest.mark.multiprocess
EP2 = ["model.experts.ep_size=2", "logging.images_every=0"]


def _ckpt_dir(run_dir):
    return os.path.join(run_dir, "toy", "checkpoints")


def _latest(run_dir):
    with open(os.path.join(_ckpt_dir(run_dir), "latest")) as f:
        return f.read().strip()


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    run = str(tmp_path)
    ranks = start_ranks(2, run, EP2 + ["train.steps=6", "checkpoint.every=2"], faults=Faults(crash_in_save_at_step=4))
    codes = ranks.wait(180)
    assert codes == [-signal.SIGKILL] * 2, ranks.output()[-3000:]  # killed with every shard of step 4 on disk
    assert _latest(run) == "step00000002"
    names = os.listdir(_ckpt_dir(run))
    assert ".tmp-step00000004" in names and "step00000004" not in names
    assert any(f.startswith("layer_0_expert_") for f in os.listdir(os.path.join(_ckpt_dir(run), ".tmp-step00000004")))
    resumed = run_ranks(2, run, EP2 + ["train.steps=6", "checkpoint.every=2"], resume="auto", tag="resume")
    assert "resumed from step00000002 at step 2" in resumed.output()
    assert _latest(run) == "step00000006"
    assert not any(n.startswith(".tmp-") for n in os.listdir(_ckpt_dir(run)))  # stale temporary cleaned up


def test_sigusr1_checkpoints_at_next_step_and_exits_cleanly(tmp_path):
    run = str(tmp_path)
    ranks = start_ranks(2, run, EP2 + ["train.steps=200", "checkpoint.every=1000"], faults=Faults(step_sleep_s=0.5))
    wait_for_step(run, 3, ranks)
    os.kill(ranks.procs[1].pid, signal.SIGUSR1)  # only one rank gets it: the flag is agreed at the boundary
    assert ranks.wait(120) == [0, 0], ranks.output()[-3000:]
    last = max(read_losses(run))
    assert 3 <= last < 200
    assert _latest(run) == f"step{last:08d}"
    assert f"preempted: step {last}" in ranks.output(0)


def test_a_finished_run_tears_its_process_group_down_before_exit(tmp_path):
    """Left to interpreter exit, gloo's leftover asynchronous work (ZeRO 2's overlapped reductions) can
    abort a rank with SIGABRT after a run that succeeded: launch/train.py destroys the group first."""
    entry = os.path.join(ROOT, "tests", "helpers", "teardown_entry.py")
    overrides = EP2 + ["train.steps=2", "train.zero_stage=2", "train.overlap_comm=true"]
    ranks = start_ranks(2, str(tmp_path), overrides, entry=entry)
    codes = ranks.wait(180)
    assert codes == [0, 0], ranks.report(codes)
    for rank in (0, 1):
        assert "process group up at exit: False" in ranks.output(rank), ranks.output(rank)[-2000:]


def test_nan_loss_on_one_rank_is_skipped_on_all_and_counted(tmp_path):
    run = str(tmp_path)
    ranks = run_ranks(
        2,
        run,
        EP2
        + [
            "train.steps=5",
            "checkpoint.every=100",
            "logging.every=5",
            "guards.replica_check_every=1",
        ],  # the replicas stay identical throughout
        faults=Faults(nan_at_steps=[3]),
    )
    recs = {r["step"]: r for r in read_records(run)}
    assert [s for s, r in recs.items() if r["skipped"]] == [3]
    assert all(math.isfinite(recs[s]["loss"]) for s in (1, 2, 4, 5))  # weights not poisoned
    out = ranks.output(0)
    assert "step 3: skipped (non-finite loss); 1 in a row, 1 total" in out
    assert "skipped 1" in out  # console line counter
    assert "done: step 5" in out and "1 skipped steps" in out


def test_consecutive_nans_stop_the_run_naming_the_step(tmp_path):
    run = str(tmp_path)
    ranks = run_ranks(
        2,
        run,
        EP2 + ["train.steps=8", "guards.max_consecutive_skips=3"],
        expect_ok=False,
        faults=Faults(nan_at_steps=[2, 3, 4]),
    )
    assert all(p.returncode != 0 for p in ranks.procs)
    assert "step 4: 3 consecutive steps skipped" in ranks.output(0)
    assert max(read_losses(run)) == 4
