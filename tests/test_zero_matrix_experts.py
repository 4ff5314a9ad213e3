"""The real model's expert kinds under ZeRO 2 at ep_size 2 (2 gloo ranks): every run computes what the
ep_size 1 run computes, and the replicas pass the consistency check at every step.

tests/test_zero_matrix.py runs the matrix with the stand-in model, whose experts are plain Linear
layers of one size. The real experts (moe/experts.py) read their own condition: Text and Reference
read ``ctx_dim`` columns, Mask and Base ``ctx_dim + 1`` (the mask column), so their ``cond``
projections differ in width. Which expert-parallel rank holds which experts follows
``model.experts.enabled``:

* the default order (text, mask, reference, base) puts one narrow and one wide expert on each rank at
  ep_size 2: both ranks hold tensors of the same sizes, in the same order, so a gradient bucket smaller
  than one expert flushes at the same points on both. Run here with such a bucket;
* the order (text, reference, mask, base) puts both narrow experts on rank 0 and both wide ones on rank
  1: the risky case (buckets that mix expert and non-expert gradients fill at different points). The
  trainer refuses a bucket smaller than a rank's gradients there (train/engine.py); with one bucket for
  all gradients the run equals ep_size 1.

The tiny random-init model of tests/helpers/model_configs.py, 32 px synthetic shards, fp32 on the CPU.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from tests.helpers.faults import Faults
from tests.helpers.model_configs import TINY, tiny_model_config
from tests.helpers.train_harness import ROOT, read_losses, start_ranks

pytestmark = pytest.mark.multiprocess

STEPS = 4
DEFAULT_ORDER = "[text,mask,reference,base]"
SPLIT_ORDER = "[text,reference,mask,base]"  # narrow experts on rank 0, wide ones on rank 1
COMMON = [
    "--real-model",  # tests/helpers/train_entry.py: the real model and loader, faults injected through their factories
    f"train.steps={STEPS}",
    "checkpoint.every=100",
    "guards.replica_check_every=1",
    "model.router.noise_std=0.0",
]


def _config(path: str, shards: str) -> str:
    cfg = {
        "run": {"name": "tiny", "seed": 0},
        "train": {"micro_batch": 2, "precision": "fp32"},
        "optim": {"lr": 1.0e-2, "weight_decay": 0.0},
        "schedule": {"warmup_steps": 1, "min_lr": 1.0e-4},
        "logging": {"every": 1, "images_every": 0, "progress_bar": False},
        "data": {
            "train_shards": f"{shards}/train-{{000000..000001}}.tar",
            "val_shards": f"{shards}/val-{{000000..000000}}.tar",
            "image_size": 32,
            "num_workers": 0,
        },
        "model": TINY,
    }
    OmegaConf.save(OmegaConf.create(cfg), path)
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    d = tmp_path_factory.mktemp("experts-data")
    cmd = [
        sys.executable,
        "-m",
        "data.synthetic",
        "--out",
        str(d),
        "--train",
        "32",
        "--val",
        "4",
        "--test",
        "0",
        "--size",
        "32",
    ]
    subprocess.run(cmd + ["--samples-per-shard", "16"], check=True, cwd=ROOT, capture_output=True)
    return _config(str(d / "tiny.yaml"), str(d))


def _run(config: str, run: str, overrides: list[str], expect_ok: bool = True, faults: Faults | None = None):
    r = start_ranks(2, run, COMMON + overrides, config=config, faults=faults)
    codes = r.wait(300)
    if expect_ok:
        assert codes == [0, 0], r.report(codes)
    return r, codes


def _rank_experts(kind: str, order: str, ep_rank: int) -> list[tuple[str, int]]:
    """(name, size) of every trainable expert tensor an expert-parallel rank holds at ep_size 2, in order."""
    from moe.model import build_model

    torch.manual_seed(0)
    names = order.strip("[]").split(",")
    cfg = tiny_model_config(**{"experts.kind": kind, "experts.ep_size": 2, "experts.enabled": names})
    model = build_model(cfg, ep_rank=ep_rank)
    return [(n, p.numel()) for n, p in model.named_parameters() if p.requires_grad and ".deepspeed_experts." in n]


def _sizes(kind: str, order: str, ep_rank: int) -> list[int]:
    return [size for _, size in _rank_experts(kind, order, ep_rank)]


def _small_bucket(kind: str, order: str) -> int:
    """About half the smallest expert (summed over its tensors), even (DeepSpeed asks it)."""
    per_expert: dict[str, int] = {}
    for name, size in _rank_experts(kind, order, 0):
        expert = name.split(".deepspeed_experts.")[0] + name.split(".deepspeed_experts.")[1].split(".")[0]
        per_expert[expert] = per_expert.get(expert, 0) + size
    return min(per_expert.values()) // 4 * 2


def grad_norms(run: str, name: str = "tiny") -> dict[int, float]:
    """step -> the global gradient norm the run logged to TensorBoard (``logging.every=1``)."""
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(
        os.path.join(run, name, "tb"), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("opt/grad_norm")}


def assert_equal_to_ep1(run: str, ref: str, steps: int = STEPS, name: str = "tiny") -> None:
    """Same losses and global gradient norms as the reference run, at every step, within fp32 tolerance
    (all-to-all dispatch vs local experts, bucketed vs whole reductions: the summation order differs).
    The gradient norms see a wrongly scaled or misplaced reduction that Adam's update would hide."""
    for got, want in ((read_losses(run, name), read_losses(ref, name)), (grad_norms(run, name), grad_norms(ref, name))):
        assert sorted(got) == sorted(want) == list(range(1, steps + 1))
        for step in got:
            assert got[step] == pytest.approx(want[step], rel=1e-5, abs=1e-7), (step, got[step], want[step])
        assert want[steps] != want[1]  # the comparison is not vacuous: the values move


