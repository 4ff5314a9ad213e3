"""The base's trainer: text-to-image flow matching with all weights trainable, as FLUX was made.

One step, top to bottom (:func:`train_step`): captions -> tokenizer -> T5 sequence and CLIP pooled
embeddings -> noisy packed latents at a logit-normal time -> the transformer's own ``forward`` (the
clean sample with ``prediction: sample``, turned into a velocity) -> MSE to the velocity. The saved
weights are an EMA of the trained ones. The same run on the same device kind, torch version and
thread count writes the same bytes (deterministic algorithms, seeded data and noise).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from data.captions import make_scenes
from pretrain.recipe import BaseRecipe
from pretrain.text_to_image import TextToImage, build_tokenizer, encode_text, images_to_latents


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
    _deterministic(r.seed, device)
    tokenizer = build_tokenizer(r.text.max_length)
    model, ema, opt = _model_ema_optimizer(r, len(tokenizer), device)
    images, texts = _scenes(r, device, log)
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
        batch = (tokenizer, images[idx.to(device)], [texts[i] for i in idx.tolist()], gen, order)
        loss = _optimizer_step(model, opt, r, step, autocast, batch)
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


def _deterministic(seed: int, device: str) -> None:
    """Seed torch and pick deterministic kernels: the same recipe on the same device kind writes the same bytes."""
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    if device.startswith("cuda"):
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False


def _model_ema_optimizer(
    r: BaseRecipe, vocab_size: int, device: str
) -> tuple[TextToImage, TextToImage, torch.optim.AdamW]:
    """The model, its EMA copy (same weights, no gradients) and AdamW without decay on biases, norms and
    embeddings. The model is built first: both draw their initialisation from the seeded torch RNG."""
    model = TextToImage(r, vocab_size).to(device)
    ema = TextToImage(r, vocab_size).to(device).requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": r.weight_decay}, {"params": rest, "weight_decay": 0.0}],
        lr=r.lr,
        betas=(0.9, 0.99),
    )
    return model, ema, opt


def _scenes(r: BaseRecipe, device: str, log: Callable[[str], None]) -> tuple[Tensor, list[str]]:
    """The recipe's captioned training scenes (uint8 [N, H, W, 3] on ``device``) and their captions."""
    t0 = time.time()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    images, texts = make_scenes(r.seed, 0, r.num_scenes, r.image_size, workers=cores)
    images = torch.from_numpy(images).to(device)
    log(f"{r.num_scenes} scenes of {r.image_size} px made in {time.time() - t0:.0f} s")
    return images, texts


def _optimizer_step(
    model: TextToImage, opt: torch.optim.Optimizer, r: BaseRecipe, step: int, autocast: Any, batch: tuple
) -> Tensor:
    """One step at the schedule's learning rate: the loss of ``batch`` (``train_step``'s arguments after
    the model) under ``autocast``, its backward, clipping, AdamW. Returns the loss."""
    for g in opt.param_groups:
        g["lr"] = _lr(r, step)
    with autocast:
        loss = train_step(model, *batch)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), r.clip_grad_norm)
    opt.step()
    return loss


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
