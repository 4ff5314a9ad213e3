"""Torn checkpoints and concurrent copies of a run: the completeness marker and the run lock.

One small run (1 process, stand-in model) writes checkpoints at steps 2 and 4; each test copies that
run and damages the copy. The lock tests start real processes of one config side by side.
"""

import os
import shutil
import signal
import socket
import time

import pytest
import torch

from tests.helpers.faults import Faults
from tests.helpers.train_harness import TOY_CONFIG, read_losses, run_ranks, start_ranks, wait_for_step
from train.checkpoint import COMPLETE, Checkpointer, IncompleteCheckpoint, verify_complete
from train.config import load_config
from train.distributed import DistInfo
from train.faults import RunLocked
from train.faults.runlock import Holder, _try_lock, gone_reason

pytestmark = pytest.mark.multiprocess
COMMON = ["train.steps=4", "checkpoint.every=2", "checkpoint.keep=3", "logging.images_every=0"]
SHARD = "layer_0_expert_1_mp_rank_00_model_states.pt"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("trained"))
    run_ranks(1, run, COMMON)
    return run


def _copy(trained, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(trained, run)
    return run, os.path.join(run, "toy", "checkpoints")


def _checkpointer(run):
    cfg = load_config(TOY_CONFIG, [f"run.dir={run}", *COMMON])
    return Checkpointer.for_run(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def test_complete_checkpoints_carry_a_marker_listing_every_file(trained):
    ckpt = os.path.join(trained, "toy", "checkpoints", "step00000004")
    assert verify_complete(ckpt) is None
    with open(os.path.join(ckpt, COMPLETE)) as f:
        listed = set(__import__("json").load(f)["files"])
    on_disk = {n for n in os.listdir(ckpt) if n.endswith(".pt")} | {"config.yaml"}
    assert SHARD in listed and "train_state_rank0.pt" in listed
    assert on_disk <= listed, on_disk - listed


@pytest.mark.parametrize("damage", ["missing shard", "truncated file"])
def test_damaged_checkpoint_is_refused_and_auto_falls_back(trained, tmp_path, damage):
    run, ckpts = _copy(trained, tmp_path)
    target = os.path.join(ckpts, "step00000004", SHARD if damage == "missing shard" else "train_state_rank0.pt")
    if damage == "missing shard":
        os.remove(target)
        why = f"file {SHARD} is missing"
    else:
        with open(target, "r+b") as f:
            f.truncate(os.path.getsize(target) // 2)
        why = "file train_state_rank0.pt has"
    ck = _checkpointer(run)
    with pytest.raises(IncompleteCheckpoint, match="is incomplete: " + why):
        ck.find(os.path.join(ckpts, "step00000004"))
    found = ck.find("auto")
    assert (found.tag, found.step) == ("step00000002", 2)
    assert why in found.note and "fell back to step00000002" in found.note


def test_auto_resume_past_a_torn_checkpoint_trains_on(trained, tmp_path):
    run, ckpts = _copy(trained, tmp_path)
    os.remove(os.path.join(ckpts, "step00000004", SHARD))
    r = run_ranks(1, run, COMMON[1:] + ["train.steps=5"], resume="auto", tag="resume")
    out = r.output()
    assert "resumed from step00000002 at step 2 (checkpoint step00000004 is incomplete (file " in out
    assert "done: step 5" in out
    assert verify_complete(os.path.join(ckpts, "step00000004")) is None  # rewritten by the resumed run


def test_no_complete_checkpoint_is_an_error_not_a_fresh_start(trained, tmp_path):
    run, ckpts = _copy(trained, tmp_path)
    for tag in ("step00000002", "step00000004"):
        os.remove(os.path.join(ckpts, tag, COMPLETE))
    with pytest.raises(IncompleteCheckpoint, match="no earlier complete checkpoint"):
        _checkpointer(run).find("auto")


def test_lock_take_over_rules(tmp_path):
    host = socket.gethostname()
    me = Holder(pid=os.getpid(), host=host, started=0.0, slurm_job_id="77", slurm_restart_count=1)
    dead = Holder(pid=2**22 + 12345, host=host, started=0.0)
    assert gone_reason(dead, me, age_s=1) == "its process is gone"
    reused_pid = Holder(pid=os.getpid(), host=host, started=0.0)  # e.g. a restarted container's first process
    assert gone_reason(reused_pid, me, age_s=1) == "its process is gone"
    alive_elsewhere = Holder(pid=1, host="other-node", started=0.0)
    assert gone_reason(alive_elsewhere, me, age_s=1) is None
    assert "no heartbeat" in gone_reason(alive_elsewhere, me, age_s=3600)
    requeued = Holder(pid=1, host="other-node", started=0.0, slurm_job_id="77", slurm_restart_count=0)
    assert "requeued" in gone_reason(requeued, me, age_s=1)
    path = str(tmp_path / "run.lock")
    assert _try_lock(path, alive_elsewhere) == ""
    with pytest.raises(RunLocked, match="pid 1 on other-node"):
        _try_lock(path, me)


def test_second_copy_of_a_running_run_refuses_then_a_dead_holder_is_taken_over(tmp_path):
    run = str(tmp_path)
    common = ["train.steps=200", "checkpoint.every=2", "logging.images_every=0"]
    first = start_ranks(1, run, common, faults=Faults(step_sleep_s=0.3), env={"SLURM_JOB_ID": "4242"})
    wait_for_step(run, 2, first)
    second = run_ranks(1, run, common, resume="auto", tag="second", expect_ok=False)
    assert second.procs[0].returncode != 0
    assert (
        f"is in use by another copy of this run (pid {first.procs[0].pid} on {socket.gethostname()}, SLURM "
        f"job 4242 restart 0" in second.output()
    )
    assert first.procs[0].poll() is None  # the first copy trains on
    time.sleep(1.0)
    os.kill(first.procs[0].pid, signal.SIGKILL)  # leaves its lock behind
    first.wait(30)
    reached = max(read_losses(run))
    third = run_ranks(1, run, ["train.steps=" + str(reached + 1)] + common[1:], resume="auto", tag="third")
    out = third.output()
    assert f"took over the run lock of pid {first.procs[0].pid} on {socket.gethostname()}" in out
    assert "its process is gone" in out and f"done: step {reached + 1}" in out
    assert not os.path.exists(os.path.join(run, "toy", "run.lock"))  # released at the end
