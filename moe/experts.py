"""The four heterogeneous experts.

Every expert receives the same *packed token* (what is dispatched, possibly to another rank):

    [ x (D) | text_ctx (c) | ref_ctx (c) | mask_ctx (c) | base_ctx (c) | m (1) | 0 ... ]
                                                         width D + 4c + 1, padded to a multiple of 8

and reads the token plus its own condition columns:

| expert    | condition it reads                                                      |
|-----------|-------------------------------------------------------------------------|
| text      | the text read-out                                                       |
| reference | the reference-image read-out (a learned "absent" vector without one)    |
| mask      | the mask-token context and the refined mask m                           |
| base      | the base-image token at the same grid position and 1 - m (what to keep) |

Two sizes. ``lora``: a low-rank residual ``up(gelu(down(x) + cond(c)))`` added to the frozen FFN's
output. ``ffn``: a full copy of the block's feed-forward, initialised from it, applied to
``x + cond(c)`` with ``cond`` zero-initialised. Either way the experts start (almost) where the
frozen path is, but not identical: the ``lora`` up projections and the ``ffn`` output projections
carry a small random perturbation, zero-mean over the experts (:func:`zero_mean_perturbation`),
so the diffusion loss can tell the router which expert helps where from the first step.
"""

from __future__ import annotations

import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.arith import ceil_div

NUM_CONDITION_COLUMNS = 4  # context blocks of width c in a packed token: text, reference, mask, base


def packed_width(dim: int, ctx_dim: int) -> int:
    """Width of a packed token: D + 4c + 1 columns, zero-padded to a multiple of 8 so that every row
    starts on a 16-byte boundary in bf16 (cuBLAS reads strided rows in place only then). The condition
    columns start aligned too when D is a multiple of 8 (FLUX: 3072)."""
    return ceil_div(dim + NUM_CONDITION_COLUMNS * ctx_dim + 1, 8) * 8


def condition_columns(name: str, dim: int, ctx_dim: int) -> list[tuple[int, int]]:
    """The (start, end) column ranges of an expert's condition inside the packed token, ascending.
    The mask column m is the last of the Mask and of the Base expert's condition."""
    c = ctx_dim
    m = (dim + 4 * c, dim + 4 * c + 1)
    return {
        "text": [(dim, dim + c)],
        "reference": [(dim + c, dim + 2 * c)],
        "mask": [(dim + 2 * c, dim + 3 * c), m],
        "base": [(dim + 3 * c, dim + 4 * c + 1)],  # base read-out and m, adjacent
    }[name]


def zero_mean_perturbation(
    shape: tuple[int, ...], expert_id: int, num_experts: int, seed: int, device: Optional[torch.device] = None
) -> Tensor:
    """``R_e - mean_j R_j`` with ``R_j ~ N(0, 1)`` drawn from ``seed + j``: a perturbation per expert
    that sums to zero over the experts (so a uniform mixture of perturbed copies equals the copy to first
    order), and is the same for a given expert id on any expert-parallel layout and any device: drawn on
    the CPU (also when the model is built under a CUDA default device), then moved to ``device``."""
    draws = [
        torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed + j), device="cpu")
        for j in range(num_experts)
    ]
    return (draws[expert_id] - torch.stack(draws).mean(0)).to(device if device is not None else "cpu")


