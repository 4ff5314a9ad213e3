"""Resume on another shape: ep_size 2 on 2 ranks -> ep_size 1 on 1 rank (ep 4 on 4 -> 2 and 1: slow).

Each case trains the toy model (tests/helpers/reshape_entry.py: data and noise fixed per global
micro-batch, so one step is the same computation at 2 ranks x 1 micro-batch and 1 rank x 2)
uninterrupted for 6 steps with checkpoints at 3 and 6, converts step 3 with
``launch.reshape_checkpoint`` and checks, at the new shape:

* the state after loading is the saved one *exactly*: the resumed run saves at once, that checkpoint
  is converted too, and every fp32 master, Adam moment, step count, EMA tensor, the lr schedule and
  DeepSpeed's counters equal the source's bit for bit;
* the losses of steps 4-6 equal the uninterrupted run's within 1e-6 relative (fp32, and bf16 in the
  slow cases; observed: equal. Resuming with zeroed Adam moments instead moves them by ~5e-4, so
  the check can fail).

Native checkpoints of another shape are refused before the model is built, naming the command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.helpers.train_harness import ROOT, read_losses, start_ranks

pytestmark = pytest.mark.multiprocess
ENTRY = os.path.join(ROOT, "tests", "helpers", "reshape_entry.py")
COMMON = ["train.steps=6", "checkpoint.every=3", "checkpoint.keep=3", "ema.enabled=true", "logging.images_every=0"]
RTOL = 1e-6


def _run(world, run_dir, overrides, resume=None, tag="run", expect=0):
    ranks = start_ranks(world, run_dir, COMMON + overrides, resume=resume, entry=ENTRY, tag=tag)
    codes = ranks.wait(300)
    if expect is not None:
        assert codes == [expect] * world, ranks.report(codes)
    return ranks


def _ckpt(run_dir, step):
    return os.path.join(run_dir, "toy", "checkpoints", f"step{step:08d}")


def _convert(src, dst=None):
    from train.checkpoint import convert

    dst = dst or src + "-portable"  # not "step...": outside keep-last-K pruning
    convert(src, dst, log=lambda s: None)
    return dst


def _load_portable(path):
    from train.checkpoint.portable import DENSE, META, load_pt

    tensors = {}
    for f in sorted(os.listdir(path)):
        if f == DENSE or f.startswith("expert_"):
            tensors.update(load_pt(os.path.join(path, f)))
    return load_pt(os.path.join(path, META)), tensors


def _assert_same_state(a, b):
    meta_a, ta = _load_portable(a)
    meta_b, tb = _load_portable(b)
    assert sorted(ta) == sorted(tb)
    assert any(".deepspeed_experts.3." in n for n in ta)  # global expert ids, all four experts
    for name in ta:
        assert sorted(ta[name]) == ["ema", "exp_avg", "exp_avg_sq", "fp32", "step"], name
        # 3 Adam steps; 4 after bf16 at ZeRO 0, whose FP16_UnfusedOptimizer takes one at construction
        assert ta[name]["step"] == tb[name]["step"] in (3.0, 4.0), name
        for k in ("fp32", "exp_avg", "exp_avg_sq", "ema"):
            assert torch.equal(ta[name][k], tb[name][k]), (name, k)
    assert any(ta[n]["exp_avg"].abs().sum() > 0 for n in ta)
    for k in ("step", "engine", "lr_scheduler", "num_experts", "num_groups"):
        assert meta_a[k] == meta_b[k], k


def _reshape_case(tmp_path, ref, src_world, src_ep, targets, extra=()):
    """Resume ``ref``'s step 3 at each of ``targets``: [(world, ep, zero, grad_accum)], same global batch."""
    full = read_losses(ref)
    assert sorted(full) == list(range(1, 7)) and full[6] != full[4]
    portable = _convert(_ckpt(ref, 3), str(tmp_path / "portable"))
    for world, ep, zero, gas in targets:
        resumed = str(tmp_path / f"resumed-w{world}")
        ranks = _run(
            world,
            resumed,
            [f"model.experts.ep_size={ep}", f"train.zero_stage={zero}", f"train.grad_accum={gas}", *extra],
            resume=portable,
            tag="resume",
        )
        out = ranks.output()
        assert "resumed from portable at step 3" in out
        assert f"portable checkpoint from {src_world} ranks at ep_size {src_ep}" in out
        # the run saved its new shape at once: that state, converted back, is the source's bit for bit
        _assert_same_state(portable, _convert(_ckpt(resumed, 3)))
        got = read_losses(resumed)  # and the loss goes on where the uninterrupted run's went
        assert sorted(got) == [4, 5, 6]
        for step in (4, 5, 6):
            assert abs(got[step] - full[step]) <= RTOL * abs(full[step]), (world, step, got[step], full[step])


