"""The `best` checkpoint pointer (train/checkpoint/checkpointer.py): moves only on a strict improvement of the configured
held-out metric, is written atomically, is never pruned, and survives a kill during a save.

The first tests drive ``Checkpointer._commit`` directly with stand-in checkpoint directories (one file of
known size each, so ``complete.json`` and ``verify_complete`` work as for a real one); the last ones kill
toy training runs in the middle of a save through the fault seams of tests/helpers/faults.py.
"""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch

from tests.helpers.faults import Faults
from tests.helpers.train_harness import TOY_CONFIG, read_records, run_ranks, start_ranks
from train.checkpoint import BEST, Checkpointer, read_best, resolve_tag, step_tag
from train.config import ConfigError, load_config
from train.distributed import DistInfo

# the toy's held-out samples come from tests.helpers.toy_model.build_toy_val_batch; the setting only has to be there
TOY_VAL = "toy-val-{000000..000000}.tar"


def _checkpointer(tmp_path, metric: str = "val/success_mean", mode: str = "max", keep: int = 2) -> Checkpointer:
    cfg = load_config(
        TOY_CONFIG,
        [
            f"run.dir={tmp_path}",
            f"data.val_shards={TOY_VAL}",
            "logging.eval_every=1",
            "checkpoint.every=1",
            f"checkpoint.keep={keep}",
            f"checkpoint.best_metric={metric}",
            f"checkpoint.best_mode={mode}",
        ],
    )
    return Checkpointer.for_run(cfg, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))


def _save(ckpt: Checkpointer, step: int, metrics: dict | None) -> None:
    """What ``Checkpointer.save`` does on one rank, without an engine: files under the temporary tag, commit."""
    tmp = os.path.join(ckpt.dir, f".tmp-{step_tag(step)}")
    os.makedirs(tmp, exist_ok=True)
    with open(os.path.join(tmp, "weights.bin"), "wb") as f:
        f.write(bytes(step))
    ckpt._commit(tmp, step_tag(step), step, {"weights.bin": step}, metrics)


def _best_step(ckpt: Checkpointer) -> int | None:
    pointer = read_best(ckpt.dir)
    return None if pointer is None else pointer["step"]


def test_best_moves_only_on_strict_improvement_and_is_never_pruned(tmp_path):
    ckpt = _checkpointer(tmp_path, keep=2)
    # step -> success: better, worse, tie (keeps the earlier), NaN and no evaluation (not candidates), better
    sequence = [(1, 0.25), (2, 0.125), (3, 0.25), (4, math.nan), (5, None), (6, 0.5), (7, 0.375)]
    expected_best = [1, 1, 1, 1, 1, 6, 6]
    seen = []
    for step, value in sequence:
        _save(ckpt, step, None if value is None else {"val/success_mean": value, "val/flow_loss": 1.0})
        seen.append(_best_step(ckpt))
        kept = sorted(t for t in os.listdir(ckpt.dir) if t.startswith("step"))
        best = read_best(ckpt.dir)["tag"]
        assert best in kept, (step, kept)  # never pruned...
        assert set(kept) == {step_tag(s) for s in range(max(1, step - 1), step + 1)} | {best}  # ...the rest is
    assert seen == expected_best
    pointer = read_best(ckpt.dir)
    assert pointer == {"tag": step_tag(6), "step": 6, "metric": "val/success_mean", "mode": "max", "value": 0.5}
    assert not os.path.exists(os.path.join(ckpt.dir, BEST + ".tmp"))  # renamed into place
    with open(os.path.join(ckpt.dir, step_tag(6), "complete.json")) as f:
        assert json.load(f)["metrics"]["val/success_mean"] == 0.5  # each checkpoint records its metrics
    assert resolve_tag(ckpt.dir, "best") == os.path.join(ckpt.dir, step_tag(6))


def test_min_mode_follows_a_loss(tmp_path):
    ckpt = _checkpointer(tmp_path, metric="val/flow_loss", mode="min", keep=1)
    for step, loss in enumerate([0.5, 0.4, 0.45, 0.4, 0.3, 0.31], start=1):
        _save(ckpt, step, {"val/flow_loss": loss})
    assert _best_step(ckpt) == 5
    assert sorted(t for t in os.listdir(ckpt.dir) if t.startswith("step")) == [step_tag(5), step_tag(6)]