@pytest.fixture(scope="module")
def references(config, tmp_path_factory):
    """(kind, order) -> the run directory of the ep_size 1 run (2 ranks, ZeRO 0), run once each."""
    cache: dict[tuple[str, str], str] = {}

    def get(kind: str, order: str) -> str:
        if (kind, order) not in cache:
            run = str(tmp_path_factory.mktemp(f"ep1-{kind}"))
            common = [f"model.experts.kind={kind}", f"model.experts.enabled={order}", "train.zero_stage=0"]
            _run(config, run, common + ["model.experts.ep_size=1"])
            cache[kind, order] = run
        return cache[kind, order]

    return get


def _overrides(kind: str, order: str, bucket: int = 0) -> list[str]:
    out = [
        f"model.experts.kind={kind}",
        f"model.experts.enabled={order}",
        "model.experts.ep_size=2",
        "train.zero_stage=2",
        "train.overlap_comm=true",
    ]
    if bucket:
        out += [f"train.reduce_bucket_size={bucket}", f"train.allgather_bucket_size={bucket}"]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "ffn"])
def test_real_experts_of_equal_shapes_with_buckets_smaller_than_one_expert_equal_ep1(
    tmp_path, config, references, kind
):
    # the default order: both ranks hold expert tensors of the same sizes in the same order (the docstring)
    assert _sizes(kind, DEFAULT_ORDER, 0) == _sizes(kind, DEFAULT_ORDER, 1)
    bucket = _small_bucket(kind, DEFAULT_ORDER)
    run = str(tmp_path)
    r, _ = _run(config, run, _overrides(kind, DEFAULT_ORDER, bucket))
    assert not any("replica check" in r.output(rank) for rank in (0, 1))  # passed at every step
    assert_equal_to_ep1(run, references(kind, DEFAULT_ORDER))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "ffn"])
def test_real_experts_of_different_sizes_per_rank_with_one_bucket_equal_ep1(tmp_path, config, references, kind):
    ranks = [_sizes(kind, SPLIT_ORDER, r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) and sum(ranks[0]) < sum(ranks[1])  # the risky case: sizes differ
    run = str(tmp_path)
    r, _ = _run(config, run, _overrides(kind, SPLIT_ORDER))  # the default bucket (5e7) holds all gradients
    assert not any("replica check" in r.output(rank) for rank in (0, 1))
    assert_equal_to_ep1(run, references(kind, SPLIT_ORDER))


def test_real_experts_of_different_sizes_refuse_a_bucket_smaller_than_a_rank(tmp_path, config):
    bucket = _small_bucket("ffn", SPLIT_ORDER)
    run = str(tmp_path)
    r, codes = _run(config, run, _overrides("ffn", SPLIT_ORDER, bucket), expect_ok=False)
    # every rank refuses (exit 2); under load a rank that is still tearing gloo down when its peer has
    # gone may abort instead (SIGABRT, -6) after printing the same refusal: still no training
    assert 2 in codes and all(c in (2, -6) for c in codes), codes
    assert f"train.reduce_bucket_size: {bucket} elements is smaller than a rank's trainable gradients" in r.output(0)
    assert not os.path.exists(os.path.join(run, "tiny", "losses.jsonl"))


@pytest.mark.slow
def test_without_the_bucket_check_the_real_experts_break_the_reduction(tmp_path, config):
    """What the refusal prevents, with the real FFN experts (check patched out). The last expert tensor
    of a layer's backward is a condition projection, 256 elements on rank 0 and 288 on rank 1; the dense
    gradients after it share its bucket. At 300 elements rank 0 fits 2 + 1 + 32 + 4 of them (295), rank
    1 flushes after 2 + 1 (291): the dense all-reduces differ in length at step 1 and gloo aborts. Whether
    a bucket size does this depends on where the flushes fall: at 4,304 or 8 elements (LoRA experts: 162)
    every dense gradient happens to flush at the same point on both ranks, and training equals ep_size 1;
    a fifth of the even sizes below a rank's 60,368 gradient elements mismatch (LoRA: 7% of those below
    27,120)."""
    r, codes = _run(
        config,
        str(tmp_path),
        _overrides("ffn", SPLIT_ORDER, 300),
        expect_ok=False,
        faults=Faults(skip_bucket_check=True),
    )
    assert all(c != 0 for c in codes), codes
    out = r.output(0) + r.output(1)
    assert "Received data size doesn't match expected size. Is there a distributed collective mismatch" in out
    with open(os.path.join(str(tmp_path), "tiny", "losses.jsonl")) as f:
        assert f.read() == ""  # not even step 1
