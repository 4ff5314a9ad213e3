"""Pretrain a miniature FLUX-shaped base on the synthetic world, and write it in diffusers' layout.

CARE-Edit fine-tunes a *pretrained* frozen DiT. No pretrained weights can be downloaded here, and a
random frozen DiT cannot be taught to edit by LoRA, so the miniature pipeline makes its own base the
way FLUX was made: a text-to-image flow-matching model trained with all its weights (transformer
and the small text encoders) on captioned images (:mod:`data.captions`). The result is written as a
diffusers pipeline folder::

    OUT/transformer/        FluxTransformer2DModel.save_pretrained (safetensors)
    OUT/text_encoder/       CLIPTextModel (pooled text)       OUT/tokenizer/    word-level tokenizer
    OUT/text_encoder_2/     T5EncoderModel (sequence text)    OUT/tokenizer_2/  the same tokenizer
    OUT/model_index.json    the folder's parts and what the transformer predicts (velocity or sample)
    OUT/recipe.yaml         the recipe that made it
    OUT/samples.png         a grid of samples from held-out captions

and CARE-Edit loads it through the paths real FLUX weights take (``model.backbone.path``,
``model.text.t5_path`` / ``clip_path``). The image codec is the lossless pixel-unshuffle one
(``model.vae.kind: pixel_unshuffle``): it has no weights, so nothing of it is saved.

One step, top to bottom (:func:`train_step`): captions -> tokenizer -> T5 sequence and CLIP pooled
embeddings -> noisy packed latents at a logit-normal time -> the transformer's own ``forward`` (the
clean sample with ``prediction: sample``, turned into a velocity) -> MSE to the velocity.
Attention runs on SDPA's math kernel: the sequences are short, it is deterministic, and cuDNN's
attention failed on a FLUX backward on the GPUs here. The same run on the same device kind, torch
version and thread count writes the same bytes (deterministic algorithms, seeded data and noise):
:func:`file_digests` lists them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from data.captions import VOCABULARY, make_scenes
from moe.backbone import flux_arch_kwargs, grid_position_ids, pack_latents, unpack_latents, velocity_from_sample
from moe.config import FluxArch
from train.eval import COLOR_RADIUS  # one notion of "has this palette colour"

PAD, EOS, UNK = "[PAD]", "[EOS]", "[UNK]"  # ids 0, 1, 2 (CLIP pools at EOS; its legacy path is eos id 2)


@dataclass
class TextArch:
    d_model: int = 64  # T5 width = the transformer's joint_attention_dim
    layers: int = 2
    heads: int = 4
    ff: int = 128
    clip_hidden: int = 64  # CLIP width = the transformer's pooled_projection_dim
    clip_layers: int = 2
    clip_heads: int = 4
    max_length: int = 32


@dataclass
class BaseRecipe:
    """Everything that decides the base's bytes (saved as OUT/recipe.yaml)."""

    seed: int = 0
    image_size: int = 64
    pixel_factor: int = 4  # pixel-unshuffle codec: latent channels 3 * f^2, packed 2x2 into tokens
    arch: FluxArch = field(default_factory=FluxArch)
    text: TextArch = field(default_factory=TextArch)
    num_scenes: int = 20000  # a fixed set of captioned scenes, cycled in seeded epochs
    val_scenes: int = 64  # held-out scenes (after the training ones) for the loss and the sample grid
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 5e-5
    warmup_steps: int = 200
    weight_decay: float = 0.01
    clip_grad_norm: float = 1.0
    caption_dropout: float = 0.1  # empty caption: the base also learns unconditional generation
    ema_decay: float = 0.999  # the saved weights are the EMA's (0 = the raw weights)
    save_dtype: str = "float16"  # transformer weights on disk: float16 halves the folder
    sample_steps: int = 20
    # What the transformer's output means. "velocity" (FLUX's choice) or "sample", the clean image x0,
    # turned into the velocity (x_t - x0) / t for the loss and the sampler. A token here is 8x8 raw
    # pixels (192 values, as wide as the model): noise that high-dimensional is hard for a narrow
    # network to predict, a clean image is not (Li & He, "Back to Basics: Let Denoising Generative
    # Models Denoise", 2025), so pixel-space miniatures predict the sample.
    prediction: str = "velocity"
    t_min: float = 0.05  # "sample": the velocity's division by t is clamped at t_min
    logit_mean: float = 0.0  # training times t = sigmoid(logit_mean + logit_std * N(0, 1)); t = 1 is noise
    logit_std: float = 1.0

    def validate(self) -> None:
        a, t = self.arch, self.text
        channels = 3 * self.pixel_factor**2 * 4
        checks = {
            "arch.in_channels": (a.in_channels == channels, f"must be 3 * pixel_factor^2 * 4 = {channels}"),
            "arch.joint_attention_dim": (a.joint_attention_dim == t.d_model, "must equal text.d_model"),
            "arch.pooled_projection_dim": (a.pooled_projection_dim == t.clip_hidden, "must equal text.clip_hidden"),
            "arch.axes_dims_rope": (sum(a.axes_dims_rope) == a.attention_head_dim, "must sum to attention_head_dim"),
            "image_size": (self.image_size % (2 * self.pixel_factor) == 0, "must be a multiple of 2 * pixel_factor"),
            "save_dtype": (self.save_dtype in ("float16", "float32", "bfloat16"), "float16, float32 or bfloat16"),
            "steps": (self.steps >= 1 and self.batch_size >= 1, "steps and batch_size must be >= 1"),
            "prediction": (self.prediction in ("velocity", "sample"), "velocity or sample"),
            "t_min": (0 < self.t_min < 1, "must lie in (0, 1)"),
        }
        for key, (ok, msg) in checks.items():
            if not ok:
                raise ValueError(f"recipe.{key}: {msg}")


