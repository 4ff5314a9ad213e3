"""Held-out evaluation inside a run (train/eval/heldout.py), the `best` checkpoint it picks, and launch/eval.py
over a whole run; the real CARE-Edit model on the tiny recipe (CPU, fp32), and the toy at ep_size 2.

* the same run with and without evaluation has the same training losses, bit for bit (the evaluation
  uses the EMA weights here, so their swap in and out is checked too);
* evaluating a checkpoint again, in another process, gives exactly the numbers the run logged;
* ``launch/export.py --tag best`` exports the checkpoint ``best`` names;
* ``launch/eval.py --all-checkpoints`` / ``--tags`` write one table row per checkpoint and a plot.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.helpers.faults import Faults
from tests.helpers.train_harness import LAUNCH, ROOT, read_losses, read_records, run_ranks
from tests.helpers.train_harness import TINY_CONFIG as TINY

pytestmark = pytest.mark.multiprocess

COMMON = [
    "train.steps=5",
    "checkpoint.every=2",
    "checkpoint.keep=2",
    "logging.every=5",
    "logging.images_every=0",
    "logging.progress_bar=false",
    "data.num_workers=0",
    "ema.enabled=true",
    "ema.decay=0.5",
]
EVAL = [
    "logging.eval_every=2",
    "logging.eval_samples=6",
    "logging.eval_edits=4",
    "logging.eval_edit_steps=2",
    "logging.eval_batch_size=4",
    "checkpoint.best_metric=val/flow_loss",
    "checkpoint.best_mode=min",
]


def _train(run_dir: str, overrides: list[str]) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    proc = subprocess.run(
        [sys.executable, LAUNCH, "--config", TINY, f"run.dir={run_dir}", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc.stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_shards):
    """The same 5 steps without and with the held-out evaluation (every 2 steps and at the last)."""
    root = tmp_path_factory.mktemp("runs")
    shards = tiny_shards
    plain, evaluated = str(root / "plain"), str(root / "eval")
    _train(plain, shards + COMMON + ["logging.eval_every=0", "checkpoint.best_metric=null"])  # tiny.yaml has them on
    out = _train(evaluated, shards + COMMON + EVAL)
    return {"plain": plain, "eval": evaluated, "shards": shards, "stdout": out}


def test_evaluation_does_not_change_the_training_losses(runs):
    a, b = read_losses(runs["plain"], "tiny"), read_losses(runs["eval"], "tiny")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5]
    assert a == b, (a, b)
    assert not any("val" in r for r in read_records(runs["plain"], "tiny"))  # evaluation off there
    val = {r["step"]: r["val"] for r in read_records(runs["eval"], "tiny") if "val" in r}
    assert sorted(val) == [2, 4, 5]  # every 2 steps, and the last
    for m in val.values():
        assert 0 < m["val/flow_loss_inside"] and 0 < m["val/flow_loss_outside"] and 0 < m["val/flow_loss"]
        assert 0 <= m["val/success_mean"] <= 1 and 0 <= m["val/mask_iou"] <= 1
        assert m["val/l1_inside"] > 0 and m["val/l1_outside"] > 0
        assert any(k.startswith("val/success/") for k in m)  # per task: the synthetic shards carry checks
    assert val[2] != val[4]  # the weights moved between evaluations
    assert "step 4 | val flow" in runs["stdout"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(os.path.join(runs["eval"], "tiny", "tb"))
    tb.Reload()
    logged = {e.step: e.value for e in tb.Scalars("val/flow_loss")}
    assert logged == pytest.approx({s: m["val/flow_loss"] for s, m in val.items()}, rel=1e-6)
    assert "val/success_mean" in tb.Tags()["scalars"]


def test_a_checkpoint_evaluated_again_gives_the_numbers_the_run_logged(runs):
    """In another process, from the checkpoint's EMA weights: the same numbers as the run, bit for bit,
    twice; and the module's own weights are back exactly after an evaluation with EMA weights."""
    from omegaconf import OmegaConf

    from train.config import as_train_config, load_config
    from train.engine import EMA
    from train.eval import HeldOutEval, ema_weights, load_for_inference
    from train.loop import default_factories

    ckpt = os.path.join(runs["eval"], "tiny", "checkpoints", "step00000005")
    logged = {r["step"]: r["val"] for r in read_records(runs["eval"], "tiny") if "val" in r}[5]
    model, _ = load_for_inference(ckpt, ema=True)
    cfg = load_config(os.path.join(runs["eval"], "tiny", "config.yaml"))
    typed = as_train_config(cfg)
    heldout = HeldOutEval.build(
        typed.logging, typed.data, default_factories()[2], torch.device("cpu"), typed.train.steps, typed.run.seed
    )
    model.train()  # as the training module is
    first = heldout.run(model, None, torch.float32)
    second = heldout.run(model, None, torch.float32)
    for m in (first, second, logged):
        m.pop("val/seconds")
    assert first == second == logged
    # EMA weights swapped in and out: inside they are the shadow, after it the weights are back, bit for bit
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema = EMA(model, 0.5)
    for t in ema.shadow.values():
        t.add_(1.0)
    name = next(iter(ema.shadow))
    with ema_weights(model, ema):
        assert torch.equal(dict(model.named_parameters())[name], ema.shadow[name])
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert model.training
    assert OmegaConf.select(cfg, "logging.eval_every") == 2


