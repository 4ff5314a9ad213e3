"""Shard MagicBrush as published in one command.

    python -m data.convert_magicbrush --root DIR --out OUTDIR [--threshold 128] [--shard-size-mb 1000]

Assumed layout (the release zip / the HF repo unpacked; ``DIR`` is a split folder, or a folder
holding split folders such as ``train/`` and ``dev/``)::

    DIR/edit_sessions.json     {"<img_id>": [{"input": "<img_id>-input.png", "mask": "<img_id>-mask1.png",
                                              "output": "<img_id>-output1.png", "instruction": "..."}, ...]}
    DIR/images/<img_id>/<img_id>-input.png, -mask1.png, -output1.png, -output2.png, ...

Each turn is one sample (multi-turn sessions: turn k's input is turn k-1's output). Masks are
"white = edit region" images, sometimes RGBA or with soft edges: a pixel is in the region when
its grey level (alpha-composited onto black, so transparent pixels are background) is
``>= --threshold`` (default 128). MagicBrush has no task labels: task ``other``, tags
``{scope: local, type: other, preservation: [background]}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from data.build_shards import open_image
from data.schema import SampleError
from data.shards import EditRecord, ShardReport, write_shards


def binarise_mask(img: Image.Image, threshold: int = 128) -> np.ndarray:
    """uint8 {0, 255} from a white-is-region mask of any mode (RGBA: transparent = background)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba)
    grey = np.asarray(img.convert("L"))
    return np.where(grey >= threshold, 255, 0).astype(np.uint8)


def magicbrush_records(split_dir: str, threshold: int = 128) -> Iterator[EditRecord | SampleError]:
    with open(os.path.join(split_dir, "edit_sessions.json")) as f:
        sessions = json.load(f)
    for img_id, turns in sorted(sessions.items()):
        folder = os.path.join(split_dir, "images", str(img_id))
        for turn, t in enumerate(turns, 1):
            try:
                yield EditRecord(
                    key=f"mb-{img_id}-{turn}",
                    src=open_image(os.path.join(folder, t["input"]), "RGB"),
                    tgt=open_image(os.path.join(folder, t["output"]), "RGB"),
                    mask=binarise_mask(open_image(os.path.join(folder, t["mask"]), None), threshold),
                    instruction=t.get("instruction", ""),
                    task="other",
                    tags={"scope": "local", "type": "other", "preservation": ["background"]},
                    source="magicbrush",
                    extra={"orig_id": f"{img_id}/{turn}"},
                )
            except SampleError as exn:
                yield exn
            except KeyError as exn:
                yield SampleError("bad_json", f"{img_id} turn {turn}: no {exn}")


def convert(
    root: str, out: str, threshold: int = 128, shard_size_mb: float = 1000.0, progress: bool = True
) -> dict[str, ShardReport]:
    """Shard every split under ``root``; returns ``{split: report}`` (prefix ``magicbrush-<split>``)."""
    if os.path.isfile(os.path.join(root, "edit_sessions.json")):
        splits = {os.path.basename(os.path.normpath(root)): root}
    else:
        splits = {
            d: os.path.join(root, d)
            for d in sorted(os.listdir(root))
            if os.path.isfile(os.path.join(root, d, "edit_sessions.json"))
        }
    if not splits:
        raise FileNotFoundError(f"no edit_sessions.json in {root} or its subfolders")
    return {
        s: write_shards(magicbrush_records(d, threshold), out, f"magicbrush-{s}", shard_size_mb, progress=progress)
        for s, d in splits.items()
    }


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Shard MagicBrush (edit_sessions.json + images/).")
    ap.add_argument("--root", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threshold", type=int, default=128, help="grey level >= this is edit region")
    ap.add_argument("--shard-size-mb", type=float, default=1000.0)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for split, rep in convert(a.root, a.out, a.threshold, a.shard_size_mb).items():
        print(f"{split}: wrote {rep.written} samples: {rep.pattern}; skipped {dict(rep.skipped) or 'none'}")


if __name__ == "__main__":
    main()