# ------------------------------------------------------------------------------------------- parts
def build_tokenizer(max_length: int):
    """A word-level tokenizer over the generator's vocabulary (``transformers`` fast tokenizer, saved
    and loaded like any other): ids 0 pad, 1 eos (appended), 2 unknown word."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([PAD, EOS, UNK] + VOCABULARY)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, vocab[EOS])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=EOS,
        unk_token=UNK,
        model_max_length=max_length,
    )


def build_text_encoders(t: TextArch, vocab_size: int) -> tuple[nn.Module, nn.Module]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    t5 = T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=t.d_model,
            d_kv=t.d_model // t.heads,
            d_ff=t.ff,
            num_layers=t.layers,
            num_heads=t.heads,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=t.clip_hidden,
            intermediate_size=t.clip_hidden * 4,
            num_hidden_layers=t.clip_layers,
            num_attention_heads=t.clip_heads,
            max_position_embeddings=t.max_length,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=1,
        )
    )
    return t5, clip


def encode_text(tokenizer, t5: nn.Module, clip: nn.Module, texts: list[str], max_length: int, device) -> tuple:
    """(sequence embeddings [B, L, D], pooled [B, D_clip]), as CARE-Edit's frozen encoders compute them
    (``moe.encoders.FrozenTextEncoders.encode``: padded to max_length, T5 with its mask, CLIP pooled)."""
    enc = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    ids, mask = enc.input_ids.to(device), enc.attention_mask.to(device)
    seq = t5(input_ids=ids, attention_mask=mask).last_hidden_state
    pooled = clip(input_ids=ids, attention_mask=mask).pooler_output
    return seq, pooled


def images_to_latents(images: Tensor, factor: int) -> Tensor:
    """uint8 [B, H, W, 3] -> the pixel-unshuffle codec's latents [B, 3 f^2, H/f, W/f] of [-1, 1] pixels."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1
    return F.pixel_unshuffle(x, factor)


def latents_to_images(latents: Tensor, factor: int) -> Tensor:
    return F.pixel_shuffle(latents.float(), factor).clamp(-1, 1)


