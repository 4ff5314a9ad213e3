"""The condition-aware router: per-token condition contexts and top-K expert selection.

Two jobs, both per target token:

1. *Condition contexts* that the heterogeneous experts read: an attention read-out of the text
   tokens (for the Text expert), of the reference-image tokens (Reference expert), a projection of
   the mask tokens (Mask expert) and of the base-image token at the same grid position (Base
   expert and Mask Repaint: what is to be kept, and the object's shape when there is no reference).
   They are computed once here, before dispatch, so that they can travel with the token to
   whichever rank holds the expert (docs/DESIGN.md section 6). A sample without a reference reads a
   learned "absent" vector instead of the reference read-out.
2. *Routing*: a latent-attention router. Learned latent queries, modulated by the global task
   context (timestep embedding, pooled text, which conditions are present), form a small set of
   task latents; every token (its content, its condition contexts and the refined mask of the
   previous expert layer) attends over them, and the read-out gives the logits over experts.
   Top-K is taken over all experts for every sample (an absent reference is a context like any
   other: the Reference expert may be picked and learns what to add then), and the weights are
   renormalised over the selected experts, or at K = 1 taken as the softmax probability (Switch's
   choice: a renormalised single weight is 1 and passes the router no gradient; ``router.weights``).
   ``router.mask_absent`` restores the removal of experts
   whose condition is absent before the top-K, as an ablation.

Ablations: ``uniform`` picks K available experts at random per token with equal weights;
``static`` uses every available expert with equal weights (static fusion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import RouterConfig

NUM_CONTEXTS = 4  # per-token condition contexts: text, reference, mask, base


@dataclass
class Routing:
    probs: Tensor  # [S, E] router probabilities over experts (zero for unavailable experts)
    index: Tensor  # [S, K] selected expert ids, -1 where a token has fewer than K available experts
    weight: Tensor  # [S, K] weights of the selected experts (0 where index is -1): summing to 1 per token
    # when renormalised, their softmax probabilities otherwise (router.weights)
    logits: Optional[Tensor] = None  # [S, E] before masking (learned router only)


class CrossAttentionReadout(nn.Module):
    """Single-head attention of each token over a condition's tokens, read out in ``ctx_dim`` channels."""

    def __init__(self, dim: int, attn_dim: int, ctx_dim: int):
        super().__init__()
        self.q = nn.Linear(dim, attn_dim, bias=False)
        self.k = nn.Linear(dim, attn_dim, bias=False)
        self.v = nn.Linear(dim, ctx_dim, bias=False)

    def forward(self, x: Tensor, cond: Tensor, cond_mask: Optional[Tensor]) -> Tensor:
        """x [B, N, D], cond [B, M, D], cond_mask [B, M] bool (True = real) -> [B, N, ctx_dim]."""
        if cond_mask is None:
            return F.scaled_dot_product_attention(self.q(x), self.k(cond), self.v(cond))
        # A sample with no valid condition token reads nothing. Its row attends everywhere (so that no
        # softmax sees only -inf, whose NaN would leak into gradients) and is then zeroed.
        present = cond_mask.any(dim=1)
        mask = (cond_mask | ~present[:, None])[:, None, :]
        out = F.scaled_dot_product_attention(self.q(x), self.k(cond), self.v(cond), attn_mask=mask)
        return out * present[:, None, None].to(out.dtype)


