"""Compositional edits: two regions in one sample, one edited by the text and one by the reference image.

The single-edit benchmark (:mod:`data.synthetic`) gives each sample one task, one region and one set of
conditions, so nothing in it needs a different condition on different tokens. This set does. Each sample
of world v2 (:mod:`data.world`) asks for two edits at once, in two boxes that do not touch::

    "make the red striped circle blue and replace the green checkered square with the object in the
     reference image"                                   (or the two clauses the other way round)

* the **text region**: a recolor the instruction names (its colour word, the object's shape and finish
  kept);
* the **reference region**: a replace whose new object (shape, colour, finish) only the reference image
  shows.

The two edits conflict by construction: the reference object's colour is none of the colour the text asks
for, the text object's old colour and the replaced object's old colour, and its finish differs from the
text object's. An editor that lets
one condition leak into the other region paints the reference's colour or pattern into the text region,
or the text's colour into the reference region; ``train.eval.compose`` measures that (cross-bleed) beside
each region's success.

What reaches the model: the source, the instruction, the reference, and **one coarse mask of two boxes**
(the box around each region's part of the fine mask). One mask, not two: which box takes which condition
is what a condition-aware router must work out from the instruction and the source, so the mask does not
say it; two labelled masks would hand every arm, static fusion included, the assignment. The json's
``regions`` field (``[{"role": "text", "bbox"}, {"role": "reference", "bbox"}]``, source pixels) lets the
loader split the fine mask into the two regions and draw their boxes (``data.augment``); the batch carries
which box is which as ``EditBatch.region_labels``, read only by the oracle router and the routing
interventions. The json's ``check`` (``kind: compose``) holds each region's check in the single-edit form
(``version: 2``), its box, and the scene (background and objects after the edit), from which the checker
renders what a leak would look like.

Every sample is a pure function of (seed, split, index), on a random stream apart from the single-edit
set's, with keys ``cmp<seed>-<split>-<index>``. Written by ``python -m data.synthetic --edits compose``.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
from PIL import Image

from data import world
from data.schema import REGION_ROLES, bbox_from_mask
from data.shards import EditRecord
from data.world import CHECK_VERSION, COLORS, FINISHES, SHAPES, SPLIT_IDS, Obj, object_phrase

SEPARATION = 1 / 16  # the smallest gap between the two boxes, as a fraction of the side: one token at 128 px
MIN_VISIBLE = 0.6  # an edited object shows at least this share of its shape (not mostly covered)
STREAM = 3  # this set's random stream (world v1: none, world v2's single edits: 2)
MAX_SCENES = 200  # scenes drawn before giving up on a sample (a sample needs about 3)
TEXT_CLAUSE = "make the {phrase} {color}"
REFERENCE_CLAUSE = "replace the {phrase} with the object in the reference image"


def separation_px(size: int) -> int:
    """The smallest gap between the two regions' boxes at ``size`` pixels (1 token at 128 px)."""
    return max(1, math.ceil(SEPARATION * size))


def box_gap(a: list[int], b: list[int]) -> int:
    """Pixels between two end-exclusive boxes along the axis where they are farthest apart (<= 0: they touch)."""
    return max(b[0] - a[2], a[0] - b[2], b[1] - a[3], a[1] - b[3])


def _visible_share(objs: list[Obj], i: int, size: int) -> float:
    o = objs[i]
    full = world.shape_mask(o["shape"], o["cx"], o["cy"], o["r"], size).sum()
    return float(world.visible_mask(objs, i, size).sum()) / max(float(full), 1.0)


def _pick(rng: np.random.Generator, options: list):
    return options[int(rng.integers(len(options)))]


