"""The losses: every term as a plain function of tensors, and where they are selected and weighted.

:func:`combine_losses` is the one place the terms meet: it reads a :class:`ForwardRecord` (what one
training forward produced: the prediction and its target, each expert layer's routing and refined
mask, the batch's fine mask and tags), computes each term whose weight (``model.loss.*``) is above 0,
unweighted so it can be logged on its own, and their weighted sum, the loss the optimizer follows.
:func:`routing_statistics` reads the same record for the logs.

Ideal inputs: flow matching 0 at the true velocity; load balance 1 (its minimum) for uniform
routing; router z-loss 0 where logsumexp(logits) = 0; mask boundary 0 when the refined mask equals
a binary fine mask; mixture smoothness 0 for routing weights constant over the grid; tag alignment
0 when the prediction points along the task embedding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .backbone import pack_latents
from .config import LossConfig
from .repaint import subgrid_logits
from .router import dense_weights

# TAG-MoE's learned head: (routing signature [B, E], tag ids [B, T]) -> (predicted, task embedding) [B, d]
TaskHead = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass
class ForwardRecord:
    """What one training forward produced, as the losses read it. Per expert layer lists, in layer order;
    S = B * N target tokens."""

    pred: Tensor  # [B, C, h, w] predicted velocity
    velocity: Tensor  # [B, C, h, w] its target, noise - x0
    grid: tuple[int, int]  # (gh, gw): the token grid, N = gh * gw
    probs: list[Tensor]  # [S, E] router probabilities
    index: list[Tensor]  # [S, K] selected experts (-1 = empty slot)
    weight: list[Tensor]  # [S, K] their weights
    logits: list[Tensor]  # [S, E] router logits (learned router)
    refined: list[Tensor]  # [B, N] Mask Repaint's logits (repaint on)
    details: list[Tensor]  # [B, N, s*s] their subgrid offsets (repaint.subgrid s > 1)
    gates: list[Tensor]  # [B, N] Latent Mixture gates (mixture on)
    fine: Optional[Tensor]  # [B, N] the fine mask on the token grid
    fine_subgrid: Optional[Tensor]  # [B, gh*s, gw*s] the fine mask on Mask Repaint's subgrid (s > 1)
    tag_ids: Tensor  # [B, T] the samples' tags (-1 = none)


def combine_losses(
    rec: ForwardRecord, cfg: LossConfig, num_experts: int, learned_router: bool, task_head: Optional[TaskHead] = None
) -> tuple[Tensor, dict[str, Tensor]]:
    """(weighted total, {term: unweighted value}) over the terms whose weight in ``cfg`` is above 0 (a weight
    of 0 removes a term and its cost). Load balance, router z-loss and smoothness regularise a learned
    router only; tag alignment needs the model's ``task_head``. A pure function of tensors (compiled by
    ``CareEditModel.compile_regions``); nothing in it waits for the GPU."""
    b, (gh, gw), e = rec.pred.shape[0], rec.grid, num_experts
    terms: dict[str, Tensor] = {}
    region = region_weight(rec.fine, cfg.region_alpha) if cfg.region_alpha > 0 else None
    terms["diffusion"] = flow_matching_loss(pack_latents(rec.pred), pack_latents(rec.velocity), region)
    if cfg.load_balance > 0 and learned_router and rec.probs:
        terms["load_balance"] = torch.stack([load_balance_loss(p, i, e) for p, i in zip(rec.probs, rec.index)]).mean()
    if cfg.router_z > 0 and learned_router and rec.logits:
        terms["router_z"] = torch.stack([router_z_loss(lg) for lg in rec.logits]).mean()
    if cfg.mask_boundary > 0 and rec.refined:
        terms["mask_boundary"] = _mask_term(rec, cfg)
    if cfg.mixture_smoothness > 0 and learned_router and rec.index:
        terms["mixture_smoothness"] = torch.stack(
            [
                mixture_smoothness_loss(dense_weights(i, w, e).reshape(b, gh, gw, e))
                for i, w in zip(rec.index, rec.weight)
            ]
        ).mean()
    if cfg.tag_alignment > 0 and rec.probs and task_head is not None:
        signature = torch.stack([p.reshape(b, -1, e).mean(dim=1) for p in rec.probs]).mean(dim=0)
        predicted, task = task_head(signature, rec.tag_ids)
        terms["tag_alignment"] = tag_alignment_loss(predicted, task)
    weights = {name: getattr(cfg, name) for name in terms}  # each term's weight is the config field of its name
    return sum(weights[k] * v for k, v in terms.items()), terms


def _mask_term(rec: ForwardRecord, cfg: LossConfig) -> Tensor:
    """Mask Repaint's loss, mean over expert layers: on the subgrid through the token logits and their
    patches (``repaint.subgrid`` > 1), else on the token grid."""
    b, (gh, gw) = rec.pred.shape[0], rec.grid
    if rec.details and rec.fine_subgrid is not None:
        per_layer = [
            mask_boundary_loss(
                subgrid_logits(lg, d, rec.grid), rec.fine_subgrid, cfg.boundary_band, cfg.boundary_weight
            )
            for lg, d in zip(rec.refined, rec.details)
        ]
    else:
        fine = rec.fine.reshape(b, gh, gw)
        per_layer = [
            mask_boundary_loss(lg.reshape(b, gh, gw), fine, cfg.boundary_band, cfg.boundary_weight)
            for lg in rec.refined
        ]
    return torch.stack(per_layer).mean()


@torch.no_grad()
def routing_statistics(rec: ForwardRecord, num_experts: int) -> dict[str, Tensor]:
    """Detached routing statistics per expert layer, for the logs: ``util`` [L, E] (share of tokens
    selecting each expert), ``spread`` [L] and ``entropy`` [L] (:func:`routing_spread`,
    :func:`routing_entropy`: the signs of a collapsed router), ``gate`` [L] (mean mixture gate) and
    ``gate_spread`` [L] (its standard deviation over tokens). No kernel in it waits for the GPU."""
    b, e = rec.pred.shape[0], num_experts
    stats: dict[str, Tensor] = {}
    if rec.index:
        stats["util"] = torch.stack([dense_weights(i, (i >= 0).float(), e).mean(dim=0) for i in rec.index])
        stats["spread"] = torch.stack(
            [routing_spread(dense_weights(i, w, e).reshape(b, -1, e)) for i, w in zip(rec.index, rec.weight)]
        )
        stats["entropy"] = torch.stack([routing_entropy(p) for p in rec.probs])
    if rec.gates:
        stats["gate"] = torch.stack([g.float().mean() for g in rec.gates])
        stats["gate_spread"] = torch.stack([g.float().reshape(b, -1).std(dim=1).mean() for g in rec.gates])
    return stats


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
