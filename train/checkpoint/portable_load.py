"""Load a portable checkpoint (``portable.py``) into a live engine of any shape.

Why not through ``engine.load_checkpoint``: DeepSpeed refuses optimizer state written at another
data-parallel width ("Automatic adjustment of ZeRO's optimizer state partitioning with a new world
size is not currently supported") and finds experts by local id. Here every rank takes, by *global*
name, the parameters it holds now and writes them where this engine's optimizer keeps them:

* the model weights (``bf16`` runs get the fp32 master rounded, as DeepSpeed itself does);
* the fp32 masters and Adam moments: for ZeRO 1/2 into this rank's flat partition through each
  parameter's ``_hp_mapping`` (the same fragment addresses DeepSpeed's own universal loader uses),
  for ZeRO 0 into the FP16_UnfusedOptimizer's fp32 masters or the torch optimizer's per-parameter state;
  the Adam step count per group;
* the lr schedule (and each group's current lr from it), DeepSpeed's step/sample counters, EMA.

Everything is checked before the first tensor is written: the expert count per layer, the set of
trainable names and their shapes, the number of optimizer groups and one step count per group.
The loader position and RNG are the caller's (``resume.py``).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch

from train.checkpoint.layout import expert_id, expert_ranks, global_names, lp_groups, moe_layers, optimizer_kind
from train.checkpoint.portable import DENSE, MOMENTS, ReshapeError, expert_file, load_pt, read_meta


def read_params_for(path: str, trainable: dict[str, torch.nn.Parameter]) -> dict[str, dict]:
    """The portable entries of exactly this rank's trainable parameters (dense + its experts' files)."""
    params = dict(load_pt(os.path.join(path, DENSE)))
    for g in sorted({expert_id(n) for n in trainable if expert_id(n) is not None}):
        params.update(load_pt(os.path.join(path, expert_file(g))))
    params = {n: e for n, e in params.items() if expert_id(n) is None or n in trainable}
    missing, unexpected = sorted(set(trainable) - set(params)), sorted(set(params) - set(trainable))
    if missing or unexpected:
        raise ReshapeError(
            f"{path}: does not match this model: {len(missing)} trainable tensors missing "
            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for n, p in trainable.items():
        if tuple(params[n]["fp32"].shape) != tuple(p.shape):
            raise ReshapeError(f"{path}: {n} has shape {tuple(params[n]['fp32'].shape)}, the model {tuple(p.shape)}")
    return params


def _group_step(i: int, entries: list[dict], path: str) -> Optional[float]:
    steps = {e.get("step") for e in entries}
    if len(steps) != 1:
        raise ReshapeError(f"{path}: optimizer group {i} mixes parameters with step counts {sorted(steps, key=str)}")
    step = steps.pop()
    if step is not None and not all(k in e for e in entries for k in MOMENTS):
        raise ReshapeError(f"{path}: optimizer group {i} has a step count but not every parameter's Adam moments")
    return step


def _adam_state(step: float, moments: dict[str, torch.Tensor], group: dict) -> dict:
    """Adam's state as torch keeps it: the step a float32 scalar tensor, on the CPU unless the group is
    fused or capturable, whose kernels read it on the moments' device (torch's own load_state_dict rule)."""
    on_device = group.get("fused") or group.get("capturable")
    device = next(iter(moments.values())).device if on_device else "cpu"
    return {"step": torch.tensor(float(step), dtype=torch.float32, device=device), **moments}


@torch.no_grad()
def _apply_optimizer(engine: Any, params: dict[str, dict], name_of: dict[int, str], path: str) -> None:
    opt, kind = engine.optimizer, optimizer_kind(engine)
    groups = lp_groups(engine)
    entries_of = [[params[name_of[id(p)]] for p in lps] for lps in groups]
    steps = [_group_step(i, entries, path) for i, entries in enumerate(entries_of)]  # all checked, then written
    for i, (lps, entries, step) in enumerate(zip(groups, entries_of, steps)):
        for p, e in zip(lps, entries):
            p.data.copy_(e["fp32"].to(p.dtype))
        if kind == "zero":  # this rank's flat fp32 partition: each parameter's fragment, by address
            hp = opt.single_partition_of_fp32_groups[i]
            bufs = {k: torch.zeros_like(hp) for k in MOMENTS}
            for p, e in zip(lps, entries):
                m = p._hp_mapping
                if m is None:
                    continue  # no element of this parameter in this rank's partition
                lo, hi = m.lp_fragment_address, m.hp_fragment_address
                for key, dst in (("fp32", hp), *((k, bufs[k]) for k in MOMENTS if step is not None)):
                    dst.narrow(0, hi.start, hi.numel).copy_(e[key].flatten().narrow(0, lo.start, lo.numel))
            if step is not None:
                opt.optimizer.state[hp] = _adam_state(step, bufs, opt.optimizer.param_groups[i])
        elif kind == "unfused":  # bf16 at ZeRO 0: an fp32 master per parameter, Adam state on the master
            for _, e, master in zip(lps, entries, opt.fp32_groups[i]):
                master.data.copy_(e["fp32"])
                if step is not None:
                    opt.optimizer.state[master] = _adam_state(
                        step, {k: e[k].to(master.device).clone() for k in MOMENTS}, opt.optimizer.param_groups[i]
                    )
        elif step is not None:  # fp32 at ZeRO 0: the parameters are the masters
            for p, e in zip(lps, entries):
                moments = {k: e[k].to(p.device, p.dtype).clone() for k in MOMENTS}
                opt.state[p] = _adam_state(step, moments, opt.param_groups[i])


def load_portable(engine: Any, path: str, ema: Any = None) -> dict:
    """Load weights, optimizer, schedule, counters and EMA of ``path`` into ``engine``; returns the meta."""
    meta = read_meta(path)
    module = engine.module
    num_experts = [int(m.num_experts) for _, m in moe_layers(module)]
    if num_experts != list(meta["num_experts"]):
        raise ReshapeError(f"{path}: experts per expert layer {meta['num_experts']}, this model {num_experts}")
    ep_rank = expert_ranks(module)[0]
    names = global_names(module, ep_rank)
    trainable = {names[n]: p for n, p in module.named_parameters() if p.requires_grad}
    groups = lp_groups(engine)
    if len(groups) != meta["num_groups"]:
        raise ReshapeError(f"{path}: {meta['num_groups']} optimizer groups, this engine {len(groups)}")
    if ema is not None and not meta["ema"]:
        raise ReshapeError(f"ema.enabled but {path} has no EMA state")
    sched_state = meta["lr_scheduler"]
    base_groups = engine.basic_optimizer.param_groups
    if sched_state is not None and len(sched_state["base_lrs"]) != len(base_groups):
        raise ReshapeError(
            f"{path}: lr schedule for {len(sched_state['base_lrs'])} groups, this optimizer has {len(base_groups)}"
        )
    params = read_params_for(path, trainable)
    name_of = {id(p): names[n] for n, p in module.named_parameters()}

    _apply_optimizer(engine, params, name_of, path)
    if sched_state is not None and engine.lr_scheduler is not None:
        engine.lr_scheduler.load_state_dict(sched_state)
        for g, lr in zip(base_groups, engine.lr_scheduler.get_last_lr()):
            g["lr"] = lr  # what the uninterrupted run's scheduler.step() left for the next step
    engine.global_steps = meta["engine"]["global_steps"]
    engine.global_samples = meta["engine"]["global_samples"]
    engine.skipped_steps = meta["engine"]["skipped_steps"]
    if ema is not None:
        with torch.no_grad():
            for local, shadow in ema.shadow.items():
                shadow.copy_(params[names[local]]["ema"])
    return meta
