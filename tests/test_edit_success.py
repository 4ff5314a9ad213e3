"""The success checker is right: per task, the oracle passes and every editor that needs no model fails;
edits that are right up to a decoder's error pass; each criterion fails the edit it is for, and only it;
the evaluation reports every baseline row and why edits failed.

Samples are validation samples written at 128 px and resized by the loader's own transform, as the
evaluation sees them.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data import augment, world
from data.synthetic import make_sample
from train.eval import BASELINES, baseline_edits
from train.eval.edit_success import CRITERIA, box_of, edit_criteria, edit_success, first_failure

N_SAMPLES = 200  # about 40 a task: 5% is two samples


def _samples(size: int, n: int = N_SAMPLES, split: str = "val") -> dict:
    """Batched unit-range tensors of ``n`` samples at ``size`` px, with tasks, checks, boxes and bboxes."""
    out = defaultdict(list)
    for i in range(n):
        rec = make_sample(0, split, i, 128)
        d = augment.transform(rec.src, rec.tgt, rec.ref, rec.mask, (size, size), None)
        for k in ("source", "target"):
            out[k].append(augment.to_float(d[k]).add(1).div(2))
        ref = d["reference"]
        out["reference"].append(augment.to_float(ref).add(1).div(2) if ref is not None else torch.ones(3, size, size))
        out["has_reference"].append(ref is not None)
        out["fine"].append(d["fine_mask"])
        out["box"].append(d["coarse_mask"])
        out["bbox"].append(torch.tensor(d["bbox"]))
        out["tasks"].append(rec.task)
        out["checks"].append(rec.extra["check"])
    batch = {k: torch.stack(v) for k, v in out.items() if k not in ("tasks", "checks", "has_reference")}
    return batch | {"has_reference": torch.tensor(out["has_reference"]), "tasks": out["tasks"], "checks": out["checks"]}


@pytest.fixture(scope="module", params=[64, 128])
def samples(request):
    return _samples(request.param)


def _rates(s: dict, edit: torch.Tensor) -> dict[str, float]:
    ok = edit_success(edit, s["source"], s["target"], s["fine"], s["tasks"], s["checks"], s["box"])
    assert not ok.isnan().any()
    per = defaultdict(list)
    for t, v in zip(s["tasks"], ok.tolist()):
        per[t].append(v)
    return {t: sum(v) / len(v) for t, v in per.items()}


def test_oracle_passes_and_every_baseline_fails_on_every_task(samples):
    s = samples
    rows = baseline_edits(
        s["source"], s["target"], s["reference"], s["has_reference"], s["box"], s["bbox"], s["tasks"], s["checks"]
    )
    assert set(rows) == set(BASELINES)
    rates = {name: _rates(s, edit) for name, edit in rows.items()}
    assert set(rates["oracle"]) == {"add", "recolor", "remove", "replace", "style"}
    assert min(rates["oracle"].values()) >= 0.98, rates["oracle"]
    for name in ("do_nothing", "noise", "paint_bucket", "paint_bucket_target_colour", "copy_reference"):
        assert max(rates[name].values()) <= 0.05, (name, rates[name])


def test_edits_right_up_to_a_decoders_error_pass(samples):
    s, tgt = samples, samples["target"]
    g = torch.Generator().manual_seed(0)
    k = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    near = {
        "noise 0.03": tgt + 0.03 * torch.randn(tgt.shape, generator=g),
        "brighter by 8/255": tgt + 8 / 255,
        "15 levels": (tgt * 15).round() / 15,
    }
    if tgt.shape[-1] <= 64:  # a 3x3 blur at 64 px; at 128 px patterns must be drawn sharper
        near["3x3 blur"] = F.conv2d(F.pad(tgt, (1, 1, 1, 1), mode="replicate"), k.expand(3, 1, 3, 3), groups=3)
    for name, edit in near.items():
        rates = _rates(s, edit.clamp(0, 1))
        assert min(rates.values()) >= 0.95, (name, rates)


# ----------------------------------------------------------------------------- one criterion at a time
def _judge(bg, objs_src, objs_tgt, objs_edit, size=64, style=None, edit_img=None):
    """Criteria of one hand-built edit of a scene drawn by the world's own renderer."""
    to = lambda a: torch.from_numpy(a).float().div(255).permute(2, 0, 1)[None]  # noqa: E731
    src, tgt = world.render(bg, objs_src, size), world.render(bg, objs_tgt, size)
    if style:
        tgt = world.apply_style(src, style)
    edit = to(edit_img) if edit_img is not None else to(world.render(bg, objs_edit, size))
    diff = np.abs(src.astype(int) - tgt.astype(int)).sum(-1) > 0
    fine = torch.from_numpy(diff).float()[None, None]
    task, check = ("style", {"version": 2}) if style else ("add", {"version": 2})
    res = edit_criteria(edit, to(src), to(tgt), fine, [task], [check], box_of(fine))
    return {c: res[c].item() for c in (*CRITERIA, "success")}, first_failure(res, 0)


