"""What the denoiser is conditioned on, what training supervises it with, and condition dropout.

Two records, because they come from different places: ``Conditions`` is what a user supplies (an
instruction, a source image, an optional reference, a box), encoded; ``TrainingTargets`` is what only a
training batch has, the fine mask, on the token grid and on Mask Repaint's finer grid. A forward at
inference has no targets, and nothing about them travels with the conditions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from data.batch import EditBatch

from .config import ConditionDropoutConfig, RepaintConfig
from .encoders import FrozenTextEncoders, FrozenVAE, mask_to_grid
from .repaint import cells_of_grid

# the empty prompt's encoding at a length, device and dtype: ([1, L, D], [1, L] bool, [1, D_pooled])
EmptyPrompt = Callable[[int, torch.device, torch.dtype], tuple[Tensor, Tensor, Tensor]]


@dataclass
class Conditions:
    """Everything the denoiser is conditioned on, already encoded."""

    base: Tensor  # [B, C, h, w] normalised latents of the source image
    reference: Optional[Tensor]  # [B, C, h, w] or None when no sample has a reference
    has_ref: Tensor  # [B] bool
    text: Tensor  # [B, L, D_t5]
    text_mask: Tensor  # [B, L] bool
    pooled: Tensor  # [B, D_clip]
    coarse: Tensor  # [B, 1, H, W] coarse box in pixels
    has_mask: Optional[Tensor] = None  # [B] bool; None = every sample has its box (False: dropped in training)
    # [B, 1, H, W] long: which box each pixel is in (EditBatch.region_labels; compositional samples only). The
    # oracle router and the routing interventions read it; condition dropout leaves it as it is
    region_labels: Optional[Tensor] = None


@dataclass
class TrainingTargets:
    """The fine mask of a training batch: it weights the region loss, supervises Mask Repaint and, for
    AdaptEdit (``repaint.use_gt_mask_in_training``), is what the editing path reads in training."""

    fine: Optional[Tensor]  # [B, N] the fine mask's area fraction per token
    fine_subgrid: Optional[Tensor] = None  # [B, gh*s, gw*s] its share of each cell of the subgrid (s > 1)


@torch.no_grad()
def encode_conditions(
    batch: EditBatch,
    vae: FrozenVAE,
    text_encoders: FrozenTextEncoders,
    dtype: torch.dtype,
    use_reference: bool = True,
    drop_text: bool = False,
    drop_image: bool = False,
) -> Conditions:
    """The batch's conditions through the frozen encoders, in the model's ``dtype`` (cached latents and text
    embeddings are taken as they are). ``drop_text`` / ``drop_image``: the empty prompt / zero base latents,
    the inputs of guidance's extra predictions (``moe/sampling.py``)."""
    if batch.source_latent is not None:
        base = vae.normalise(batch.source_latent.to(dtype))
    else:
        base = vae.encode(batch.source.to(dtype))
    has_ref = batch.has_reference.bool() & use_reference
    reference = None
    if bool(has_ref.any()):
        if batch.reference_latent is not None:
            reference = vae.normalise(batch.reference_latent.to(dtype))
        else:
            reference = vae.encode(batch.reference.to(dtype))
        reference = reference * has_ref[:, None, None, None].to(reference.dtype)
    if batch.text_embeds is not None and not drop_text:
        text, text_mask, pooled = batch.text_embeds, batch.text_mask, batch.pooled_text
    else:
        prompts = [""] * batch.batch_size if drop_text else list(batch.instruction)
        text, text_mask, pooled = text_encoders.encode(prompts, batch.has_reference.device)
    if drop_image:
        base = torch.zeros_like(base)
    return Conditions(
        base=base,
        reference=reference,
        has_ref=has_ref,
        text=text.to(dtype),
        text_mask=text_mask.bool(),
        pooled=pooled.to(dtype),
        coarse=batch.coarse_mask.to(dtype),
        region_labels=batch.region_labels,
    )