@pytest.fixture(scope="module")
def native_ep2(tmp_path_factory):
    """2 ranks, ep_size 2, ZeRO 2, 6 steps, checkpoints at 3 and 6 (shared: the runs cost seconds each)."""
    run = str(tmp_path_factory.mktemp("native"))
    _run(2, run, ["model.experts.ep_size=2", "train.zero_stage=2"])
    return run


def test_ep2_zero2_on_2_ranks_continues_at_ep1_zero0_on_1_rank(native_ep2, tmp_path):
    _reshape_case(tmp_path, native_ep2, 2, 2, [(1, 1, 0, 2)])


@pytest.mark.parametrize("precision", ["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def test_ep2_zero0_on_2_ranks_continues_at_ep1_zero2_on_1_rank(tmp_path, precision):
    extra = [f"train.precision={precision}"]
    ref = str(tmp_path / "ref")
    _run(2, ref, ["model.experts.ep_size=2", "train.zero_stage=0", *extra])
    _reshape_case(tmp_path, ref, 2, 2, [(1, 1, 2, 2)], extra)


@pytest.mark.slow  # bf16 on CPU: ZeRO 2's bf16 shards and bf16 ZeRO 0's FP16_UnfusedOptimizer masters
def test_bf16_ep2_zero2_on_2_ranks_continues_at_ep1_zero0_on_1_rank(tmp_path):
    extra = ["train.precision=bf16"]
    ref = str(tmp_path / "ref")
    _run(2, ref, ["model.experts.ep_size=2", "train.zero_stage=2", *extra])
    _reshape_case(tmp_path, ref, 2, 2, [(1, 1, 0, 2)], extra)


@pytest.mark.slow  # 4 processes on 2 cores: ~40 s on an idle machine, minutes on a loaded one
def test_ep4_on_4_ranks_continues_at_ep2_on_2_and_ep1_on_1(tmp_path):
    ref = str(tmp_path / "ref")
    _run(4, ref, ["model.experts.ep_size=4", "train.zero_stage=0"])
    _reshape_case(tmp_path, ref, 4, 4, [(2, 2, 2, 2), (1, 1, 0, 4)])


def test_native_checkpoint_at_another_shape_is_refused_with_the_command(native_ep2, tmp_path):
    ranks = _run(
        1, str(tmp_path), ["model.experts.ep_size=1", "train.zero_stage=2"], resume=_ckpt(native_ep2, 3), expect=4
    )
    out = ranks.output()
    assert "was written by 2 ranks at ep_size 2, ZeRO 2; this run has 1 ranks at ep_size 1" in out
    assert f"python -m launch.reshape_checkpoint --src {_ckpt(native_ep2, 3)}" in out
    assert "Traceback" not in out and not os.path.exists(
        os.path.join(str(tmp_path), "toy", "checkpoints", "step00000003")
    )


def test_reshape_command_writes_portable_checkpoint_and_checks_target(native_ep2, tmp_path):
    ckpt_dir = os.path.join(native_ep2, "toy", "checkpoints")
    cmd = [sys.executable, "-m", "launch.reshape_checkpoint", "--src", ckpt_dir]  # follows 'latest'
    bad = subprocess.run(cmd + ["--ep-size", "3"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode == 2 and "--ep-size 3 does not divide the 4 experts of expert layer 0" in bad.stderr
    assert not os.path.exists(os.path.join(ckpt_dir, "portable"))
    ok = subprocess.run(cmd + ["--world-size", "2", "--ep-size", "2"], cwd=ROOT, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-3000:]
    dst = os.path.join(ckpt_dir, "portable", "step00000006")
    assert f"--resume {dst}" in ok.stdout
    assert sorted(os.listdir(dst)) == [
        "config.yaml",
        "dense_states.pt",
        *[f"expert_{g:04d}_states.pt" for g in range(4)],
        "portable.pt",
    ]
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert again.returncode == 2 and "exists" in again.stderr


def test_resume_auto_at_another_shape_uses_the_conversion_of_latest(native_ep2, tmp_path):
    run = str(tmp_path / "run")
    shutil.copytree(native_ep2, run, ignore=shutil.ignore_patterns("portable"))  # another test converts there
    ckpt_dir = os.path.join(run, "toy", "checkpoints")
    from launch.reshape_checkpoint import main as reshape

    assert reshape(["--src", ckpt_dir]) == 0  # latest: step 6 -> checkpoints/portable/step00000006
    ranks = _run(
        1, run, ["model.experts.ep_size=1", "train.zero_stage=0", "train.grad_accum=2"], resume="auto", tag="auto"
    )
    assert "resumed from step00000006 at step 6" in ranks.output()
    with open(os.path.join(ckpt_dir, "latest")) as f:
        assert f.read() == "step00000006"
    state = torch.load(os.path.join(ckpt_dir, "step00000006", "train_state_rank0.pt"), weights_only=True)
    assert state["layout"]["world_size"] == 1 and state["layout"]["ep_size"] == 1  # the new shape, saved at once
    again = _run(
        1, run, ["model.experts.ep_size=1", "train.zero_stage=0", "train.grad_accum=2"], resume="auto", tag="again"
    )  # now a native checkpoint of this shape: no conversion involved
    assert "portable" not in again.output()


@pytest.mark.parametrize("victim", ["zero_pp_rank_1_mp_rank_00_optim_states.pt", "train_state_rank1.pt"])
def test_missing_shard_stops_conversion_naming_it(native_ep2, tmp_path, victim):
    from train.checkpoint import ReshapeError

    src = str(tmp_path / "step00000003")
    shutil.copytree(_ckpt(native_ep2, 3), src)
    os.remove(os.path.join(src, victim))
    with pytest.raises(ReshapeError, match=victim):
        _convert(src, str(tmp_path / "out"))
    assert not os.path.exists(str(tmp_path / "out"))


def test_portable_checkpoint_missing_an_expert_file_is_refused(native_ep2, tmp_path):
    from train.checkpoint import ReshapeError
    from train.checkpoint.portable_load import read_params_for

    dst = _convert(_ckpt(native_ep2, 3), str(tmp_path / "p"))
    _, tensors = _load_portable(dst)
    trainable = {n: torch.nn.Parameter(e["fp32"]) for n, e in tensors.items()}
    assert sorted(read_params_for(dst, trainable)) == sorted(trainable)
    os.remove(os.path.join(dst, "expert_0002_states.pt"))
    with pytest.raises(ReshapeError, match="expert_0002_states.pt: missing"):
        read_params_for(dst, trainable)


@pytest.mark.parametrize("group, on_moments", [({"fused": True}, True), ({"capturable": True}, True), ({}, False)])
def test_loaded_adam_step_lives_where_the_optimizer_reads_it(group, on_moments):
    """A fused (or capturable) AdamW reads its step on the parameters' device, the others on the CPU;
    a step left on the CPU fails a fused GPU optimizer's first step after a portable resume. The meta
    device stands in for a GPU here."""
    from train.checkpoint.portable_load import _adam_state

    moments = {"exp_avg": torch.zeros(3, device="meta"), "exp_avg_sq": torch.zeros(3, device="meta")}
    state = _adam_state(7, moments, group)
    assert state["step"].device.type == ("meta" if on_moments else "cpu")
    assert state["step"].dtype == torch.float32 and state["exp_avg"] is moments["exp_avg"]
    if not on_moments:
        assert float(state["step"]) == 7.0
