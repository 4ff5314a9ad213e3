"""Paired geometric augmentation: one crop/resize/flip for every spatial member of a sample.

Source, target and both masks get the same crop box and flip, so they stay pixel-aligned; the
bbox is recomputed from the transformed fine mask and the coarse mask is drawn from it (never
the json bbox, which describes the un-cropped image). The reference image is a separate subject
picture, not pixel-aligned with the source: it gets the same flip and output size but no crop,
because a crop chosen for the source could cut the subject out of it.

The crop always contains one randomly chosen edit pixel, so the edit region never leaves the
frame. A compositional sample (``regions`` in its json, :mod:`data.compose`) has one box per region: the
fine mask is split by the json's boxes before the crop, each part is resampled like the fine mask, and the
coarse mask is the boxes drawn around the parts after it (a crop that cuts a region out leaves its box
out; the routing grid trains without crops). ``region_labels`` says which box each pixel is in. Images are resampled bilinearly; masks with a box filter thresholded at one half, falling
back to "any coverage" if that would erase a thin region.
"""

from __future__ import annotations

import math
import random
import re
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from data.schema import bbox_from_mask

_SIDED = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def choose_bucket(width: int, height: int, buckets: Sequence[Sequence[int]], image_size: int) -> tuple[int, int]:
    """(h, w) of the bucket whose aspect ratio is closest (in log space) to the image's."""
    if not buckets:
        return image_size, image_size
    ar = math.log(width / height)
    return tuple(min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - ar), b[0] * b[1])))  # type: ignore


def crop_box(
    width: int,
    height: int,
    out_h: int,
    out_w: int,
    min_scale: float,
    rng: Optional[random.Random],
    must_contain: Optional[tuple[int, int]] = None,
) -> tuple[float, float, float, float]:
    """A crop (x0, y0, x1, y1) in source pixels with the output's aspect ratio.

    Its area is a random fraction in [min_scale, 1] of the largest such crop; it contains pixel
    ``must_contain`` (x, y). With ``rng=None``: the largest crop, centred (evaluation).
    """
    aspect = out_w / out_h
    cw, ch = (width, width / aspect) if width / height <= aspect else (height * aspect, height)
    if rng is None:
        return ((width - cw) / 2, (height - ch) / 2, (width + cw) / 2, (height + ch) / 2)
    s = math.sqrt(rng.uniform(min_scale, 1.0))
    cw, ch = cw * s, ch * s

    def place(size: float, crop: float, p: Optional[int]) -> float:
        lo, hi = 0.0, size - crop
        if p is not None:  # keep pixel p (its centre p + 0.5) inside
            lo, hi = max(lo, p + 1 - crop), min(hi, float(p))
        return rng.uniform(lo, max(lo, hi))

    px, py = must_contain if must_contain is not None else (None, None)
    x0, y0 = place(width, cw, px), place(height, ch, py)
    return (x0, y0, x0 + cw, y0 + ch)


