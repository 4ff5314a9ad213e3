"""Failure guards: skip non-finite steps (all ranks agree), stop after too many, explain OOMs.

Why skip here instead of relying on DeepSpeed: with ZeRO 0 in fp32/bf16 DeepSpeed applies whatever
gradients it gets (only its fp16 / ZeRO-1/2 paths detect overflow), and a NaN loss on one rank would
poison every rank through the gradient all-reduce. We decide *before* backward from the loss (so a
NaN never reaches the gradients) and, at ZeRO 0, check the reduced gradients before the optimizer
step; at ZeRO 1/2 DeepSpeed's own overflow check skips a non-finite gradient norm (with clipping on)
and we count it from ``engine.was_step_applied()``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as torch_dist

from train.config import TrainConfig
from train.distributed import all_ranks_any


class TooManySkippedSteps(RuntimeError):
    pass


class StepGuard:
    def __init__(self, max_consecutive: int) -> None:
        self.max_consecutive = max_consecutive
        self.consecutive = 0
        self.total = 0

    def loss_is_bad(self, loss: torch.Tensor) -> bool:
        """Collective: True on every rank if the loss is non-finite on any rank."""
        return all_ranks_any(not bool(torch.isfinite(loss.detach()).all()), loss.device)

    def grad_norm(self, module: torch.nn.Module, device: torch.device, ep_size: int) -> float:
        """Collective: global L2 norm of the (already reduced) gradients, before clipping (ZeRO 0).

        Dense gradients are identical on all ranks after the all-reduce; each expert's gradient lives
        on ``world / ep_size`` ranks, so expert squares are summed over ranks and divided by that.
        A non-finite value on any rank makes the result non-finite on all ranks.
        """
        from deepspeed.moe.utils import is_moe_param

        dense = torch.zeros((), dtype=torch.float64, device=device)
        expert = torch.zeros((), dtype=torch.float64, device=device)
        for p in module.parameters():
            if p.grad is not None:
                sq = p.grad.detach().double().pow(2).sum()
                if is_moe_param(p):
                    expert += sq
                else:
                    dense += sq
        world = torch_dist.get_world_size() if torch_dist.is_initialized() else 1
        both = torch.stack([dense, expert])
        if world > 1:
            torch_dist.all_reduce(both)  # NaN/inf anywhere propagates everywhere
            both[0] /= world
            both[1] /= world // ep_size
        return float(both.sum().sqrt())

    def record(self, skipped: bool, step: int, reason: str = "non-finite loss") -> None:
        """Count a step's outcome; raise after ``max_consecutive`` skipped steps in a row."""
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_consecutive:
            raise TooManySkippedSteps(
                f"step {step}: {self.consecutive} consecutive steps skipped ({reason}); stopping. "
                f"Lower optim.lr, check the data near this step, or raise guards.max_consecutive_skips."
            )


def discard_step(engine: Any, micro_steps: int) -> None:
    """Drop this step's gradients without an optimizer update, keeping DeepSpeed's counters in step.

    Mirrors what DeepSpeed does on an fp16 overflow: gradients cleared, ``skipped_steps`` counted,
    the LR schedule not advanced, ``global_steps`` advanced.
    """
    engine.zero_grad()
    opt = engine.optimizer
    if engine.zero_optimization_stage() > 0:
        opt.zero_grad(set_to_none=True)
        if hasattr(opt, "_release_preflattened_grad_buffers"):
            opt._release_preflattened_grad_buffers()
        for k in list(getattr(opt, "averaged_gradients", {}).keys()):
            opt.averaged_gradients[k] = None
            if hasattr(opt, "all_grad_tensors"):
                opt.all_grad_tensors[k] = None
    engine.micro_steps += micro_steps
    engine.global_steps += 1
    engine.global_samples += engine.train_batch_size()
    engine.skipped_steps += 1


def oom_advice(cfg: TrainConfig) -> str:
    """What to lower after an out-of-memory error, with the run's current values."""
    m = cfg.model
    return (
        "out of memory. Lower, in this order: train.micro_batch "
        f"(now {cfg.train.micro_batch}; raise train.grad_accum to keep the batch), data.image_size "
        f"(now {cfg.data.image_size}), turn on model.backbone.gradient_checkpointing "
        f"(now {m.backbone.gradient_checkpointing}), raise train.zero_stage (now {cfg.train.zero_stage}, max 2), "
        f"or raise model.experts.ep_size (now {m.experts.ep_size}) to shard the experts."
    )


def is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
