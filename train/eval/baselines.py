"""Editors that need no model: the rows every benchmark table carries beside the trained editor.

A success metric is only as good as the dumbest thing that passes it. Each of these is scored by the
same checker on the same samples as the editor (``train.eval.evaluation.evaluate``); the checker is right only
when the oracle passes it and do-nothing, noise and the paint bucket fail it on every task
(``tests/test_edit_success.py`` asserts this per task).

* ``do_nothing``: the source returned.
* ``oracle``: the target returned.
* ``paint_bucket``: the user's box filled with one flat colour: the colour the instruction names (add,
  recolor), the mean of a 2-pixel ring around the box in the source (remove), the reference's mean
  non-white colour (replace); for a style edit, whose box is the whole image, the source's mean colour.
* ``paint_bucket_target_colour``: the box filled with the target's mean colour over the pixels the edit
  must change: the best any flat fill can do.
* ``copy_reference``: the reference image's object (its non-white pixels) resized into the box over the
  source; the source where a sample has no reference.
* ``noise``: uniform noise inside the box (a seeded generator), the source outside.

Images are ``[B, 3, H, W]`` in ``[0, 1]``, boxes ``[B, 1, H, W]`` in ``{0, 1}`` with ``bbox`` ``[B, 4]``
(x0, y0, x1, y1, end exclusive), as the evaluation's batches carry them.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from train.eval.edit_success import dilate, regions

BASELINES = ("do_nothing", "paint_bucket", "paint_bucket_target_colour", "copy_reference", "noise", "oracle")
RING_PX = 2
WHITE = 0.9  # a reference pixel with every channel above this is its white background


def _fill(source: Tensor, box: Tensor, colours: Tensor) -> Tensor:
    """The source with each box filled by its sample's colour ``colours`` [B, 3]."""
    inside = box.float() >= 0.5
    return torch.where(inside, colours[:, :, None, None].to(source.dtype), source)


def _masked_mean(images: Tensor, mask: Tensor) -> Tensor:
    """[B, 3]: mean colour over the mask (the whole image where the mask is empty)."""
    w = mask.float()
    w = torch.where(w.flatten(1).sum(1)[:, None, None, None] > 0, w, torch.ones_like(w))
    return (images.float() * w).sum((2, 3)) / w.sum((2, 3))


def bucket_colours(
    source: Tensor,
    reference: Tensor,
    has_reference: Tensor,
    box: Tensor,
    tasks: Sequence[str],
    checks: Sequence[Optional[Mapping[str, Any]]],
) -> Tensor:
    """[B, 3]: the paint bucket's colour per sample (module docstring)."""
    inside = box.float() >= 0.5
    ring = _masked_mean(source, dilate(inside, RING_PX) & ~inside)
    ref_obj = (reference.float() <= WHITE).any(dim=1, keepdim=True) & has_reference[:, None, None, None]
    ref_mean = _masked_mean(reference, ref_obj)
    whole = source.float().mean((2, 3))
    out = []
    for i, (task, check) in enumerate(zip(tasks, checks)):
        named = (check or {}).get("rgb")
        if task in ("add", "recolor") and named is not None:
            out.append(torch.tensor([float(v) / 255.0 for v in named]))
        elif task == "replace" and bool(has_reference[i]):
            out.append(ref_mean[i])
        elif task == "style":
            out.append(whole[i])
        else:  # remove, and anything without a named colour: what surrounds the box
            out.append(ring[i])
    return torch.stack(out).to(source.dtype)


def copy_reference(source: Tensor, reference: Tensor, has_reference: Tensor, bbox: Tensor) -> Tensor:
    """The reference's non-white pixels resized into each box over the source (the source without one)."""
    out = source.clone()
    for i in range(source.shape[0]):
        x0, y0, x1, y1 = (int(v) for v in bbox[i])
        if not bool(has_reference[i]) or x1 <= x0 or y1 <= y0:
            continue
        ref = F.interpolate(reference[i : i + 1].float(), size=(y1 - y0, x1 - x0), mode="bilinear", antialias=True)
        obj = (ref <= WHITE).any(dim=1, keepdim=True)
        out[i : i + 1, :, y0:y1, x0:x1] = torch.where(obj, ref.to(out.dtype), out[i : i + 1, :, y0:y1, x0:x1])
    return out


def baseline_edits(
    source: Tensor,
    target: Tensor,
    reference: Tensor,
    has_reference: Tensor,
    box: Tensor,
    bbox: Tensor,
    tasks: Sequence[str],
    checks: Sequence[Optional[Mapping[str, Any]]],
    seed: int = 0,
) -> dict[str, Tensor]:
    """Every row of :data:`BASELINES` for one batch: ``{name: edits [B, 3, H, W]}``.

    A style edit's box is the whole image (the data's fine mask is), so no special case is needed here."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(source.shape, generator=g).to(source)
    change = regions(source, target, box)["change"]
    return {
        "do_nothing": source,
        "paint_bucket": _fill(source, box, bucket_colours(source, reference, has_reference, box, tasks, checks)),
        "paint_bucket_target_colour": _fill(source, box, _masked_mean(target, change)),
        "copy_reference": copy_reference(source, reference, has_reference, bbox),
        "noise": torch.where(box.float() >= 0.5, noise, source),
        "oracle": target,
    }
