"""Edit one image with a trained CARE-Edit model (flow-matching sampler, LoRA + experts + router +
Mask Repaint + Latent Mixture as trained).

``python -m launch.edit --checkpoint RUN/checkpoints|TAG_DIR|weights.safetensors --image in.png
--instruction "make the circle blue" --out out.png [--mask x0,y0,x1,y1 | --mask mask.png]
[--reference ref.png] [--steps 20] [--text-guidance S] [--image-guidance S] [--seed 0]
[--size H W] [--device cpu|cuda] [--ema] [--keep-outside-box] [--refined-mask-out m.png]
[--routing-map-out r.png]``

The image is resized to ``--size`` (default: the training resolution, ``data.image_size``) and the
outputs are written at that size. ``--mask`` is a box in the input image's pixels (end exclusive,
like the dataset's bbox) or a PNG (white = region); the model is routed by the mask's bounding box
(the coarse mask it was trained with). Without a mask the whole image is the region.
``--keep-outside-box`` makes the sampler keep the image outside the mask's box, as inpainting
samplers do (``CareEditModel.edit``): with a lossless codec the result there is the input, exactly.

Bad input is refused with one line naming the argument and exit code 2 (a missing or unreadable
image, a box wholly outside the image, an empty instruction, ...); what can be converted is, with a
note on stderr: grayscale, palette, RGBA (composited onto white) and 16-bit images become 8-bit RGB, a
reference or mask PNG of another size is resized with the image, a box partly outside the image is
clipped to it.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

if not __package__:  # run as a file (deepspeed launch/train.py): launch/by_path.py says why
    import by_path  # noqa: F401

# The project's modules are imported inside the functions, after the arguments are parsed: `--help` and a
# bad argument answer at once, before torch, DeepSpeed and the model load.

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, UnidentifiedImageError  # noqa: E402

from data.batch import EditBatch  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run checkpoint dir (uses 'latest'), a tag dir, or an export")
    p.add_argument("--image", required=True)
    p.add_argument("--instruction", required=True)
    p.add_argument("--out", required=True)
    p.add_argument(
        "--mask",
        default=None,
        help="box 'x0,y0,x1,y1' (input pixels; clipped to the image) or a mask "
        "PNG; a box that starts with a minus sign: --mask=-4,0,20,20",
    )
    p.add_argument("--reference", default=None, help="reference image (subject / style)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--text-guidance", type=float, default=None, help="default: the recipe's model.sampling")
    p.add_argument("--image-guidance", type=float, default=None, help="default: the recipe's model.sampling")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument(
        "--keep-outside-box",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the sampler keeps the image outside the mask's box, an inpainting-style constraint "
        "(default: the recipe's model.sampling.keep_outside_box)",
    )
    p.add_argument("--refined-mask-out", default=None)
    p.add_argument("--routing-map-out", default=None)
    return p.parse_args(argv)


class InputError(ValueError):
    """A bad command-line input: reported as one ``error:`` line naming the argument, exit code 2."""


def _note(msg: str) -> None:
    print(f"note: {msg}", file=sys.stderr)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


_HIGH_DEPTH = {
    "I;16": "16-bit",
    "I;16L": "16-bit",
    "I;16B": "16-bit",
    "I;16N": "16-bit",
    "I": "32-bit integer (16-bit range)",
    "F": "32-bit float",
}


def _to_8bit(img: Image.Image) -> Image.Image:
    """A one-channel 16/32-bit image -> mode L, scaled (PIL's own conversion clips at 255: mostly white)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        scale = 255.0 if arr.size and np.nanmax(arr) <= 1.0 else 1.0  # [0, 1] floats or [0, 255] values
    else:
        scale = 255.0 / 65535.0  # 16-bit range (a 16-bit PNG may also open as mode I)
    return Image.fromarray(np.clip(np.nan_to_num(arr * scale), 0, 255).round().astype(np.uint8))


def to_rgb(img: Image.Image, name: str, quiet: bool = False) -> Image.Image:
    """``img`` as 8-bit RGB; a note names ``name`` and what was converted (nothing for RGB input)."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in _HIGH_DEPTH:
        out, what = _to_8bit(img).convert("RGB"), f"{_HIGH_DEPTH[mode]} grayscale image, scaled to 8 bits"
    elif mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
        what = f"{mode} image with transparency, composited onto white"
    else:
        what = {"L": "grayscale", "1": "black-and-white", "P": "palette", "CMYK": "CMYK"}.get(mode, f"mode {mode}")
        what += " image"
        try:
            out = img.convert("RGB")
        except (ValueError, OSError) as e:
            raise InputError(f"{name}: cannot convert a mode {mode} image to RGB ({e})") from None
    if not quiet:
        _note(f"{name}: {what}; converted to RGB")
    return out


def open_image(path: str, flag: str) -> Image.Image:
    """The image file given to ``flag``, decoded; a missing, unreadable or non-image file -> InputError."""
    name = f"{flag} {path}"
    if not os.path.exists(path):
        raise InputError(f"{name}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{name}: is a directory, not an image file")
    try:
        img = Image.open(path)
        img.load()  # decode now: a truncated file fails here, not inside the model
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image file PIL can read (PNG, JPEG, WebP, ...)") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{name}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # truncated / corrupt data, permission denied
        raise InputError(f"{name}: unreadable image ({e})") from None
    if img.width < 1 or img.height < 1:
        raise InputError(f"{name}: empty image ({img.width}x{img.height})")
    return img


def _image_tensor(img: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """PIL -> [1, 3, H, W] in [-1, 1] at ``size`` (H, W)."""
    arr = np.asarray(to_rgb(img, "", quiet=True).resize((size[1], size[0]), Image.BICUBIC), dtype=np.float32)
    return torch.from_numpy(arr / 127.5 - 1).permute(2, 0, 1)[None]


def _is_box(mask: str) -> bool:
    return mask.count(",") == 3 and not os.path.exists(mask)


def parse_box(mask: str, orig_wh: tuple[int, int]) -> tuple[float, float, float, float]:
    """A ``x0,y0,x1,y1`` box in the image's pixels, clipped to the image (with a warning).

    A malformed box, one with x1 <= x0 or y1 <= y0, or one wholly outside the image -> InputError.
    """
    W, H = orig_wh
    try:
        x0, y0, x1, y1 = (float(v) for v in mask.split(","))
    except ValueError:
        raise InputError(f"--mask {mask}: a box is four numbers 'x0,y0,x1,y1' (image pixels)") from None
    if not all(np.isfinite(v) for v in (x0, y0, x1, y1)):
        raise InputError(f"--mask {mask}: the box's numbers must be finite")
    if not (x1 > x0 and y1 > y0):
        raise InputError(f"--mask {mask}: need x1 > x0 and y1 > y0 (x1, y1 are exclusive ends)")
    cx0, cy0, cx1, cy1 = max(x0, 0.0), max(y0, 0.0), min(x1, float(W)), min(y1, float(H))
    if not (cx1 > cx0 and cy1 > cy0):
        raise InputError(f"--mask {mask}: the box lies wholly outside the {W}x{H} image (x in 0..{W}, y in 0..{H})")
    if (cx0, cy0, cx1, cy1) != (x0, y0, x1, y1):
        _warn(f"--mask {mask}: the box extends past the {W}x{H} image; clipped to {cx0:g},{cy0:g},{cx1:g},{cy1:g}")
    return cx0, cy0, cx1, cy1


def open_mask(path: str, orig_wh: tuple[int, int]) -> Image.Image:
    """A mask PNG as mode L (white = region); one of another size than the image gets a note."""
    img = open_image(path, "--mask")
    if img.mode in _HIGH_DEPTH:
        img = _to_8bit(img)
    if img.size != tuple(orig_wh):
        _note(
            f"--mask {path}: the mask is {img.width}x{img.height}, the image {orig_wh[0]}x{orig_wh[1]}: "
            "resized with the image"
        )
    return img.convert("L")


def region_masks(
    mask: Optional[str], orig_wh: tuple[int, int], size: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """(fine [1,1,H,W], coarse box [1,1,H,W], bbox) at ``size`` from a box string, a PNG or nothing."""
    h, w = size
    fine = torch.zeros(1, 1, h, w)
    if mask is None:
        fine[:] = 1
    elif _is_box(mask):
        x0, y0, x1, y1 = parse_box(mask, orig_wh)
        sx, sy = w / orig_wh[0], h / orig_wh[1]
        bx0, by0 = min(w - 1, int(x0 * sx)), min(h - 1, int(y0 * sy))
        bx1, by1 = min(w, max(bx0 + 1, round(x1 * sx))), min(h, max(by0 + 1, round(y1 * sy)))
        fine[0, 0, by0:by1, bx0:bx1] = 1
    elif os.path.exists(mask):
        m = open_mask(mask, orig_wh).resize((w, h), Image.NEAREST)
        fine[0, 0] = torch.from_numpy(np.asarray(m) >= 128).float()
        if fine.sum() == 0:
            raise InputError(f"--mask {mask}: the mask is empty at {w}x{h} (no pixel >= 128)")
    else:
        raise InputError(f"--mask {mask}: no such file, and not a box 'x0,y0,x1,y1' (image pixels)")
    ys, xs = torch.nonzero(fine[0, 0], as_tuple=True)
    bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
    coarse = torch.zeros_like(fine)
    coarse[0, 0, bbox[1] : bbox[3], bbox[0] : bbox[2]] = 1
    return fine, coarse, bbox


def check_instruction(instruction: str) -> str:
    """The instruction stripped of surrounding blanks; an empty (or blank) one -> InputError."""
    text = instruction.strip()
    if not text:
        raise InputError('--instruction is empty: say what to change, e.g. --instruction "make the circle blue"')
    return text


def build_edit_batch(
    image: str, instruction: str, size: tuple[int, int], mask: Optional[str] = None, reference: Optional[str] = None
) -> EditBatch:
    """One-sample EditBatch as the loader would make it (target unknown: the source stands in).

    Bad input raises InputError (a ValueError) naming the argument; conversions print a note.
    """
    check_instruction(instruction)
    img = open_image(image, "--image")
    source = _image_tensor(to_rgb(img, f"--image {image}"), size)
    fine, coarse, bbox = region_masks(mask, img.size, size)
    if reference:
        ref_img = open_image(reference, "--reference")
        ref_rgb = to_rgb(ref_img, f"--reference {reference}")
        if ref_img.size != img.size:
            _note(
                f"--reference {reference}: {ref_img.width}x{ref_img.height}, the image {img.width}x{img.height}: "
                f"resized to {size[1]}x{size[0]} like the image"
            )
        ref = _image_tensor(ref_rgb, size)
    else:
        ref = torch.zeros_like(source)
    return EditBatch(
        source=source,
        target=source.clone(),
        reference=ref,
        has_reference=torch.tensor([bool(reference)]),
        fine_mask=fine,
        coarse_mask=coarse,
        bbox=torch.tensor([bbox]),
        instruction=[instruction],
        task=["edit"],
        tag_ids=torch.full((1, 1), -1, dtype=torch.long),
        keys=["input"],
    )


def save_image(x: torch.Tensor, path: str, signed: bool = True) -> None:
    """[3|1, H, W] tensor -> PNG; ``signed``: values in [-1, 1], else [0, 1]."""
    x = x.detach().float().cpu()
    x = (x + 1) / 2 if signed else x
    arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)


def check_output(path: str, flag: str) -> None:
    """Refuse, before the edit runs, an output path that cannot be written as an image."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in Image.registered_extensions():
        raise InputError(f"{flag} {path}: unknown image extension {ext or '(none)'!r}; use .png")
    if os.path.isdir(path):
        raise InputError(f"{flag} {path}: is a directory")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise InputError(f"{flag} {path}: {parent} is a file, not a directory")


def check_args(args: argparse.Namespace) -> None:
    """The checks that need neither the model nor the input files."""
    check_instruction(args.instruction)
    if args.steps < 1:
        raise InputError(f"--steps {args.steps}: need at least 1 sampling step")
    if args.size is not None and min(args.size) < 1:
        raise InputError(f"--size {args.size[0]} {args.size[1]}: must be positive")
    for flag, path in (
        ("--out", args.out),
        ("--refined-mask-out", args.refined_mask_out),
        ("--routing-map-out", args.routing_map_out),
    ):
        if path is not None:
            check_output(path, flag)
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise InputError(f"--device {args.device!r}: not a device (cpu, cuda or cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"--device {args.device}: CUDA is not available here (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InputError(f"--device {args.device}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise InputError(f"--device {args.device}: use cpu or cuda[:N]")


def run_edit(
    model: torch.nn.Module,
    batch: EditBatch,
    steps: int,
    text_guidance: Optional[float],
    image_guidance: Optional[float],
    seed: int,
    device: str,
    keep_outside_box: Optional[bool] = None,
):
    """``model.edit`` with a seeded generator on ``device`` (same seed -> same edit); None: the recipe's."""
    g = torch.Generator(device=device).manual_seed(seed)
    return model.edit(
        batch.to(device, model.dtype),
        num_steps=steps,
        text_guidance=text_guidance,
        image_guidance=image_guidance,
        generator=g,
        keep_outside_box=keep_outside_box,
    )


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from train.config import ConfigError
    from train.eval import WeightsError, load_for_inference

    try:
        check_args(args)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        model, cfg = load_for_inference(args.checkpoint, device=args.device, ema=args.ema)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ConfigError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: --checkpoint {args.checkpoint}: its config does not validate: {first}", file=sys.stderr)
        return 2
    size = tuple(args.size) if args.size else (cfg.data.image_size, cfg.data.image_size)
    stride = model.token_stride
    if size[0] % stride or size[1] % stride:
        print(f"error: --size {size[0]} {size[1]} must be multiples of {stride} (VAE x 2x2 packing)", file=sys.stderr)
        return 2
    try:
        batch = build_edit_batch(args.image, args.instruction, size, args.mask, args.reference)
    except ValueError as e:  # InputError, or a ValueError of the batch's own checks
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = run_edit(
        model,
        batch,
        args.steps,
        args.text_guidance,
        args.image_guidance,
        args.seed,
        args.device,
        keep_outside_box=args.keep_outside_box,
    )
    outputs = [
        (args.out, res.images[0], True),
        (args.refined_mask_out, res.refined_mask[0], False),
        (args.routing_map_out, res.routing_map[0], True),
    ]
    for path, image, signed in outputs:
        if path is None:
            continue
        try:
            save_image(image, path, signed=signed)
        except (OSError, ValueError) as e:
            print(f"error: cannot write {path}: {e}", file=sys.stderr)
            return 2
    util = " ".join(f"{k} {v:.2f}" for k, v in res.utilisation.items())
    g = res.guidance
    print(
        f"wrote {args.out} ({size[0]}x{size[1]}, {args.steps} steps, seed {args.seed}, text guidance {g['text']}, "
        f"image guidance {g['image']}); expert utilisation: {util}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