def test_export_tag_best(runs, tmp_path, capsys):
    from launch.export import main as export_main
    from train.checkpoint import read_best
    from train.eval import read_checkpoint_tensors, read_export

    ckpt_dir = os.path.join(runs["eval"], "tiny", "checkpoints")
    val = {r["step"]: r["val"]["val/flow_loss"] for r in read_records(runs["eval"], "tiny") if "val" in r}
    best = read_best(ckpt_dir)
    assert best["step"] == min(val, key=val.get) and best["value"] == min(val.values())
    kept = {"best", "latest", "step00000004", "step00000005", best["tag"]}  # the last 2, and best
    assert sorted(os.listdir(ckpt_dir)) == sorted(kept)
    out = str(tmp_path / "best.safetensors")
    assert export_main(["--checkpoint", os.path.join(runs["eval"], "tiny"), "--tag", "best", "--out", out]) == 0
    assert best["tag"] in capsys.readouterr().out
    tensors, _ = read_export(out)
    expected = read_checkpoint_tensors(os.path.join(ckpt_dir, best["tag"]))
    assert len(tensors) > 10 and all(torch.equal(t, expected[k]) for k, t in tensors.items())
    if best["tag"] != "step00000005":  # not merely the latest
        latest = read_checkpoint_tensors(os.path.join(ckpt_dir, "step00000005"))
        assert any(not torch.equal(t, latest[k]) for k, t in tensors.items())
    # a run without a `best` pointer: one line, exit 2
    assert export_main(["--checkpoint", runs["plain"] + "/tiny/checkpoints", "--tag", "best", "--out", out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no 'best' pointer" in err[0] and "checkpoint.best_metric" in err[0]


def test_eval_over_a_run_writes_a_table_and_a_plot_per_checkpoint(runs, tmp_path, capsys):
    from PIL import Image

    from launch.eval import main as eval_main
    from train.checkpoint import read_best

    ckpt_dir = os.path.join(runs["eval"], "tiny", "checkpoints")
    tags = sorted(t for t in os.listdir(ckpt_dir) if t.startswith("step"))
    val = runs["shards"][1].split("=", 1)[1]
    common = ["--checkpoint", ckpt_dir, "--data", val, "--steps", "1", "--limit", "3", "--batch-size", "3"]
    out = tmp_path / "all"
    assert eval_main(common + ["--all-checkpoints", "--out", str(out)]) == 0
    report = json.loads((out / "run_eval.json").read_text())
    assert [r["tag"] for r in report["rows"]] == tags and [r["step"] for r in report["rows"]] == [
        int(t[4:]) for t in tags
    ]
    for row in report["rows"]:
        assert row["num_samples"] == 3 and 0 <= row["metrics"]["success_mean_over_tasks"] <= 1
        assert row["metrics"]["flow_mse"] > 0
        assert report["results"][row["tag"]]["in_run"]["val/flow_loss"] > 0  # what the run logged there
    table = (out / "run_eval.md").read_text().splitlines()
    body = [line for line in table if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    assert [int(line.split("|")[1]) for line in body] == [int(t[4:]) for t in tags]
    assert "success mean" in table[2] and "L1 inside" in table[2]
    img = Image.open(out / "run_eval.png").convert("L")
    assert img.size[0] == 820 and img.size[1] >= 4 * 200 and min(img.getdata()) == 0  # drawn: 4 panels
    # the listed tags (best resolved through its pointer, named twice: evaluated once)
    out2 = tmp_path / "tags"
    assert eval_main(common + ["--tags", f"best,{tags[-1]}", "--out", str(out2)]) == 0
    rows = json.loads((out2 / "run_eval.json").read_text())["rows"]
    assert [r["tag"] for r in rows] == sorted({read_best(ckpt_dir)["tag"], tags[-1]})
    assert eval_main(common + ["--tags", "step00000099", "--out", str(out2)]) == 2
    assert "step00000099" in capsys.readouterr().err


def test_evaluation_under_expert_parallelism_leaves_the_losses_unchanged(tmp_path):
    """2 gloo ranks, ep_size 2 (the toy's MoE exchanges tokens between the ranks in every forward, so
    both must evaluate): the losses with evaluation are those without it."""
    common = ["model.experts.ep_size=2", "logging.images_every=0", "train.steps=4", "checkpoint.every=4"]
    evaluated = ["logging.eval_every=2", "logging.eval_samples=4", "logging.eval_edits=2", "logging.eval_edit_steps=1"]
    evaluated.append("data.val_shards=toy-val-{000000..000000}.tar")  # the toy's val batch does not read it
    plain, with_eval = str(tmp_path / "plain"), str(tmp_path / "eval")
    run_ranks(2, plain, common, faults=Faults(toy_eval=True))
    run_ranks(2, with_eval, common + evaluated, faults=Faults(toy_eval=True))
    assert read_losses(plain) == read_losses(with_eval)
    assert [r["step"] for r in read_records(with_eval) if "val" in r] == [2, 4]


def test_in_run_edits_take_the_tasks_in_turn():
    from train.eval import balanced_by_task

    tasks = ["remove", "remove", "remove", "recolor", "recolor", "style", "add", "remove"]
    assert balanced_by_task(tasks, 4) == [0, 3, 5, 6]  # one of each task, in file order
    assert balanced_by_task(tasks, 6) == [0, 1, 3, 4, 5, 6]  # then the second of each
    assert balanced_by_task(tasks, 20) == list(range(8))  # no more than there are
    assert balanced_by_task(tasks, 0) == []
