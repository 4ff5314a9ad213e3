"""Loss terms. Each is a plain function of tensors, returned separately so it can be logged.

Ideal inputs: flow matching 0 at the true velocity; load balance 1 (its minimum) for uniform
routing; router z-loss 0 where logsumexp(logits) = 0; mask boundary 0 when the refined mask equals
a binary fine mask; mixture smoothness 0 for routing weights constant over the grid; tag alignment
0 when the prediction points along the task embedding.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .router import dense_weights


def flow_matching_loss(pred: Tensor, target: Tensor, weight: Optional[Tensor] = None) -> Tensor:
    """Mean squared error of the predicted velocity; pred/target [B, N, C], weight [B, N] (region loss)."""
    err = (pred.float() - target.float()).pow(2).mean(dim=-1)
    if weight is None:
        return err.mean()
    return (err * weight).sum() / weight.sum().clamp_min(1e-8)


def region_weight(fine_tokens: Tensor, alpha: float) -> Tensor:
    """AdaptEdit's per-token weight 1 + alpha * mask (fine mask on the token grid, [B, N])."""
    return 1.0 + alpha * fine_tokens


def load_balance_loss(probs: Tensor, index: Tensor, num_experts: int) -> Tensor:
    """Switch-style E * sum_e f_e * P_e over tokens: f = share of top-K assignments, P = mean probability.

    probs [S, E], index [S, K] (-1 = empty slot). Equals 1 when routing is uniform, grows as it collapses.
    The gradient reaches the router through the soft probabilities P (f is a count); it is zero only
    where the assignments are already balanced (or, with experts removed before the top-K, where every
    remaining expert is always selected: the reason the router does not remove absent experts).
    """
    # assignments per expert; empty slots fall in dense_weights' discard column (no host sync)
    counts = dense_weights(index, torch.ones_like(index, dtype=torch.float32), num_experts).sum(dim=0)
    f = counts / counts.sum().clamp_min(1)
    p = probs.float().mean(dim=0)
    return num_experts * (f * p).sum()


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(logits)^2 ([S, E] -> scalar); keeps logits small,
    so the softmax stays responsive and bf16 round-off in it stays small."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def routing_spread(weights: Tensor) -> Tensor:
    """How much routing varies over a sample's tokens: the standard deviation over tokens of each
    expert's combine weight, averaged over experts and samples. weights [B, N, E] -> scalar. About 0
    when every token of a sample is routed alike (a collapsed router); ~0.1-0.4 when tokens differ."""
    if weights.shape[1] < 2:
        return weights.new_zeros(())
    return weights.float().std(dim=1).mean()


def routing_entropy(probs: Tensor) -> Tensor:
    """Mean entropy of the router's probabilities over tokens, divided by log E (1 = uniform, 0 = one
    expert with certainty). probs [S, E] -> scalar."""
    p = probs.float()
    return (-(p * torch.log(p.clamp_min(1e-12))).sum(-1)).mean() / torch.log(torch.tensor(float(max(p.shape[-1], 2))))


def boundary_band(mask: Tensor, width: int) -> Tensor:
    """Tokens within ``width`` of the mask boundary: dilation minus erosion of the binarised mask [B, h, w]."""
    m = (mask > 0.5).float()[:, None]
    k = 2 * width + 1
    dil = F.max_pool2d(m, k, stride=1, padding=width)
    ero = 1 - F.max_pool2d(1 - m, k, stride=1, padding=width)
    return (dil - ero)[:, 0]


def mask_boundary_loss(logits: Tensor, fine: Tensor, band_width: int = 1, band_weight: float = 4.0) -> Tensor:
    """BCE (as KL to the target, so 0 at the ideal even for soft targets) + soft Dice, boundary-weighted.

    logits, fine: [B, h, w]; fine is the fine mask's area fraction per token.
    """
    fine = fine.float()
    logits = logits.float()
    w = 1.0 + band_weight * boundary_band(fine, band_width)
    bce = F.binary_cross_entropy_with_logits(logits, fine, reduction="none")
    ent = F.binary_cross_entropy(fine, fine, reduction="none")  # entropy of the target: BCE's floor
    kl = ((bce - ent) * w).sum() / w.sum()
    p = torch.sigmoid(logits)
    inter = (w * p * fine).sum(dim=(1, 2))
    denom = (w * (p + fine)).sum(dim=(1, 2))
    dice = 1 - (2 * inter + 1e-6) / (denom + 1e-6)
    return kl + dice.mean()


def mixture_smoothness_loss(weights: Tensor) -> Tensor:
    """Total variation of routing weights over the token grid: weights [B, h, w, E] -> scalar."""
    dh = (weights[:, 1:] - weights[:, :-1]).abs().sum(dim=-1).mean() if weights.shape[1] > 1 else 0.0
    dw = (weights[:, :, 1:] - weights[:, :, :-1]).abs().sum(dim=-1).mean() if weights.shape[2] > 1 else 0.0
    return weights.new_tensor(0.0) + dh + dw


def tag_alignment_loss(predicted: Tensor, task_embedding: Tensor) -> Tensor:
    """TAG-MoE predictive alignment: 1 - cos(MLP(routing signature), sum of tag embeddings); [B, d]."""
    return (1 - F.cosine_similarity(predicted.float(), task_embedding.float(), dim=-1)).mean()
