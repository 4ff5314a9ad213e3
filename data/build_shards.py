"""Convert a folder of images plus a JSONL manifest into edit shards.

    python -m data.build_shards --manifest M.jsonl --root DIR --out OUTDIR --shard-size-mb 1000 [--prefix edit]

One manifest line per sample (paths relative to ``--root``)::

    {"src": "a/1.png", "tgt": "a/1_edit.png", "ref": null, "mask": "a/1_mask.png",
     "instruction": "make the cup red", "task": "recolor",
     "tags": {"scope": "local", "type": "recolor", "preservation": ["background"]},
     "source": "omniedit", "key": "optional-unique-key"}

Masks must be binary (mode 1 or L with values {0,1} or {0,255}); converters for datasets with soft
masks binarise first (see ``data.convert_magicbrush``). Lines are shuffled (``--shuffle-seed``)
before writing so that each shard mixes all sources: the loader shuffles samples only within a
shard (that is what makes resume exact and cheap, docs/DATA.md), so shard order must not be
source order. Skipped samples are counted per reason, printed, and saved next to the shards in
``<prefix>.report.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
from multiprocessing import Pool
from typing import Optional

import numpy as np
from PIL import Image

from data.schema import SampleError
from data.shards import EditRecord, record_to_sample, write_shards


def open_image(path: Optional[str], mode: Optional[str], what: str = "") -> Image.Image:
    """Open and fully decode an image file, turning failures into the skip reasons the report counts."""
    if path is None or not os.path.isfile(path):
        raise SampleError("missing_file", f"{what}: {path}" if what else str(path))
    try:
        img = Image.open(path)
        img.load()
    except Exception as exn:
        raise SampleError("decode_error", f"{path}: {exn}") from exn
    return img.convert(mode) if mode else img


def _open(root: str, rel: Optional[str], what: str, mode: str) -> Image.Image:
    return open_image(os.path.join(root, rel) if rel else None, mode, what)


def load_binary_mask(img: Image.Image) -> np.ndarray:
    """uint8 {0, 255} from a binary mask image; grey values are refused, not thresholded."""
    if img.mode not in ("1", "L"):
        raise SampleError("mask_not_binary", f"mask mode {img.mode}")
    arr = np.asarray(img.convert("L"))
    vals = set(np.unique(arr).tolist())
    if vals <= {0, 1}:
        return (arr * 255).astype(np.uint8)
    if vals <= {0, 255}:
        return arr
    raise SampleError("mask_not_binary", f"values {sorted(vals)[:8]}")


def line_to_record(root: str, index: int, line: dict) -> EditRecord:
    return EditRecord(
        key=str(line.get("key") or f"{index:09d}"),
        src=_open(root, line.get("src"), "src", "RGB"),
        tgt=_open(root, line.get("tgt"), "tgt", "RGB"),
        ref=_open(root, line["ref"], "ref", "RGB") if line.get("ref") else None,
        mask=load_binary_mask(_open(root, line.get("mask"), "mask", "")),
        instruction=line.get("instruction") or "",
        task=line.get("task", ""),
        tags=line.get("tags") or {},
        source=line.get("source", "other"),
        extra={k: v for k, v in line.items() if k.startswith("orig_")},
    )


def _load(args: tuple[str, int, str]):
    """Pool task: manifest line -> encoded sample, or the SampleError (the writer counts it)."""
    root, index, text = args
    try:
        return record_to_sample(line_to_record(root, index, json.loads(text)))
    except SampleError as exn:
        return exn
    except json.JSONDecodeError as exn:
        return SampleError("bad_json", f"manifest line {index}: {exn}")


def build_shards(
    manifest: str,
    root: str,
    out: str,
    shard_size_mb: float = 1000.0,
    prefix: str = "edit",
    shuffle_seed: Optional[int] = 0,
    workers: int = 1,
    progress: bool = True,
):
    """Library form of the CLI; returns the :class:`data.shards.ShardReport`."""
    with open(manifest) as f:
        lines = [ln for ln in f if ln.strip()]
    order = list(range(len(lines)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    tasks = ((root, i, lines[i]) for i in order)
    if workers > 1:
        with Pool(workers) as pool:
            return write_shards(
                pool.imap(_load, tasks, chunksize=4), out, prefix, shard_size_mb, total=len(lines), progress=progress
            )
    return write_shards(map(_load, tasks), out, prefix, shard_size_mb, total=len(lines), progress=progress)


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--root", required=True, help="folder the manifest paths are relative to")
    ap.add_argument("--out", required=True)
    ap.add_argument("--shard-size-mb", type=float, default=1000.0)
    ap.add_argument("--prefix", default="edit")
    ap.add_argument("--shuffle-seed", type=int, default=0, help="-1 keeps manifest order")
    ap.add_argument("--workers", type=int, default=1, help="processes decoding/encoding images")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    rep = build_shards(
        a.manifest, a.root, a.out, a.shard_size_mb, a.prefix, None if a.shuffle_seed < 0 else a.shuffle_seed, a.workers
    )
    print(f"wrote {rep.written} samples in {len(rep.shards)} shards: {rep.pattern}")
    print("skipped:", json.dumps(dict(rep.skipped)) if rep.skipped else "none")
    print("report:", os.path.join(a.out, f"{a.prefix}.report.json"))


if __name__ == "__main__":
    main()