class _Expert(nn.Module):
    def __init__(self, name: str, dim: int, ctx_dim: int):
        super().__init__()
        self.name = name
        self.dim = dim
        self.cond_ranges = condition_columns(name, dim, ctx_dim)
        self.cond_width = sum(hi - lo for lo, hi in self.cond_ranges)

    def condition(self, packed: Tensor) -> Tensor:
        """The expert's condition read plainly from its columns (the definition; tests only)."""
        cond = torch.cat([packed[:, lo:hi] for lo, hi in self.cond_ranges], dim=1)
        if self.name == "base":  # the Base expert reads "how much of this token is to be kept"
            cond = torch.cat([cond[:, :-1], 1.0 - cond[:, -1:]], dim=1)
        return cond

    def condition_projection(self, packed: Tensor) -> Tensor:
        """``self.cond(self.condition(packed))`` computed over all condition columns at once.

        The expert's own columns have odd widths and unaligned starts; a product over all condition
        columns (zero weight outside them) reads the packed rows in place and is aligned. [T, W] -> [T, out].
        """
        w, b = self.full_condition_weight(packed.shape[1] - self.dim)
        return F.linear(packed[:, self.dim :], w, b)

    def own_condition_weight(self) -> tuple[Tensor, Tensor]:
        """The condition projection on the expert's own columns as they are packed: weight [out, cond_width]
        and bias [out]. The Base expert reads 1 - m: W (1 - m) = W - W m, a bias W and a weight -W on the
        m column."""
        w = self.cond.weight  # [out, cond_width]
        bias = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        if self.name == "base":
            w, bias = torch.cat([w[:, :-1], -w[:, -1:]], dim=1), w[:, -1]
        return w, bias

    def full_condition_weight(self, width: int) -> tuple[Tensor, Tensor]:
        """The condition projection over all ``width`` condition columns: weight [out, width] (zero
        outside the expert's columns) and bias [out] (:meth:`own_condition_weight`)."""
        w, bias = self.own_condition_weight()
        pieces, pos, col = [], 0, 0
        for lo, hi in self.cond_ranges:
            lo, hi = lo - self.dim, hi - self.dim
            pieces += [w.new_zeros(w.shape[0], lo - pos), w[:, col : col + hi - lo]]
            col, pos = col + hi - lo, hi
        pieces.append(w.new_zeros(w.shape[0], width - pos))
        return torch.cat(pieces, dim=1), bias


