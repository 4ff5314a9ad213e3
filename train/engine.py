"""DeepSpeed engine set-up: MoE-aware optimizer groups, warm-up + cosine schedule, EMA.

Why these pieces: expert parameters are marked ``allreduce=False`` by DeepSpeed-MoE and must sit in
their own optimizer groups (``split_params_into_different_moe_groups_for_optimizer``) so the engine
reduces their gradients only inside the expert-data-parallel group and checkpoints their optimizer
state per expert-parallel rank. Only trainable parameters reach the optimizer: the frozen backbone
has no Adam state and is not written to checkpoints.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import deepspeed
import torch
import torch.distributed as torch_dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
from torch import nn

from train.config import OptimConfig, TrainConfig, deepspeed_config, resolve_precision
from train.contracts import TrainableModel
from train.distributed import DistInfo


def optimizer_param_groups(model: TrainableModel, weight_decay: float) -> list[dict]:
    """Trainable params split into decay / no-decay (biases, norms), then per MoE expert group."""
    named = model.trainable_named_parameters()
    decay = [p for n, p in named if p.ndim >= 2]
    no_decay = [p for n, p in named if p.ndim < 2]
    groups = [
        {"name": "decay", "params": decay, "weight_decay": weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    return split_params_into_different_moe_groups_for_optimizer(groups)


class BucketLayoutError(RuntimeError):
    """ZeRO 1/2 would reduce mismatched gradient buckets across ranks (the message says what to set)."""


def check_bucket_layout(model: nn.Module, zero_stage: int, bucket: int) -> None:
    """Collective: refuse ZeRO 1/2 gradient buckets that would flush at different points on different ranks.

    ZeRO 1/2 put expert and non-expert gradients in one bucket and reduce it whenever the next
    gradient would overflow ``reduce_bucket_size``; the non-expert part of each flush is all-reduced
    across all ranks. Where expert-parallel ranks hold experts of different sizes, a bucket smaller
    than a rank's gradients fills at different points on different ranks, the all-reduces get
    different lengths, and gloo stops ("collective mismatch") while NCCL may hang or reduce the wrong
    data. With one bucket for all of a rank's gradients every rank flushes once, at the end.
    """
    if zero_stage == 0 or not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return
    sizes = [p.numel() for p in model.parameters() if p.requires_grad]
    everyone: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(everyone, sizes)
    if all(s == everyone[0] for s in everyone):
        return
    largest = max(sum(s) for s in everyone)
    if bucket < largest:
        differ = next(r for r, s in enumerate(everyone) if s != everyone[0])
        raise BucketLayoutError(
            f"train.reduce_bucket_size: {bucket} elements is smaller than a rank's trainable gradients ({largest}) "
            f"while ranks hold parameters of different sizes (rank 0: {sum(everyone[0])} elements in "
            f"{len(everyone[0])} tensors, rank {differ}: {sum(everyone[differ])} in {len(everyone[differ])}): ZeRO "
            f"{zero_stage} would flush its gradient buckets at different points on different ranks and reduce "
            f"mismatched data. Set train.reduce_bucket_size >= {largest} (one flush per step), or train.zero_stage=0"
        )


def warmup_cosine(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier: linear warm-up to 1, then cosine to ``min_ratio`` at ``total`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """LambdaLR whose lambda reads picklable state (so DeepSpeed checkpoints it, ``total`` included: a run
    whose time budget set its step count resumes with the same schedule)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, total: int, min_ratio: float) -> None:
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio
        super().__init__(optimizer, lambda s: warmup_cosine(s, self.warmup, self.total, self.min_ratio))


class EMA:
    """Exponential moving average of the trainable weights of *this rank*.

    Per rank because expert weights differ across expert-parallel ranks; each rank checkpoints its
    own copy. Kept in fp32 on the parameters' device.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1 - self.decay)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise RuntimeError(f"EMA state lacks {len(missing)} trainable tensors, e.g. {sorted(missing)[:3]}")
        for n, t in state["shadow"].items():
            if n in self.shadow:
                self.shadow[n].copy_(t)


@dataclass
class TrainingParts:
    """What ``build_engine`` makes: the DeepSpeed engine (model + optimizer + ZeRO) and what steps beside it."""

    deepspeed: Any  # deepspeed.DeepSpeedEngine
    scheduler: WarmupCosine
    ema: Optional[EMA]
    dtype: torch.dtype
    ds_config: dict


def build_optimizer(groups: list[dict], o: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``groups`` with ``optim``'s settings, fused wherever torch has the kernel (CPU, CUDA).

    Fused, one kernel (GPU) or one loop (CPU) per group steps every tensor instead of about two
    operations per tensor: ~450 fewer dispatches a step for configs/tiny.yaml (bench/step_ops.py). The
    optimizer step takes 1.8 ms against 7 ms on the CPU and 1.5 ms against 4.5 ms on one H200
    (bench/optimizer_step.py), where that is within the noise of the ~100 ms step of configs/mid.yaml."""
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=fused)


def build_engine(cfg: TrainConfig, model: nn.Module, dist: DistInfo) -> TrainingParts:
    """``deepspeed.initialize`` with MoE optimizer groups, AdamW, schedule and optional EMA."""
    precision = resolve_precision(cfg.train, dist.on_gpu)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ds_config = deepspeed_config(cfg, dist.world_size, dist.on_gpu)
    o = cfg.optim
    groups = optimizer_param_groups(model, o.weight_decay)
    if not any(g["params"] for g in groups):
        raise RuntimeError("the model has no trainable parameters")
    check_bucket_layout(model, cfg.train.zero_stage, cfg.train.reduce_bucket_size)
    optimizer = build_optimizer(groups, o)
    scheduler = WarmupCosine(optimizer, cfg.schedule.warmup_steps, cfg.train.steps, cfg.schedule.min_lr / o.lr)
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
    )
    ema = EMA(engine.module, cfg.ema.decay) if cfg.ema.enabled else None
    return TrainingParts(deepspeed=engine, scheduler=scheduler, ema=ema, dtype=dtype, ds_config=ds_config)