def _to_tensor(img: Image.Image) -> Tensor:
    """uint8 [3, h, w]; converted to float once per batch (:func:`to_float`), which is cheaper
    than per sample and keeps the worker's per-sample tensors 4x smaller."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def to_float(x: Tensor) -> Tensor:
    """uint8 image tensor -> float in [-1, 1] (EditBatch convention)."""
    return x.float().div_(127.5).sub_(1.0)


def box_mask(bbox: Sequence[int], h: int, w: int) -> Tensor:
    """[1, h, w] float {0, 1}: the coarse mask, 1 inside the end-exclusive box."""
    m = torch.zeros(1, h, w)
    x0, y0, x1, y1 = bbox
    m[:, y0:y1, x0:x1] = 1.0
    return m


def region_coarse(parts: Sequence[np.ndarray], h: int, w: int) -> tuple[Tensor, Tensor]:
    """A compositional sample's coarse mask and region labels from the fine mask of each region (bool HxW,
    in ``data.schema.REGION_ROLES`` order): the union of the boxes around the parts, float [1, h, w], and
    uint8 [1, h, w] labels, i + 1 inside the box of region i, 0 outside every box. An empty part has no box."""
    coarse, labels = torch.zeros(1, h, w), torch.zeros(1, h, w, dtype=torch.uint8)
    for i, part in enumerate(parts):
        if part.any():
            box = box_mask(bbox_from_mask(part), h, w)
            coarse = torch.maximum(coarse, box)
            labels[box > 0] = i + 1
    return coarse, labels


def split_by_boxes(mask: np.ndarray, boxes: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """The fine mask (HxW, nonzero = edit) inside each box, as uint8 {0, 255} masks."""
    parts = []
    for x0, y0, x1, y1 in boxes:
        part = np.zeros_like(mask)
        part[y0:y1, x0:x1] = mask[y0:y1, x0:x1]
        parts.append(part)
    return parts


def _resize_mask(mask: np.ndarray, size: tuple[int, int], box: tuple[float, float, float, float]) -> np.ndarray:
    """A 0/255 mask resampled with a box filter and thresholded at one half (any coverage if that erases it)."""
    m = np.asarray(Image.fromarray(mask, "L").resize(size, Image.BOX, box=box))
    fine = m >= 128
    return fine if fine.any() else m > 0


def transform(
    src: Image.Image,
    tgt: Image.Image,
    ref: Optional[Image.Image],
    mask: np.ndarray,
    out_hw: tuple[int, int],
    rng: Optional[random.Random],
    min_scale: float = 1.0,
    hflip: bool = False,
    instruction: str = "",
    regions: Optional[Sequence[Sequence[int]]] = None,
) -> dict:
    """Crop/resize/flip a decoded sample to ``out_hw``; ``rng=None`` means the evaluation view.

    Returns ``source, target, reference (or None)`` as uint8 [3,h,w] tensors (see :func:`to_float`),
    ``fine_mask`` and ``coarse_mask`` as float [1,h,w], and ``bbox``; with ``regions`` (a compositional
    sample's boxes, source pixels) the coarse mask is the regions' boxes and ``region_labels`` (uint8
    [1,h,w], :func:`region_coarse`) says which box each pixel is in.
    """
    out_h, out_w = out_hw
    w, h = src.size
    pick = None
    if rng is not None:
        ys, xs = np.nonzero(mask)
        i = rng.randrange(len(xs))
        pick = (int(xs[i]), int(ys[i]))
    box = crop_box(w, h, out_h, out_w, min_scale, rng, pick)
    flip = bool(hflip and rng is not None and rng.random() < 0.5 and not _SIDED.search(instruction))
    size = (out_w, out_h)
    s = src.resize(size, Image.BILINEAR, box=box)
    t = tgt.resize(size, Image.BILINEAR, box=box)
    fine = _resize_mask(mask, size, box)
    r = ref.resize(size, Image.BILINEAR) if ref is not None else None
    if flip:
        s, t = s.transpose(Image.FLIP_LEFT_RIGHT), t.transpose(Image.FLIP_LEFT_RIGHT)
        r = r.transpose(Image.FLIP_LEFT_RIGHT) if r is not None else None
        fine = fine[:, ::-1]
    bbox = bbox_from_mask(fine)
    out = dict(
        source=_to_tensor(s),
        target=_to_tensor(t),
        reference=_to_tensor(r) if r is not None else None,
        fine_mask=torch.from_numpy(np.ascontiguousarray(fine)).float()[None],
        coarse_mask=box_mask(bbox, out_h, out_w),
        bbox=bbox,
        box=box,
        flipped=flip,
    )
    if regions is not None:
        parts = []
        for part in split_by_boxes(mask, regions):
            p = _resize_mask(part, size, box) if part.any() else np.zeros((out_h, out_w), bool)
            parts.append((p[:, ::-1] if flip else p) & fine)  # a part resampled alone may reach past the whole
        out["coarse_mask"], out["region_labels"] = region_coarse(parts, out_h, out_w)
    return out