class LoraExpert(_Expert):
    def __init__(self, name: str, dim: int, ctx_dim: int, rank: int, perturbation: Optional[Tensor] = None):
        """``perturbation`` [dim, rank]: the up projection's start (zero when None)."""
        super().__init__(name, dim, ctx_dim)
        self.down = nn.Linear(dim, rank)
        self.cond = nn.Linear(self.cond_width, rank, bias=False)
        self.up = nn.Linear(rank, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        if perturbation is not None:
            with torch.no_grad():
                self.up.weight.copy_(perturbation)

    def forward(self, packed: Tensor) -> Tensor:
        """[T, W] packed tokens -> [T, D] residual added to the frozen FFN output."""
        x = packed[:, : self.dim]
        return self.up(F.gelu(self.down(x) + self.condition_projection(packed)))


class FfnExpert(_Expert):
    def __init__(
        self,
        name: str,
        dim: int,
        ctx_dim: int,
        proj_in: nn.Linear,
        proj_out: nn.Linear,
        perturbation: Optional[Tensor] = None,
    ):
        """``perturbation`` [dim, F]: added to the copied output projection's weight (None: an exact copy)."""
        super().__init__(name, dim, ctx_dim)
        self.proj_in = copy.deepcopy(proj_in).requires_grad_(True)
        self.proj_out = copy.deepcopy(proj_out).requires_grad_(True)
        self.cond = nn.Linear(self.cond_width, dim, bias=False)
        nn.init.zeros_(self.cond.weight)
        if perturbation is not None:
            with torch.no_grad():
                self.proj_out.weight.add_(perturbation.to(self.proj_out.weight.dtype))

    def forward(self, packed: Tensor) -> Tensor:
        """[T, W] packed tokens -> [T, D] replacement of the frozen FFN output."""
        x = packed[:, : self.dim] + self.condition_projection(packed)
        return self.proj_out(F.gelu(self.proj_in(x), approximate="tanh"))


def fused_lora_forward(experts: list[LoraExpert], packed: Tensor, dense: Tensor) -> Tensor:
    """All low-rank experts as one rank-(E*r) product, each expert's hidden units scaled by its weight.

    The same function as ``sum_e dense[:, e] * expert_e(packed)`` (tests compare them), in 2 matmuls
    instead of 3E small ones (low-rank experts are too small to launch one by one):
    * in: one product over the whole packed row, ``[down | all conditions]`` stacked for all experts,
      so the gradient of the packed rows is one product too (no slice, zero fill and add);
    * out: the up projections with the weighted up biases as E more input columns.
    packed [S, W], dense [S, E] -> [S, D].
    """
    d, r, n = experts[0].dim, experts[0].down.out_features, len(experts)
    rows, width = _aligned_rows(packed, d)
    cond_w, cond_b = condition_weights(experts, width)  # [E, width, r], [E, r]
    w_in = torch.cat(
        [
            torch.cat([e.down.weight for e in experts]),  # [E*r, D]
            cond_w.transpose(1, 2).reshape(n * r, width),
        ],
        dim=1,
    )  # [E*r, D + width]
    b_in = torch.cat([e.down.bias for e in experts]) + cond_b.reshape(-1)
    h = F.gelu(F.linear(rows, w_in, b_in)) * dense.repeat_interleave(r, dim=1)  # [S, E*r]
    pad = ceil_div(n * r + n, 8) * 8 - (n * r + n)  # keep the inner dimension 16-byte aligned
    h = torch.cat([h, dense, h.new_zeros(h.shape[0], pad)], dim=1)
    up = [e.up.weight for e in experts] + [torch.stack([e.up.bias for e in experts], dim=1)]  # [D, r] x E, [D, E]
    return F.linear(h, torch.cat(up + [up[-1].new_zeros(d, pad)], dim=1))


def grouped_ffn_supported(experts: list, dtype: torch.dtype, device: torch.device) -> bool:
    """The grouped-GEMM path needs FFN experts, bf16 rows and ``torch._grouped_mm`` (CUDA sm90+, or
    the CPU fallback); anything else takes the per-expert loop. Asked with the rows' dtype and device,
    or before any rows exist with the parameters' (whether a layer can be traced)."""
    return (
        hasattr(torch, "_grouped_mm")
        and dtype == torch.bfloat16
        and len(experts) > 0
        and all(isinstance(e, FfnExpert) for e in experts)
        and experts[0].dim % 8 == 0  # grouped GEMM operands need 16-byte strides
        and (device.type == "cpu" or (device.type == "cuda" and _cuda_major(device.index) >= 9))
    )


@torch.compiler.assume_constant_result
def _cuda_major(index) -> int:
    """Compute capability major of a CUDA device; a constant to torch.compile (traced layers ask it)."""
    return torch.cuda.get_device_capability(index)[0]


def condition_weights(experts: list, width: int) -> tuple[Tensor, Tensor]:
    """Every expert's full condition projection (:meth:`_Expert.full_condition_weight`) stacked:
    weights [E, width, out], biases [E, out]."""
    weights, biases = zip(*(e.full_condition_weight(width) for e in experts))
    return torch.stack([w.t() for w in weights]), torch.stack(biases)


def _aligned_condition_columns(packed: Tensor, dim: int) -> tuple[Tensor, int]:
    """The condition columns of the packed tokens, zero-padded to a multiple of 8 (16-byte rows)."""
    rows, width = _aligned_rows(packed, dim)
    return rows[:, dim:], width


def _aligned_rows(packed: Tensor, dim: int) -> tuple[Tensor, int]:
    """The packed tokens with their condition columns padded to a multiple of 8, and that padded
    condition width. Rows packed by :func:`packed_width` with D a multiple of 8 need no copy."""
    cols = packed.shape[1] - dim
    width = ceil_div(cols, 8) * 8
    return (packed if width == cols else F.pad(packed, (0, width - cols))), width


class _RowBias(torch.autograd.Function):
    """``h + bias[group_of_row]`` for rows sorted by group: a gather-add in the forward (fused into the
    next elementwise kernel when compiled), and in the backward the bias gradient as one [E, T] x [T, N]
    product with the one-hot group matrix, where autograd's gradient of a gather would scatter-add T
    rows into E (atomics)."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, bias: Tensor, group_of_row: Tensor, onehot: Tensor) -> Tensor:
        ctx.save_for_backward(onehot)
        return h + bias.index_select(0, group_of_row)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        (onehot,) = ctx.saved_tensors
        grad_bias = onehot.t().to(grad.dtype).mm(grad) if ctx.needs_input_grad[1] else None
        return grad, grad_bias, None, None


def stacked_for_grouped_mm(weights: list[Tensor]) -> Tensor:
    """E Linear weights [out, in] -> the grouped GEMM's [E, in, out] operand, as a transposed view of their
    plain stack: the copy keeps each weight's own layout (a transposing copy cost 2.5 ms per call on the
    H100), and the gradient comes back in it, so each expert's slice needs no copy either."""
    return torch.stack(weights).transpose(1, 2)