def test_a_lost_or_damaged_pointer_is_rebuilt_from_the_checkpoints_on_disk(tmp_path):
    ckpt = _checkpointer(tmp_path, keep=5)
    for step, value in [(1, 0.1), (2, 0.6), (3, 0.2)]:
        _save(ckpt, step, {"val/success_mean": value})
    assert _best_step(ckpt) == 2
    os.remove(os.path.join(ckpt.dir, BEST))
    _save(ckpt, 4, {"val/success_mean": 0.3})  # not better than step 2, which the markers still record
    assert _best_step(ckpt) == 2
    # re-saving the step `best` names (a run resumed from an earlier checkpoint): never left dangling
    _save(ckpt, 2, {"val/success_mean": 0.05})
    assert _best_step(ckpt) == 4


def test_bad_best_settings_fail_naming_the_key(tmp_path):
    base = [f"run.dir={tmp_path}", f"data.val_shards={TOY_VAL}", "logging.eval_every=2", "checkpoint.every=4"]
    cases = [
        (["checkpoint.best_metric=val/sucess_mean"], "checkpoint.best_metric"),
        (["checkpoint.best_metric=val/flow_loss", "checkpoint.best_mode=max"], "checkpoint.best_mode"),
        (["checkpoint.best_metric=val/success_mean", "checkpoint.best_mode=up"], "checkpoint.best_mode"),
        (["checkpoint.best_metric=val/success_mean", "logging.eval_every=0"], "logging.eval_every"),
        (["checkpoint.best_metric=val/success_mean", "logging.eval_edits=0"], "logging.eval_edits"),
        (["logging.eval_every=-1"], "logging.eval_every"),
        (['data.val_shards=""'], "logging.eval_every"),  # nothing to evaluate on
        (["logging.eval_edits=40", "logging.eval_samples=32"], "logging.eval_edits"),
        (["logging.eval_edit_steps=0"], "logging.eval_edit_steps"),
    ]
    for overrides, key in cases:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(TOY_CONFIG, base + overrides)
    cfg = load_config(TOY_CONFIG, base + ["checkpoint.best_metric=val/success/recolor"])  # a per-task success
    assert cfg.checkpoint.best_mode == "max"


# ------------------------------------------------------------------------ kills during a save (toy runs)
EVAL = [
    f"data.val_shards={TOY_VAL}",
    "train.steps=6",
    "checkpoint.every=2",
    "checkpoint.keep=1",
    "logging.images_every=0",
    "logging.eval_every=2",
    "logging.eval_samples=4",
    "logging.eval_edits=2",
    "logging.eval_edit_steps=1",
    "checkpoint.best_metric=val/flow_loss",
    "checkpoint.best_mode=min",
]


def _ckpt_dir(run: str) -> str:
    return os.path.join(run, "toy", "checkpoints")


def _flow_losses(run: str) -> dict[int, float]:
    return {r["step"]: r["val"]["val/flow_loss"] for r in read_records(run) if "val" in r}


@pytest.mark.multiprocess
@pytest.mark.parametrize("where", ["before the commit", "while moving best"])
def test_kill_during_save_leaves_best_on_a_complete_checkpoint(tmp_path, where):
    run = str(tmp_path)
    faults = (
        Faults(toy_eval=True, crash_in_save_at_step=4)
        if where == "before the commit"
        else Faults(toy_eval=True, crash_in_best_at_step=4)
    )
    ranks = start_ranks(1, run, EVAL, faults=faults)
    assert ranks.wait(180) == [-signal.SIGKILL], ranks.output()[-3000:]
    flow = _flow_losses(run)
    assert flow[4] < flow[2]  # step 4 was an improvement: its save would have moved `best`
    pointer = read_best(_ckpt_dir(run))
    assert pointer["tag"] == step_tag(2) and pointer["value"] == flow[2]
    assert resolve_tag(_ckpt_dir(run), "best") == os.path.join(_ckpt_dir(run), step_tag(2))  # complete
    with open(os.path.join(_ckpt_dir(run), "latest")) as f:
        assert f.read() == step_tag(2 if where == "before the commit" else 4)
    # resumed, the run moves `best` on as it improves, and removes the torn temporaries
    run_ranks(1, run, EVAL, resume="auto", tag="resume", faults=Faults(toy_eval=True))
    flow = _flow_losses(run)
    best_step = min(flow, key=lambda s: (flow[s], s))
    assert read_best(_ckpt_dir(run))["step"] == best_step
    resolve_tag(_ckpt_dir(run), "best")  # complete
    assert not any(n.startswith(".tmp-") for n in os.listdir(_ckpt_dir(run)))