BG = dict(kind="stripes", c0=[120, 150, 170], c1=[170, 130, 110], angle=0.4, amp=40, tint=[1, 0.9, 0.8])
BG.update(period=0.14, tex_angle=0.7)
OBJ = dict(shape="circle", color="red", finish="striped", cx=0.5, cy=0.5, r=0.25)


def test_each_criterion_fails_the_edit_it_is_for():
    add = ([], [OBJ])
    # the right edit
    verdict, why = _judge(BG, *add, [OBJ])
    assert verdict["success"] == 1.0 and why is None
    # the object in the wrong colour (same shape and finish)
    verdict, why = _judge(BG, *add, [dict(OBJ, color="blue")])
    assert why == "colour" and verdict["shape"] == 1.0 and verdict["box_background"] == 1.0
    # the right shape and mean colour, but flat: no stripes
    to = lambda a: torch.from_numpy(a).float()  # noqa: E731
    flat = world.render(BG, [OBJ], 64)
    m = world.shape_mask("circle", 0.5, 0.5, 0.25, 64)
    flat[m] = to(flat)[torch.from_numpy(m)].mean(0).round().byte().numpy()
    verdict, why = _judge(BG, *add, None, edit_img=flat)
    assert why == "pattern" and verdict["colour"] == 1.0 and verdict["shape"] == 1.0
    # the right finish in the wrong shape: a square fills the circle's box, over its background
    verdict, why = _judge(BG, *add, [dict(OBJ, shape="square", r=0.25 / 0.82)])
    assert why == "box_background"
    # half of the object missing: what changed is not the object's shape
    verdict, why = _judge(BG, *add, [dict(OBJ, r=0.25 * 0.6)])
    assert verdict["shape"] == 0.0 and verdict["box_background"] == 1.0
    # the right object, and a colour cast over the rest of the image
    cast = world.render(BG, [OBJ], 64).astype(np.int16)
    cast[:, :, 2] += np.where(np.arange(64) < 12, 40, 0)[None, :]  # the left fifth, outside the box, bluer
    verdict, why = _judge(BG, *add, None, edit_img=cast.clip(0, 255).astype(np.uint8))
    assert why == "outside" and sum(v == 0.0 for v in verdict.values()) == 2  # outside, and so success
    # a removal that fills the hole with the mean colour around it, against the striped background
    ring = world.render(BG, [], 64)[np.logical_xor(world.shape_mask("circle", 0.5, 0.5, 0.3, 64), m)].mean(0)
    patched = world.render(BG, [OBJ], 64)
    patched[m] = ring.round().astype(np.uint8)
    verdict, why = _judge(BG, [OBJ], [], None, edit_img=patched)
    assert why == "pattern" and verdict["outside"] == 1.0


