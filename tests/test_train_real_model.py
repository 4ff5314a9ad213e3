"""The real CARE-Edit model (moe.model) and loader (data.loader) through launch/train.py, tiny config."""

import os
import subprocess
import sys

import pytest

from tests.helpers.faults import Faults
from tests.helpers.train_harness import LAUNCH, ROOT, Ranks, read_losses, start_ranks, wait_for_step
from tests.helpers.train_harness import TINY_CONFIG as TINY

pytestmark = pytest.mark.multiprocess


def _start(run_dir, overrides, resume=None, log="run.log"):
    cmd = [sys.executable, LAUNCH, "--config", TINY, f"run.dir={run_dir}", "logging.progress_bar=false", *overrides]
    if resume:
        cmd += ["--resume", resume]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    path = os.path.join(run_dir, log)
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    return Ranks([proc], [path])


def test_tiny_real_model_single_process_trains_and_writes_everything(tmp_path, tiny_shards):
    run = str(tmp_path)
    r = _start(
        run,
        tiny_shards
        + [
            "train.steps=4",
            "checkpoint.every=2",
            "logging.every=2",
            "logging.images_every=4",
            "logging.num_images=2",
            "logging.edit_steps=2",
            "data.num_workers=0",
        ],
    )
    assert r.wait(240) == [0], r.output()[-3000:]
    out = r.output()
    assert "tensorboard --logdir" in out and "done: step 4" in out
    for term in ("diffusion", "load_balance", "mask_boundary", "mixture_smoothness"):
        assert term in out
    assert "util block" in out
    tiny = os.path.join(run, "tiny")
    assert os.path.isfile(os.path.join(tiny, "images", "step00000004.png"))
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(tiny, "tb")))
    with open(os.path.join(tiny, "checkpoints", "latest")) as f:
        assert f.read() == "step00000004"
    ckpt = os.path.join(tiny, "checkpoints", "step00000004")
    size = sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))
    # the frozen base (backbone and text encoders, more parameters than the trainable ones) is not
    # written: the model states hold the trainable parameters only (a tied text embedding aside)
    import torch
    from omegaconf import OmegaConf

    from moe.model import build_model
    from train.config import load_config

    model = build_model(OmegaConf.to_object(load_config(TINY).model))
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for n, p in model.named_parameters() if n in frozen) > trainable
    # our own file, just written by the run above (DeepSpeed's states hold non-tensor objects)
    states = torch.load(os.path.join(ckpt, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    written_frozen = [k for k in states["module"] if k in frozen and "embed_tokens" not in k]
    assert written_frozen == [], written_frozen[:5]
    assert size < 4 * sum(p.numel() for n, p in model.named_parameters() if n in frozen) + 16 * trainable, size


def test_tiny_real_model_trains_the_same_compiled(tmp_path, tiny_shards):
    """``train.compile`` under the DeepSpeed engine: blocks compiled whole with their gradient checkpoint,
    the expert layers (dense dispatch) traced inside them, the losses compiled. Backend aot_eager runs
    those graphs with eager kernels, so the losses must match the eager run's to float32 rounding."""
    common = tiny_shards + [
        "train.steps=4",
        "checkpoint.every=4",
        "logging.every=2",
        "logging.images_every=0",
        "data.num_workers=0",
        "model.backbone.gradient_checkpointing=true",
    ]
    eager, compiled = str(tmp_path / "eager"), str(tmp_path / "compiled")
    r = _start(eager, common)
    assert r.wait(240) == [0], r.output()[-3000:]
    r = _start(compiled, common + ["train.compile=true", "train.compile_backend=aot_eager"])
    assert r.wait(480) == [0], r.output()[-3000:]
    # tiny.yaml: 4 double blocks, 2 of them with a (dense, traceable) expert layer
    assert (
        "compiled (aot_eager, default): 3 of 3 blocks whole with their checkpoint, 0 of 3 expert layers apart"
        in r.output()
    )
    a, b = read_losses(eager, "tiny"), read_losses(compiled, "tiny")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5 * abs(a[step]), (step, a[step], b[step])


def test_logging_images_does_not_change_training(tmp_path, tiny_shards):
    """Drawing the validation batch and sampling its edits leave the training run as it was: same losses
    with images every 2 steps as without. (Both had changed it: the batch and the sampler drew from the
    global generators, and ``model.train()`` after sampling put the frozen T5 back in training mode,
    so its dropout noised the text conditioning from the first image on.)"""
    common = tiny_shards + ["train.steps=5", "checkpoint.every=100", "logging.every=5", "data.num_workers=0"]
    plain, images = str(tmp_path / "plain"), str(tmp_path / "images")
    for run, every in ((plain, 0), (images, 2)):
        r = _start(run, common + [f"logging.images_every={every}"])
        assert r.wait(240) == [0], r.output()[-3000:]
    assert os.path.isfile(os.path.join(images, "tiny", "images", "step00000004.png"))
    a, b = read_losses(plain, "tiny"), read_losses(images, "tiny")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert a == b, (a, b)


def test_tiny_real_model_two_ranks_zero2_expert_parallel(tmp_path, tiny_shards):
    """2 gloo ranks, ZeRO 2, ep_size 2: ZeRO-2's gradient buckets must hold the same parameters on both
    ranks even when one rank's batch has no reference image (micro-batch 1: some batches have none)."""
    run = str(tmp_path)
    r = start_ranks(
        2,
        run,
        tiny_shards
        + [
            "train.steps=4",
            "train.micro_batch=1",
            "train.zero_stage=2",
            "model.experts.ep_size=2",
            "checkpoint.every=4",
            "logging.every=1",
            "logging.images_every=0",
            "data.num_workers=0",
            "logging.progress_bar=false",
        ],
        entry=LAUNCH,
        config=TINY,
    )
    assert r.wait(300) == [0, 0], r.output()[-3000:]
    losses = read_losses(run, "tiny")
    assert sorted(losses) == [1, 2, 3, 4] and all(0 < v < 10 for v in losses.values()), losses


@pytest.mark.slow
def test_tiny_real_model_resume_is_exact(tmp_path, tiny_shards):
    common = tiny_shards + ["train.steps=6", "checkpoint.every=3", "logging.images_every=0", "data.num_workers=1"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    assert _start(full, common).wait(300) == [0]
    # the real model through tests/helpers/train_entry.py, whose loader sleeps 1.5 s per step (tests/helpers/faults.py)
    r = start_ranks(
        1, cut, common + ["--real-model", "logging.progress_bar=false"], config=TINY, faults=Faults(step_sleep_s=1.5)
    )
    wait_for_step(cut, 4, r, name="tiny")
    r.kill()
    r2 = _start(cut, common, resume="auto", log="resume.log")
    assert r2.wait(300) == [0], r2.output()[-3000:]
    a, b = read_losses(full, "tiny"), read_losses(cut, "tiny")
    for step in (4, 5, 6):
        assert a[step] == b[step], (step, a[step], b[step])