class ConditionRouter(nn.Module):
    def __init__(self, cfg: RouterConfig, dim: int, num_experts: int, temb_dim: int):
        super().__init__()
        self.kind = cfg.kind
        self.top_k = cfg.top_k
        self.noise_std = cfg.noise_std
        self.renormalize = cfg.weights == "renormalized" or (cfg.weights == "auto" and cfg.top_k > 1)
        self.num_experts = num_experts
        c, a = cfg.ctx_dim, cfg.attn_dim
        self.ctx_dim = c
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.text_readout = CrossAttentionReadout(dim, a, c)
        self.ref_readout = CrossAttentionReadout(dim, a, c)
        self.mask_proj = nn.Linear(dim, c)
        self.base_proj = nn.Linear(dim, c)
        # what the Reference expert reads for a sample without a reference (learned; small at start)
        self.absent_ref = nn.Parameter(0.02 * torch.randn(c))
        if self.kind == "learned":
            # global task context: timestep embedding (carries pooled text in FLUX) + condition presence
            self.task = nn.Sequential(nn.Linear(temb_dim + 3, a), nn.SiLU(), nn.Linear(a, 2 * a))
            self.latents = nn.Parameter(torch.randn(cfg.num_latents, a) / math.sqrt(a))
            self.token_query = nn.Linear(dim + NUM_CONTEXTS * c + 1, a)
            self.latent_value = nn.Linear(a, a)
            self.to_logits = nn.Linear(a, num_experts)

    def contexts(
        self,
        x: Tensor,
        text: Tensor,
        text_mask: Optional[Tensor],
        ref: Optional[Tensor],
        has_ref: Tensor,
        mask_tokens: Tensor,
        base_tokens: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-token condition contexts [B, N, c] each: text, reference (the learned absent vector
        without one), mask, base (the base token at the token's grid position; base_tokens [B, N, D])."""
        xn = self.norm(x)
        text_ctx = self.text_readout(xn, self.norm(text), text_mask)
        absent = self.absent_ref.to(text_ctx.dtype).expand_as(text_ctx)
        if ref is None:
            # No reference in this batch. The read-out still enters the graph with weight zero: its
            # parameters then get (zero) gradients on every rank. ZeRO-2 reduces gradient buckets
            # that must hold the same parameters on all ranks, and another rank's batch may have a
            # reference: without this, the ranks' reductions differ in size (gloo fails, NCCL hangs).
            touch = sum(p.sum() for p in self.ref_readout.parameters())
            ref_ctx = absent + 0.0 * touch
        else:
            ref_mask = has_ref[:, None].expand(-1, ref.shape[1])
            read = self.ref_readout(xn, self.norm(ref), ref_mask)
            ref_ctx = torch.where(has_ref[:, None, None], read, absent)
        mask_ctx = self.mask_proj(self.norm(mask_tokens))
        base_ctx = self.base_proj(self.norm(base_tokens))
        return text_ctx, ref_ctx, mask_ctx, base_ctx

    def forward(
        self,
        x: Tensor,  # [B, N, D] target tokens
        contexts: tuple[Tensor, ...],  # NUM_CONTEXTS x [B, N, c]
        prev_mask: Tensor,  # [B, N] refined mask of the previous expert layer (coarse box for the first)
        temb: Tensor,  # [B, D_t]
        presence: Tensor,  # [B, 3] float: has text, has reference, has mask
        available: Tensor,  # [B, E] bool: experts that may be selected (all, unless router.mask_absent)
    ) -> Routing:
        b, n, _ = x.shape
        avail = available[:, None, :].expand(b, n, -1).reshape(b * n, -1)
        if self.kind == "learned":
            scale, shift = self.task(torch.cat([temb, presence.to(temb.dtype)], dim=-1)).chunk(2, dim=-1)
            task_latents = self.latents[None] * (1 + scale[:, None]) + shift[:, None]  # [B, L, a]
            q = self.token_query(torch.cat([self.norm(x), *contexts, prev_mask[..., None]], dim=-1))
            read = F.scaled_dot_product_attention(q, task_latents, self.latent_value(task_latents))
            logits = self.to_logits(read + q).reshape(b * n, -1).float()
            noise = self.noise_std if self.training else 0.0
            return topk_routing(logits, avail, self.top_k, noise, self.renormalize)
        if self.kind == "uniform":
            scores = torch.rand(avail.shape, device=x.device)
            return _equal_weights(scores, avail, self.top_k)
        return _equal_weights(torch.ones(avail.shape, device=x.device), avail, self.num_experts)


def topk_routing(
    logits: Tensor, available: Tensor, k: int, noise_std: float = 0.0, renormalize: bool = True
) -> Routing:
    """Softmax over available experts, top-K; the selected probabilities renormalised to sum to 1, or
    (``renormalize=False``) kept as they are. logits/available: [S, E].

    ``logits`` in the result are the (noised) logits before masking: the z-loss reads them."""
    if noise_std > 0:
        logits = logits + noise_std * torch.randn_like(logits)
    masked = logits.masked_fill(~available, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    top_p, index = probs.topk(k, dim=-1)
    valid = top_p > 0
    weight = top_p / top_p.sum(dim=-1, keepdim=True).clamp_min(1e-20) if renormalize else top_p
    weight = weight * valid
    index = torch.where(valid, index, torch.full_like(index, -1))
    return Routing(probs=probs, index=index, weight=weight, logits=logits)


def _equal_weights(scores: Tensor, available: Tensor, k: int) -> Routing:
    """The k highest-scoring available experts per token, each with weight 1/(number selected)."""
    masked = scores.masked_fill(~available, float("-inf"))
    top, index = masked.topk(k, dim=-1)
    valid = torch.isfinite(top)
    weight = valid.float() / valid.sum(dim=-1, keepdim=True).clamp_min(1)
    index = torch.where(valid, index, torch.full_like(index, -1))
    probs = available.float() / available.float().sum(dim=-1, keepdim=True).clamp_min(1)
    return Routing(probs=probs, index=index, weight=weight)


def dense_weights(index: Tensor, weight: Tensor, num_experts: int) -> Tensor:
    """Sparse routing (index/weight [S, K], -1 = empty slot) -> dense combine weights [S, E]."""
    slot = torch.where(index >= 0, index, torch.full_like(index, num_experts))  # -1 -> a discarded column
    dense = torch.zeros(index.shape[0], num_experts + 1, dtype=weight.dtype, device=weight.device)
    return dense.scatter_add(1, slot, weight)[:, :num_experts]


def routing_confidence(probs: Tensor) -> Tensor:
    """How sure the router is per token: [S, E] probabilities -> [S, 2] (max probability, entropy / log E),
    both in [0, 1]. The Latent Mixture gate reads them."""
    e = probs.shape[-1]
    p = probs.float()
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum(-1) / math.log(max(e, 2))
    return torch.stack([p.max(dim=-1).values, entropy], dim=-1)
