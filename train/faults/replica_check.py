"""Replica-consistency check: the weights that must be identical on several ranks are compared bit for bit.

Why: data-parallel replicas stay identical only if every rank applies the same reduced gradient. A
gradient bucket that reduces different data on different ranks (the mismatch NCCL does not always
report), a bit flip, or a bug in a custom reduction lets them drift apart silently; the loss keeps
falling and every later checkpoint holds rank 0's copy only. Which ranks must agree:

* a non-expert trainable parameter: every rank (all data-parallel replicas);
* an expert parameter (DeepSpeed-MoE marks it ``allreduce=False`` with ``group_name``): the ranks of
  its expert-data-parallel group (``deepspeed.utils.groups``), i.e. those holding the same expert.

Each rank fingerprints its trainable parameters exactly (the raw bits as integers, summed plain and
position-weighted, wrapping in int64: any changed bit changes the fingerprint, and integer sums do
not depend on the reduction order), the fingerprints are gathered, and every rank computes the same
verdict. The module's parameters are the replicas: fp32 masters under ZeRO 1/2 or bf16 are
partitioned, not replicated, so they have no second copy to compare with.

The trainer runs it every ``guards.replica_check_every`` steps and always before a checkpoint is
written; a difference raises ``ReplicaMismatch`` on every rank, so ``latest`` is not moved.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as torch_dist
from torch import nn

CHUNK = 1 << 24  # elements fingerprinted at a time (bounds the int64 temporaries)
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class ReplicaMismatch(RuntimeError):
    """Ranks that must hold identical copies of a parameter do not; the message names the first one."""


def fingerprint(t: torch.Tensor) -> torch.Tensor:
    """[2] int64, identical for bitwise-identical tensors on any device: sum of the bits, and the sum
    weighted by position (so a permutation also changes it)."""
    bits = t.detach().contiguous().view(-1).view(_INT_OF_SIZE[t.element_size()])
    weights = _weights(t.device)
    out = torch.zeros(2, dtype=torch.int64, device=t.device)
    for start in range(0, bits.numel(), CHUNK):
        chunk = bits[start : start + CHUNK].to(torch.int64)
        out[0] += chunk.sum()
        out[1] += (chunk * weights[: chunk.numel()]).sum()
    return out


_WEIGHTS: dict[torch.device, torch.Tensor] = {}


def _weights(device: torch.device) -> torch.Tensor:
    """Position weights 1..65521 repeating, built once per device (CHUNK int64s: 128 MB)."""
    if device not in _WEIGHTS:
        _WEIGHTS[device] = torch.arange(CHUNK, device=device, dtype=torch.int64) % 65521 + 1
    return _WEIGHTS[device]


def replica_ranks(p: nn.Parameter, world: int) -> tuple[int, ...]:
    """The global ranks that must hold a copy of ``p`` identical to this rank's."""
    if getattr(p, "allreduce", True) is False and hasattr(p, "group_name"):
        from deepspeed.utils import groups

        return tuple(groups._get_expert_data_parallel_group_ranks(p.group_name))
    return tuple(range(world))


class ReplicaCheck:
    def __init__(self, module: nn.Module, every: int) -> None:
        self.every = every
        self.params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.checked_step: Optional[int] = None

    def maybe_check(self, step: int) -> None:
        if self.every and step % self.every == 0:
            self.check(step)

    @torch.no_grad()
    def check(self, step: int) -> None:
        """Collective (every rank, same step): raise ReplicaMismatch on every rank if replicas differ."""
        if self.checked_step == step or not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
            return
        self.checked_step = step
        world = torch_dist.get_world_size()
        prints = torch.stack([fingerprint(p) for _, p in self.params]).cpu().tolist() if self.params else []
        mine = {n: (tuple(fp), replica_ranks(p, world)) for (n, p), fp in zip(self.params, prints)}
        everyone: list = [None] * world
        torch_dist.all_gather_object(everyone, mine)
        differing = []
        for rank, report in enumerate(everyone):
            for name, (fp, ranks) in report.items():
                for other in ranks:
                    if other > rank and everyone[other][name][0] != fp:
                        differing.append((name, rank, other))
        if differing:
            name, a, b = differing[0]
            more = f"; {len(differing) - 1} more differing pairs, e.g. {differing[1:4]}" if len(differing) > 1 else ""
            raise ReplicaMismatch(
                f"replica check at step {step}: parameter '{name}' differs between ranks {a} and {b}, which must "
                f"hold identical copies{more}. Stopping before any further checkpoint ('latest' still names the "
                f"last consistent one): resume from it with --resume auto; if it recurs at the same settings, "
                f"suspect the gradient reduction (ZeRO buckets, overlap_comm) rather than the hardware"
            )
