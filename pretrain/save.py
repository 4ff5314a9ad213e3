"""The base written as a diffusers pipeline folder, its digests, and its sample sheet::

    OUT/transformer/        FluxTransformer2DModel.save_pretrained (safetensors)
    OUT/text_encoder/       CLIPTextModel (pooled text)       OUT/tokenizer/    word-level tokenizer
    OUT/text_encoder_2/     T5EncoderModel (sequence text)    OUT/tokenizer_2/  the same tokenizer
    OUT/model_index.json    the folder's parts and what the transformer predicts (velocity or sample)
    OUT/recipe.yaml         the recipe that made it
    OUT/samples.png         a grid of samples from held-out captions

CARE-Edit loads it through the paths real FLUX weights take (``model.backbone.path``,
``model.text.t5_path`` / ``clip_path``). The image codec is the lossless pixel-unshuffle one
(``model.vae.kind: pixel_unshuffle``): it has no weights, so nothing of it is saved.
:func:`file_digests` lists the bytes a rebuild must reproduce.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from typing import Optional

import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw
from torch import Tensor

from data.captions import STYLE_SUFFIX, make_scenes
from data.synthetic import COLORS
from pretrain.recipe import BaseRecipe
from pretrain.text_to_image import TextToImage, sample
from train.eval import MATCH  # one notion of "has this palette colour"


def save_base(model: TextToImage, tokenizer, r: BaseRecipe, out: str, summary: Optional[dict] = None) -> None:
    """Write the diffusers pipeline folder (module docstring). Text encoders stay float32 (tiny)."""
    os.makedirs(out, exist_ok=True)
    # a cast copy: casting the model itself and back would round the weights it goes on training
    # (a snapshot mid-run would then change the final base)
    copy.deepcopy(model.transformer).to(getattr(torch, r.save_dtype)).save_pretrained(
        os.path.join(out, "transformer"), safe_serialization=True
    )
    model.clip.save_pretrained(os.path.join(out, "text_encoder"), safe_serialization=True)
    model.t5.save_pretrained(os.path.join(out, "text_encoder_2"), safe_serialization=True)
    tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
    tokenizer.save_pretrained(os.path.join(out, "tokenizer_2"))
    index = {
        "_class_name": "CareEditMiniatureBase",
        "transformer": ["diffusers", "FluxTransformer2DModel"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "text_encoder_2": ["transformers", "T5EncoderModel"],
        "tokenizer_2": ["transformers", "PreTrainedTokenizerFast"],
        "vae": {"kind": "pixel_unshuffle", "pixel_factor": r.pixel_factor},
        "prediction": r.prediction,  # what the transformer's output means (model.backbone.prediction)
    }
    with open(os.path.join(out, "model_index.json"), "w") as f:
        json.dump(index, f, indent=1)
    OmegaConf.save(OmegaConf.structured(r), os.path.join(out, "recipe.yaml"))
    if summary is not None:
        with open(os.path.join(out, "summary.json"), "w") as f:
            json.dump(summary, f, indent=1)


def file_digests(folder: str, pattern: str = ".safetensors") -> dict[str, str]:
    """sha256 of every weights file under ``folder`` (relative path -> hex): what "bit for bit" compares."""
    digests = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            if name.endswith(pattern):
                path = os.path.join(root, name)
                with open(path, "rb") as f:
                    digests[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return dict(sorted(digests.items()))


def colour_presence(images: Tensor, texts: list[str], radius: float = MATCH, min_share: float = 0.004) -> float:
    """Share of images whose palette colours are exactly the ones their caption names: a colour counts
    as present when at least ``min_share`` of the pixels lie within ``radius`` of it (RGB in [0, 1]).
    A coarse check that the base draws what it is told (noise shows every colour and fails). Styled
    scenes ("..., in sepia") are left out: a style changes the colours their caption names.
    images [B, 3, H, W] in [-1, 1]."""
    x = ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # [B, H, W, 3]
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255  # [P, 3]
    ok = scored = 0
    for img, text in zip(x, texts):
        if text.endswith(tuple(STYLE_SUFFIX.values())):
            continue
        share = ((img[..., None, :] - palette).norm(dim=-1) < radius).float().mean(dim=(0, 1))  # [P]
        present = {name for name, s in zip(COLORS, share.tolist()) if s >= min_share}
        ok += present == ({w.strip(",") for w in text.split()} & set(COLORS))
        scored += 1
    return ok / max(scored, 1)


@torch.no_grad()
def save_samples(model: TextToImage, tokenizer, r: BaseRecipe, path: str, device: str, n: int = 8) -> dict:
    """samples.png: held-out scenes (top row) and the base's samples from their captions (bottom row).
    Returns the colour-presence score of the samples and of the real scenes (the checker's ceiling)."""
    images, texts = make_scenes(r.seed, r.num_scenes, max(n, r.val_scenes), r.image_size)
    gen = sample(model, tokenizer, texts, r.sample_steps)
    real = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    scores = dict(samples=colour_presence(gen.cpu(), texts), scenes=colour_presence(real, texts))
    s, pad = r.image_size * 2, 4
    sheet = Image.new("RGB", (n * (s + pad), 2 * (s + pad) + 14), "white")
    for i in range(n):
        for row, img in enumerate((real[i], gen[i].cpu())):
            arr = ((img.permute(1, 2, 0) + 1) * 127.5).clamp(0, 255).byte().numpy()
            sheet.paste(Image.fromarray(arr).resize((s, s), Image.NEAREST), (i * (s + pad), row * (s + pad)))
    ImageDraw.Draw(sheet).text(
        (2, 2 * (s + pad)),
        f"top: held-out scenes; bottom: samples from their captions "
        f"({r.sample_steps} steps); colours present {scores['samples']:.2f} "
        f"(scenes {scores['scenes']:.2f})",
        fill="black",
    )
    sheet.save(path)
    return scores
