"""How well can a mask predicted on the token grid match the fine mask? The IoU ceiling of Mask Repaint.

    python bench/mask_ceiling.py --data 'artifacts/synthetic/val-{000000..000000}.tar' [--image-size 64]
        [--grid 8] [--limit 200]

Mask Repaint predicts one value per image token; evaluation upsamples it to pixels and thresholds it at
0.5 (``train.eval.evaluation.mask_iou_per_sample``). This prints one JSON line with the held-out mean IoU
against the fine mask of: the coarse box (what the model is given), and the *perfect* token-level mask
(the fine mask averaged over each token's pixels) upsampled nearest (as ``CareEditModel.edit`` does) or
bilinearly, alone and intersected with the box. If the perfect token mask scores below the box, no
token-level head can beat the box: that needs a finer grid or a head that predicts below the token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The project's modules (and torch) are imported inside the functions: `--help` and a bad argument answer at
# once, before the model's code loads.


def ceilings(fine, box, grid: int) -> dict[str, float]:
    """Mean IoU against ``fine`` ([B, 1, H, W] in {0, 1}) of the box and of the perfect grid x grid mask."""
    import torch.nn.functional as F

    from train.eval import mask_iou_per_sample

    size = fine.shape[-2:]
    token = F.adaptive_avg_pool2d(fine.float(), (grid, grid))  # each token's share of fine-mask pixels
    nearest = F.interpolate(token, size=size, mode="nearest")
    bilinear = F.interpolate(token, size=size, mode="bilinear", align_corners=False)

    def iou(m) -> float:
        return round(mask_iou_per_sample(m, fine).mean().item(), 4)

    return {
        "coarse_box": iou(box),
        "token_mask_nearest": iou(nearest),
        "token_mask_bilinear": iou(bilinear),
        "token_mask_nearest_and_box": iou(nearest * box),
        "token_mask_bilinear_and_box": iou(bilinear * box),
    }


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--grid", type=int, default=8, help="tokens per side (tiny.yaml: 64 px / 4 / 2 = 8)")
    p.add_argument("--limit", type=int, default=200)
    args = p.parse_args(argv)
    from data.config import DataConfig
    from train.eval import iterate_heldout

    data_cfg = dataclasses.replace(DataConfig(), image_size=args.image_size)
    batch = next(iter(iterate_heldout(data_cfg, args.data, args.limit, args.limit)))
    out = ceilings(batch.fine_mask, batch.coarse_mask.float(), args.grid)
    print(json.dumps({"samples": len(batch.task), "image_size": args.image_size, "grid": args.grid, **out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