def coarse_cells(coarse: Tensor, grid: tuple[int, int], repaint: RepaintConfig) -> Optional[Tensor]:
    """The coarse box's area fraction per cell of Mask Repaint's fine grid, per token [B, N, s*s], where
    the refined mask is confined to it on that grid (``repaint.within_coarse`` with ``subgrid`` s > 1)."""
    s = repaint.subgrid
    if not (repaint.enabled and repaint.within_coarse) or s <= 1:
        return None
    return cells_of_grid(mask_to_grid(coarse, (grid[0] * s, grid[1] * s)), s).to(coarse.dtype)


def training_targets(
    fine_mask: Optional[Tensor],
    grid: tuple[int, int],
    repaint: RepaintConfig,
    dtype: torch.dtype,
    device: torch.device,
) -> TrainingTargets:
    """The fine mask [B, 1, H, W] on the token grid (in ``dtype``) and, with ``repaint.subgrid`` s > 1, on
    Mask Repaint's grid s times finer, where its loss is taken."""
    if fine_mask is None:
        return TrainingTargets(fine=None)
    fine = mask_to_grid(fine_mask, grid).reshape(fine_mask.shape[0], grid[0] * grid[1]).to(dtype)
    s = repaint.subgrid
    subgrid = None
    if repaint.enabled and s > 1:
        subgrid = mask_to_grid(fine_mask.to(device), (grid[0] * s, grid[1] * s))
    return TrainingTargets(fine=fine, fine_subgrid=subgrid)


def drop_conditions(cond: Conditions, p: ConditionDropoutConfig, empty_prompt: EmptyPrompt) -> Conditions:
    """Condition dropout for training: each sample loses each condition with its probability
    (``model.condition_dropout``), drawn from the torch RNG (seeded runs repeat). Dropped means what
    ``edit()``'s guidance passes and an absent input look like: the empty prompt's encoding, zero base
    latents, no reference, and a box over the whole image (its presence flag off)."""
    rates = [p.text, p.base, p.reference, p.mask]
    if max(rates) <= 0:
        return cond
    b, dev = cond.base.shape[0], cond.base.device
    drop = torch.rand(b, 4, device=dev) < torch.tensor(rates, device=dev)  # [B, 4]
    text, text_mask, pooled = cond.text, cond.text_mask, cond.pooled
    if p.text > 0:
        e_text, e_mask, e_pooled = empty_prompt(text.shape[1], dev, text.dtype)
        d = drop[:, 0]
        text = torch.where(d[:, None, None], e_text, text)
        text_mask = torch.where(d[:, None], e_mask, text_mask)
        pooled = torch.where(d[:, None], e_pooled, pooled)
    base = cond.base * (~drop[:, 1]).to(cond.base.dtype)[:, None, None, None]
    has_ref, reference = cond.has_ref & ~drop[:, 2], cond.reference
    if reference is not None:
        reference = reference * has_ref.to(reference.dtype)[:, None, None, None]
    keep_mask = ~drop[:, 3] & (cond.has_mask if cond.has_mask is not None else True)
    coarse = torch.where(keep_mask[:, None, None, None], cond.coarse, torch.ones_like(cond.coarse))
    return Conditions(
        base=base,
        reference=reference,
        has_ref=has_ref,
        text=text,
        text_mask=text_mask,
        pooled=pooled,
        coarse=coarse,
        has_mask=keep_mask,
        region_labels=cond.region_labels,
    )


def fit_length(text: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    """A prompt's encoding [1, L, D] and mask [1, L] cut or zero-padded to ``length`` tokens (cached
    embeddings may be longer than the encoder's max_length)."""
    text, mask = text[:, :length], mask[:, :length].bool()
    if text.shape[1] < length:
        pad = length - text.shape[1]
        text = torch.nn.functional.pad(text, (0, 0, 0, pad))
        mask = torch.nn.functional.pad(mask, (0, pad))
    return text, mask
