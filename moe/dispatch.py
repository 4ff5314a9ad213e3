"""Token dispatchers: how routed tokens reach their experts and how the outputs come back.

All dispatchers compute the same function

    y[s] = sum_k weight[s, k] * expert_{index[s, k]}(packed[s])        (index -1 contributes nothing)

and are interchangeable (tests compare them against :func:`reference_combine`). With the Latent
Mixture on, a token has K+1 slots: its top-K and Base's share, merged into Base's slot where the
router chose Base (the extra slot is then empty, -1), so each expert appears once per token:

* :class:`DenseDispatcher` runs every local expert on every token and weights the outputs by the
  sparse routing weights. For low-rank experts this is the fast path (docs/DESIGN.md section 9): the math
  is tiny and gathering tokens per expert would cost more than it saves, so all low-rank experts run
  as one grouped product (:func:`moe.experts.fused_lora_forward`). Needs ep_size 1.
* :class:`AllToAllDispatcher` groups the (token, expert) assignments by expert, exchanges them with
  the ranks that hold those experts through a variable-size all-to-all (no capacity, no dropped
  tokens: an editor must not drop pixels), runs each local expert once on its rows, sends the
  outputs back and combines. Rows move by permutations in both directions (no atomic scatter-add);
  with ep_size 1 that is one gather, the experts, one permutation back and an elementwise combine.
  With ``grouped_gemm``, FFN experts in bf16 run as grouped GEMMs (:func:`moe.experts.grouped_ffn_forward`),
  at ep_size 1 without any host synchronisation (the group sizes stay on the device). Its shapes are
  static, so empty slots are computed (by the last local expert) and zeroed: S*(K+1) rows where the
  per-expert loop computes only the used ones (S*K plus the tokens whose top-K lacks Base). At ep_size 1
  this is the reference for the grouped dispatcher.
* :class:`GroupedDispatcher` (FFN experts at ep_size 1, the default there) computes the same grouped
  GEMMs with the permutation, the biases, the routing weights and the combine fused around them
  (:func:`moe.grouped_ffn.fused_grouped_ffn`): no host synchronisation, so CUDA graphs take it. Where
  grouped GEMMs do not run it falls back to the all-to-all dispatcher's per-expert loop.

Measured against each other and a dense layer of the same FLOPs: docs/PERF.md.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from .experts import LoraExpert, fused_lora_forward, grouped_ffn_forward, grouped_ffn_supported
from .grouped_ffn import fused_grouped_ffn
from .permute import GatherSlots, PermuteRows, inverse_permutation, slots_by_expert
from .router import dense_weights


def reference_combine(packed: Tensor, index: Tensor, weight: Tensor, experts: Sequence[nn.Module]) -> Tensor:
    """Plain per-token loop: the definition the fast paths are tested against (slow; tests only)."""
    out = []
    for s in range(packed.shape[0]):
        acc = 0
        for k in range(index.shape[1]):
            e = int(index[s, k])
            if e >= 0:
                acc = acc + weight[s, k] * experts[e](packed[s : s + 1])[0]
        out.append(acc if torch.is_tensor(acc) else experts[0](packed[s : s + 1])[0] * 0)
    return torch.stack(out)


class DenseDispatcher:
    name = "dense"

    def host_sync_free(self, experts: Sequence[nn.Module]) -> bool:
        """Whether dispatching to ``experts`` never waits for a host value (so it can be traced whole)."""
        return True

    def __call__(
        self, packed: Tensor, index: Tensor, weight: Tensor, experts: Sequence[nn.Module], group=None
    ) -> Tensor:
        dense = dense_weights(index, weight, len(experts)).to(packed.dtype)  # [S, E]
        if all(isinstance(e, LoraExpert) for e in experts) and len({e.down.out_features for e in experts}) == 1:
            return fused_lora_forward(list(experts), packed, dense)
        out = None
        for e, expert in enumerate(experts):
            y = expert(packed) * dense[:, e : e + 1]
            out = y if out is None else out + y
        return out


class _VariableAllToAll(torch.autograd.Function):
    """all_to_all_single with per-rank split sizes; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out_splits: list[int], in_splits: list[int], group) -> Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        torch_dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        back = _VariableAllToAll.apply(grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group)
        return back, None, None, None


