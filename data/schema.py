"""The sample schema of an edit shard (docs/DESIGN.md section 4) and the checks both ends run.

One sample in a WebDataset tar shard is the group of members sharing a key::

    <key>.src.png    base image, RGB
    <key>.tgt.png    target image, RGB, same size
    <key>.ref.png    optional reference image (subject on white)
    <key>.mask.png   fine mask, mode L, same size as src, values exactly {0, 255} (255 = edit region)
    <key>.json       {"instruction", "bbox": [x0, y0, x1, y1] (end exclusive), "task", "tags":
                      {"scope", "type", "preservation": [...]}, "source", "width", "height",
                      optional "regions": [{"role", "bbox"}, ...] (a compositional edit's boxes)}

Cached shards (``data.cache``) add ``<key>.latent.safetensors`` and ``<key>.text.safetensors``.

The same validation functions run in the shard writer (so bad data is refused at conversion time)
and in the loader (so a shard written by someone else, or damaged since, cannot slip a bad sample
into training). A failed check raises :class:`SampleError` whose ``reason`` is one of
:data:`SKIP_REASONS`, the keys the loader's skip counters use.
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image

TASKS: list[str] = [
    "recolor",
    "remove",
    "replace",
    "add",
    "style",
    "text",
    "background",
    "material",
    "action",
    "other",  # sources without task labels (e.g. MagicBrush)
    "compose",  # two edits in two boxes, one by the text and one by the reference (data.compose)
]

SOURCES: list[str] = ["magicbrush", "omniedit", "uno", "anyedit", "subjects200k", "synthetic", "other"]

UNK_TAG = "<unk>"
# Fixed vocabulary: append only (ids are stored in checkpoints as embedding rows). Id 0 is "<unk>",
# which every tag outside the vocabulary maps to, so a new data source shows up as <unk> counts
# instead of silently losing its tags.
TAG_VOCAB: list[str] = [
    UNK_TAG,
    "scope:local",
    "scope:global",
    "type:recolor",
    "type:remove",
    "type:replace",
    "type:add",
    "type:style",
    "type:text",
    "type:background",
    "type:material",
    "type:action",
    "type:other",
    "preservation:background",
    "preservation:identity",
    "preservation:layout",
    "preservation:structure",
    "preservation:color",
    "preservation:texture",
    "preservation:style",
    "type:compose",
]
TAG_TO_ID: dict[str, int] = {t: i for i, t in enumerate(TAG_VOCAB)}
UNK_ID = TAG_TO_ID[UNK_TAG]

# Every reason a sample can be skipped for; the loader's skip_stats() has exactly these keys.
SKIP_REASONS: list[str] = [
    "corrupt_tar",  # the tar stream broke (truncated member, bad header); rest of that shard lost
    "shard_open_error",  # the shard file / pipe could not be opened
    "missing_key",  # a required member (src/tgt/mask/json) is absent
    "bad_json",  # json does not parse or lacks/mistypes a field
    "decode_error",  # an image member does not decode
    "empty_instruction",
    "unknown_task",
    "size_mismatch",  # tgt / mask / declared width,height differ from src
    "mask_not_binary",  # mask not mode L/1, or values other than 0 and 255
    "empty_mask",  # no edit pixel at all
    "bad_bbox",  # json bbox disagrees with the box of the fine mask
    "bad_regions",  # a compositional sample's region boxes are malformed, overlap, or miss the fine mask
    # writer only (data.shards): the input files, not a shard, are at fault
    "missing_file",
    "duplicate_key",
]

REQUIRED_MEMBERS = ("src.png", "tgt.png", "mask.png", "json")
META_FIELDS = ("instruction", "bbox", "task", "tags", "source", "width", "height")
# The roles of a compositional sample's regions, in the order its json lists them: region i + 1 in the
# batch's ``region_labels`` is ``REGION_ROLES[i]``. The text edits the first box, the reference fills the second.
REGION_ROLES = ("text", "reference")


class SampleError(ValueError):
    """A sample that must not be used; ``reason`` is one of :data:`SKIP_REASONS`."""

    def __init__(self, reason: str, message: str):
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {message}")
        self.reason, self.message = reason, message

    def __reduce__(self):  # picklable (process pools return it as a value)
        return (SampleError, (self.reason, self.message))


def tags_to_ids(tags: Mapping[str, Any]) -> list[int]:
    """Ids into :data:`TAG_VOCAB` for a tags dict ``{scope, type, preservation: [...]}``.

    Order: scope, type, then each preservation tag. A value outside the vocabulary, or a key other
    than the three known ones, maps to ``UNK_ID`` (one id per unknown tag), never dropped.
    """
    ids: list[int] = []
    for key, value in tags.items():
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            ids.append(TAG_TO_ID.get(f"{key}:{v}", UNK_ID))
    return ids


def bbox_from_mask(mask: np.ndarray) -> list[int]:
    """``[x0, y0, x1, y1]`` (end exclusive) of the nonzero pixels of a 2-D mask; raises if empty."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if len(ys) == 0:
        raise SampleError("empty_mask", "fine mask has no edit pixel")
    return [int(xs[0]), int(ys[0]), int(xs[-1]) + 1, int(ys[-1]) + 1]


