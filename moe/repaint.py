"""Mask Repaint and Latent Mixture: the two small heads of an expert layer."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .router import dense_weights


def _logit(p: Tensor, eps: float = 0.02) -> Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


class MaskRepaint(nn.Module):
    """Refines the mask on the token grid from the current target tokens, the reference read-out and the
    base read-out (the base token at the same position: the object's shape when there is no reference).

    It predicts a correction to the logit of the previous mask (the coarse box for the first expert
    layer), through a 3x3 convolution on the token grid so that it sees the neighbourhood a boundary
    needs. The correction starts at zero: at initialisation the refined mask is the (clamped) prior.

    With ``subgrid`` s > 1 it also predicts, per token, an s x s patch of logit offsets around the token's
    logit (:func:`subgrid_logits` assembles them): one value per token cannot follow a shape's edge
    inside the token (on an 8x8 grid even the ideal token mask has IoU ~0.63 with the fine mask). The
    offsets start at zero, so at initialisation the patch is the token's value.
    """

    def __init__(self, dim: int, ctx_dim: int, hidden: int, subgrid: int = 1):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.inp = nn.Linear(dim + 2 * ctx_dim + 2, hidden)
        self.conv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.out = nn.Conv2d(hidden, 1, kernel_size=3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)
        self.subgrid = subgrid
        self.detail = None
        if subgrid > 1:  # zero-initialised, made without drawing from the RNG: the rest inits as without it
            with torch.random.fork_rng(devices=[]):
                self.detail = nn.Conv2d(hidden, subgrid * subgrid, kernel_size=3, padding=1)
            nn.init.zeros_(self.detail.weight)
            nn.init.zeros_(self.detail.bias)

    def forward(
        self,
        x: Tensor,
        ref_ctx: Tensor,
        base_ctx: Tensor,
        prior: Tensor,
        coarse: Tensor,
        grid: tuple[int, int],
    ) -> tuple[Tensor, Optional[Tensor]]:
        """x [B, N, D], ref_ctx/base_ctx [B, N, c], prior/coarse [B, N] -> refined-mask logits [B, N] and, with
        ``subgrid`` s > 1, the offsets of each token's s x s patch [B, N, s*s] (else None)."""
        b, n, _ = x.shape
        feats = [self.norm(x), ref_ctx, base_ctx, prior[..., None], coarse[..., None]]
        h = F.gelu(self.inp(torch.cat(feats, dim=-1)))
        h = h.transpose(1, 2).reshape(b, -1, *grid)
        h = F.gelu(self.conv(h)) + h
        logits = _logit(prior) + self.out(h).reshape(b, n)
        detail = self.detail(h).reshape(b, -1, n).transpose(1, 2) if self.detail is not None else None
        return logits, detail


OUTSIDE_LOGIT = -1.0e4  # a logit whose sigmoid is 0 in every dtype the model runs in; its BCE gradient is 0 too


def confine_to_coarse(
    logits: Tensor, detail: Optional[Tensor], coarse: Tensor, coarse_cells: Optional[Tensor]
) -> tuple[Tensor, Optional[Tensor]]:
    """Mask Repaint's logits [B, N] and patch offsets [B, N, s*s] with everything outside the coarse mask
    set to :data:`OUTSIDE_LOGIT`: tokens the box does not touch (``coarse`` [B, N], its area fraction), and
    subgrid cells it does not touch (``coarse_cells`` [B, N, s*s], same layout as the offsets). Nothing
    reaches the head from those positions (their values are constants), and their mask is exactly 0."""
    logits = logits.masked_fill(coarse <= 0, OUTSIDE_LOGIT)
    if detail is not None and coarse_cells is not None:
        detail = detail.masked_fill(coarse_cells <= 0, OUTSIDE_LOGIT)
    return logits, detail


def cells_of_grid(fine: Tensor, s: int) -> Tensor:
    """A map on the fine grid [B, gh*s, gw*s] -> per token, its s x s cells [B, N, s*s] in the layout of
    Mask Repaint's patch offsets (the inverse of :func:`subgrid_logits`' placement)."""
    b = fine.shape[0]
    cells = F.pixel_unshuffle(fine[:, None], s)  # [B, s*s, gh, gw]
    return cells.reshape(b, s * s, -1).transpose(1, 2)


def subgrid_logits(logits: Tensor, detail: Tensor, grid: tuple[int, int]) -> Tensor:
    """Token logits [B, N] + patch offsets [B, N, s*s] -> mask logits on the fine grid [B, gh*s, gw*s]
    (token (i, j)'s offset (u, v) lands at (i*s + u, j*s + v), as ``pixel_shuffle`` places channels)."""
    b, n = logits.shape
    s = int(round(detail.shape[-1] ** 0.5))
    patches = logits[..., None] + detail  # [B, N, s*s]
    patches = patches.transpose(1, 2).reshape(b, s * s, *grid)
    return F.pixel_shuffle(patches, s)[:, 0]


class LatentMixture(nn.Module):
    """Gate g in (0, 1) per token, from the timestep and the token's routing confidence, that blends the
    experts' mixture with the Base expert: y = g * sum_k w_k y_k + (1 - g) * y_base.

    The confidence (max probability and normalised entropy of the token's routing, detached: the gate
    reads the router, it does not train it) lets the gate trust the routed experts where the router is
    sure and fall back to Base where it is not; the timestep lets it lean on Base where the sample is
    mostly noise. Because the blend is linear in the expert outputs it is applied to the routing
    weights (:meth:`blend`), so the dispatcher computes it in the same pass and Base may live on any
    expert-parallel rank.
    """

    def __init__(self, temb_dim: int):
        super().__init__()
        self.gate = nn.Linear(temb_dim, 1)
        self.confidence = nn.Linear(2, 1, bias=False)
        for p in (self.gate.weight, self.gate.bias, self.confidence.weight):
            nn.init.zeros_(p)  # g = 0.5 at initialisation

    def forward(self, temb: Tensor, confidence: Tensor) -> Tensor:
        """temb [B, D_t], confidence [B, N, 2] (``router.routing_confidence``) -> gate [B, N]."""
        t = self.gate(temb.to(self.gate.weight.dtype)).float()  # [B, 1]
        c = self.confidence(confidence.detach().to(self.confidence.weight.dtype)).float()[..., 0]  # [B, N]
        return torch.sigmoid(t + c)

    @staticmethod
    def blend(index: Tensor, weight: Tensor, gate: Tensor, base_id: int) -> tuple[Tensor, Tensor]:
        """Routing (index/weight [S, K], gate [S]) -> index/weight [S, K+1] with Base's 1 - g share.

        Base is computed once per token: where the router selected it, its share is added to that slot
        and the extra slot is empty (-1); otherwise the extra slot is Base's."""
        is_base = index == base_id  # [S, K]
        selected = is_base.any(dim=1, keepdim=True)  # [S, 1]
        rest = (1 - gate)[:, None]
        weight = weight * gate[:, None] + is_base.to(weight.dtype) * rest
        extra_index = torch.where(selected, torch.full_like(index[:, :1], -1), torch.full_like(index[:, :1], base_id))
        extra_weight = torch.where(selected, torch.zeros_like(rest), rest)
        return torch.cat([index, extra_index], dim=1), torch.cat([weight, extra_weight], dim=1)


def combine_weights(index: Tensor, weight: Tensor, gate: Optional[Tensor], num_experts: int, base_id: int) -> Tensor:
    """Each expert's share of each token's output, [S, E]: the routed weights (index/weight [S, K], -1 an
    empty slot) times the Latent Mixture gate, plus Base's 1 - g share (gate [S]; None: mixture off, the
    routed weights alone). What a routing map must show: without Base's share, Base is understated."""
    if gate is not None:
        index, weight = LatentMixture.blend(index, weight, gate.reshape(-1).to(weight.dtype), base_id)
    return dense_weights(index, weight, num_experts)
