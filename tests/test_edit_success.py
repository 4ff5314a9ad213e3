"""The edit-success checker is right: real generated samples, resolution by resolution, and small
hand-made cases for each criterion.

* on validation samples at 32, 64 and 128 px (resized by the loader's own transform), the target
  succeeds on every sample of every task, and the source (do-nothing), Gaussian noise, another
  sample's target, and noise or another target pasted inside the mask only, almost never do;
* hand-made 16 px scenes: a recolor to the wrong colour, a remove that leaves the object, a
  replace that leaves the old object, an edit that damages the background outside the mask, and
  a style edit returning the source all fail; the right edits pass;
* samples without a check are NaN (unavailable), and a check lacking a colour is refused by name.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch

from data import augment
from data.synthetic import COLORS, make_sample
from train.eval.edit_success import (
    COLOR_RADIUS,
    MAX_L1_OUTSIDE,
    color_iou,
    dilate,
    edit_success,
    leftover_fraction,
    task_success,
)

N_SAMPLES = 60


def _real_samples(size: int, n: int = N_SAMPLES):
    """(source, target, fine mask, tasks, checks) of val samples written at 128 px, resized to ``size``
    exactly as the evaluation loader does."""
    src, tgt, masks, tasks, checks = [], [], [], [], []
    for i in range(n):
        rec = make_sample(0, "val", i, 128)
        d = augment.transform(rec.src, rec.tgt, rec.ref, rec.mask, (size, size), None)
        src.append((augment.to_float(d["source"]) + 1) / 2)
        tgt.append((augment.to_float(d["target"]) + 1) / 2)
        masks.append(d["fine_mask"])
        tasks.append(rec.task)
        checks.append(rec.extra["check"])
    return torch.stack(src), torch.stack(tgt), torch.stack(masks), tasks, checks


def _rate_per_task(success: torch.Tensor, tasks: list[str]) -> dict[str, float]:
    per = defaultdict(list)
    for t, v in zip(tasks, success.tolist()):
        per[t].append(v)
    return {t: sum(v) / len(v) for t, v in per.items()}


@pytest.mark.parametrize("size", [32, 64, 128])
def test_targets_succeed_and_sources_noise_and_other_targets_fail(size):
    src, tgt, mask, tasks, checks = _real_samples(size)
    assert set(tasks) == {"recolor", "remove", "replace", "add", "style"}
    g = torch.Generator().manual_seed(size)
    inside = mask.expand_as(tgt) > 0
    noise = (0.5 + 0.25 * torch.randn(tgt.shape, generator=g)).clamp(0, 1)
    other = tgt[torch.roll(torch.arange(len(tasks)), 1)]
    oracle = edit_success(tgt, src, tgt, mask, tasks, checks)
    assert not oracle.isnan().any()
    assert _rate_per_task(oracle, tasks) == {t: 1.0 for t in set(tasks)}
    for name, edit, most in (
        ("do-nothing", src, 0.0),
        ("noise", noise, 0.0),
        ("other target", other, 0.0),
        ("noise inside the mask", torch.where(inside, noise, src), 0.0),
        ("other target inside the mask", torch.where(inside, other, src), 0.15),
    ):
        rates = _rate_per_task(edit_success(edit, src, tgt, mask, tasks, checks), tasks)
        assert max(rates.values()) <= most, (name, rates)


def test_target_with_mild_noise_still_succeeds_on_object_edits():
    """Not a pixel-exact test: a target off by N(0, 0.03) per channel (a good but imperfect edit) passes."""
    src, tgt, mask, tasks, checks = _real_samples(64)
    g = torch.Generator().manual_seed(1)
    edit = (tgt + 0.03 * torch.randn(tgt.shape, generator=g)).clamp(0, 1)
    rates = _rate_per_task(edit_success(edit, src, tgt, mask, tasks, checks), tasks)
    assert min(rates[t] for t in ("recolor", "remove", "replace", "add")) >= 0.95, rates


# ------------------------------------------------------------------------------------------ hand-made
SIZE = 16
BG = (0.6, 0.6, 0.6)


def _rgb(name: str) -> tuple[float, float, float]:
    return tuple(v / 255 for v in COLORS[name])


def _scene(objects: list[tuple[str, slice, slice]]) -> torch.Tensor:
    """[1, 3, 16, 16] grey image with square objects (colour name, rows, cols)."""
    img = torch.tensor(BG).view(1, 3, 1, 1).repeat(1, 1, SIZE, SIZE)
    for name, rows, cols in objects:
        img[0, :, rows, cols] = torch.tensor(_rgb(name)).view(3, 1, 1)
    return img


def _mask(rows: slice, cols: slice) -> torch.Tensor:
    m = torch.zeros(1, 1, SIZE, SIZE)
    m[0, 0, rows, cols] = 1
    return m


OBJ = (slice(4, 10), slice(4, 10))
NEIGHBOUR = ("green", slice(12, 15), slice(12, 15))


def _check(color=None, old=None) -> dict:
    out = {}
    if color:
        out.update(color=color, rgb=list(COLORS[color]))
    if old:
        out.update(old_color=old, old_rgb=list(COLORS[old]))
    return out


def test_recolor_with_the_wrong_colour_fails():
    src, tgt = _scene([("red", *OBJ), NEIGHBOUR]), _scene([("blue", *OBJ), NEIGHBOUR])
    mask, check = _mask(*OBJ), _check("blue", "red")
    assert task_success("recolor", tgt, src, tgt, mask, [check]).item()
    assert not task_success("recolor", _scene([("purple", *OBJ), NEIGHBOUR]), src, tgt, mask, [check]).item()
    half = tgt.clone()
    half[0, :, 4:10, 4:7] = torch.tensor(_rgb("red")).view(3, 1, 1)  # half recoloured: IoU 1/2, red left 1/2
    assert not task_success("recolor", half, src, tgt, mask, [check]).item()
    # the neighbour of the same colour as the new one is not counted as the edit's success
    region = dilate(torch.ones(1, 1, SIZE, SIZE), 1)
    assert color_iou(src, src, _scene([("green", *OBJ), NEIGHBOUR]), region, torch.tensor([_rgb("green")])).item() == 0


def test_remove_that_leaves_the_object_fails_and_restoring_background_passes():
    src, tgt = _scene([("orange", *OBJ), NEIGHBOUR]), _scene([NEIGHBOUR])
    mask, check = _mask(*OBJ), _check(old="orange")
    assert task_success("remove", tgt, src, tgt, mask, [check]).item()
    assert not task_success("remove", src, src, tgt, mask, [check]).item()
    # the object gone but the hole filled with another palette colour: not background
    assert not task_success("remove", _scene([("cyan", *OBJ), NEIGHBOUR]), src, tgt, mask, [check]).item()
    # a colour within COLOR_RADIUS of orange still counts as orange: left over
    near = tgt.clone()
    near[0, :, 4:10, 4:10] = (torch.tensor(_rgb("orange")) + COLOR_RADIUS / 2 / 3**0.5).view(3, 1, 1)
    region = dilate(mask, 1)
    assert leftover_fraction(near, src, tgt, region, torch.tensor([_rgb("orange")])).item() == 1.0


def test_replace_that_leaves_the_old_object_fails():
    # a red square replaced by a blue bar inside it: the bar painted but the rest left red fails
    # (leftover); a same-colour replacement returned as the source fails too (colour IoU 0)
    bar = (slice(4, 10), slice(6, 8))
    src, tgt = _scene([("red", *OBJ)]), _scene([("blue", *bar)])
    mask, check = _mask(*OBJ), _check("blue", "red")
    assert task_success("replace", tgt, src, tgt, mask, [check]).item()
    both = _scene([("red", *OBJ), ("blue", *bar)])
    region = dilate(mask, 1)
    assert color_iou(both, src, tgt, region, torch.tensor([_rgb("blue")])).item() == 1.0
    assert not task_success("replace", both, src, tgt, mask, [check]).item()
    same_tgt = _scene([("red", *bar)])
    assert task_success("replace", same_tgt, src, same_tgt, mask, [_check("red", "red")]).item()
    assert not task_success("replace", src, src, same_tgt, mask, [_check("red", "red")]).item()
    # ... and so does erasing it: the bar inside the old square must stay red (kept)
    erased = _scene([])
    assert color_iou(erased, src, same_tgt, region, torch.tensor([_rgb("red")])).item() == 1.0  # vacuous
    assert not task_success("replace", erased, src, same_tgt, mask, [_check("red", "red")]).item()


def test_edit_that_damages_the_background_outside_the_mask_fails():
    src, tgt = _scene([("red", *OBJ), NEIGHBOUR]), _scene([("blue", *OBJ), NEIGHBOUR])
    mask, check = _mask(*OBJ), _check("blue", "red")
    damaged = tgt.clone()
    damaged[0, :, 0:3, :] = 1.0  # 3 white rows: 3*16 px of 220 outside, each off by 0.4 -> L1 0.087
    assert (damaged - tgt).abs().mean(1)[0, 0:3].sum() / (SIZE * SIZE - 36) > MAX_L1_OUTSIDE
    for task in ("recolor", "add", "replace"):
        assert task_success(task, tgt, src, tgt, mask, [check]).item()
        assert not task_success(task, damaged, src, tgt, mask, [check]).item()


def test_style_returning_the_source_fails():
    src = _scene([("red", *OBJ)])
    tgt = 1 - src
    full = torch.ones(1, 1, SIZE, SIZE)
    assert task_success("style", tgt, src, tgt, full, [{"style": "invert"}]).item()
    assert not task_success("style", src, src, tgt, full, [{"style": "invert"}]).item()
    # halfway to the target is not "much closer" (ratio 0.5 is the bound, strict)
    assert not task_success("style", (src + tgt) / 2, src, tgt, full, [{"style": "invert"}]).item()


def test_missing_checks_are_unavailable_and_bad_checks_are_refused():
    src, tgt = _scene([("red", *OBJ)]), _scene([("blue", *OBJ)])
    mask = _mask(*OBJ)
    two = lambda x: x.repeat(2, 1, 1, 1)  # noqa: E731
    out = edit_success(two(tgt), two(src), two(tgt), two(mask), ["recolor", "text"], [None, {"x": 1}])
    assert all(math.isnan(v) for v in out.tolist())
    out = edit_success(two(tgt), two(src), two(tgt), two(mask), ["recolor", "recolor"], [_check("blue", "red"), None])
    assert out[0].item() == 1.0 and math.isnan(out[1].item())
    with pytest.raises(ValueError, match="'rgb'"):
        edit_success(tgt, src, tgt, mask, ["recolor"], [{"color": "blue", "old_rgb": [1, 2, 3]}])
    with pytest.raises(ValueError, match="must match"):
        edit_success(tgt, src, tgt, mask, ["recolor", "add"], [None])


def test_generator_records_the_check_matching_the_instruction():
    for i in range(40):
        rec = make_sample(0, "val", i, 64)
        check = rec.extra["check"]
        if rec.task == "style":
            assert set(check) == {"style"}
            continue
        if "rgb" in check:
            assert COLORS[check["color"]] == tuple(check["rgb"])
        if "old_rgb" in check:
            assert COLORS[check["old_color"]] == tuple(check["old_rgb"])
            assert check["old_color"] in rec.instruction
        if rec.task in ("recolor", "add"):
            assert check["color"] in rec.instruction
        assert ("rgb" in check) == (rec.task != "remove") and ("old_rgb" in check) == (rec.task != "add")


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
    cfg = DataConfig(image_size=32, shuffle_buffer=1)
    return evaluate(model, iterate_heldout(cfg, pattern, settings.batch_size, limit), settings)


def test_evaluate_reports_success_with_do_nothing_and_oracle_rows(tmp_path):
    pattern = _val_shards(tmp_path)
    for field, expected in (("target", 1.0), ("source", 0.0)):
        for group_by_task in (True, False):
            res = _evaluate(_CopyModel(field), pattern, limit=17, group_by_task=group_by_task)
            assert res["num_samples"] == res["num_checked"] == 17 and "success" not in res["skipped_metrics"]
            assert res["metrics"]["success"] == expected and res["metrics"]["success_mean_over_tasks"] == expected
            assert {t: d["success"] for t, d in res["per_task"].items()} == {t: expected for t in res["per_task"]}
            assert sum(d["count"] for d in res["per_task"].values()) == 17
    do_nothing, oracle = res["baselines"]["do_nothing"], res["baselines"]["oracle"]
    assert do_nothing["metrics"]["success"] == 0.0 and oracle["metrics"]["success"] == 1.0
    assert oracle["metrics"]["l1_inside"] == 0.0 and oracle["metrics"]["l1_outside"] == 0.0
    assert oracle["metrics"]["mask_iou"] == 1.0 and oracle["mask_iou_of"] == "fine mask"
    # resized to 32 px, edge pixels just outside the fine mask are blends: small, not 0
    assert do_nothing["metrics"]["l1_outside"] < 0.01 and do_nothing["metrics"]["l1_inside"] > 0.05
    # do-nothing's IoU is the coarse box's: below 1 (objects are not boxes), above 0 (it covers them)
    assert 0.3 < do_nothing["metrics"]["mask_iou"] < 1.0 and do_nothing["mask_iou_of"] == "coarse box"
    # the source-copy model's row equals the do-nothing row on the metrics they share, but IoU
    for k in ("l1", "l1_inside", "l1_outside", "success"):
        assert res["metrics"][k] == pytest.approx(do_nothing["metrics"][k]), k


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

    from train.eval import format_table, plot_results

    res = _evaluate(_CopyModel("target"), _val_shards(tmp_path), limit=12)
    lines = format_table(res).splitlines()
    header, rows = lines[0].split(), {ln.split()[0]: ln.split()[1:] for ln in lines[1:4]}
    assert set(rows) == {"model", "do-nothing", "oracle"}
    tasks = sorted(res["per_task"])
    assert header[: 2 * len(tasks) + 2] == [w for t in tasks + ["mean"] for w in ("success", t)]
    assert rows["oracle"][: len(tasks) + 1] == ["1.000"] * (len(tasks) + 1)
    assert rows["do-nothing"][: len(tasks) + 1] == ["0.000"] * (len(tasks) + 1)
    assert "coarse box" in lines[4] and "12 of 12 samples" in lines[5]
    import numpy as np

    def bar_heights(img: Image.Image, colour: tuple) -> int:
        """Tallest column of the colour in the first (success) panel."""
        arr = np.asarray(img.convert("RGB"))[: img.height // 3]
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