def test_a_style_needs_the_style_not_the_source():
    src = world.render(BG, [OBJ], 64)
    verdict, why = _judge(BG, [OBJ], [OBJ], None, style="sepia", edit_img=src)
    assert verdict["success"] == 0.0 and verdict["closer"] == 0.0
    verdict, why = _judge(BG, [OBJ], [OBJ], None, style="sepia", edit_img=world.apply_style(src, "sepia"))
    assert verdict["success"] == 1.0
    verdict, why = _judge(BG, [OBJ], [OBJ], None, style="sepia", edit_img=world.apply_style(src, "grayscale"))
    assert verdict["success"] == 0.0


def test_box_of_is_the_loaders_box():
    for i in range(20):
        rec = make_sample(0, "val", i, 128)
        d = augment.transform(rec.src, rec.tgt, rec.ref, rec.mask, (64, 64), None)
        assert torch.equal(box_of(d["fine_mask"][None])[0], d["coarse_mask"])


def test_missing_checks_and_unknown_tasks_are_unavailable():
    s = _samples(32, 6)
    checks = [None] + s["checks"][1:]
    tasks = ["text"] + s["tasks"][1:2] + s["tasks"][2:]
    out = edit_criteria(s["target"], s["source"], s["target"], s["fine"], tasks, checks, s["box"])
    assert all(math.isnan(out[c][0].item()) for c in out)
    assert (out["success"][1:] == 1.0).all()
    with pytest.raises(ValueError, match="must match"):
        edit_success(s["target"], s["source"], s["target"], s["fine"], s["tasks"][:2], checks)


# ------------------------------------------------------------------------------------------ evaluate()
class _CopyModel:
    """A stand-in editor that returns the batch's target (or source): evaluate() must score it as the
    oracle (or do-nothing) row."""

    def __init__(self, field: str):
        self.field = field

    def edit(self, batch, num_steps, text_guidance, image_guidance, generator):
        from types import SimpleNamespace

        return SimpleNamespace(
            images=getattr(batch, self.field), refined_mask=batch.fine_mask, utilisation={"text": 0.25, "mask": 0.75}
        )


def _val_shards(tmp_path, with_checks: bool = True, n: int = 20) -> str:
    from data.shards import write_shards

    records = []
    for i in range(n):
        rec = make_sample(0, "val", i, 128)
        if not with_checks:
            rec.extra = {}
        records.append(rec)
    return write_shards(records, str(tmp_path), prefix="val", max_count=8, progress=False).pattern


def _evaluate(model, pattern: str, limit: int, group_by_task: bool = True) -> dict:
    from data.config import DataConfig
    from train.eval import EvalSettings, evaluate, iterate_heldout

    settings = EvalSettings(steps=1, limit=limit, batch_size=6, flow_loss=False, group_by_task=group_by_task)
    cfg = DataConfig(image_size=64, shuffle_buffer=1)
    return evaluate(model, iterate_heldout(cfg, pattern, settings.batch_size, limit), settings)


def test_evaluate_reports_every_baseline_row_and_why_edits_failed(tmp_path):
    pattern = _val_shards(tmp_path)
    for field, expected in (("target", 1.0), ("source", 0.0)):
        for group_by_task in (True, False):
            res = _evaluate(_CopyModel(field), pattern, limit=17, group_by_task=group_by_task)
            assert res["num_samples"] == res["num_checked"] == 17 and "success" not in res["skipped_metrics"]
            assert res["metrics"]["success"] == expected and res["metrics"]["success_mean_over_tasks"] == expected
            assert {t: d["success"] for t, d in res["per_task"].items()} == {t: expected for t in res["per_task"]}
            assert sum(d["count"] for d in res["per_task"].values()) == 17
            assert len(res["samples"]) == 17 and {s["success"] for s in res["samples"]} == {expected}
    # the source copied: every sample failed, and says why (nothing changed: shape and pattern)
    assert all("shape" in s["failed"] and "pattern" in s["failed"] for s in res["samples"])
    assert res["metrics"]["fail_shape"] == 1.0 and res["metrics"]["fail_outside"] == 0.0
    base = res["baselines"]
    assert set(base) == set(BASELINES)
    assert base["oracle"]["metrics"]["success"] == 1.0 and base["oracle"]["metrics"]["l1_outside_box"] == 0.0
    for name in ("do_nothing", "paint_bucket", "noise", "copy_reference"):
        assert base[name]["metrics"]["success"] == 0.0, name
    assert base["oracle"]["mask_iou_of"] == "fine mask" and base["paint_bucket"]["mask_iou_of"] == "coarse box"
    # the source-copy model's row equals the do-nothing row on the metrics they share, but IoU
    for k in ("l1", "l1_inside", "l1_outside", "l1_outside_box", "success", "fail_pattern"):
        assert res["metrics"][k] == pytest.approx(base["do_nothing"]["metrics"][k]), k


