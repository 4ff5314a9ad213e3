"""FFN experts on one rank with the permutation fused into the grouped GEMMs (``GroupedDispatcher``).

The same function as the reference path (``AllToAllDispatcher`` with grouped GEMMs: gather the slot rows
in expert order, :func:`moe.experts.grouped_ffn_forward`, permute back, weight, sum; tests compare them),
with fewer passes over memory and fewer kernels around the three grouped GEMMs:

* The packed tokens are gathered straight into the two GEMM inputs: the token columns [T, D], and each
  row's own expert's condition columns, compacted to [T, Wc] (at most c + 1 of the 4c + 1 condition
  columns: the condition GEMM's inner dimension is Wc = 72 at c = 64 where the reference's is 264, whose
  other columns each expert multiplies by zero). There is no [T, W] copy of the packed rows.
* The condition bias rides in the condition GEMM: the compact condition rows carry a column of ones,
  the stacked condition weights the bias in that row. Its gradient comes out of the GEMM's weight
  gradient, with no one-hot product.
* The routing weight scales the hidden activations in the bias + gelu pass (:class:`BiasGeluScale`).
  The second GEMM then writes weighted rows, empty slots (weight 0) come out zero without a pass of
  their own, and the combine is a sum of K gathered rows. The weight's gradient is a row sum in the
  gelu backward pass.
* The output bias is added per token, ``sum_e w[s, e] b_e``, an [S, E] x [E, D] product: its gradient
  reads the S token rows, not the S*K slot rows.

The routing slots are sorted once (:func:`moe.permute.slots_by_expert`) and the backward reuses the
order. Group sizes stay on the device: no host synchronisation, so the layer traces whole and CUDA graphs
take it. Shapes: S tokens, K slots per token, T = S*K rows, W packed width, D model width, F hidden
width, E experts, Wc the most condition columns an expert reads + 1, rounded up to a multiple of 8.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from data.arith import ceil_div

from .experts import FfnExpert, stacked_for_grouped_mm
from .permute import PermuteRows, slots_by_expert
from .router import dense_weights


def fused_grouped_ffn(experts: list[FfnExpert], packed: Tensor, index: Tensor, weight: Tensor) -> Tensor:
    """packed [S, W], index/weight [S, K] (local expert ids, -1 = empty slot) -> [S, D]
    = ``sum_k weight[s, k] * experts[index[s, k]](packed[s])``."""
    s, k = index.shape
    n, d = len(experts), experts[0].dim
    order, inverse, expert_of_slot, counts = slots_by_expert(index, n)
    # empty slots, sorted last, ride along in the last expert's group with weight 0
    offs = (counts[:n] + F.pad(counts[n:], (n - 1, 0))).cumsum(0).to(torch.int32)
    expert_of_row = expert_of_slot.clamp(max=n - 1)
    w_row = PermuteRows.apply(torch.where(index >= 0, weight, 0).to(packed.dtype).reshape(-1), order, inverse)

    columns = tuple(tuple((lo - d, hi - d) for lo, hi in e.cond_ranges) for e in experts)
    x_rows, cond_rows = GatherTokenRows.apply(packed, order, inverse, expert_of_row, k, d, columns)  # [T, D], [T, Wc]
    x = x_rows + torch._grouped_mm(cond_rows, compact_condition_weights(experts), offs=offs)
    w_in = stacked_for_grouped_mm([e.proj_in.weight for e in experts])  # [E, D, F]
    h = torch._grouped_mm(x, w_in, offs=offs)  # [T, F], before the bias
    a = BiasGeluScale.apply(h, torch.stack([e.proj_in.bias for e in experts]), expert_of_row, w_row)
    w_out = stacked_for_grouped_mm([e.proj_out.weight for e in experts])  # [E, F, D]
    rows = torch._grouped_mm(a, w_out, offs=offs)  # [T, D], weighted, without the output bias
    y = PermuteRows.apply(rows, inverse, order).view(s, k, d).sum(1)  # back to slot order, K slots summed
    b_out = torch.stack([e.proj_out.bias for e in experts])  # [E, D]
    return y + dense_weights(index, weight, n).to(y.dtype) @ b_out


def _ones_column(experts_columns: tuple) -> int:
    """Where the compact condition rows carry their column of ones: after the most columns any expert reads."""
    return max(sum(hi - lo for lo, hi in cols) for cols in experts_columns)


def _compact_width(experts_columns: tuple) -> int:
    """Wc: the compact condition rows' width, the ones column included, rounded up to a multiple of 8
    (16-byte rows in bf16, as grouped GEMM operands need)."""
    return ceil_div(_ones_column(experts_columns) + 1, 8) * 8


def compact_condition_weights(experts: list[FfnExpert]) -> Tensor:
    """Every expert's condition projection as the condition GEMM's weight operand [E, Wc, D]: the weights
    of its own columns in their packed order (:meth:`moe.experts._Expert.own_condition_weight`), zero
    rows up to the ones column, the bias in that row, zero rows after it."""
    columns = tuple(tuple(e.cond_ranges) for e in experts)
    ones, width = _ones_column(columns), _compact_width(columns)
    stacked = []
    for e in experts:
        w, b = e.own_condition_weight()  # [D, n_e], [D]
        w = w.t()
        stacked.append(
            torch.cat(
                [w, w.new_zeros(ones - w.shape[0], w.shape[1]), b[None], w.new_zeros(width - ones - 1, w.shape[1])]
            )
        )
    return torch.stack(stacked)


class GatherTokenRows(torch.autograd.Function):
    """The two GEMM inputs gathered from the packed tokens in expert order (row j reads token
    ``order[j] // k``): the token columns x [T, D], and the compact condition rows [T, Wc]: the columns of
    the row's expert (``columns[e]``: ranges after the D token columns), zeros, a column of ones, zeros.

    Each row's expert is chosen among the E experts' static column layouts (no index tables). The
    gradient places each compact row's columns back where its expert read them, goes back to slot order
    by the inverse gather and sums each token's K slots (no atomic scatter-add); columns that no expert
    reads (and the padding) get zero.
    """

    @staticmethod
    def forward(
        ctx: Any, packed: Tensor, order: Tensor, inverse: Tensor, expert_of_row: Tensor, k: int, dim: int, columns
    ):
        tokens = order // k
        x = packed[:, :dim].index_select(0, tokens)
        extent = max(hi for cols in columns for _, hi in cols)
        conds = packed[:, dim : dim + extent].index_select(0, tokens)  # [T, extent]
        t, ones, width = conds.shape[0], _ones_column(columns), _compact_width(columns)
        compact = None
        for e, cols in enumerate(columns):
            own = [conds[:, lo:hi] for lo, hi in cols]
            n = sum(hi - lo for lo, hi in cols)
            row = torch.cat(
                own + [conds.new_zeros(t, ones - n), conds.new_ones(t, 1), conds.new_zeros(t, width - ones - 1)], 1
            )
            compact = row if compact is None else torch.where((expert_of_row == e)[:, None], row, compact)
        ctx.save_for_backward(inverse, expert_of_row)
        ctx.k, ctx.columns, ctx.extent, ctx.packed_shape = k, columns, extent, packed.shape
        return x, compact

    @staticmethod
    def backward(ctx: Any, grad_x: Tensor, grad_cond: Tensor):
        inverse, expert_of_row = ctx.saved_tensors
        s, w = ctx.packed_shape
        t = grad_cond.shape[0]
        placed = None  # [T, extent]: each row's compact gradient where its expert read the columns
        for e, cols in enumerate(ctx.columns):
            pieces, pos, col = [], 0, 0
            for lo, hi in cols:
                pieces += [grad_cond.new_zeros(t, lo - pos), grad_cond[:, col : col + hi - lo]]
                col, pos = col + hi - lo, hi
            mine = torch.where(
                (expert_of_row == e)[:, None], torch.cat(pieces + [grad_cond.new_zeros(t, ctx.extent - pos)], 1), 0
            )
            placed = mine if placed is None else placed + mine
        rows = torch.cat([grad_x, placed], dim=1).index_select(0, inverse)
        per_token = rows.view(s, ctx.k, rows.shape[1]).sum(1)  # [S, D + extent]
        return F.pad(per_token, (0, w - per_token.shape[1])), None, None, None, None, None, None


class BiasGeluScale(torch.autograd.Function):
    """``gelu_tanh(h + bias[expert_of_row]) * w[:, None]``: the first GEMM's bias, the activation and the
    routing weight in one pass. h [T, F] (the GEMM's output), bias [E, F], expert_of_row [T], w [T].

    The backward recomputes the pre-activation from h (kept: no second [T, F] buffer) and returns the
    weight's gradient as a row sum in the same pass. The bias gradient is one [E, T] x [T, F] product
    with the one-hot expert matrix (rows are sorted by expert), where autograd's gradient of the gather
    would scatter-add T rows into E (atomics).
    """

    @staticmethod
    def forward(ctx: Any, h: Tensor, bias: Tensor, expert_of_row: Tensor, w: Tensor) -> Tensor:
        ctx.save_for_backward(h, bias, expert_of_row, w)
        return F.gelu(h + bias.index_select(0, expert_of_row), approximate="tanh") * w[:, None]

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        h, bias, expert_of_row, w = ctx.saved_tensors
        pre = h + bias.index_select(0, expert_of_row)
        grad_pre = torch.ops.aten.gelu_backward(grad * w[:, None], pre, approximate="tanh")
        grad_bias = grad_w = None
        if ctx.needs_input_grad[1]:
            experts = torch.arange(bias.shape[0], device=expert_of_row.device)
            onehot = (expert_of_row[None, :] == experts[:, None]).to(grad.dtype)  # [E, T]
            grad_bias = onehot.mm(grad_pre)
        if ctx.needs_input_grad[3]:
            grad_w = (grad.float() * F.gelu(pre, approximate="tanh").float()).sum(1).to(w.dtype)
        return grad_pre, grad_bias, None, grad_w
