"""The first success checker, for samples of the first synthetic world (``data.world_v1``, whose check
has no ``version``): kept so results on that world stay reproducible. ``train.eval.edit_success`` calls it.

It judges colour only inside the fine mask widened by a pixel and never looks at shape, so a flat fill
of the box in the named colour passes most of its edits; :mod:`train.eval.edit_success` is the checker
that the current world is scored by.

Pixel errors (L1, IoU) say how far an edit is from the target, not whether it did what was asked:
a do-nothing edit scores a low L1 on a small recolor. These checks answer yes or no per sample,
from the ``check`` dict that ``data.synthetic`` writes into each sample's JSON (what the target
must contain: the named colour, the removed object's colour, the style) and from the target
image itself (which pixels the object covers, at whatever resolution the evaluation runs).

Conventions as in ``train.eval.evaluation``: images ``[B, 3, H, W]`` in ``[0, 1]``, masks
``[B, 1, H, W]`` in ``{0, 1}``, any resolution. A pixel *has* a palette colour when its RGB
distance to it is below :data:`COLOR_RADIUS`. ``region`` is the fine mask dilated by
:func:`dilation_px` pixels, so the soft edge pixels of a resized object are looked at too.

Criteria (each task also needs ``preserved``, except style whose mask is the whole image):

* ``preserved``: L1 to the target outside the fine mask <= :data:`MAX_L1_OUTSIDE`.
* recolor / add / replace, ``colour IoU``: inside ``region``, the pixels where the edit has the
  new colour against the pixels where the target has it, IoU >= :data:`MIN_COLOR_IOU`. Pixels
  that have the colour in the source *and* the target (a neighbour of the same colour, a
  background stripe that happens to be close) are left out: they say nothing about the edit,
  and so the do-nothing edit scores exactly 0.
* recolor / add / replace, ``kept``: those pixels left out above, where they lie inside the fine
  mask (a new object overlapping an old one of the same colour), must keep the colour in the
  edit: a fraction >= 1 - :data:`MAX_LEFTOVER`. Without it, erasing a replaced object whose
  successor of the same colour lies inside it would pass.
* recolor / replace / remove, ``leftover``: of the pixels that have the old colour in the source
  but not in the target (the part of the old object that must change), the fraction still of the
  old colour in the edit is <= :data:`MAX_LEFTOVER`. This fails an edit that paints the new
  object but leaves the old one beside it, which the colour IoU does not see.
* remove also needs the background back: L1 to the target inside the fine mask <=
  :data:`MAX_L1_REMOVED`.
* style: L1(edit, target) < :data:`STYLE_MAX_RATIO` x L1(source, target), so returning the
  source fails by construction.

A sample without a check (a shard written without it, a task these checks do not know) gets NaN:
success unavailable, left out of the means.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

# Half the closest palette pair's distance (yellow-orange, 0.30 in RGB [0, 1]): no pixel has two
# palette colours at once.
COLOR_RADIUS = 0.15
MIN_COLOR_IOU = 0.5
MAX_LEFTOVER = 0.2
# Filling the hole with the mean colour of the pixels around it scores at most 0.04 at 64 px.
MAX_L1_REMOVED = 0.06
MAX_L1_OUTSIDE = 0.05
STYLE_MAX_RATIO = 0.5
CHECKED_TASKS = ("recolor", "remove", "replace", "add", "style")


def dilation_px(size: int) -> int:
    """Dilation of the fine mask: 1 px up to 64 px images, 2 px at 128 (a resized edge's width)."""
    return max(1, round(size / 64))


def has_color(images: Tensor, rgb: Tensor) -> Tensor:
    """[B, 1, H, W] bool: RGB distance of each pixel to its sample's colour ``rgb`` [B, 3] (in
    [0, 1]) is below :data:`COLOR_RADIUS`."""
    dist = (images.float() - rgb.float()[:, :, None, None]).pow(2).sum(dim=1, keepdim=True).sqrt()
    return dist < COLOR_RADIUS


def dilate(mask: Tensor, px: int) -> Tensor:
    """[B, 1, H, W] bool: the mask grown by ``px`` pixels (square neighbourhood)."""
    m = (mask.float() >= 0.5).float()
    return torch.nn.functional.max_pool2d(m, 2 * px + 1, stride=1, padding=px) > 0


def _count(mask: Tensor) -> Tensor:
    return mask.flatten(1).sum(1).float()


def color_iou(edit: Tensor, source: Tensor, target: Tensor, region: Tensor, rgb: Tensor) -> Tensor:
    """[B]: IoU inside ``region`` of the edit's and the target's pixels of colour ``rgb``, leaving
    out pixels that have it in both source and target; 1.0 where neither has any such pixel."""
    in_tgt = has_color(target, rgb)
    looked_at = region & ~(has_color(source, rgb) & in_tgt)
    want, got = looked_at & in_tgt, looked_at & has_color(edit, rgb)
    union = _count(want | got)
    return torch.where(union > 0, _count(want & got) / union.clamp(min=1), torch.ones_like(union))


def kept_fraction(edit: Tensor, source: Tensor, target: Tensor, fine_mask: Tensor, rgb: Tensor) -> Tensor:
    """[B]: of the fine mask's pixels with colour ``rgb`` in both source and target, the fraction
    that has it in the edit; 1.0 where there is no such pixel."""
    must_keep = (fine_mask >= 0.5) & has_color(source, rgb) & has_color(target, rgb)
    n = _count(must_keep)
    return torch.where(n > 0, _count(must_keep & has_color(edit, rgb)) / n.clamp(min=1), torch.ones_like(n))


def leftover_fraction(edit: Tensor, source: Tensor, target: Tensor, region: Tensor, rgb_old: Tensor) -> Tensor:
    """[B]: of the region's pixels with colour ``rgb_old`` in the source but not in the target, the
    fraction that still has it in the edit; 0.0 where there is no such pixel."""
    must_lose = region & has_color(source, rgb_old) & ~has_color(target, rgb_old)
    n = _count(must_lose)
    return torch.where(n > 0, _count(must_lose & has_color(edit, rgb_old)) / n.clamp(min=1), torch.zeros_like(n))


def l1_inside_outside(edit: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """([B], [B]): mean |edit - target| inside / outside the mask; 0.0 for an empty part."""
    diff = (edit.float() - target.float()).abs().mean(dim=1, keepdim=True)
    m = (mask.float() >= 0.5).float()
    n_in, n_out = _count(m), _count(1 - m)
    inside = _count(diff * m) / n_in.clamp(min=1)
    outside = _count(diff * (1 - m)) / n_out.clamp(min=1)
    return inside, outside


def style_success(edit: Tensor, source: Tensor, target: Tensor) -> Tensor:
    """[B] bool: the edit is much closer to the target than the source is."""
    l1 = lambda a: (a.float() - target.float()).abs().flatten(1).mean(1)  # noqa: E731
    return l1(edit) < STYLE_MAX_RATIO * l1(source)


def _rgb(checks: Sequence[Mapping[str, Any]], field: str, task: str) -> Tensor:
    rows = []
    for c in checks:
        value = c.get(field)
        if not (isinstance(value, (list, tuple)) and len(value) == 3):
            raise ValueError(f"edit check for task {task!r} needs {field!r} as [r, g, b] in 0..255, got {c!r}")
        rows.append([float(v) / 255.0 for v in value])
    return torch.tensor(rows)


def task_success(
    task: str, edit: Tensor, source: Tensor, target: Tensor, fine_mask: Tensor, checks: Sequence[Mapping[str, Any]]
) -> Tensor:
    """[B] bool: success of a batch of edits that all have ``task``; criteria in the module docstring."""
    if task not in CHECKED_TASKS:
        raise ValueError(f"no success check for task {task!r} (known: {', '.join(CHECKED_TASKS)})")
    if task == "style":
        return style_success(edit, source, target)
    region = dilate(fine_mask, dilation_px(min(fine_mask.shape[-2:])))
    inside, outside = l1_inside_outside(edit, target, fine_mask)
    ok = outside <= MAX_L1_OUTSIDE
    if task in ("recolor", "add", "replace"):
        rgb = _rgb(checks, "rgb", task)
        ok &= color_iou(edit, source, target, region, rgb) >= MIN_COLOR_IOU
        ok &= kept_fraction(edit, source, target, fine_mask, rgb) >= 1 - MAX_LEFTOVER
    if task in ("recolor", "replace", "remove"):
        ok &= leftover_fraction(edit, source, target, region, _rgb(checks, "old_rgb", task)) <= MAX_LEFTOVER
    if task == "remove":
        ok &= inside <= MAX_L1_REMOVED
    return ok


def edit_success(
    edit: Tensor,
    source: Tensor,
    target: Tensor,
    fine_mask: Tensor,
    tasks: Sequence[str],
    checks: Sequence[Optional[Mapping[str, Any]]],
) -> Tensor:
    """[B] float: 1.0 success, 0.0 failure, NaN where the sample has no check (or an unchecked task).

    ``checks[i]`` is sample i's ``check`` dict from its shard JSON, or None.
    """
    if not (len(tasks) == len(checks) == edit.shape[0]):
        raise ValueError(f"{edit.shape[0]} edits, {len(tasks)} tasks and {len(checks)} checks: must match")
    out = torch.full((edit.shape[0],), math.nan)
    for task in sorted(set(tasks)):
        idx = [i for i, (t, c) in enumerate(zip(tasks, checks)) if t == task and c is not None]
        if not idx or task not in CHECKED_TASKS:
            continue
        pick = torch.tensor(idx)
        ok = task_success(task, edit[pick], source[pick], target[pick], fine_mask[pick], [checks[i] for i in idx])
        out[pick] = ok.float()
    return out