def test_evaluate_on_shards_without_checks_reports_success_unavailable(tmp_path):
    from train.eval import format_table

    res = _evaluate(_CopyModel("target"), _val_shards(tmp_path, with_checks=False), limit=8)
    assert res["num_samples"] == 8 and res["num_checked"] == 0
    assert "'check'" in res["skipped_metrics"]["success"]
    assert math.isnan(res["metrics"]["success"]) and math.isnan(res["baselines"]["oracle"]["metrics"]["success"])
    assert res["metrics"]["l1"] == 0.0  # the other metrics are there
    assert "success unavailable" in format_table(res)


def test_report_table_and_plot(tmp_path, monkeypatch):
    import sys

    from PIL import Image

    from train.eval import ROW_NAMES, format_table, plot_results

    res = _evaluate(_CopyModel("source"), _val_shards(tmp_path), limit=12)
    lines = format_table(res).splitlines()
    names = [ROW_NAMES[k] for k in ("model", *BASELINES)]
    header, rows = lines[0].split(), {ln.split()[0]: ln.split()[1:] for ln in lines[1 : 1 + len(names)]}
    assert set(rows) == set(names)
    tasks = sorted(res["per_task"])
    assert header[: 2 * len(tasks) + 2] == [w for t in tasks + ["mean"] for w in ("success", t)]
    assert rows["oracle"][: len(tasks) + 1] == ["1.000"] * (len(tasks) + 1)
    for name in ("model", "do-nothing", "paint-bucket", "noise"):
        assert rows[name][: len(tasks) + 1] == ["0.000"] * (len(tasks) + 1), name
    text = "\n".join(lines)
    assert "coarse box" in text and "12 of 12 samples" in text
    assert "model's edits failing each criterion:" in text and "shape 100%" in text
    res = _evaluate(_CopyModel("target"), _val_shards(tmp_path / "t"), limit=12)

    def bar_heights(img: Image.Image, colour: tuple) -> int:
        """Tallest column of the colour in the first (success) panel's plot, below its legend."""
        arr = np.asarray(img.convert("RGB"))[40 : img.height // 3]
        return int((arr == colour).all(-1).sum(0).max())

    plots = [("pil", True)] + ([("matplotlib", False)] if _has_matplotlib() else [])
    for name, hide_matplotlib in plots:
        with monkeypatch.context() as m:
            if hide_matplotlib:
                m.setitem(sys.modules, "matplotlib", None)  # import fails: the PIL fallback draws
            plot_results(res, str(tmp_path / f"{name}.png"))
        img = Image.open(tmp_path / f"{name}.png")
        assert img.width >= 640 and img.height > 400
        # model (copies the target) and oracle bars reach 1.0, do-nothing's (grey) have no height
        model, oracle = bar_heights(img, (60, 120, 200)), bar_heights(img, (90, 170, 90))
        assert model > 50 and abs(model - oracle) <= 2 and bar_heights(img, (170, 170, 170)) < 0.1 * model, name


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
