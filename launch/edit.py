"""Edit one image with a trained CARE-Edit model (flow-matching sampler, LoRA + experts + router +
Mask Repaint + Latent Mixture as trained).

``python launch/edit.py --checkpoint RUN/checkpoints|TAG_DIR|weights.safetensors --image in.png
--instruction "make the circle blue" --out out.png [--mask x0,y0,x1,y1 | --mask mask.png]
[--reference ref.png] [--steps 20] [--text-guidance 1.0] [--image-guidance 1.0] [--seed 0]
[--size H W] [--device cpu|cuda] [--ema] [--refined-mask-out m.png] [--routing-map-out r.png]``

The image is resized to ``--size`` (default: the training resolution, ``data.image_size``) and the
outputs are written at that size. ``--mask`` is a box in the input image's pixels (end exclusive,
like the dataset's bbox) or a PNG (white = region); the model is routed by the mask's bounding box
(the coarse mask it was trained with). Without a mask the whole image is the region.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from data.batch import EditBatch  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run checkpoint dir (uses 'latest'), a tag dir, or an export")
    p.add_argument("--image", required=True)
    p.add_argument("--instruction", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mask", default=None, help="box 'x0,y0,x1,y1' (input pixels) or a mask PNG")
    p.add_argument("--reference", default=None, help="reference image (subject / style)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--text-guidance", type=float, default=1.0)
    p.add_argument("--image-guidance", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--refined-mask-out", default=None)
    p.add_argument("--routing-map-out", default=None)
    return p.parse_args(argv)


def _image_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL -> [1, 3, H, W] in [-1, 1] at ``size`` (H, W)."""
    arr = np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(arr).permute(2, 0, 1)[None]


def region_masks(mask: Optional[str], orig_wh: tuple[int, int], size: tuple[int, int]
                 ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(fine [1,1,H,W], coarse box [1,1,H,W], bbox) at ``size`` from a box string, a PNG or nothing."""
    h, w = size
    fine = torch.zeros(1, 1, h, w)
    if mask is None:
        fine[:] = 1
    elif os.path.isfile(mask):
        m = Image.open(mask).convert("L").resize((w, h), Image.NEAREST)
        fine[0, 0] = torch.from_numpy(np.asarray(m) >= 128).float()
        if fine.sum() == 0:
            raise ValueError(f"--mask {mask}: the mask is empty (no pixel >= 128)")
    else:
        try:
            x0, y0, x1, y1 = (float(v) for v in mask.split(","))
        except ValueError:
            raise ValueError(f"--mask {mask!r}: neither a file nor a box 'x0,y0,x1,y1'") from None
        sx, sy = w / orig_wh[0], h / orig_wh[1]
        bx0, by0 = max(0, int(x0 * sx)), max(0, int(y0 * sy))
        bx1, by1 = min(w, max(bx0 + 1, round(x1 * sx))), min(h, max(by0 + 1, round(y1 * sy)))
        if not (x1 > x0 and y1 > y0):
            raise ValueError(f"--mask {mask!r}: need x1 > x0 and y1 > y0")
        fine[0, 0, by0:by1, bx0:bx1] = 1
    ys, xs = torch.nonzero(fine[0, 0], as_tuple=True)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    coarse = torch.zeros_like(fine)
    coarse[0, 0, bbox[1]:bbox[3], bbox[0]:bbox[2]] = 1
    return fine, coarse, bbox


def build_edit_batch(image: str, instruction: str, size: tuple[int, int], mask: Optional[str] = None,
                     reference: Optional[str] = None) -> EditBatch:
    """One-sample EditBatch as the loader would make it (target unknown: the source stands in)."""
    img = Image.open(image)
    source = _image_tensor(img, size)
    fine, coarse, bbox = region_masks(mask, img.size, size)
    ref = _image_tensor(Image.open(reference), size) if reference else torch.zeros_like(source)
    return EditBatch(source=source, target=source.clone(), reference=ref, has_reference=torch.tensor([bool(reference)]),
                     fine_mask=fine, coarse_mask=coarse, bbox=torch.tensor([bbox]), instruction=[instruction],
                     task=["edit"], tag_ids=torch.full((1, 1), -1, dtype=torch.long), keys=["input"])


def save_image(x: torch.Tensor, path: str, signed: bool = True) -> None:
    """[3|1, H, W] tensor -> PNG; ``signed``: values in [-1, 1], else [0, 1]."""
    x = x.detach().float().cpu()
    x = (x + 1) / 2 if signed else x
    arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def run_edit(model: torch.nn.Module, batch: EditBatch, steps: int, text_guidance: float, image_guidance: float,
             seed: int, device: str):
    """``model.edit`` with a seeded generator on ``device`` (same seed -> same edit)."""
    g = torch.Generator(device=device).manual_seed(seed)
    return model.edit(batch.to(device, model.dtype), num_steps=steps, text_guidance=text_guidance,
                      image_guidance=image_guidance, generator=g)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from train.export import WeightsError, load_for_inference

    try:
        model, cfg = load_for_inference(args.checkpoint, device=args.device, ema=args.ema)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = tuple(args.size) if args.size else (cfg.data.image_size, cfg.data.image_size)
    stride = model.token_stride
    if size[0] % stride or size[1] % stride:
        print(f"error: --size {size[0]} {size[1]} must be multiples of {stride} (VAE x 2x2 packing)", file=sys.stderr)
        return 2
    try:
        batch = build_edit_batch(args.image, args.instruction, size, args.mask, args.reference)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = run_edit(model, batch, args.steps, args.text_guidance, args.image_guidance, args.seed, args.device)
    save_image(res.images[0], args.out)
    if args.refined_mask_out:
        save_image(res.refined_mask[0], args.refined_mask_out, signed=False)
    if args.routing_map_out:
        save_image(res.routing_map[0], args.routing_map_out)
    util = " ".join(f"{k} {v:.2f}" for k, v in res.utilisation.items())
    print(f"wrote {args.out} ({size[0]}x{size[1]}, {args.steps} steps, seed {args.seed}); expert utilisation: {util}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
