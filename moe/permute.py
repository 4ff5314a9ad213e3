"""Row movements between token order and expert order, with gradients that need no atomic scatter-add.

The dispatchers sort the S*K routing slots (slot = token * K + k) by expert once per call and move rows
with these: a gather by a permutation has the inverse gather as its gradient, and the gather of each
token into its K slots has the inverse gather plus a sum over the K slots as its gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm`` with inverse ``inverse``.

    Autograd would take the gradient of a general row gather as a scatter-add (atomic adds, slow in
    bf16 at these sizes); for a permutation it is the inverse gather.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class GatherSlots(torch.autograd.Function):
    """The packed rows of the S*K routing slots in expert order: ``out[j] = x[order[j] // k]``.

    Each token is read K times; its gradient is the inverse gather back to slot order, then a sum
    over the token's K slots (no atomic scatter-add).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, order: Tensor, inverse: Tensor, k: int) -> Tensor:
        ctx.save_for_backward(inverse)
        ctx.k, ctx.tokens = k, x.shape[0]
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx: Any, grad: Tensor):
        (inverse,) = ctx.saved_tensors
        slots = grad.index_select(0, inverse)
        return slots.view(ctx.tokens, ctx.k, slots.shape[1]).sum(1), None, None, None


def inverse_permutation(perm: Tensor) -> Tensor:
    return torch.empty_like(perm).scatter_(0, perm, torch.arange(perm.numel(), device=perm.device))


def slots_by_expert(index: Tensor, n_total: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Routing slots (S*K of them, slot = token * K + k) grouped by expert, unassigned ones (index -1) last.

    Returns order [S*K] (slot ids in expert order), its inverse, the expert of each ordered slot
    (n_total for unassigned) and counts [n_total + 1] (the last: unassigned slots).
    """
    flat = index.reshape(-1)
    key = torch.where(flat >= 0, flat, n_total)
    order = torch.argsort(key, stable=True)
    return order, inverse_permutation(order), key[order], count_keys(key, n_total + 1)


def count_keys(key: Tensor, n: int) -> Tensor:
    """How often each of 0..n-1 occurs in ``key`` -> [n] int64, a shape known before the data.

    Not ``torch.bincount``: its output length depends on the data (max(key) + 1), so on CUDA it reads
    the maximum back to the host, a device-to-host synchronisation in the middle of every expert layer,
    and a traced graph gets a data-dependent size there (which CUDA graphs must split around). A
    comparison with the n ids and a sum is one small reduction, without atomics.
    """
    ids = torch.arange(n, device=key.device, dtype=key.dtype)
    return (key[None, :] == ids[:, None]).sum(1)
