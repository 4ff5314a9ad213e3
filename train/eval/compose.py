"""Compositional edits (``data.compose``) judged region by region: success per region, cross-bleed between the
regions, and the error in a band around their boxes; and the editors that need no model, per region.

A compositional sample asks for a recolor by the text in one box (the *text region*) and a replace by the
reference image in another (the *reference region*). Each region is judged with the single-edit checker's
criteria (``train.eval.edit_success``) over its own box, with the other region's fringe left out of its
``outside`` criterion (that region is supposed to change). Regions come from the sample's ``check``: the
json's boxes, scaled to the image, split the fine mask into each region's part (the boxes are at least
``data.compose.separation_px`` apart), and each region's box is the box around its part, as the loader
draws it. So a region's success does not depend on the other region's edit, and the oracle passes, the
source fails and a flat fill of each box fails, per region (``tests/test_compose.py``).

Per sample, [B] float each:

* ``success_text``, ``success_reference``: the region passed every criterion; ``success``: both did;
  ``<role>/<criterion>``: that criterion in that region (1 passed, 0 failed);
* cross-bleed, from renders of the scene in which one region took the other's condition (the checker knows
  the scene: the check's ``scene``): ``bleed_colour_into_text`` (the text object in the reference object's
  colour), ``bleed_pattern_into_text`` (in its finish), ``bleed_colour_into_reference`` (the new object in the
  text's colour), ``bleed_pattern_into_reference`` (in the text object's finish). Each is the share of the
  region's pixels where that render differs from both the target and the source that the edit paints as
  the render and not as the target (0 for the target and the source, 1 for the render); ``bleed_into_text`` / ``bleed_into_reference`` are 1
  where the larger of the region's two shares reaches :data:`BLEED_SHARE`;
* ``band_error``: the share of pixels in a band of :func:`band_px` pixels on each side of either box's
  border that do not match the target (:data:`train.eval.edit_success.MATCH`): where a routing border runs.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from data import world
from data.compose import separation_px
from data.schema import REGION_ROLES
from train.eval.baselines import WHITE, copy_reference
from train.eval.criteria import CRITERIA, box_of, criteria, dilate, dilation_px, matches

ROLES = REGION_ROLES  # ("text", "reference"): the order of the check's regions and of the batch's labels
BLEEDS = ("colour_into_text", "pattern_into_text", "colour_into_reference", "pattern_into_reference")
BLEED_SHARE = 0.5
# what an evaluation reports per compositional sample beside success (each region's success, whether the other
# region's condition bled into it, the boundary band's error): the numbers a routing intervention moves
REGION_METRICS = ("success_text", "success_reference", "bleed_into_text", "bleed_into_reference", "band_error")
COMPOSE_BASELINES = ("do_nothing", "paint_bucket", "copy_reference", "noise", "oracle")


def band_px(size: int) -> int:
    """The boundary band's width on each side of a box's border: half a token (4 px) at 128 px."""
    return max(1, round(size / 32))


def region_parts(fine_mask: Tensor, checks: Sequence[Mapping[str, Any]]) -> tuple[Tensor, Tensor]:
    """Each region's part of the fine mask and the box around it, [B, R, 1, H, W] bool and float, in
    :data:`ROLES` order. The check's boxes (in pixels of an image ``check["size"]`` wide) are scaled to
    the mask and grown by a margin that keeps them apart; the fine mask inside each is the region's part."""
    b, _, h, w = fine_mask.shape
    fine = fine_mask.float() >= 0.5
    parts = torch.zeros(b, len(ROLES), 1, h, w, dtype=torch.bool)
    for i, check in enumerate(checks):
        s = h / float(check["size"])
        grow = max(0, separation_px(h) // 2 - 2)
        for r, region in enumerate(check["regions"]):
            x0, y0, x1, y1 = region["bbox"]
            ya, yb = max(0, math.floor(y0 * s) - grow), min(h, math.ceil(y1 * s) + grow)
            xa, xb = max(0, math.floor(x0 * s) - grow), min(w, math.ceil(x1 * s) + grow)
            parts[i, r, :, ya:yb, xa:xb] = fine[i, :, ya:yb, xa:xb].cpu()
    boxes = box_of(parts.flatten(0, 1).float()).reshape(parts.shape)
    return parts, boxes


def _erode(mask: Tensor, px: int) -> Tensor:
    return ~dilate(~mask, px)


def counterfactuals(check: Mapping[str, Any], size: int) -> dict[str, Tensor]:
    """The scene of a check with one region given the other's colour or finish (:data:`BLEEDS`), rendered at
    the check's size and resized to ``size`` as the loader resizes images: [3, size, size] each, in [0, 1]."""
    scene = check["scene"]
    objs, it, ir = scene["objects"], scene["text_index"], scene["reference_index"]
    text, ref = objs[it], objs[ir]

    def render(k: int, **change) -> Tensor:
        changed = [dict(o, **change) if j == k else o for j, o in enumerate(objs)]
        img = Image.fromarray(world.render(scene["background"], changed, int(check["size"])))
        if img.size != (size, size):
            img = img.resize((size, size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255.0

    return {
        "colour_into_text": render(it, color=ref["color"]),
        "pattern_into_text": render(it, finish=ref["finish"]),
        "colour_into_reference": render(ir, color=text["color"]),
        "pattern_into_reference": render(ir, finish=text["finish"]),
    }


def bleed_shares(
    edit: Tensor,
    source: Tensor,
    target: Tensor,
    parts: Tensor,
    checks: Sequence[Mapping[str, Any]],
    renders: Optional[Sequence[Mapping[str, Tensor]]] = None,
) -> dict[str, Tensor]:
    """``bleed_<kind>`` for each of :data:`BLEEDS`, [B] float (module docstring; NaN where the render does not
    differ from the target and the source in that region). Pixels where the render matches the source are
    left out: a palette colour's dark tone may match another's, and returning the source is no leak.
    ``renders``: each sample's :func:`counterfactuals` at the edit's size, when the caller has them."""
    h = edit.shape[-1]
    renders = renders if renders is not None else [counterfactuals(c, h) for c in checks]
    out = {}
    right = matches(edit, target)
    for kind in BLEEDS:
        cf = torch.stack([r[kind] for r in renders]).to(edit.dtype)
        region = parts[:, ROLES.index(kind.rsplit("_", 1)[1])]
        differs = region & ~matches(cf, target) & ~matches(cf, source)
        leaked = differs & matches(edit, cf) & ~right
        n = differs.flatten(1).sum(1).float()
        out[f"bleed_{kind}"] = torch.where(n > 0, leaked.flatten(1).sum(1).float() / n.clamp(min=1), math.nan)
    return out


def compose_results(
    edit: Tensor,
    source: Tensor,
    target: Tensor,
    fine_mask: Tensor,
    checks: Sequence[Mapping[str, Any]],
    renders: Optional[Sequence[Mapping[str, Tensor]]] = None,
) -> dict[str, Tensor]:
    """Every per-sample number of the module docstring, [B] float each. Images [B, 3, H, W] in [0, 1],
    ``checks`` the samples' compositional checks; ``renders`` their :func:`counterfactuals` (made here
    when None: a caller that judges several edits of the same samples makes them once)."""
    edit, source, target = edit.float().cpu(), source.float().cpu(), target.float().cpu()
    parts, boxes = region_parts(fine_mask.cpu(), checks)
    b, h = edit.shape[0], edit.shape[-1]
    px, out = dilation_px(h), {}
    no_style = torch.zeros(b, dtype=torch.bool)
    success = torch.ones(b)
    for r, role in enumerate(ROLES):
        others = [dilate(boxes[:, k] >= 0.5, px) for k in range(len(ROLES)) if k != r]
        ignore = torch.stack(others).any(dim=0)
        judged = criteria(edit, source, target, boxes[:, r], no_style, ignore)
        ok = torch.stack(list(judged.values())).all(dim=0).float()
        out |= {f"{role}/{name}": judged[name].float() for name in CRITERIA}
        out[f"success_{role}"] = ok
        success = success * ok
    out["success"] = success
    out |= bleed_shares(edit, source, target, parts, checks, renders)
    for role in ROLES:
        shares = torch.stack([out[f"bleed_colour_into_{role}"], out[f"bleed_pattern_into_{role}"]])
        flag = (shares.nan_to_num(0).max(dim=0).values >= BLEED_SHARE).float()
        out[f"bleed_into_{role}"] = torch.where(shares.isnan().all(dim=0), math.nan, flag)
    w = band_px(h)
    inside = boxes >= 0.5
    band = (dilate(inside.flatten(0, 1), w) & ~_erode(inside.flatten(0, 1), w)).reshape(inside.shape).any(dim=1)
    n = band.flatten(1).sum(1).float()
    good = (band & matches(edit, target)).flatten(1).sum(1).float()
    out["band_error"] = torch.where(n > 0, 1 - good / n.clamp(min=1), math.nan)
    return out


def compose_criteria(
    edit: Tensor, source: Tensor, target: Tensor, fine_mask: Tensor, checks: Sequence[Mapping[str, Any]]
) -> dict[str, Tensor]:
    """What ``train.eval.edit_success.edit_criteria`` reports for compositional samples: each criterion passed
    in both regions, ``success`` (both regions) and the :data:`REGION_METRICS`, [B] float each."""
    res = compose_results(edit, source, target, fine_mask, checks)
    out = {name: torch.stack([res[f"{role}/{name}"] for role in ROLES]).min(dim=0).values for name in CRITERIA}
    return out | {"success": res["success"]} | {k: res[k] for k in REGION_METRICS}


def _fill(images: Tensor, box: Tensor, colours: Tensor) -> Tensor:
    return torch.where(box >= 0.5, colours[:, :, None, None].to(images.dtype), images)


def compose_baselines(
    source: Tensor,
    target: Tensor,
    reference: Tensor,
    has_reference: Tensor,
    fine_mask: Tensor,
    checks: Sequence[Mapping[str, Any]],
    seed: int = 0,
) -> dict[str, Tensor]:
    """The editors that need no model (:data:`COMPOSE_BASELINES`), per region as ``train.eval.baselines``
    defines them for one edit: do-nothing; the paint bucket, which fills the text region's box with the
    colour the text names and the reference region's box with the reference's mean non-white colour; the
    reference's object copied into the reference region's box; uniform noise in both boxes; the oracle.
    Images [B, 3, H, W] in [0, 1]."""
    _, boxes = region_parts(fine_mask.cpu(), checks)
    text_box, ref_box = boxes[:, 0], boxes[:, 1]
    named = torch.tensor([[v / 255.0 for v in c["regions"][0]["check"]["rgb"]] for c in checks])
    obj = (reference.float() <= WHITE).any(dim=1, keepdim=True).float()
    ref_mean = (reference.float() * obj).sum((2, 3)) / obj.sum((2, 3)).clamp(min=1)
    bucket = _fill(_fill(source, text_box, named), ref_box, ref_mean)
    bbox = torch.stack([_bbox(m) for m in ref_box])
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(source.shape, generator=g).to(source)
    return {
        "do_nothing": source,
        "paint_bucket": bucket,
        "copy_reference": copy_reference(source, reference, has_reference, bbox),
        "noise": torch.where((text_box + ref_box) >= 0.5, noise, source),
        "oracle": target,
    }


def _bbox(box: Tensor) -> Tensor:
    """[1, H, W] box mask -> [4] long x0, y0, x1, y1 (end exclusive; zeros for an empty box)."""
    ys, xs = torch.nonzero(box[0] >= 0.5, as_tuple=True)
    if len(ys) == 0:
        return torch.zeros(4, dtype=torch.long)
    return torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])


def compose_checks(checks: Sequence[Optional[Mapping[str, Any]]]) -> bool:
    """True when every check is a compositional one (``kind: compose``)."""
    return all(c is not None and c.get("kind") == "compose" for c in checks)


def region_box_masks(fine_mask: Tensor, checks: Sequence[Mapping[str, Any]]) -> Tensor:
    """[B, 1, H, W] float: the union of each sample's region boxes (the coarse mask the loader draws)."""
    _, boxes = region_parts(fine_mask, checks)
    return boxes.amax(dim=1)
