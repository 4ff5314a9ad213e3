"""Precompute VAE latents and text embeddings into cached shards, so GPUs stop re-encoding images.

    python -m launch.cache_latents --config configs/flux_full.yaml --src 'shards/edit-{000000..000119}.tar' \\
        --out shards_cached/ [--device cuda] [--batch-size 16] [--keep-images] [key=value ...]

It builds only the frozen encoders named by the config's ``model.vae`` / ``model.text`` (the same
ones training uses) and hands them to ``data.cache.cache_shards``. Train on the result with
``data.cached=true data.train_shards='shards_cached/cached-{...}.tar'``. Caching fixes the view
(centre crop to ``data.image_size``): no augmentation in cached mode.
"""

from __future__ import annotations

import argparse
from pathlib import Path

if not __package__:  # run as a file (deepspeed launch/train.py): launch/by_path.py says why
    import by_path  # noqa: F401

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from data.cache import cache_shards  # noqa: E402
from moe.config import ModelConfig  # noqa: E402
from moe.encoders import FrozenTextEncoders, FrozenVAE  # noqa: E402
from train.config import load_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--src", required=True, help="brace pattern of raw shards")
    parser.add_argument("--out", required=True, help="output folder for cached shards")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size-mb", type=float, default=1000.0)
    parser.add_argument("--keep-images", action="store_true", help="also store the images of the cached view")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args, overrides = parser.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    model_cfg: ModelConfig = OmegaConf.to_object(cfg.model)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    vae = FrozenVAE(model_cfg.vae, model_cfg.init_seed).to(device=device, dtype=dtype)
    text = FrozenTextEncoders(model_cfg.text, model_cfg.init_seed).to(device=device, dtype=dtype)

    def encode_images(images: torch.Tensor) -> torch.Tensor:
        return vae.encode_raw(images.to(device)).float().cpu()

    def encode_text(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        embeds, mask, pooled = text.encode(prompts, device)
        return embeds.float().cpu(), mask.cpu(), pooled.float().cpu()

    Path(args.out).mkdir(parents=True, exist_ok=True)
    report = cache_shards(
        args.src,
        args.out,
        encode_images,
        encode_text,
        image_size=int(cfg.data.image_size),
        batch_size=args.batch_size,
        keep_images=args.keep_images,
        shard_size_mb=args.shard_size_mb,
    )
    print(f"cached {report.written} samples: {report.pattern}; skipped {dict(report.skipped)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
