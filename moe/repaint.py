"""Mask Repaint and Latent Mixture: the two small heads of an expert layer."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _logit(p: Tensor, eps: float = 0.02) -> Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)


class MaskRepaint(nn.Module):
    """Refines the mask on the token grid from the current target tokens and the reference read-out.

    It predicts a correction to the logit of the previous mask (the coarse box for the first expert
    layer), through a 3x3 convolution on the token grid so that it sees the neighbourhood a boundary
    needs. The correction starts at zero: at initialisation the refined mask is the (clamped) prior.
    """

    def __init__(self, dim: int, ctx_dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.inp = nn.Linear(dim + ctx_dim + 2, hidden)
        self.conv = nn.Conv2d(hidden, hidden, kernel_size=3, padding=1)
        self.out = nn.Conv2d(hidden, 1, kernel_size=3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, ref_ctx: Tensor, prior: Tensor, coarse: Tensor, grid: tuple[int, int]) -> Tensor:
        """x [B, N, D], ref_ctx [B, N, c], prior/coarse [B, N] -> refined-mask logits [B, N]."""
        b, n, _ = x.shape
        h = F.gelu(self.inp(torch.cat([self.norm(x), ref_ctx, prior[..., None], coarse[..., None]], dim=-1)))
        h = h.transpose(1, 2).reshape(b, -1, *grid)
        h = F.gelu(self.conv(h)) + h
        return _logit(prior) + self.out(h).reshape(b, n)


class LatentMixture(nn.Module):
    """Timestep-dependent gate g(t) in (0, 1) that blends the experts' mixture with the Base expert.

    y = g * sum_k w_k y_k + (1 - g) * y_base. Because the blend is linear in the expert outputs, it is
    applied to the routing weights (Base gets an extra 1 - g on every token), so the dispatcher
    computes it in the same pass and Base may live on any expert-parallel rank.
    """

    def __init__(self, temb_dim: int):
        super().__init__()
        self.gate = nn.Linear(temb_dim, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)  # g = 0.5 at initialisation

    def forward(self, temb: Tensor) -> Tensor:
        """[B, D_t] -> [B] gate."""
        return torch.sigmoid(self.gate(temb.to(self.gate.weight.dtype)).float())[:, 0]

    @staticmethod
    def blend(index: Tensor, weight: Tensor, gate: Tensor, base_id: int) -> tuple[Tensor, Tensor]:
        """Routing (index/weight [S, K], gate [S]) -> (index/weight [S, K+1]) with Base's extra share."""
        index = torch.cat([index, torch.full_like(index[:, :1], base_id)], dim=1)
        weight = torch.cat([weight * gate[:, None], (1 - gate)[:, None]], dim=1)
        return index, weight
