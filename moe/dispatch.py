"""Token dispatchers: how routed tokens reach their experts and how the outputs come back.

All dispatchers compute the same function

    y[s] = sum_k weight[s, k] * expert_{index[s, k]}(packed[s])        (index -1 contributes nothing)

and are interchangeable (tests compare them against :func:`reference_combine`):

* :class:`DenseDispatcher` runs every local expert on every token and weights the outputs by the
  sparse routing weights. For low-rank experts this is the fast path (DESIGN.md section 4): the math
  is tiny and gathering tokens per expert would cost more than it saves, so all low-rank experts run
  as one grouped product (:func:`moe.experts.fused_lora_forward`). Needs ep_size 1.
* :class:`AllToAllDispatcher` groups the (token, expert) assignments by expert, exchanges them with
  the ranks that hold those experts through a variable-size all-to-all (no capacity, no dropped
  tokens: an editor must not drop pixels), runs each local expert once on its rows, sends the
  outputs back and combines. With ep_size 1 it is a plain gather/scatter. With ``grouped_gemm``,
  FFN experts in bf16 run as grouped GEMMs (:func:`moe.experts.grouped_ffn_forward`), at ep_size 1
  without any host synchronisation; measured slower than the per-expert loop on the H100 so far.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .experts import LoraExpert, fused_lora_forward, grouped_ffn_forward, grouped_ffn_supported
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

    def __call__(self, packed: Tensor, index: Tensor, weight: Tensor, experts: Sequence[nn.Module], group=None) -> Tensor:
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
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        back = _VariableAllToAll.apply(grad.contiguous(), ctx.in_splits, ctx.out_splits, ctx.group)
        return back, None, None, None


def _exchange_counts(counts: Tensor, ep_size: int, group) -> Tensor:
    """counts [E_total] tokens this rank sends to each global expert -> [ep, n_local] it receives."""
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts.contiguous(), group=group)
    return recv.view(ep_size, -1)


class AllToAllDispatcher:
    name = "alltoall"

    def __init__(self, ep_size: int = 1, ep_rank: int = 0, grouped_gemm: bool = False):
        self.ep_size = ep_size
        self.ep_rank = ep_rank
        self.grouped_gemm = grouped_gemm  # opt-in: slower than the per-expert loop on the H100 (docs/PERF.md)

    def __call__(
        self, packed: Tensor, index: Tensor, weight: Tensor, experts: Sequence[nn.Module], group: Optional[Any] = None
    ) -> Tensor:
        n_local = len(experts)
        n_total = n_local * self.ep_size
        s, k = index.shape
        flat_expert = index.reshape(-1)
        keep = flat_expert >= 0
        token = torch.arange(s, device=index.device).repeat_interleave(k)[keep]
        flat_expert, flat_weight = flat_expert[keep], weight.reshape(-1)[keep]
        order = torch.argsort(flat_expert, stable=True)  # grouped by expert, hence by destination rank
        token, flat_expert, flat_weight = token[order], flat_expert[order], flat_weight[order]
        counts = torch.bincount(flat_expert, minlength=n_total)
        rows = packed.index_select(0, token)
        grouped_gemm = self.grouped_gemm and grouped_ffn_supported(list(experts), rows)

        if self.ep_size == 1 and grouped_gemm:  # no host round trip: split sizes stay on the device
            out_rows = grouped_ffn_forward(list(experts), rows, flat_expert, counts)
            combined = out_rows.new_zeros((s, out_rows.shape[1]))
            return combined.index_add(0, token, out_rows * flat_weight[:, None].to(out_rows.dtype))

        if self.ep_size > 1:
            recv_counts = _exchange_counts(counts, self.ep_size, group)  # [ep, n_local]
            send_splits = counts.view(self.ep_size, n_local).sum(1).tolist()
            recv_splits = recv_counts.sum(1).tolist()
            rows = _VariableAllToAll.apply(rows, recv_splits, send_splits, group)
            # rows arrive grouped by source rank, then by local expert: regroup by local expert
            src_chunks = recv_counts.reshape(-1).tolist()
            local_of_chunk = torch.arange(n_local, device=rows.device).repeat(self.ep_size)
            chunk_of_row = torch.repeat_interleave(
                torch.arange(len(src_chunks), device=rows.device), torch.tensor(src_chunks, device=rows.device)
            )
            by_expert = torch.argsort(local_of_chunk[chunk_of_row], stable=True)
            local_counts = recv_counts.sum(0).tolist()
        else:
            by_expert = None
            local_counts = counts.tolist()

        grouped = rows if by_expert is None else rows.index_select(0, by_expert)
        if grouped_gemm:
            local = torch.tensor(local_counts, device=rows.device)
            expert_of_row = torch.repeat_interleave(
                torch.arange(n_local, device=rows.device), local, output_size=grouped.shape[0]
            )
            out_rows = grouped_ffn_forward(list(experts), grouped, expert_of_row, local)
        else:
            outputs = [expert(chunk) for expert, chunk in zip(experts, grouped.split(local_counts, dim=0))]
            out_rows = torch.cat(outputs, dim=0)
        if by_expert is not None:
            out_rows = torch.empty_like(out_rows).index_copy(0, by_expert, out_rows)
            out_rows = _VariableAllToAll.apply(out_rows, send_splits, recv_splits, group)

        combined = out_rows.new_zeros((s, out_rows.shape[1]))
        return combined.index_add(0, token, out_rows * flat_weight[:, None].to(out_rows.dtype))


def build_dispatcher(mode: str, expert_kind: str, ep_size: int, ep_rank: int, grouped_gemm: bool = False):
    """``auto``: dense for low-rank experts on one rank, all-to-all otherwise (DESIGN.md section 4)."""
    if mode == "auto":
        mode = "dense" if (expert_kind == "lora" and ep_size == 1) else "alltoall"
    if mode == "dense":
        return DenseDispatcher()
    return AllToAllDispatcher(ep_size, ep_rank, grouped_gemm)