def _combine(out_rows: Tensor, order: Tensor, inverse: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """Expert outputs [S*K, D] in expert order -> y [S, D] = sum_k weight[s, k] * out(slot s*K + k)."""
    s, k = index.shape
    y = PermuteRows.apply(out_rows, inverse, order).view(s, k, out_rows.shape[1])  # back to slot order
    w = torch.where(index >= 0, weight, 0).to(y.dtype)
    # elementwise, not bmm: a [S, 1, K] x [S, K, D] batch of tiny products (and its gradient) takes
    # cuBLAS's slow batched path, 3.3 ms at 16K tokens on the H100 for ~0.3 ms of memory traffic
    return (y * w.unsqueeze(-1)).sum(1)


def _exchange_counts(counts: Tensor, ep_size: int, group) -> Tensor:
    """counts [E_total] tokens this rank sends to each global expert -> [ep, n_local] it receives."""
    recv = torch.empty_like(counts)
    torch_dist.all_to_all_single(recv, counts.contiguous(), group=group)
    return recv.view(ep_size, -1)


class AllToAllDispatcher:
    """Routing slots sorted by expert; rows move by permutations (atomic-free in both directions);
    one variable all-to-all each way when ep_size > 1."""

    name = "alltoall"

    def __init__(self, ep_size: int = 1, ep_rank: int = 0, grouped_gemm: bool = False):
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.grouped_gemm = grouped_gemm  # where grouped_ffn_supported; the per-expert loop otherwise

    def host_sync_free(self, experts: Sequence[nn.Module]) -> bool:
        """True for grouped GEMMs on one rank: the group sizes stay on the device. The per-expert loop
        and the all-to-all need split sizes on the host."""
        if not (self.ep_size == 1 and self.grouped_gemm):
            return False
        p = next(experts[0].parameters())
        return grouped_ffn_supported(list(experts), p.dtype, p.device)

    def __call__(
        self, packed: Tensor, index: Tensor, weight: Tensor, experts: Sequence[nn.Module], group: Optional[Any] = None
    ) -> Tensor:
        n_local = len(experts)
        n_total = n_local * self.ep_size
        s, k = index.shape
        order, inverse, expert_of_slot, counts = slots_by_expert(index, n_total)
        rows = GatherSlots.apply(packed, order, inverse, k)  # [S*K, W], unassigned slots last
        grouped_gemm = self.grouped_gemm and grouped_ffn_supported(list(experts), rows.dtype, rows.device)

        if self.ep_size == 1 and grouped_gemm:  # no host round trip: group sizes stay on the device
            # unassigned slots ride along in the last group and are zeroed after
            groups = counts[:n_local] + F.pad(counts[n_local:], (n_local - 1, 0))
            out_rows = grouped_ffn_forward(list(experts), rows, expert_of_slot.clamp(max=n_local - 1), groups)
            out_rows = torch.where((expert_of_slot < n_total)[:, None], out_rows, 0)
            return _combine(out_rows, order, inverse, index, weight)

        host_counts = counts.tolist()
        n_assigned = s * k - host_counts[-1]
        rows = rows[:n_assigned]
        if self.ep_size > 1:
            recv_counts = _exchange_counts(counts[:n_total], self.ep_size, group)  # [ep, n_local]
            recv_host = recv_counts.tolist()  # the one host round trip for what arrives
            send_splits = [sum(host_counts[r * n_local : (r + 1) * n_local]) for r in range(self.ep_size)]
            recv_splits = [sum(row) for row in recv_host]
            rows = _VariableAllToAll.apply(rows, recv_splits, send_splits, group)
            # rows arrive grouped by source rank, then by local expert: regroup by local expert
            src_chunks = recv_counts.reshape(-1)
            local_of_chunk = torch.arange(n_local, device=rows.device).repeat(self.ep_size)
            by_expert = torch.argsort(
                torch.repeat_interleave(local_of_chunk, src_chunks, output_size=rows.shape[0]), stable=True
            )
            inverse_by_expert = inverse_permutation(by_expert)
            rows = PermuteRows.apply(rows, by_expert, inverse_by_expert)
            local_counts = recv_counts.sum(0)
            local_host = [sum(col) for col in zip(*recv_host)]
        else:
            local_counts, local_host = counts[:n_local], host_counts[:n_local]

        if grouped_gemm:
            expert_of_row = torch.repeat_interleave(
                torch.arange(n_local, device=rows.device), local_counts, output_size=rows.shape[0]
            )
            out_rows = grouped_ffn_forward(list(experts), rows, expert_of_row, local_counts)
        else:
            chunks = rows.split(local_host, dim=0)
            out_rows = torch.cat([expert(chunk) for expert, chunk in zip(experts, chunks)], dim=0)
        if self.ep_size > 1:
            out_rows = PermuteRows.apply(out_rows, inverse_by_expert, by_expert)
            out_rows = _VariableAllToAll.apply(out_rows, send_splits, recv_splits, group)
        if n_assigned < s * k:
            out_rows = torch.cat([out_rows, out_rows.new_zeros(s * k - n_assigned, out_rows.shape[1])])
        return _combine(out_rows, order, inverse, index, weight)


class GroupedDispatcher:
    """FFN experts on one rank as grouped GEMMs with the permutation fused into them
    (:func:`moe.grouped_ffn.fused_grouped_ffn`): the fast path, with ``AllToAllDispatcher(grouped_gemm=True)``
    as its reference. Where grouped GEMMs do not run (float32, GPUs before sm90), ``fallback`` does."""

    name = "grouped"
    ep_size, ep_rank = 1, 0

    def __init__(self, fallback: Optional[AllToAllDispatcher] = None):
        self.fallback = fallback if fallback is not None else AllToAllDispatcher(1, 0)

    def host_sync_free(self, experts: Sequence[nn.Module]) -> bool:
        """True where the fused path runs: its group sizes stay on the device."""
        p = next(experts[0].parameters())
        return grouped_ffn_supported(list(experts), p.dtype, p.device)

    def __call__(
        self, packed: Tensor, index: Tensor, weight: Tensor, experts: Sequence[nn.Module], group: Optional[Any] = None
    ) -> Tensor:
        if not grouped_ffn_supported(list(experts), packed.dtype, packed.device):
            return self.fallback(packed, index, weight, experts, group)
        return fused_grouped_ffn(list(experts), packed, index, weight)


def build_dispatcher(mode: str, expert_kind: str, ep_size: int, ep_rank: int, grouped_gemm: bool = False):
    """``auto``: on one rank, dense for low-rank experts and grouped for FFN experts with grouped GEMMs on;
    all-to-all otherwise (docs/DESIGN.md section 9)."""
    if mode == "auto" and ep_size == 1:
        mode = "dense" if expert_kind == "lora" else ("grouped" if grouped_gemm else "alltoall")
    if mode == "dense":
        return DenseDispatcher()
    if mode == "grouped":
        return GroupedDispatcher()
    return AllToAllDispatcher(ep_size, ep_rank, grouped_gemm)