def decode_image(data: bytes, name: str, mode: str = "RGB") -> Image.Image:
    """Decode fully (``load()``), so a truncated PNG fails here and not later in a worker."""
    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except Exception as exn:  # PIL raises many types for bad data
        raise SampleError("decode_error", f"{name}: {exn}") from exn
    if mode == "RGB" and img.mode != "RGB":
        img = img.convert("RGB")
    return img


def mask_array(img: Image.Image) -> np.ndarray:
    """The fine mask as uint8 {0, 255}; anything else (other mode, grey values) is refused."""
    if img.mode == "1":
        img = img.convert("L")
    if img.mode != "L":
        raise SampleError("mask_not_binary", f"mask mode {img.mode}, expected L")
    arr = np.asarray(img)
    if not np.isin(arr, (0, 255)).all():
        raise SampleError("mask_not_binary", f"mask has values {np.unique(arr)[:8].tolist()}")
    return arr


def parse_meta(data: bytes | str | Mapping) -> dict:
    """Parse and check the ``.json`` member (types, instruction, task, tags)."""
    try:
        meta = dict(data) if isinstance(data, Mapping) else json.loads(data)
    except Exception as exn:
        raise SampleError("bad_json", str(exn)) from exn
    if not isinstance(meta, dict):
        raise SampleError("bad_json", "json is not an object")
    missing = [f for f in META_FIELDS if f not in meta]
    if missing:
        raise SampleError("bad_json", f"missing fields {missing}")
    if not isinstance(meta["instruction"], str) or not meta["instruction"].strip():
        raise SampleError("empty_instruction", repr(meta["instruction"]))
    if meta["task"] not in TASKS:
        raise SampleError("unknown_task", repr(meta["task"]))
    bbox = meta["bbox"]
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, int) for v in bbox)):
        raise SampleError("bad_json", f"bbox {bbox!r}")
    if not isinstance(meta["tags"], dict):
        raise SampleError("bad_json", f"tags {meta['tags']!r}")
    if not all(isinstance(meta[k], int) and meta[k] > 0 for k in ("width", "height")):
        raise SampleError("bad_json", f"width/height {meta['width']!r}/{meta['height']!r}")
    region_boxes(meta)  # raises on a malformed "regions" field
    return meta


