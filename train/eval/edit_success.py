"""Did an edit succeed? Yes or no per sample, judged over the user's whole box, with the reason it failed.

Pixel errors (L1, IoU) say how far an edit is from the target, not whether it did what was asked. This
checker compares the edit with the target pixel by pixel inside the box, split into what the edit must
change and what it must keep, so a flat fill of the box (the paint bucket), the source returned, or
noise fail it, while an edit that draws the right object, pattern and background passes with the
error a decoder leaves. It reads only images: source, target, edit and the box, so it judges any
data set that has targets (the synthetic world's ``check`` field only says which checker applies).

Conventions as in ``train.eval.evaluation``: images ``[B, 3, H, W]`` in ``[0, 1]``, masks ``[B, 1, H, W]``,
any resolution. Two pixels *match* when their RGB distance is below :data:`MATCH` (half the closest
palette pair's distance, so no pixel matches two palette colours). Regions, per sample:

* the box: the user's coarse mask (the whole image for a style edit); its *fringe* is the box grown
  by :func:`dilation_px` pixels, which a resized edge smears into;
* ``must change``: pixels of the fringe where the target does not match the source (the object that
  appears, changes colour or disappears; every pixel a style changes);
* ``must keep``: pixels of the box farther than the fringe width from ``must change``: the
  background inside the box, which the edit must leave as it is.

Criteria, in the order a failure is reported (:data:`CRITERIA`); success needs all of them:

* ``outside``: outside the fringe, the mean L1 to the target is <= :data:`MAX_L1_OUTSIDE` and a share
  >= :data:`MIN_OUTSIDE_MATCH` of the pixels match it (a mean alone forgives a visible change to a
  part of the image);
* ``box_background``: a share >= :data:`MIN_KEEP` of ``must keep`` matches the target;
* ``shape``: the pixels the edit changed (no longer matching the source, inside the fringe) against
  ``must change``: IoU >= :data:`MIN_SHAPE_IOU`;
* ``colour``: the mean colour of the edit over ``must change`` is within :data:`MAX_COLOUR_DIST` of
  the target's;
* ``pattern``: a share >= :data:`MIN_MATCH` of ``must change`` matches the target pixel for pixel: the
  finish (stripes, checks, shading) of a drawn or recoloured object, the background texture under a
  removed one, every pixel of a style;
* ``closer`` (style only): L1 to the target below :data:`STYLE_MAX_RATIO` x the source's, so returning
  the source fails by construction.

Samples whose check has no ``version`` (the first world, ``data.world_v1``) are judged by the first
checker, :mod:`train.eval.edit_success_v1`. A sample without a check gets NaN: success unavailable, left
out of the means.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from train.eval import edit_success_v1

MATCH = 0.14  # half the RGB distance of the closest palette pair (yellow and orange, 0.28 in [0, 1])
MAX_L1_OUTSIDE = 0.05
MIN_OUTSIDE_MATCH = 0.95
MIN_KEEP = 0.85
MIN_SHAPE_IOU = 0.6
MAX_COLOUR_DIST = 0.1
MIN_MATCH = 0.65
STYLE_MAX_RATIO = 0.5
CHECKED_TASKS = ("recolor", "remove", "replace", "add", "style")
CRITERIA = ("outside", "box_background", "shape", "colour", "pattern", "closer")


def dilation_px(size: int) -> int:
    """The fringe's width: 1 px up to 64 px images, 2 px at 128 (a resized edge's width)."""
    return max(1, round(size / 64))


def dilate(mask: Tensor, px: int) -> Tensor:
    """[B, 1, H, W] bool: the mask grown by ``px`` pixels (square neighbourhood)."""
    return F.max_pool2d(mask.float(), 2 * px + 1, stride=1, padding=px) > 0


def matches(a: Tensor, b: Tensor) -> Tensor:
    """[B, 1, H, W] bool: RGB distance below :data:`MATCH`."""
    return (a.float() - b.float()).pow(2).sum(dim=1, keepdim=True).sqrt() < MATCH


def _count(mask: Tensor) -> Tensor:
    return mask.flatten(1).sum(1).float()


def _share(good: Tensor, region: Tensor, empty: float) -> Tensor:
    """[B]: |good & region| / |region|; ``empty`` where the region is empty."""
    n = _count(region)
    return torch.where(n > 0, _count(good & region) / n.clamp(min=1), torch.full_like(n, empty))


def regions(source: Tensor, target: Tensor, box: Tensor) -> dict[str, Tensor]:
    """The fringe, ``must change``, ``must keep`` and outside, each [B, 1, H, W] bool (module docstring)."""
    px = dilation_px(min(box.shape[-2:]))
    inside = box.float() >= 0.5
    fringe = dilate(inside, px)
    change = fringe & ~matches(target, source)
    return {"fringe": fringe, "change": change, "keep": inside & ~dilate(change, px), "outside": ~fringe}


def criteria(edit: Tensor, source: Tensor, target: Tensor, box: Tensor, style: Tensor) -> dict[str, Tensor]:
    """Every criterion of the module docstring, [B] bool each (``closer`` is True where ``style`` is False)."""
    r = regions(source, target, box)
    right = matches(edit, target)
    diff = (edit.float() - target.float()).abs().mean(dim=1, keepdim=True)
    outside = torch.where(_count(r["outside"]) > 0, _count(diff * r["outside"]) / _count(r["outside"]).clamp(min=1), 0)
    changed = r["fringe"] & ~matches(edit, source)
    union = _count(changed | r["change"])
    iou = torch.where(union > 0, _count(changed & r["change"]) / union.clamp(min=1), torch.ones_like(union))
    w = r["change"].float()
    n = w.flatten(1).sum(1).clamp(min=1)[:, None]
    mean_edit, mean_target = (edit.float() * w).sum((2, 3)) / n, (target.float() * w).sum((2, 3)) / n
    l1 = lambda a: (a.float() - target.float()).abs().flatten(1).mean(1)  # noqa: E731
    return {
        "outside": (outside <= MAX_L1_OUTSIDE) & (_share(right, r["outside"], 1.0) >= MIN_OUTSIDE_MATCH),
        "box_background": _share(right, r["keep"], 1.0) >= MIN_KEEP,
        "shape": iou >= MIN_SHAPE_IOU,
        "colour": (mean_edit - mean_target).norm(dim=1) <= MAX_COLOUR_DIST,
        "pattern": _share(right, r["change"], 1.0) >= MIN_MATCH,
        "closer": ~style | (l1(edit) < STYLE_MAX_RATIO * l1(source)),
    }


def _between(x: Tensor, dim: int) -> Tensor:
    """bool: True from the first to the last True along ``dim``."""
    return (x.cumsum(dim) > 0) & (x.flip(dim).cumsum(dim).flip(dim) > 0)


def box_of(fine_mask: Tensor) -> Tensor:
    """[B, 1, H, W] float: the box around each fine mask (the coarse mask the loader draws from it)."""
    m = fine_mask.float() >= 0.5
    rows, cols = m.any(dim=3, keepdim=True), m.any(dim=2, keepdim=True)  # [B, 1, H, 1], [B, 1, 1, W]
    return (_between(rows.int(), 2) & _between(cols.int(), 3)).float()


def edit_criteria(
    edit: Tensor,
    source: Tensor,
    target: Tensor,
    fine_mask: Tensor,
    tasks: Sequence[str],
    checks: Sequence[Optional[Mapping[str, Any]]],
    box: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """Each criterion and ``success``, [B] float each: 1.0 passed, 0.0 failed, NaN where the sample has no
    check, an unchecked task, or (for the criteria) a first-world check, which only gives ``success``.

    ``checks[i]`` is sample i's ``check`` dict from its shard JSON, or None; ``box`` the coarse masks
    (default: the box around each fine mask, which is how the loader draws them).
    """
    b = edit.shape[0]
    if not (len(tasks) == len(checks) == b):
        raise ValueError(f"{b} edits, {len(tasks)} tasks and {len(checks)} checks: must match")
    out = {name: torch.full((b,), math.nan) for name in (*CRITERIA, "success")}
    current = [i for i, (t, c) in enumerate(zip(tasks, checks)) if c is not None and c.get("version") == 2]
    if current:
        pick = torch.tensor(current)
        boxes = (box if box is not None else box_of(fine_mask))[pick]
        style = torch.tensor([tasks[i] == "style" for i in current])
        boxes = torch.where(style[:, None, None, None], torch.ones_like(boxes), boxes.float())
        result = criteria(edit[pick], source[pick], target[pick], boxes, style)
        for name, ok in result.items():
            out[name][pick] = ok.float()
        out["success"][pick] = torch.stack(list(result.values())).all(dim=0).float()
    first = [i for i, c in enumerate(checks) if c is not None and "version" not in c]
    if first:
        pick = torch.tensor(first)
        out["success"][pick] = edit_success_v1.edit_success(
            edit[pick],
            source[pick],
            target[pick],
            fine_mask[pick],
            [tasks[i] for i in first],
            [checks[i] for i in first],
        )
    unknown = torch.tensor([t not in CHECKED_TASKS for t in tasks])
    for v in out.values():
        v[unknown] = math.nan
    return out


def edit_success(
    edit: Tensor,
    source: Tensor,
    target: Tensor,
    fine_mask: Tensor,
    tasks: Sequence[str],
    checks: Sequence[Optional[Mapping[str, Any]]],
    box: Optional[Tensor] = None,
) -> Tensor:
    """[B] float: 1.0 success, 0.0 failure, NaN where the sample has no check (or an unchecked task)."""
    return edit_criteria(edit, source, target, fine_mask, tasks, checks, box)["success"]


def first_failure(result: Mapping[str, Tensor], i: int) -> Optional[str]:
    """The first criterion sample ``i`` failed, in :data:`CRITERIA` order; None if it passed or has none."""
    for name in CRITERIA:
        v = result.get(name)
        if v is not None and v[i].item() == 0.0:
            return name
    return None