class TextToImage(nn.Module):
    """The three trainable parts together (one module for the optimizer, EMA and ``to``)."""

    def __init__(self, recipe: BaseRecipe, vocab_size: int):
        super().__init__()
        from diffusers import FluxTransformer2DModel

        self.recipe = recipe
        self.transformer = FluxTransformer2DModel(**flux_arch_kwargs(recipe.arch))
        self.t5, self.clip = build_text_encoders(recipe.text, vocab_size)

    def velocity(self, noisy: Tensor, t: Tensor, seq: Tensor, pooled: Tensor) -> Tensor:
        """noisy latents [B, C, h, w] at flow time t [B] in [0, 1] -> predicted velocity, same shape."""
        b, _, h, w = noisy.shape
        img_ids = grid_position_ids(h // 2, w // 2, 0, noisy.device)  # the target's ids in CARE-Edit
        txt_ids = torch.zeros(seq.shape[1], 3, device=noisy.device)
        with sdpa_kernel([SDPBackend.MATH]):
            out = self.transformer(
                hidden_states=pack_latents(noisy),
                encoder_hidden_states=seq,
                pooled_projections=pooled,
                timestep=t,
                img_ids=img_ids,
                txt_ids=txt_ids,
                return_dict=False,
            )[0]
        out = unpack_latents(out, h, w)
        if self.recipe.prediction == "sample":
            return velocity_from_sample(noisy, out, t, self.recipe.t_min)
        return out


# ----------------------------------------------------------------------------------------- training
def train_step(
    model: TextToImage, tokenizer, images: Tensor, texts: list[str], gen: torch.Generator, text_gen: torch.Generator
) -> Tensor:
    """Flow-matching loss of one batch: x_t = (1 - t) x0 + t noise, target velocity noise - x0."""
    r = model.recipe
    device = images.device
    x0 = images_to_latents(images, r.pixel_factor)
    b = x0.shape[0]
    drop = torch.rand(b, generator=text_gen) < r.caption_dropout  # on the host: no device sync
    texts = ["" if d else s for d, s in zip(drop.tolist(), texts)]
    t = torch.sigmoid(r.logit_mean + r.logit_std * torch.randn(b, generator=gen, device=device))
    noise = torch.randn(x0.shape, generator=gen, device=device)
    tt = t[:, None, None, None]
    seq, pooled = encode_text(tokenizer, model.t5, model.clip, texts, r.text.max_length, device)
    pred = model.velocity((1 - tt) * x0 + tt * noise, t, seq, pooled)
    return F.mse_loss(pred.float(), noise - x0)


@torch.no_grad()
def sample(model: TextToImage, tokenizer, texts: list[str], steps: int, seed: int = 0) -> Tensor:
    """Euler sampling from captions with diffusers' flow-matching scheduler (as ``CareEditModel.edit``):
    -> images [B, 3, H, W] in [-1, 1]."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    r = model.recipe
    device = next(model.parameters()).device
    c, s = 3 * r.pixel_factor**2, r.image_size // r.pixel_factor
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((len(texts), c, s, s), generator=gen).to(device)
    seq, pooled = encode_text(tokenizer, model.t5, model.clip, texts, r.text.max_length, device)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    scheduler.set_timesteps(steps, device=device)
    for t in scheduler.timesteps:
        v = model.velocity(x, (t / 1000.0).expand(len(texts)).to(device), seq, pooled)
        x = scheduler.step(v.float(), t, x).prev_sample
    return latents_to_images(x, r.pixel_factor)


def _lr(r: BaseRecipe, step: int) -> float:
    if step < r.warmup_steps:
        return r.lr * (step + 1) / r.warmup_steps
    frac = (step - r.warmup_steps) / max(1, r.steps - r.warmup_steps)
    return r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * min(frac, 1.0)))


def pretrain(
    r: BaseRecipe,
    device: str = "cpu",
    log: Callable[[str], None] = print,
    log_every: int = 100,
    snapshot: Optional[Callable[[int, TextToImage, Any], None]] = None,
    snapshot_every: int = 0,
) -> tuple[TextToImage, Any, dict]:
    """Train the base from scratch; returns (EMA model in eval mode, tokenizer, summary).

    ``snapshot(step, ema, tokenizer)`` is called every ``snapshot_every`` steps (samples or a saved
    base part-way through a long run); it must not touch the training's random generators."""
    r.validate()
    torch.manual_seed(r.seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    tokenizer = build_tokenizer(r.text.max_length)
    model = TextToImage(r, len(tokenizer)).to(device)
    ema = TextToImage(r, len(tokenizer)).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": r.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=r.lr,
        betas=(0.9, 0.99),
    )
    t0 = time.time()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    images, texts = make_scenes(r.seed, 0, r.num_scenes, r.image_size, workers=cores)
    images = torch.from_numpy(images).to(device)
    log(f"{r.num_scenes} scenes of {r.image_size} px made in {time.time() - t0:.0f} s")
    gen = torch.Generator(device).manual_seed(r.seed)
    order = torch.Generator("cpu").manual_seed(r.seed)
    perm, pos, losses = torch.randperm(r.num_scenes, generator=order), 0, []
    ema_params, model_params = list(ema.parameters()), list(model.parameters())
    autocast = (
        torch.autocast("cuda", torch.bfloat16) if device.startswith("cuda") else torch.autocast("cpu", enabled=False)
    )
    t0 = time.time()
    for step in range(r.steps):
        if pos + r.batch_size > r.num_scenes:
            perm, pos = torch.randperm(r.num_scenes, generator=order), 0
        idx = perm[pos : pos + r.batch_size]
        pos += r.batch_size
        for g in opt.param_groups:
            g["lr"] = _lr(r, step)
        with autocast:
            loss = train_step(model, tokenizer, images[idx.to(device)], [texts[i] for i in idx.tolist()], gen, order)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r.clip_grad_norm)
        opt.step()
        with torch.no_grad():  # EMA in one fused update; warm-up of the decay as in diffusers' EMAModel
            d = min(r.ema_decay, (1 + step) / (10 + step)) if r.ema_decay > 0 else 0.0
            torch._foreach_lerp_(ema_params, model_params, 1 - d)
        losses.append(loss.detach())
        if (step + 1) % log_every == 0 or step + 1 == r.steps:
            recent = torch.stack(losses[-log_every:]).mean().item()  # the only host sync of a step
            log(f"step {step + 1}/{r.steps} loss {recent:.4f} lr {_lr(r, step):.2e} {time.time() - t0:.0f} s")
        if snapshot is not None and snapshot_every and (step + 1) % snapshot_every == 0 and step + 1 < r.steps:
            ema.eval()
            snapshot(step + 1, ema, tokenizer)
    ema.eval()
    summary = dict(train_seconds=round(time.time() - t0, 1), final_loss=torch.stack(losses[-100:]).mean().item())
    return ema, tokenizer, summary


