"""Builders of small, optionally broken shards, for the tests.

Broken samples are written with ``webdataset.TarWriter`` directly (bypassing the checking
writer, which would refuse them), the way a damaged or foreign shard would look.
"""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import webdataset as wds
from PIL import Image

from data.schema import encode_png
from data.shards import record_to_sample
from data.synthetic import make_sample

BREAKAGES = ("decode_error", "size_mismatch", "missing_key", "empty_instruction", "mask_not_binary")


def valid_raw(index: int, size: int = 32, seed: int = 0, split: str = "train") -> dict:
    """An encoded, valid synthetic sample (tar members as bytes)."""
    return record_to_sample(make_sample(seed, split, index, size))


def broken_raw(raw: dict, how: str) -> dict:
    """A copy of ``raw`` damaged so that the loader must skip it for reason ``how``."""
    raw = dict(raw)
    meta = json.loads(raw["json"])
    if how == "decode_error":
        raw["src.png"] = raw["src.png"][: len(raw["src.png"]) // 2]  # truncated PNG
    elif how == "size_mismatch":
        m = np.asarray(Image.open(io.BytesIO(raw["mask.png"])))
        raw["mask.png"] = encode_png(np.pad(m, ((0, 4), (0, 4))))
    elif how == "missing_key":
        del raw["tgt.png"]
    elif how == "empty_instruction":
        meta["instruction"] = "  "
    elif how == "mask_not_binary":
        m = np.asarray(Image.open(io.BytesIO(raw["mask.png"]))).copy()
        m[m == 255] = 200
        raw["mask.png"] = encode_png(m)
    else:
        raise ValueError(how)
    raw["json"] = json.dumps(meta).encode()
    return raw


def write_raw_shard(path: str, samples: list[dict]) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with wds.TarWriter(path) as w:
        for s in samples:
            w.write(s)
    return path


def truncate_inside(path: str, member: str) -> None:
    """Cut the tar file in the middle of ``member``'s data (a truncated upload / disk error)."""
    with tarfile.open(path) as tf:
        info = tf.getmember(member)
    with open(path, "r+b") as f:
        f.truncate(info.offset_data + info.size // 2)


def coord_image(w: int, h: int) -> Image.Image:
    """RGB image whose pixel (x, y) is (x, y, 0): after a crop each pixel says where it came from."""
    assert w <= 256 and h <= 256
    yy, xx = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([xx, yy, np.zeros_like(xx)], -1).astype(np.uint8))


def wide_raw(index: int, size: int = 32, extra_w: int = 16, seed: int = 0) -> dict:
    """A valid sample of size (size + extra_w) x size: a synthetic one padded on the right."""
    rec = make_sample(seed, "train", index, size)
    pad = lambda im: Image.fromarray(np.pad(np.asarray(im), ((0, 0), (0, extra_w), (0, 0)), constant_values=128))
    rec.src, rec.tgt = pad(rec.src), pad(rec.tgt)
    rec.mask = np.pad(rec.mask, ((0, 0), (0, extra_w)))
    rec.key = rec.key + "-wide"
    return record_to_sample(rec)
