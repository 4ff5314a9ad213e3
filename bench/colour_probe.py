"""Does a trained editor read the instruction's colour word? A probe on the synthetic held-out set.

    python bench/colour_probe.py --checkpoint runs/tiny/checkpoints \
        [--data 'artifacts/synthetic/val-{000000..000000}.tar'] [--samples 40] [--steps 20] \
        [--text-guidance S] [--image-guidance S] [--device cpu]

Each recolor and add sample (``make the red circle blue``, ``add a blue square``) is edited once per
palette colour, with the instruction's colour word replaced by it, from the same noise. Every pixel
of the edit region (the fine mask) is classified as the nearest palette colour within the success
checker's match distance (``train.eval.edit_success.MATCH``), or none. Printed: one row per requested
colour, the share of the region's pixels of each palette colour and of none. An editor that reads
the word has a heavy diagonal; one that ignores it has identical rows; one that is unsure paints
mixed colours, which land in the last column. Ends with one JSON line (the matrix and its diagonal).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from data.synthetic import COLORS  # noqa: E402
from train.eval import MATCH as COLOR_RADIUS  # noqa: E402
from train.eval import iterate_heldout, load_for_inference, to_unit  # noqa: E402

PROBED_TASKS = ("recolor", "add")


def with_colour(instruction: str, task: str, colour: str) -> str:
    """The instruction asking for ``colour``: recolor names it last, add third (``add a <colour> <shape>``)."""
    words = instruction.split()
    words[-1 if task == "recolor" else 2] = colour
    return " ".join(words)


def palette_shares(images: Tensor, region: Tensor, palette: Tensor, radius: float = COLOR_RADIUS) -> Tensor:
    """Pixel counts per palette colour (and a last column: none within ``radius``) inside ``region``.

    images [B, 3, H, W] in [0, 1]; region [B, 1, H, W] boolean; palette [P, 3] in [0, 1] -> [P + 1].
    """
    pixels = images.permute(0, 2, 3, 1)[region[:, 0]]  # [N, 3]
    dist = torch.cdist(pixels.float(), palette.float())
    nearest = dist.min(dim=1)
    label = torch.where(nearest.values < radius, nearest.indices, torch.full_like(nearest.indices, len(palette)))
    return torch.bincount(label, minlength=len(palette) + 1).float()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", default="artifacts/synthetic/val-{000000..000000}.tar")
    p.add_argument("--samples", type=int, default=40, help="recolor and add samples probed (at least)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--text-guidance", type=float, default=None, help="default: the recipe's model.sampling")
    p.add_argument("--image-guidance", type=float, default=None)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    model, cfg = load_for_inference(args.checkpoint, device=args.device)
    names = list(COLORS)
    palette = torch.tensor([COLORS[c] for c in names], dtype=torch.float32) / 255
    counts = torch.zeros(len(names), len(names) + 1)
    probed = 0
    for batch in iterate_heldout(cfg.data, args.data, 50, 10**9):
        idx = [i for i, t in enumerate(batch.task) if t in PROBED_TASKS]
        if not idx:
            continue
        sub = batch.select(idx)
        original = list(sub.instruction)
        region = torch.nn.functional.interpolate(sub.fine_mask.float(), size=sub.source.shape[-2:]) > 0.5
        for ci, colour in enumerate(names):
            sub.instruction = [with_colour(s, t, colour) for s, t in zip(original, sub.task)]
            with torch.no_grad():
                res = model.edit(
                    sub.to(args.device, model.dtype),
                    num_steps=args.steps,
                    text_guidance=args.text_guidance,
                    image_guidance=args.image_guidance,
                    generator=torch.Generator(device=args.device).manual_seed(0),
                )
            counts[ci] += palette_shares(to_unit(res.images).cpu(), region, palette)
        probed += len(idx)
        if probed >= args.samples:
            break
    if probed == 0:
        print(f"error: --data {args.data}: no {' or '.join(PROBED_TASKS)} samples to probe", file=sys.stderr)
        return 2
    shares = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    cols = names + ["none"]
    print(
        f"{probed} samples ({', '.join(PROBED_TASKS)}), guidance {res.guidance}: requested colour -> share of the region's pixels"
    )
    print(" " * 8 + "".join(f"{c[:6]:>8}" for c in cols))
    for ci, colour in enumerate(names):
        print(f"{colour:>8}" + "".join(f"{v:8.2f}" for v in shares[ci].tolist()))
    diag = shares[:, : len(names)].diagonal()
    record = {
        "checkpoint": args.checkpoint,
        "samples": probed,
        "guidance": res.guidance,
        "colours": names,
        "shares": [[round(v, 4) for v in row] for row in shares.tolist()],
        "requested_share_mean": round(float(diag.mean()), 4),
        "none_share_mean": round(float(shares[:, -1].mean()), 4),
    }
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