@torch.no_grad()
def heldout_loss(model: TextToImage, tokenizer, r: BaseRecipe, device: str) -> float:
    """Flow-matching loss on the held-out scenes at t = 0.25, 0.5, 0.75 with seeded noise."""
    images, texts = make_scenes(r.seed, r.num_scenes, r.val_scenes, r.image_size)
    x = torch.from_numpy(images).to(device)
    gen = torch.Generator(device).manual_seed(1234)
    x0 = images_to_latents(x, r.pixel_factor)
    seq, pooled = encode_text(tokenizer, model.t5, model.clip, texts, r.text.max_length, device)
    total = []
    for tv in (0.25, 0.5, 0.75):
        noise = torch.randn(x0.shape, generator=gen, device=device)
        t = torch.full((x0.shape[0],), tv, device=device)
        pred = model.velocity((1 - tv) * x0 + tv * noise, t, seq, pooled)
        total.append(F.mse_loss(pred.float(), noise - x0).item())
    return float(np.mean(total))


# ------------------------------------------------------------------------------------------- saving
def save_base(model: TextToImage, tokenizer, r: BaseRecipe, out: str, summary: Optional[dict] = None) -> None:
    """Write the diffusers pipeline folder (module docstring). Text encoders stay float32 (tiny)."""
    from omegaconf import OmegaConf

    os.makedirs(out, exist_ok=True)
    dtype = getattr(torch, r.save_dtype)
    tr = model.transformer
    tr.to(dtype).save_pretrained(os.path.join(out, "transformer"), safe_serialization=True)
    tr.to(torch.float32)
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


def recipe_from_dict(d: dict) -> BaseRecipe:
    from omegaconf import OmegaConf

    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(BaseRecipe), d))


# ------------------------------------------------------------------------------------------- checks
def colour_presence(images: Tensor, texts: list[str], radius: float = COLOR_RADIUS, min_share: float = 0.004) -> float:
    """Share of images whose palette colours are exactly the ones their caption names: a colour counts
    as present when at least ``min_share`` of the pixels lie within ``radius`` of it (RGB in [0, 1]).
    A coarse check that the base draws what it is told (noise shows every colour and fails).
    images [B, 3, H, W] in [-1, 1]."""
    from data.synthetic import COLORS

    x = ((images.float() + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1)  # [B, H, W, 3]
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32) / 255  # [P, 3]
    ok = 0
    for img, text in zip(x, texts):
        share = ((img[..., None, :] - palette).norm(dim=-1) < radius).float().mean(dim=(0, 1))  # [P]
        present = {name for name, s in zip(COLORS, share.tolist()) if s >= min_share}
        ok += present == ({w.strip(",") for w in text.split()} & set(COLORS))
    return ok / max(len(texts), 1)


@torch.no_grad()
def save_samples(model: TextToImage, tokenizer, r: BaseRecipe, path: str, device: str, n: int = 8) -> dict:
    """samples.png: held-out scenes (top row) and the base's samples from their captions (bottom row).
    Returns the colour-presence score of the samples and of the real scenes (the checker's ceiling)."""
    from PIL import Image, ImageDraw

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
