"""ZeRO stage x overlap_comm x gradient bucket size, at ep_size 2 on 2 gloo ranks and at ep_size 4 with data
parallel 2 on 8: every run computes what the ep_size 1 run computes, and the replicas pass the consistency
check at every step.

Why the matrix: ZeRO 1/2 reduce gradients in buckets that mix expert and non-expert gradients and
flush when full; buckets smaller than one expert make every flush point matter (the default 5e7
elements holds all of a test model's gradients at once). The bucket keys are config keys
(``train.reduce_bucket_size`` etc.) passed to the generated DeepSpeed config. The real model's expert
kinds run in tests/test_zero_matrix_experts.py.
"""

from __future__ import annotations

import os

import pytest

from tests.helpers.faults import Faults
from tests.helpers.train_harness import read_losses, run_ranks
from train.config import ConfigError, deepspeed_config, load_config

STEPS = 4
BASE = [
    f"train.steps={STEPS}",
    "checkpoint.every=100",
    "logging.images_every=0",
    "guards.replica_check_every=1",
    "optim.lr=1.0e-2",
    "schedule.warmup_steps=1",
]
EXPERT_NUMEL = 32 * 32 + 32  # one toy expert: Linear(32, 32)
SMALL = EXPERT_NUMEL // 2


def test_bucket_and_overlap_keys_reach_the_deepspeed_config():
    cfg = load_config(
        None,
        [
            "train.zero_stage=2",
            f"train.reduce_bucket_size={SMALL}",
            "train.allgather_bucket_size=700",
            "train.overlap_comm=true",
        ],
    )
    zero = deepspeed_config(cfg, world_size=2, on_gpu=False)["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["allgather_bucket_size"], zero["overlap_comm"]) == (SMALL, 700, True)
    auto = deepspeed_config(load_config(None, ["train.zero_stage=1"]), world_size=2, on_gpu=True)["zero_optimization"]
    assert auto["overlap_comm"] is True and auto["reduce_bucket_size"] == 50_000_000  # null: on with GPUs
    with pytest.raises(ConfigError, match="train.reduce_bucket_size"):
        load_config(None, ["train.reduce_bucket_size=0"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ep1"))
    run_ranks(2, run, BASE + ["model.experts.ep_size=1", "train.zero_stage=0"])
    return read_losses(run)


def matrix_overrides(ep_size: int, zero: int, overlap: bool, bucket: int) -> list[str]:
    """One matrix cell as config overrides; bucket 0 keeps DeepSpeed's default bucket sizes."""
    out = [f"model.experts.ep_size={ep_size}", f"train.zero_stage={zero}", f"train.overlap_comm={str(overlap).lower()}"]
    if bucket:
        out += [f"train.reduce_bucket_size={bucket}", f"train.allgather_bucket_size={bucket}"]
    return out


def case_id(zero: int, overlap: bool, bucket: int) -> str:
    return f"zero{zero}-overlap{int(overlap)}-bucket{bucket or 'default'}"


CASES = [(0, False, 0)] + [
    (zero, overlap, bucket) for zero in (1, 2) for overlap in (False, True) for bucket in (0, SMALL)
]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("zero, overlap, bucket", CASES, ids=[case_id(*c) for c in CASES])
def test_ep2_equals_ep1_and_replicas_agree(tmp_path, reference, zero, overlap, bucket):
    run = str(tmp_path)
    r = run_ranks(2, run, BASE + matrix_overrides(2, zero, overlap, bucket))
    assert "replica check" not in r.output(0)  # passed at every step
    got = read_losses(run)
    assert sorted(got) == sorted(reference) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(reference[step], rel=1e-5, abs=1e-7), (step, got[step], reference[step])
    assert reference[STEPS] != reference[1]  # the comparison is not vacuous: the losses move


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("zero", [0, 2])
def test_a_weight_without_gradient_on_one_rank_breaks_zero_buckets(tmp_path, zero):
    """The "collective mismatch" class of fault, reproduced: at step 2 rank 1 runs the head without
    autograd (as a condition missing from one rank's batch once left a read-out without gradient), so
    its weights get no gradient there. ZeRO 1/2 then flush gradient buckets of different lengths on
    the two ranks: gloo aborts ("... vs ... Received data size doesn't match expected size. Is there
    a distributed collective mismatch"), where NCCL may hang (the watchdog's case) or reduce the wrong
    data (the replica check's). ZeRO 0 reduces a zero gradient for it and trains on, replicas equal.
    The bucket size plays no part: the default holds all of this model's gradients."""
    run = str(tmp_path)
    r = run_ranks(
        2,
        run,
        BASE + ["model.experts.ep_size=2", f"train.zero_stage={zero}"],
        expect_ok=(zero == 0),
        faults=Faults(unused_at_step=2, unused_rank=1, unused_module="head"),
    )
    if zero == 0:
        assert max(read_losses(run)) == STEPS
    else:
        assert all(p.returncode != 0 for p in r.procs)
        assert "Received data size doesn't match expected size. Is there a distributed collective mismatch" in r.output(
            1
        )
        assert max(read_losses(run)) == 1


# Experts of different sizes on the two expert-parallel ranks (as the real model's condition-specific
# experts are): global expert widths 8, 32, 56, 80, so rank 0 holds 2 x (8 + 32) x 65 + ... elements
# fewer than rank 1. A 3,000-element bucket then fills at different points on the two ranks.
HETERO = Faults(hetero_experts=True)


@pytest.fixture(scope="module")
def hetero_reference(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("hetero-ep1"))
    run_ranks(2, run, BASE + ["model.experts.ep_size=1", "train.zero_stage=0"], faults=HETERO)
    return read_losses(run)


@pytest.mark.multiprocess
def test_zero_buckets_that_would_mismatch_are_refused_before_training(tmp_path):
    r = run_ranks(
        2,
        str(tmp_path),
        BASE + ["model.experts.ep_size=2", "train.zero_stage=2", "train.reduce_bucket_size=3000"],
        faults=HETERO,
        expect_ok=False,
    )
    assert all(p.returncode != 0 for p in r.procs)
    assert "train.reduce_bucket_size: 3000 elements is smaller than a rank's trainable gradients" in r.output(0)
    assert "ranks hold parameters of different sizes" in r.output(0)
    assert not os.path.exists(os.path.join(str(tmp_path), "toy", "losses.jsonl"))  # refused before step 1


@pytest.mark.slow
@pytest.mark.multiprocess
def test_without_the_bucket_check_such_buckets_break_the_reduction(tmp_path):
    """What the check prevents, with it patched out: gloo's "collective mismatch" in the first step."""
    faults = Faults(hetero_experts=True, skip_bucket_check=True)
    r = run_ranks(
        2,
        str(tmp_path),
        BASE + ["model.experts.ep_size=2", "train.zero_stage=2", "train.reduce_bucket_size=3000"],
        faults=faults,
        expect_ok=False,
    )
    out = r.output(0) + r.output(1)
    assert "Received data size doesn't match expected size. Is there a distributed collective mismatch" in out


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("zero", [1, 2])
def test_heterogeneous_experts_with_one_bucket_equal_ep1(tmp_path, hetero_reference, zero):
    run = str(tmp_path)
    run_ranks(
        2, run, BASE + ["model.experts.ep_size=2", f"train.zero_stage={zero}", "train.overlap_comm=true"], faults=HETERO
    )
    got = read_losses(run)
    assert sorted(got) == sorted(hetero_reference) == list(range(1, STEPS + 1))
    for step in got:
        assert got[step] == pytest.approx(hetero_reference[step], rel=1e-5, abs=1e-7)


# ---- ep_size 4 x data parallel 2: 8 gloo ranks (tests/test_ep4_dp2.py describes the groups): expert-parallel
# groups {0,1,2,3} and {4,5,6,7}, expert-data-parallel pairs {r, r+4}. ZeRO 1/2 reduce the dense gradients
# over all 8 ranks and each expert's over its pair, from the same mixed buckets. 8 processes on 2 cores take
# 20-25 s per run, so the cases are chosen, not crossed: every ZeRO stage with a bucket smaller than one
# expert (ZeRO 0 ignores the bucket and overlap keys: DeepSpeed's engine all-reduces dense and expert
# gradients apart), overlap off at ZeRO 1 and on at ZeRO 2; and the layout of configs/flux_full.yaml: one
# expert of a different size on each rank of a group, ZeRO 2, overlap on, one bucket for all gradients.
WORLD4 = 8
BASE4 = BASE + ["logging.every=1"]
CASES4 = [(0, False, SMALL), (1, False, SMALL), (2, True, SMALL)]


def grad_norms(run: str, name: str = "toy") -> dict[int, float]:
    """step -> the global gradient norm the run logged to TensorBoard (``logging.every=1``)."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        os.path.join(run, name, "tb"), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("opt/grad_norm")}


def assert_same_run(run: str, ref: str, name: str = "toy") -> None:
    """Same losses and global gradient norms as ``ref`` at every step, within fp32 tolerance (the gradient
    norms see a wrongly scaled or misplaced reduction that Adam's update would hide from the losses)."""
    for got, want in ((read_losses(run, name), read_losses(ref, name)), (grad_norms(run, name), grad_norms(ref, name))):
        assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
        for step in got:
            assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-7), (step, got[step], want[step])
        assert want[STEPS] != want[1]  # the comparison is not vacuous: the values move


def _ep4_run(run: str, overrides: list[str], faults: Faults | None = None):
    r = run_ranks(WORLD4, run, BASE4 + overrides, timeout=400, faults=faults)
    for rank in range(WORLD4):
        assert "replica check" not in r.output(rank)  # passed at every step, on every rank
    return r


@pytest.fixture(scope="module")
def reference8(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("ep1-8ranks"))
    _ep4_run(run, ["model.experts.ep_size=1", "train.zero_stage=0"])
    return run


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize("zero, overlap, bucket", CASES4, ids=[case_id(*c) for c in CASES4])
def test_ep4_dp2_equals_ep1_and_replicas_agree(tmp_path, reference8, zero, overlap, bucket):
    run = str(tmp_path)
    _ep4_run(run, matrix_overrides(4, zero, overlap, bucket))
    assert_same_run(run, reference8)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_ep4_dp2_heterogeneous_experts_with_one_bucket_equal_ep1(tmp_path_factory):
    """Expert widths 8, 32, 56, 80: every rank of an expert-parallel group holds an expert of another size
    (its expert-data-parallel twin the same one), as the real model's FFN experts at ep_size 4."""
    ref, run = str(tmp_path_factory.mktemp("hetero-ep1-8")), str(tmp_path_factory.mktemp("hetero-ep4"))
    _ep4_run(ref, ["model.experts.ep_size=1", "train.zero_stage=0"], faults=HETERO)
    _ep4_run(run, ["model.experts.ep_size=4", "train.zero_stage=2", "train.overlap_comm=true"], faults=HETERO)
    assert_same_run(run, ref)
