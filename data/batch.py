"""The one batch type that flows from the data layer into the model.

The data layer produces it (``data.loader``), the model consumes it (``moe.model``), and nothing else
is passed between them: this file is the contract. Images are float tensors in [-1, 1]; masks are
float tensors in {0, 1}. A cached loader (precomputed VAE latents / text embeddings) fills the
``*_latent`` / ``text_*`` fields and may leave the image fields empty; the model uses whichever is
there.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Optional

import torch
from torch import Tensor


@dataclass
class EditBatch:
    # Pixel space (raw shards). Shapes: B = batch, H x W = the (augmented) image size.
    source: Optional[Tensor]  # [B, 3, H, W] base image in [-1, 1]
    target: Optional[Tensor]  # [B, 3, H, W] edited image in [-1, 1]
    reference: Optional[Tensor]  # [B, 3, H, W]; zeros where has_reference is False
    has_reference: Tensor  # [B] bool
    fine_mask: Tensor  # [B, 1, H, W] float {0, 1}: supervises Mask Repaint, weights the region loss
    coarse_mask: Tensor  # [B, 1, H, W] float {0, 1}: the box drawn from bbox (a compositional sample: one box
    # per region, drawn from each region's part of the fine mask); guides routing
    bbox: Tensor  # [B, 4] long: x0, y0, x1, y1 (pixels, end exclusive) of the augmented image
    # (of the fine mask: for a compositional sample, the box around all its regions)
    instruction: list[str]
    task: list[str]  # "recolor" | "remove" | "replace" | "add" | "style" | ...
    tag_ids: Tensor  # [B, T] long: ids into data.schema.TAG_VOCAB, padded with -1
    keys: list[str]
    # Cached mode (data.cache): VAE latents (unscaled, as the VAE's encoder mean gives them) and text.
    source_latent: Optional[Tensor] = None  # [B, C, h, w]
    target_latent: Optional[Tensor] = None  # [B, C, h, w]
    reference_latent: Optional[Tensor] = None  # [B, C, h, w]; zeros where has_reference is False
    text_embeds: Optional[Tensor] = None  # [B, L, D_text] sequence embeddings of the instruction
    text_mask: Optional[Tensor] = None  # [B, L] bool, True for real tokens
    pooled_text: Optional[Tensor] = None  # [B, D_pooled]
    # Compositional samples (data.compose): [B, 1, H, W] long, 0 outside every box, i + 1 inside the box of
    # region i (data.schema.REGION_ROLES: 1 the box the text edits, 2 the one the reference fills); zeros
    # for a sample without regions, None when no sample has them. Which box is which is what the oracle
    # router (model.router.kind=oracle) and the routing interventions read; nothing else in the model does.
    region_labels: Optional[Tensor] = None
    extras: dict = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.has_reference.shape[0])

    def to(self, device: torch.device | str, dtype: Optional[torch.dtype] = None) -> "EditBatch":
        """Move tensors to ``device``; floating tensors also to ``dtype`` when given (masks included)."""
        moved = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                if dtype is not None and value.is_floating_point():
                    value = value.to(device=device, dtype=dtype, non_blocking=True)
                else:
                    value = value.to(device=device, non_blocking=True)
            moved[f.name] = value
        return EditBatch(**moved)

    def select(self, index: list[int]) -> "EditBatch":
        """The sub-batch of the given sample indices (used for validation grids and tests)."""
        picked = {}
        idx = torch.as_tensor(index, dtype=torch.long)
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Tensor):
                value = value.index_select(0, idx.to(value.device))
            elif isinstance(value, list):
                value = [value[i] for i in index]
            picked[f.name] = value
        return EditBatch(**picked)
