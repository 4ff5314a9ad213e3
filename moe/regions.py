"""Which region each target token lies in, for a compositional edit (``data.compose``): the labels the oracle
router and the routing interventions read.

The batch carries, per pixel, which box it is in (``EditBatch.region_labels``: 0 outside every box, 1 the box
the text edits, 2 the box the reference fills). A token covers a cell of pixels, and a box's border seldom
falls on a cell's edge, so a token is labelled by how much of it each box covers:

* :data:`TEXT` where at least half of it lies in the text region's box, :data:`REFERENCE` likewise;
* :data:`BORDER` where a box covers part of it, but less than half: the tokens a box's border cuts, which
  are mostly background and hold the object's outermost pixels, where the edit's boundary is decided;
* :data:`OUTSIDE` where no box reaches it.

Nothing here is learned, and nothing but the oracle router and the interventions reads these labels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .encoders import mask_to_grid

OUTSIDE, TEXT, REFERENCE, BORDER = 0, 1, 2, 3
NAMES = ("outside", "text", "reference", "border")


def token_regions(region_labels: Tensor, grid: tuple[int, int]) -> Tensor:
    """Pixel labels [B, 1, H, W] (0 outside, 1 text box, 2 reference box) -> token labels [B, N] long, one of
    :data:`OUTSIDE`, :data:`TEXT`, :data:`REFERENCE`, :data:`BORDER` (module docstring)."""
    b = region_labels.shape[0]
    text = mask_to_grid((region_labels == 1).float(), grid).reshape(b, -1)
    ref = mask_to_grid((region_labels == 2).float(), grid).reshape(b, -1)
    labels = torch.full_like(text, OUTSIDE, dtype=torch.long)
    labels = torch.where(text + ref > 0, torch.full_like(labels, BORDER), labels)
    labels = torch.where(ref >= 0.5, torch.full_like(labels, REFERENCE), labels)
    return torch.where(text >= 0.5, torch.full_like(labels, TEXT), labels)