def region_boxes(meta: Mapping[str, Any]) -> Optional[list[list[int]]]:
    """The boxes ``[x0, y0, x1, y1]`` (end exclusive, source pixels) of a compositional sample's regions, in
    :data:`REGION_ROLES` order, or None for a sample without a ``regions`` field; raises ``bad_regions``
    when the field is malformed or its roles are not :data:`REGION_ROLES` in order."""
    regions = meta.get("regions")
    if regions is None:
        return None
    if not isinstance(regions, list) or [r.get("role") if isinstance(r, dict) else None for r in regions] != list(
        REGION_ROLES
    ):
        raise SampleError("bad_regions", f"regions must list the roles {list(REGION_ROLES)} in order: {regions!r}")
    boxes = [r.get("bbox") for r in regions]
    for b in boxes:
        if not (
            isinstance(b, list) and len(b) == 4 and all(isinstance(v, int) for v in b) and b[0] < b[2] and b[1] < b[3]
        ):
            raise SampleError("bad_regions", f"region bbox {b!r}")
    return boxes


def check_regions(boxes: list[list[int]], mask: np.ndarray) -> None:
    """A compositional sample's boxes against its fine mask (uint8 HxW): disjoint, inside the image, each
    holding part of the fine mask, and together holding all of it (the loader splits the mask by them)."""
    h, w = mask.shape
    covered = np.zeros(mask.shape, bool)
    for x0, y0, x1, y1 in boxes:
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            raise SampleError("bad_regions", f"region box {[x0, y0, x1, y1]} outside the {w}x{h} image")
        if covered[y0:y1, x0:x1].any():
            raise SampleError("bad_regions", f"region boxes {boxes} overlap")
        covered[y0:y1, x0:x1] = True
        if not mask[y0:y1, x0:x1].any():
            raise SampleError("bad_regions", f"region box {[x0, y0, x1, y1]} holds no edit pixel")
    if (mask.astype(bool) & ~covered).any():
        raise SampleError("bad_regions", f"edit pixels outside every region box {boxes}")


def check_sample(
    meta: dict, src: Image.Image, tgt: Image.Image, mask: Image.Image, ref: Optional[Image.Image]
) -> np.ndarray:
    """Cross-member checks on decoded members; returns the mask as uint8 {0, 255}.

    The reference image may have any size (it is a separate subject image); everything else must
    match the source, and the json's width/height/bbox must agree with the pixels.
    """
    w, h = src.size
    if tgt.size != src.size or mask.size != src.size:
        raise SampleError("size_mismatch", f"src {src.size} tgt {tgt.size} mask {mask.size}")
    if (meta["width"], meta["height"]) != (w, h):
        raise SampleError("size_mismatch", f"json says {meta['width']}x{meta['height']}, src is {w}x{h}")
    arr = mask_array(mask)
    box = bbox_from_mask(arr)
    if box != list(meta["bbox"]):
        raise SampleError("bad_bbox", f"json bbox {meta['bbox']} but mask box {box}")
    boxes = region_boxes(meta)
    if boxes is not None:
        check_regions(boxes, arr)
    return arr


def decode_sample(sample: Mapping[str, Any]) -> dict:
    """Raw tar sample (member suffix -> bytes) to checked, decoded members.

    Returns ``{key, url, meta, src, tgt, ref (or None), mask (uint8 array)}``; raises SampleError.
    """
    missing = [m for m in REQUIRED_MEMBERS if m not in sample]
    if missing:
        raise SampleError("missing_key", f"missing {missing}")
    meta = parse_meta(sample["json"])
    src = decode_image(sample["src.png"], "src.png")
    tgt = decode_image(sample["tgt.png"], "tgt.png")
    mask_img = decode_image(sample["mask.png"], "mask.png", mode="keep")
    ref = decode_image(sample["ref.png"], "ref.png") if "ref.png" in sample else None
    mask = check_sample(meta, src, tgt, mask_img, ref)
    return dict(
        key=sample.get("__key__", ""), url=sample.get("__url__", ""), meta=meta, src=src, tgt=tgt, ref=ref, mask=mask
    )


def encode_png(img: Image.Image | np.ndarray) -> bytes:
    """PNG bytes of an image or uint8 array (HxW -> L, HxWx3 -> RGB)."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
