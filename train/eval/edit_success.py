"""Did an edit succeed? Yes or no per sample, judged over the user's whole box, with the reason it failed.

Pixel errors (L1, IoU) say how far an edit is from the target, not whether it did what was asked. This
checker compares the edit with the target pixel by pixel inside the box, split into what the edit must
change and what it must keep, so a flat fill of the box (the paint bucket), the source returned, or
noise fail it, while an edit that draws the right object, pattern and background passes with the
error a decoder leaves. It reads only images: source, target, edit and the box, so it judges any
data set that has targets (the synthetic world's ``check`` field only says which checker applies).

The criteria and the regions they judge are :mod:`train.eval.criteria`'s (its docstring lists them); this
module picks the checker for each sample and reduces the criteria to success and the first failure.

Samples whose check has no ``version`` (the first world, ``data.world_v1``) are judged by the first
checker, :mod:`train.eval.edit_success_v1`. A compositional sample (task ``compose``, :mod:`data.compose`)
is judged region by region by :mod:`train.eval.compose` with these criteria: it succeeds when both regions
do, and fails a criterion when either region fails it. A sample without a check gets NaN: success
unavailable, left out of the means.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import torch
from torch import Tensor

from train.eval import compose, edit_success_v1
from train.eval.criteria import (  # noqa: F401  (re-exported: the checker's public names)
    CRITERIA,
    MATCH,
    MAX_COLOUR_DIST,
    MAX_L1_OUTSIDE,
    MIN_KEEP,
    MIN_MATCH,
    MIN_OUTSIDE_MATCH,
    MIN_SHAPE_IOU,
    STYLE_MAX_RATIO,
    box_of,
    criteria,
    dilate,
    dilation_px,
    matches,
)

CHECKED_TASKS = ("recolor", "remove", "replace", "add", "style", "compose")


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
    check, an unchecked task, or (for the criteria) a first-world check, which only gives ``success``. A batch
    with compositional samples also gets their per-region numbers (``train.eval.compose.REGION_METRICS``).

    ``checks[i]`` is sample i's ``check`` dict from its shard JSON, or None; ``box`` the coarse masks
    (default: the box around each fine mask, which is how the loader draws them).
    """
    b = edit.shape[0]
    if not (len(tasks) == len(checks) == b):
        raise ValueError(f"{b} edits, {len(tasks)} tasks and {len(checks)} checks: must match")
    out = {name: torch.full((b,), math.nan) for name in (*CRITERIA, "success")}
    composed = [i for i, (t, c) in enumerate(zip(tasks, checks)) if t == "compose" and c is not None]
    if composed:
        pick = torch.tensor(composed)
        result = compose.compose_criteria(
            edit[pick], source[pick], target[pick], fine_mask[pick], [checks[i] for i in composed]
        )
        for name in (*CRITERIA, "success", *compose.REGION_METRICS):  # the last only in batches with compose
            out.setdefault(name, torch.full((b,), math.nan))[pick] = result[name]
    current = [
        i for i, (t, c) in enumerate(zip(tasks, checks)) if c is not None and c.get("version") == 2 and t != "compose"
    ]
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
