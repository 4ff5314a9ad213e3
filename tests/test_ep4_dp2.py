"""ep_size 4 x data parallel 2: 8 gloo processes train the stand-in model (issue 9, CPU part).

With 8 ranks and ep_size 4 DeepSpeed builds expert-parallel groups {0,1,2,3}, {4,5,6,7} and
expert-data-parallel pairs {r, r+4}: rank r holds one expert (global id r % 4) of the 4, and its
twin r+4 holds a replica that must stay identical. Checked here, from what the trainer writes:

1. what each rank holds: its EMA (per rank, over the rank's own trainable parameters) has one
   expert's tensors, a quarter of the ep_size 1 run's, and they are expert ``r % 4``'s;
2. the training computes what ep_size 1 computes on the same 8-rank global batch: losses, global
   gradient norms and the trained weights of every expert within fp32 tolerance (all-to-all vs local
   routing changes the summation order only);
3. resuming the ep_size 4 checkpoint on the same 8-process shape reproduces the next losses and the
   final weights bit for bit.

8 processes on 2 cores: ~75 s for the three runs (20-25 s each) (marked slow; `make test-slow`).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from tests.helpers.train_harness import read_losses, run_ranks
from train.checkpoint import load_pt

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]

WORLD, STEPS = 8, 4
# lr 1e-2 and EMA decay 0.5 so that the four experts (initialised as copies of one module) drift apart
# within 4 steps by far more than the fp32 tolerance, and each rank's EMA shows which expert it trains.
BASE = [
    f"train.steps={STEPS}",
    "checkpoint.every=2",
    "checkpoint.keep=2",
    "logging.every=1",
    "logging.images_every=0",
    "optim.lr=1.0e-2",
    "schedule.warmup_steps=1",
    "ema.enabled=true",
    "ema.decay=0.5",
]
EXPERT = "moe.deepspeed_moe.experts.deepspeed_experts."
EXPERT_NUMEL = 32 * 32 + 32  # one toy expert: Linear(32, 32)


def _ckpt(run: str, step: int) -> str:
    return os.path.join(run, "toy", "checkpoints", f"step{step:08d}")


def _load(path: str) -> dict:
    return load_pt(path, deepspeed_classes=True)


def _ema(run: str, step: int, rank: int) -> dict[str, torch.Tensor]:
    state = _load(os.path.join(_ckpt(run, step), f"train_state_rank{rank}.pt"))
    assert state["rank"] == rank and state["world_size"] == WORLD
    return state["ema"]["shadow"]


def _experts(run: str, step: int) -> dict[int, dict[str, torch.Tensor]]:
    """Global expert id -> its weights, from DeepSpeed's per-expert checkpoint files."""
    out = {}
    for e in range(4):
        sd = _load(os.path.join(_ckpt(run, step), f"layer_0_expert_{e}_mp_rank_00_model_states.pt"))
        out[e] = {k.split(f"{EXPERT}{e}.")[1]: v for k, v in sd.items()}
    return out


def _dense(run: str, step: int) -> dict[str, torch.Tensor]:
    return dict(_load(os.path.join(_ckpt(run, step), "mp_rank_00_model_states.pt"))["module"])


def _grad_norms(run: str) -> dict[int, float]:
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        os.path.join(run, "toy", "tb"), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("opt/grad_norm")}


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_ep4_dp2_matches_ep1_and_resumes_exactly(tmp_path):
    ep4, ep1, resumed = str(tmp_path / "ep4"), str(tmp_path / "ep1"), str(tmp_path / "resumed")
    run_ranks(WORLD, ep4, BASE + ["model.experts.ep_size=4"], timeout=400)
    run_ranks(WORLD, ep1, BASE + ["model.experts.ep_size=1"], timeout=400)

    # ---- 1. what each rank holds
    ema1 = _ema(ep1, STEPS, 0)
    experts1 = {n for n in ema1 if n.startswith(EXPERT)}
    assert sum(ema1[n].numel() for n in experts1) == 4 * EXPERT_NUMEL
    dense_names = set(ema1) - experts1
    ema4 = [_ema(ep4, STEPS, r) for r in range(WORLD)]
    for r, shadow in enumerate(ema4):
        held = {n for n in shadow if n.startswith(EXPERT)}
        assert held == {f"{EXPERT}0.weight", f"{EXPERT}0.bias"}, (r, sorted(held))  # one local expert
        assert sum(shadow[n].numel() for n in held) == EXPERT_NUMEL
        assert set(shadow) - held == dense_names
        for n in dense_names:  # dense weights are replicated on all 8 ranks
            assert torch.equal(shadow[n], ema4[0][n]), (r, n)
        twin = ema4[(r + 4) % WORLD]  # the expert-data-parallel replica holds the same expert, bit for bit
        assert all(torch.equal(shadow[n], twin[n]) for n in held), r
        # ... and it is global expert r % 4: ep_size 1's EMA of that expert, not of another one
        mine = shadow[f"{EXPERT}0.weight"]
        matches = [e for e in range(4) if _close(mine, ema1[f"{EXPERT}{e}.weight"])]
        assert matches == [r % 4], (r, matches)

    # ---- 2. ep_size 4 computes what ep_size 1 computes on the same global batch
    loss4, loss1 = read_losses(ep4), read_losses(ep1)
    assert sorted(loss4) == sorted(loss1) == list(range(1, STEPS + 1))
    for step in loss1:
        assert math.isclose(loss4[step], loss1[step], rel_tol=1e-5), (step, loss4[step], loss1[step])
    assert loss1[STEPS] != loss1[STEPS - 1]
    gn4, gn1 = _grad_norms(ep4), _grad_norms(ep1)
    assert sorted(gn4) == sorted(gn1) == list(range(1, STEPS + 1))
    for step in gn1:  # the expert gradients' scale too (Adam would hide it from the losses)
        assert math.isclose(gn4[step], gn1[step], rel_tol=1e-4), (step, gn4[step], gn1[step])
    w4, w1 = _experts(ep4, STEPS), _experts(ep1, STEPS)
    for e in range(4):
        for k in w1[e]:
            assert _close(w4[e][k], w1[e][k]), (e, k, (w4[e][k] - w1[e][k]).abs().max())
    spread = max((w1[e]["weight"] - w1[0]["weight"]).abs().max().item() for e in range(1, 4))
    assert spread > 1e-3, spread  # the experts really differ: matching expert e to e is not vacuous
    d4, d1 = _dense(ep4, STEPS), _dense(ep1, STEPS)
    assert set(d4) == set(d1)
    for k in d1:
        assert _close(d4[k], d1[k]), k

    # ---- 3. resume the step-2 checkpoint on the same 8-process shape
    ranks = run_ranks(
        WORLD, resumed, BASE + ["model.experts.ep_size=4"], resume=_ckpt(ep4, 2), timeout=400, tag="resume"
    )
    assert "resumed from step00000002 at step 2" in ranks.output()
    got = read_losses(resumed)
    assert sorted(got) == [3, 4]
    assert [got[s] for s in (3, 4)] == [loss4[3], loss4[4]]  # bit for bit
    wr = _experts(resumed, STEPS)
    for e in range(4):
        assert all(torch.equal(wr[e][k], w4[e][k]) for k in w4[e]), e
    assert all(torch.equal(_dense(resumed, STEPS)[k], d4[k]) for k in d4)
