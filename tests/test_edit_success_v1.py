"""The first checker (``train.eval.edit_success_v1``) on the first world (``data.world_v1``) is unchanged:
real generated samples, resolution by resolution, and small hand-made cases for each criterion; the
first world's samples are the same as before, and the current checker hands their checks to it.

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
from data.world_v1 import COLORS, make_sample
from train.eval.edit_success_v1 import (
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


def test_first_world_samples_are_reproduced_bit_for_bit():
    """The digest of 24 samples as the first world's generator wrote them before the current world
    replaced it (data/synthetic.py at that time): ``--world v1`` still writes them."""
    import hashlib
    import json

    import numpy as np

    from data.synthetic import make_sample as make_any

    h = hashlib.sha256()
    for split in ("train", "val"):
        for i in range(12):
            r = make_any(0, split, i, 64, "v1")
            for im in (r.src, r.tgt, r.ref):
                if im is not None:
                    h.update(np.asarray(im).tobytes())
            h.update(r.mask.tobytes())
            h.update(r.instruction.encode())
            h.update(json.dumps(r.extra, sort_keys=True).encode())
    assert h.hexdigest() == "11721a1f3f3f435472c4fdf089ab11b6d1b30d6c2072a783fae4196526fd5a88"


def test_current_checker_judges_first_world_checks_with_the_first_checker():
    from train.eval.edit_success import edit_criteria

    src, tgt, mask, tasks, checks = _real_samples(64, 30)
    for edit in (tgt, src, (src + tgt) / 2):
        got = edit_criteria(edit, src, tgt, mask, tasks, checks)
        assert torch.equal(got["success"], edit_success(edit, src, tgt, mask, tasks, checks))
        assert got["shape"].isnan().all()  # the first checker has no per-criterion verdicts