def plan_edit(rng: np.random.Generator, objs: list[Obj], size: int) -> Optional[dict]:
    """The two edits of one scene, or None when no pair of its objects allows them: the text object ``i``
    recoloured, the reference object ``j`` replaced, their regions' boxes at least :func:`separation_px`
    apart, both objects mostly visible, and the conflict of the module docstring."""
    n = len(objs)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j]
    for p in rng.permutation(len(pairs)):
        i, j = pairs[int(p)]
        a, b = objs[i], objs[j]
        if min(_visible_share(objs, i, size), _visible_share(objs, j, size)) < MIN_VISIBLE:
            continue
        taken = {(o["color"], o["shape"]) for o in objs}
        colours = [c for c in COLORS if c != a["color"] and (c, a["shape"]) not in taken]
        if not colours:
            continue
        colour = _pick(rng, colours)
        after = [dict(o, color=colour) if k == i else dict(o) for k, o in enumerate(objs)]
        taken = {(o["color"], o["shape"]) for k, o in enumerate(after) if k != j}
        new = [
            (c, s, f)
            for c in COLORS
            for s in SHAPES
            for f in FINISHES
            if s != b["shape"]
            and c not in (colour, a["color"], b["color"])
            and f != a["finish"]
            and (c, s) not in taken
        ]
        if not new:
            continue
        c, s, f = _pick(rng, new)
        after[j] = dict(b, color=c, shape=s, finish=f)
        text_mask = world.visible_mask(objs, i, size) | world.visible_mask(after, i, size)
        ref_mask = world.visible_mask(objs, j, size) | world.visible_mask(after, j, size)
        boxes = [bbox_from_mask(text_mask), bbox_from_mask(ref_mask)]
        if box_gap(*boxes) < separation_px(size):
            continue
        return dict(text=i, reference=j, colour=colour, after=after, masks=(text_mask, ref_mask), boxes=boxes)
    return None


def _colour(name: str, prefix: str = "") -> dict:
    return {f"{prefix}color": name, f"{prefix}rgb": list(COLORS[name])}


def region_checks(objs: list[Obj], plan: dict) -> list[dict]:
    """Each region's check in the single-edit form (``data.synthetic``), with its role, task and box."""
    a_old, b_old = objs[plan["text"]], objs[plan["reference"]]
    b_new = plan["after"][plan["reference"]]
    out = []
    for role, task, old, new, box in (
        ("text", "recolor", a_old, plan["after"][plan["text"]], plan["boxes"][0]),
        ("reference", "replace", b_old, b_new, plan["boxes"][1]),
    ):
        check = dict(_colour(new["color"]), shape=new["shape"], finish=new["finish"], **_colour(old["color"], "old_"))
        check.update(old_shape=old["shape"], old_finish=old["finish"], version=CHECK_VERSION)
        out.append(dict(role=role, task=task, bbox=box, check=check))
    return out


def make_sample(seed: int, split: str, index: int, size: int = 128) -> EditRecord:
    """Sample ``index`` of ``split``: a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index, STREAM])
    for _ in range(MAX_SCENES):
        bg, objs = world.scene(rng, 2, 4)
        plan = plan_edit(rng, objs, size)
        if plan is not None:
            break
    else:  # never seen: a scene of 2-4 objects allows a pair within a few draws
        raise RuntimeError(f"no compositional edit in {MAX_SCENES} scenes (seed {seed}, {split} {index})")
    a, b = objs[plan["text"]], objs[plan["reference"]]
    text = TEXT_CLAUSE.format(phrase=object_phrase(a), color=plan["colour"])
    reference = REFERENCE_CLAUSE.format(phrase=object_phrase(b))
    order = "text_first" if rng.uniform() < 0.5 else "reference_first"
    instruction = f"{text} and {reference}" if order == "text_first" else f"{reference} and {text}"
    new = plan["after"][plan["reference"]]
    regions = region_checks(objs, plan)
    assert [r["role"] for r in regions] == list(REGION_ROLES)
    check = dict(
        kind="compose",
        version=CHECK_VERSION,
        size=size,
        order=order,
        regions=regions,
        scene=dict(background=bg, objects=plan["after"], text_index=plan["text"], reference_index=plan["reference"]),
    )
    return EditRecord(
        key=f"cmp{seed}-{split}-{index:07d}",
        src=Image.fromarray(world.render(bg, objs, size)),
        tgt=Image.fromarray(world.render(bg, plan["after"], size)),
        ref=Image.fromarray(world.render(None, [world.on_white(new)], size)),
        mask=(plan["masks"][0] | plan["masks"][1]).astype(np.uint8) * 255,
        instruction=instruction,
        task="compose",
        tags={"scope": "local", "type": "compose", "preservation": ["background", "structure"]},
        source="synthetic",
        extra=dict(check=check, regions=[dict(role=r["role"], bbox=r["bbox"]) for r in regions]),
    )