def grouped_ffn_forward(experts: list[FfnExpert], rows: Tensor, expert_of_row: Tensor, counts: Tensor) -> Tensor:
    """All FFN experts in three grouped GEMMs (``torch._grouped_mm``) instead of 3 per expert.

    rows [T, W] packed tokens sorted by expert, expert_of_row [T] (local ids, sorted), counts [E] rows
    per expert (on the device: no host synchronisation) -> [T, D]. The same function as running
    ``experts[e]`` on its rows (tests compare them). Per-expert biases are added by row
    (:class:`_RowBias`).
    """
    d = experts[0].dim
    offs = counts.cumsum(0).to(torch.int32)
    onehot = F.one_hot(expert_of_row, len(experts)).to(rows.dtype)  # [T, E], for the bias gradients

    def biased(h: Tensor, biases: list[Tensor]) -> Tensor:
        return _RowBias.apply(h, torch.stack(biases), expert_of_row, onehot)

    cond_in, width = _aligned_condition_columns(rows, d)
    cond_w, cond_b = condition_weights(experts, width)  # [E, width, D], [E, D]
    x = rows[:, :d] + _RowBias.apply(
        torch._grouped_mm(cond_in.contiguous(), cond_w, offs=offs), cond_b, expert_of_row, onehot
    )
    w_in = stacked_for_grouped_mm([e.proj_in.weight for e in experts])  # [E, D, F]
    h = F.gelu(biased(torch._grouped_mm(x, w_in, offs=offs), [e.proj_in.bias for e in experts]), approximate="tanh")
    w_out = stacked_for_grouped_mm([e.proj_out.weight for e in experts])  # [E, F, D]
    return biased(torch._grouped_mm(h, w_out, offs=offs), [e.proj_out.bias for e in experts])


def plain_linears_of_feed_forward(ff: nn.Module) -> tuple[nn.Linear, nn.Linear]:
    """The two frozen Linear layers of a diffusers ``FeedForward`` (GELU-tanh MLP), LoRA wrappers removed."""
    proj_in, proj_out = ff.net[0].proj, ff.net[2]
    proj_in = getattr(proj_in, "base_layer", proj_in)
    proj_out = getattr(proj_out, "base_layer", proj_out)
    if not (isinstance(proj_in, nn.Linear) and isinstance(proj_out, nn.Linear)):
        raise TypeError(f"unsupported feed-forward layout for ffn experts: {type(proj_in)}, {type(proj_out)}")
    act = ff.net[0]
    if getattr(act, "approximate", "tanh") != "tanh":
        raise TypeError("ffn experts copy a GELU-tanh feed-forward; this block's activation differs")
    return proj_in, proj_out


def build_expert(
    kind: str,
    name: str,
    dim: int,
    ctx_dim: int,
    rank: int,
    frozen_ff: nn.Module,
    init_std: float = 0.0,
    expert_id: int = 0,
    num_experts: int = 1,
    seed: int = 0,
) -> _Expert:
    """One expert; ``init_std`` > 0 starts it apart from the others (see the module docstring):
    ``lora`` up weights ``init_std * P``, ``ffn`` output weights ``+ init_std * std(W_out) * P``, with P
    the expert's :func:`zero_mean_perturbation` among ``num_experts`` drawn from ``seed``."""
    if kind == "lora":
        pert = None
        if init_std > 0:
            pert = init_std * zero_mean_perturbation((dim, rank), expert_id, num_experts, seed)
        return LoraExpert(name, dim, ctx_dim, rank, pert)
    proj_in, proj_out = plain_linears_of_feed_forward(frozen_ff)
    pert = None
    if init_std > 0:
        w = proj_out.weight
        scale = init_std * float(w.detach().float().std())
        pert = scale * zero_mean_perturbation(tuple(w.shape), expert_id, num_experts, seed, w.device)
    return FfnExpert(name, dim, ctx_dim, proj_in, proj_out, pert)


@torch.no_grad()
def reference_feed_forward(ff: nn.Module, x: Tensor) -> Tensor:
    """The frozen FFN without LoRA (for tests: ffn experts must start equal to it)."""
    proj_in, proj_out = plain_linears_of_feed_forward(ff)
    return proj_out(F.gelu(proj_in(x), approximate="tanh"))
