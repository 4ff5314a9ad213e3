"""Where a trained CARE-Edit model routes: routing maps per task and the token spread per expert layer.

    python bench/routing_maps.py --checkpoint runs/tiny/checkpoints --data 'artifacts/synthetic/val-{000000..000000}.tar' \
        --out runs/tiny/routing [--per-task 4] [--steps 20] [--device cpu]

Writes ``OUT/routing_<task>.png`` (rows: samples; columns: source | coarse mask | refined mask |
routing map | target | edit, as the training log's grids; routing-map colours: text red, mask green,
reference blue, base grey; a caption says what each map shows) and prints one JSON line: per task and
expert layer, the routing statistics on those samples at flow times 0.25 / 0.5 / 0.75. An expert's
*combine weight* on a token is its share of the layer's output there: its routed weight times the
Latent Mixture gate, plus, for Base, the gate's 1 - g (``moe.repaint.combine_weights``). Statistics:
token spread (the std over a sample's tokens of each expert's combine weight, ~0 when routing is
constant over the image), utilisation (share of tokens routed to the expert), mean combine weight
inside vs outside the fine mask per expert.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# The project's modules (and torch) are imported inside the functions: `--help` and a bad argument answer at
# once, before the model's code loads.


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--per-task", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    return p.parse_args(argv)


def routing_stats(model, batch, times=(0.25, 0.5, 0.75), seed: int = 0) -> dict:
    """Per expert layer: token spread, utilisation and the mean combine weight of each expert inside and
    outside the fine mask, over the batch's samples at the given flow times (seeded noise)."""
    import torch

    from moe.encoders import mask_to_grid
    from moe.repaint import combine_weights
    from moe.router import dense_weights

    x0 = model.encode_target(batch)
    cond = model.encode_conditions(batch)
    gen = torch.Generator(device=x0.device).manual_seed(seed)
    per_layer: dict[int, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    e = len(model.expert_names)
    base_id = model.expert_names.index("base") if "base" in model.expert_names else -1
    for tv in times:
        noise = torch.randn(x0.shape, generator=gen, device=x0.device, dtype=x0.dtype)
        t = torch.full((x0.shape[0],), tv, device=x0.device)
        _, ctx = model.predict_velocity((1 - tv) * x0 + tv * noise, t, cond)
        gh, gw = ctx.grid
        inside = mask_to_grid(batch.fine_mask.to(x0.device), (gh, gw)).reshape(x0.shape[0], -1) >= 0.5  # [B, N]
        for pos, rec in ctx.records.items():
            r = rec.routing
            routed = dense_weights(r.index, r.weight, e).float().reshape(x0.shape[0], gh * gw, e)
            w = combine_weights(r.index, r.weight, rec.gate, e, base_id).float().reshape(x0.shape[0], gh * gw, e)
            st = per_layer[model.expert_blocks[pos]]
            st["spread"].append(w.std(dim=1).mean().item())
            st["util"].append(routed.gt(0).float().mean(dim=(0, 1)).tolist())
            st["inside"].append([(w[..., j][inside].mean().item() if inside.any() else float("nan")) for j in range(e)])
            st["outside"].append(
                [(w[..., j][~inside].mean().item() if (~inside).any() else float("nan")) for j in range(e)]
            )
    out = {}
    for block, st in per_layer.items():
        mean = lambda rows: [round(sum(col) / len(col), 4) for col in zip(*rows)]  # noqa: E731
        out[f"block{block}"] = dict(
            token_spread=round(sum(st["spread"]) / len(st["spread"]), 4),
            utilisation=dict(zip(model.expert_names, mean(st["util"]))),
            weight_inside_mask=dict(zip(model.expert_names, mean(st["inside"]))),
            weight_outside_mask=dict(zip(model.expert_names, mean(st["outside"]))),
        )
    return out


def caption(task: str, model) -> list[str]:
    """What a routing figure shows, written above it."""
    return [
        f"{task}: source | coarse mask | refined mask | routing map | target | edit",
        f"routing map: per token, the expert with the largest combine weight in the last expert layer "
        f"(block {max(model.expert_blocks)}), Base's Latent Mixture share included",
        "colours: text red, mask green, reference blue, base grey",
    ]


def labelled(img, lines: list[str]):
    """The image under a white band holding ``lines``."""
    from PIL import Image, ImageDraw

    out = Image.new("RGB", (max(img.width, 560), img.height + 14 * len(lines) + 6), "white")
    out.paste(img, (0, 14 * len(lines) + 6))
    draw = ImageDraw.Draw(out)
    for i, line in enumerate(lines):
        draw.text((4, 3 + 14 * i), line, fill="black")
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    import torch
    from omegaconf import OmegaConf
    from PIL import Image

    from train.eval import iterate_heldout, load_for_inference
    from train.logging import edit_grid

    model, cfg = load_for_inference(args.checkpoint, device=args.device)
    model.eval()
    pool = next(iter(iterate_heldout(OmegaConf.to_object(cfg.data), args.data, 200, 200)))  # one batch
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(pool.task):
        if len(by_task[task]) < args.per_task:
            by_task[task].append(i)
    os.makedirs(args.out, exist_ok=True)
    report = {}
    for task, index in sorted(by_task.items()):
        batch = pool.select(index)
        batch = batch.to(args.device)
        grid = edit_grid(model, batch, args.steps)
        arr = (grid.permute(1, 2, 0).clamp(0, 1) * 255).byte().numpy()
        img = Image.fromarray(arr).resize((arr.shape[1] * 2, arr.shape[0] * 2), Image.NEAREST)
        labelled(img, caption(task, model)).save(os.path.join(args.out, f"routing_{task}.png"))
        with torch.no_grad():
            report[task] = routing_stats(model, batch)
    print(json.dumps(report))
    with open(os.path.join(args.out, "routing.json"), "w") as f:
        json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
