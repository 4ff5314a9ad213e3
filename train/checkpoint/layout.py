"""The parallel layout a checkpoint was written in, recorded so it can be read back at another shape.

Why: DeepSpeed's files alone do not say which rank held which experts, nor (at ZeRO 0) which
optimizer-state index is which parameter. Expert parameters are named with *local* ids
(``deepspeed_experts.<local>``) on every expert-parallel rank, so ``...experts.0.weight`` of rank 1
at ep_size 2 is global expert 2. Each rank therefore stores, next to its training state, a small
``layout`` dict: world size, ep_size, its expert-parallel and expert-data-parallel ranks, the ZeRO
stage, the optimizer wrapper DeepSpeed chose, and the optimizer's parameter groups as lists of
*global* names in the optimizer's own order. ``portable.py`` reads checkpoints with it.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from deepspeed.moe.layer import MoE

LAYOUT_VERSION = 1
EXPERT_MARKER = ".deepspeed_experts."
_EXPERT_KEY = re.compile(re.escape(EXPERT_MARKER) + r"(\d+)\.")


def global_expert_name(name: str, ep_rank: int, num_local: int) -> str:
    """``...deepspeed_experts.<local>.x`` -> ``...deepspeed_experts.<ep_rank*num_local+local>.x`` (DeepSpeed's rule)."""
    m = _EXPERT_KEY.search(name)
    if m is None:
        return name
    return name[: m.start(1)] + str(ep_rank * num_local + int(m.group(1))) + name[m.end(1) :]


def expert_id(name: str) -> int | None:
    """The (global or local) expert id in a parameter name, None for a non-expert parameter."""
    m = _EXPERT_KEY.search(name)
    return int(m.group(1)) if m else None


def moe_layers(module: torch.nn.Module) -> list[tuple[str, MoE]]:
    """Every ``deepspeed.moe.layer.MoE`` (our ``CareMoE`` included), in DeepSpeed's layer-id order."""
    return [(n, m) for n, m in module.named_modules() if isinstance(m, MoE)]


def expert_ranks(module: torch.nn.Module) -> tuple[int, int, int]:
    """(ep_rank, expert-data-parallel rank, expert-data-parallel size) of this process; (0, rank, world) without MoE."""
    import deepspeed.comm as dist
    from deepspeed.utils import groups

    layers = moe_layers(module)
    if not layers:
        return 0, dist.get_rank(), dist.get_world_size()
    names = {m.expert_group_name for _, m in layers}
    if len(names) != 1:
        raise RuntimeError(
            f"expert layers use several expert-parallel groups {sorted(names)}; one ep_size is supported"
        )
    g = names.pop()
    return (
        groups._get_expert_parallel_rank(g),
        groups._get_expert_data_parallel_rank(g),
        groups._get_expert_data_parallel_world_size(g),
    )


def global_names(module: torch.nn.Module, ep_rank: int) -> dict[str, str]:
    """Local parameter name -> global name (expert ids made global; other names unchanged)."""
    out = {}
    num_local = {f"{n}.": m.num_local_experts for n, m in moe_layers(module)}
    for name, _ in module.named_parameters():
        local = next((k for p, k in num_local.items() if name.startswith(p) and EXPERT_MARKER in name), None)
        out[name] = global_expert_name(name, ep_rank, local) if local is not None else name
    return out


def lp_groups(engine: Any) -> list[list[torch.nn.Parameter]]:
    """The model parameters of each optimizer group, in the order the wrapper flattens them.

    ZeRO 1/2 (``DeepSpeedZeroOptimizer``): ``bit16_groups``; bf16 at ZeRO 0 (``FP16_UnfusedOptimizer``):
    ``fp16_groups``; fp32 at ZeRO 0: the torch optimizer itself, whose groups hold the parameters.
    """
    opt = engine.optimizer
    for attr in ("bit16_groups", "fp16_groups"):
        if hasattr(opt, attr):
            return [list(g) for g in getattr(opt, attr)]
    if isinstance(opt, torch.optim.Optimizer):
        return [list(g["params"]) for g in opt.param_groups]
    raise RuntimeError(f"unsupported DeepSpeed optimizer wrapper {type(opt).__name__} (expected ZeRO 0, 1 or 2)")


def optimizer_kind(engine: Any) -> str:
    """'zero' (ZeRO 1/2 partitions), 'unfused' (bf16 at ZeRO 0: an fp32 master per parameter) or 'torch'.

    bf16 at ZeRO 0 with our torch AdamW is DeepSpeed's ``FP16_UnfusedOptimizer`` (the fused
    ``FP16_Optimizer`` needs DeepSpeed's FusedAdam); 'torch' is fp32 at ZeRO 0, no wrapper.
    """
    opt = engine.optimizer
    if hasattr(opt, "bit16_groups") and hasattr(opt, "single_partition_of_fp32_groups"):
        return "zero"
    if type(opt).__name__ == "FP16_UnfusedOptimizer":
        return "unfused"
    if isinstance(opt, torch.optim.Optimizer):
        return "torch"
    raise RuntimeError(f"unsupported DeepSpeed optimizer wrapper {type(opt).__name__} (expected ZeRO 0, 1 or 2)")


def capture_layout(engine: Any, rank: int, world_size: int, ep_size: int) -> dict:
    """This rank's layout (plain types only: saved with ``torch.save`` and read with ``weights_only=True``)."""
    module = engine.module
    ep_rank, edp_rank, edp_size = expert_ranks(module)
    names = global_names(module, ep_rank)
    by_id = {id(p): n for n, p in module.named_parameters()}
    groups = []
    base_groups = engine.basic_optimizer.param_groups
    for i, params in enumerate(lp_groups(engine)):
        groups.append({"moe": bool(base_groups[i].get("moe", False)), "params": [names[by_id[id(p)]] for p in params]})
    shapes = {names[n]: list(p.shape) for n, p in module.named_parameters() if p.requires_grad}
    return {
        "version": LAYOUT_VERSION,
        "rank": rank,
        "world_size": world_size,
        "ep_size": ep_size,
        "ep_rank": ep_rank,
        "expert_dp_rank": edp_rank,
        "expert_dp_size": edp_size,
        "zero_stage": int(engine.zero_optimization_stage()),
        "optimizer": optimizer_kind(engine),
        "num_experts": [int(m.num_experts) for _, m in moe_layers(module)],
        "groups": groups,
        "shapes": shapes,
        "local_to_global": {n: g for n, g in names.items() if n != g},
    }
