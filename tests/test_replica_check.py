"""The replica-consistency check: one rank's copy of a replicated weight is nudged (through the model
seam, tests/helpers/faults.py) -> the check stops the run naming the parameter, the ranks and the step, and
``latest`` stays at the last consistent checkpoint. Unperturbed runs pass it (here at every step)."""

import os

import pytest
import torch

from tests.helpers.faults import Faults
from tests.helpers.train_harness import read_losses, run_ranks
from train.faults import fingerprint

pytestmark = pytest.mark.multiprocess
COMMON = ["logging.images_every=0", "train.steps=6", "checkpoint.every=2", "guards.replica_check_every=1"]
EXPERT = "moe.deepspeed_moe.experts.deepspeed_experts.2.weight"


def test_fingerprint_sees_any_changed_bit_and_order():
    x = torch.randn(1000)
    y = x.clone()
    y.view(torch.int32)[17] ^= 1  # the lowest mantissa bit of one element
    assert not torch.equal(fingerprint(x), fingerprint(y))
    assert not torch.equal(fingerprint(x), fingerprint(x.flip(0)))
    assert torch.equal(fingerprint(x), fingerprint(x.clone()))
    assert fingerprint(x.bfloat16()).shape == (2,)


@pytest.mark.parametrize("param, ep", [("adapter.weight", 2), (EXPERT, 1)], ids=["dense", "expert"])
def test_a_perturbed_replica_stops_the_run_naming_the_parameter(tmp_path, param, ep):
    """Dense: replicated on both ranks. Expert: at ep_size 1 both ranks hold every expert (one
    expert-data-parallel group of 2); at ep_size 2 an expert has one copy and nothing to compare."""
    run = str(tmp_path)
    ranks = run_ranks(
        2,
        run,
        COMMON + [f"model.experts.ep_size={ep}"],
        expect_ok=False,
        faults=Faults(perturb_at_step=3, perturb_rank=1, perturb_param=param),
    )
    assert all(p.returncode != 0 for p in ranks.procs)
    for rank in (0, 1):
        assert f"replica check at step 3: parameter '{param}' differs between ranks 0 and 1" in ranks.output(rank)
    assert max(read_losses(run)) == 3
    with open(os.path.join(run, "toy", "checkpoints", "latest")) as f:
        assert f.read() == "step00000002"  # written after the check passed at steps 1 and 2


def test_the_check_before_a_checkpoint_keeps_latest(tmp_path):
    """Periodic checks off: the check that runs right before the step 4 checkpoint catches it."""
    run = str(tmp_path)
    overrides = COMMON[:-1] + ["guards.replica_check_every=0", "model.experts.ep_size=2"]
    ranks = run_ranks(2, run, overrides, expect_ok=False, faults=Faults(perturb_at_step=3))
    assert "replica check at step 4: parameter 'adapter.weight' differs between ranks 0 and 1" in ranks.output(0)
    ckpts = os.path.join(run, "toy", "checkpoints")
    with open(os.path.join(ckpts, "latest")) as f:
        assert f.read() == "step00000002"
    assert not any("step00000004" in n for n in os.listdir(ckpts))  # not even a temporary
