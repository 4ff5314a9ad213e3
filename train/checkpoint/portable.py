"""Portable checkpoints: the whole training state, independent of world size, ep_size and ZeRO stage.

Why not DeepSpeed's universal checkpoint (``deepspeed.checkpoint.ds_to_universal``, 0.19.8): it
keys every tensor by the parameter's name, and DeepSpeed-MoE names experts with *local* ids on
every expert-parallel rank, so at ep_size > 1 the fragments of different experts land under one
name (on our ep 2 checkpoints it stops with "shape '[32, 32]' is invalid for input of size 2048");
its loader looks parameters up by local name again, so it cannot give rank 1 of an ep 2 run its
experts 2 and 3; and it needs ZeRO >= 1 files, while CPU runs use ZeRO 0. So the project converts
its own checkpoints, once, on any machine without GPUs or a process group:

    python -m launch.reshape_checkpoint --src <run>/checkpoints[/<tag>]   # -> <run>/checkpoints/portable/<tag>

and ``--resume <that directory>`` continues at any world size, ep_size and ZeRO stage 0/1/2
(``portable_load.py``).

What a portable checkpoint holds (every file ``torch.load(weights_only=True)``-safe):

* ``portable.pt``: format and version, the step, the source shape, DeepSpeed's counters
  (global_steps / global_samples / skipped_steps), the lr-scheduler state, every source rank's
  loader state and RNG state, the number of experts per expert layer;
* ``dense_states.pt``: per non-expert trainable parameter ``{"fp32", "exp_avg", "exp_avg_sq",
  "step", "ema"}`` (fp32 master weights and Adam moments, exactly as the optimizer held them);
* ``expert_<g>_states.pt``: the same for every parameter of global expert ``g`` (all expert layers),
  so a rank reads only the experts it will hold;
* ``config.yaml``: the source run's resolved config, for reference.

Where the tensors come from (DeepSpeed 0.19.8 files, read with the ``layout`` each rank recorded in
``train_state_rank<r>.pt``, see ``layout.py``):

* ZeRO 1/2 (``[bf16_]zero_pp_rank_<r>_mp_rank_00_optim_states.pt``): ``single_partition_of_fp32_groups``
  and ``base_optimizer_state`` are flat partitions per optimizer group; ``param_slice_mappings``
  says where each parameter's fragment sits. A parameter's fragments, in partition order (the
  data-parallel rank; the expert-data-parallel rank for expert groups), concatenate to it.
* ZeRO 0, fp32 (``expp_rank_<e>_..._optim_states.pt``, one per expert-parallel rank): a torch
  optimizer state dict indexed by parameter position; the weights themselves are the masters
  (``mp_rank_00_model_states.pt`` and the per-expert ``layer_<l>_expert_<g>_...`` files).
* ZeRO 0, bf16 (``FP16_UnfusedOptimizer``): the same files, the state dict nested under
  ``optimizer_state_dict`` next to ``fp32_groups``, an fp32 master per parameter.
"""

from __future__ import annotations

import math
import os
import shutil
from typing import Any, Callable, Optional

import torch

from train.checkpoint.layout import LAYOUT_VERSION, expert_id

PORTABLE_DIR = "portable"  # default place of conversions: <checkpoint dir>/portable/<tag>, outside pruning
FORMAT = "care-edit-portable"
VERSION = 1
META = "portable.pt"
DENSE = "dense_states.pt"
MODEL_STATES = "mp_rank_00_model_states.pt"
MOMENTS = ("exp_avg", "exp_avg_sq")


class ReshapeError(RuntimeError):
    """A checkpoint that cannot be converted or resumed at this shape; the message names the file or key."""


def expert_file(g: int) -> str:
    return f"expert_{g:04d}_states.pt"


def is_portable(path: str) -> bool:
    return os.path.isfile(os.path.join(path, META))


def load_pt(path: str, deepspeed_classes: bool = False) -> Any:
    """``torch.load(weights_only=True)``; any failure names the file.

    DeepSpeed's ZeRO optimizer files pickle three small classes (``fragment_address``,
    ``ZeroStageEnum``, ``LossScaler``); we allow exactly those instead of ``weights_only=False``.
    ``mmap`` keeps a large shard out of memory until its slices are copied.
    """
    if not os.path.isfile(path):
        raise ReshapeError(f"{path}: missing")
    allowed: list = []
    if deepspeed_classes:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address

        allowed = [fragment_address, ZeroStageEnum, LossScaler]
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated zip, bad pickle, disallowed global, ...
        raise ReshapeError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:300]})") from None


# ------------------------------------------------------------------------------------------ source
def read_layouts(tag_dir: str) -> list[dict]:
    """Every rank's training state (step, loader, RNG, EMA, layout), checked for completeness."""
    first = load_pt(os.path.join(tag_dir, "train_state_rank0.pt"))
    world = int(first["world_size"])
    missing = [
        f"train_state_rank{r}.pt"
        for r in range(world)
        if not os.path.isfile(os.path.join(tag_dir, f"train_state_rank{r}.pt"))
    ]
    if missing:
        raise ReshapeError(f"{tag_dir}: written by {world} ranks but {', '.join(missing)} missing")
    states = [first] + [load_pt(os.path.join(tag_dir, f"train_state_rank{r}.pt")) for r in range(1, world)]
    for r, st in enumerate(states):
        lay = st.get("layout")
        if lay is None:
            raise ReshapeError(
                f"{os.path.join(tag_dir, f'train_state_rank{r}.pt')}: no 'layout' (written before "
                "reshape support); resume it at its own shape and reshape a later checkpoint"
            )
        if lay.get("version") != LAYOUT_VERSION or lay["rank"] != r or lay["world_size"] != world:
            raise ReshapeError(
                f"{tag_dir}/train_state_rank{r}.pt: layout {lay.get('version')}, rank {lay['rank']} "
                f"of {lay['world_size']}: not rank {r} of {world} (version {LAYOUT_VERSION})"
            )
        if int(st["step"]) != int(first["step"]):
            raise ReshapeError(f"{tag_dir}: ranks disagree on the step ({first['step']} vs {st['step']} on rank {r})")
    kinds = {(s["layout"]["optimizer"], s["layout"]["zero_stage"], s["layout"]["ep_size"]) for s in states}
    if len(kinds) != 1:
        raise ReshapeError(f"{tag_dir}: ranks disagree on (optimizer, zero_stage, ep_size): {sorted(kinds)}")
    return states


def _writers(layouts: list[dict]) -> dict[int, dict]:
    """ep_rank -> layout of the rank that wrote that expert-parallel rank's files (expert-dp rank 0)."""
    out = {lay["ep_rank"]: lay for lay in layouts if lay["expert_dp_rank"] == 0}
    ep = layouts[0]["ep_size"]
    if sorted(out) != list(range(ep)):
        raise ReshapeError(f"expert-parallel ranks {sorted(out)} have a writer, expected 0..{ep - 1}")
    return out


def zero_file(tag_dir: str, rank: int) -> str:
    """ZeRO 1/2 optimizer shard of ``rank``: ``bf16_zero_pp_rank_*`` in bf16 runs, ``zero_pp_rank_*`` otherwise."""
    name = f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"
    bf16 = os.path.join(tag_dir, "bf16_" + name)
    return bf16 if os.path.isfile(bf16) else os.path.join(tag_dir, name)


def required_files(tag_dir: str, layouts: list[dict]) -> list[str]:
    """Every DeepSpeed file the conversion reads, so a missing one stops it before any tensor is read."""
    lay0 = layouts[0]
    files = [MODEL_STATES]
    if lay0["optimizer"] == "zero":
        files += [zero_file(tag_dir, lay["rank"]) for lay in layouts]
    else:
        files += [f"expp_rank_{e}_mp_rank_00_optim_states.pt" for e in range(lay0["ep_size"])]
        if lay0["optimizer"] == "torch":  # fp32 weights are the masters: read the per-expert weight files too
            files += [
                f"layer_{layer}_expert_{g}_mp_rank_00_model_states.pt"
                for layer, n in enumerate(lay0["num_experts"])
                for g in range(n)
            ]
    paths = [os.path.join(tag_dir, f) for f in files]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ReshapeError(f"{tag_dir}: {len(missing)} checkpoint file(s) missing, e.g. {missing[0]}")
    return paths


def _collect_zero(tag_dir: str, layouts: list[dict]) -> dict[str, dict]:
    """Per global name: fp32 + moments + step, from ZeRO 1/2 partitions (see the module docstring)."""
    frags: dict[str, dict[int, dict]] = {}
    step_of: dict[str, Optional[float]] = {}
    for lay in layouts:
        path = zero_file(tag_dir, lay["rank"])
        osd = load_pt(path, deepspeed_classes=True)["optimizer_state_dict"]
        fp32s, maps = osd["single_partition_of_fp32_groups"], osd["param_slice_mappings"]
        states = osd["base_optimizer_state"]["state"]
        if len(fp32s) != len(lay["groups"]):
            raise ReshapeError(f"{path}: {len(fp32s)} optimizer groups, the layout says {len(lay['groups'])}")
        for i, group in enumerate(lay["groups"]):
            part = lay["expert_dp_rank"] if group["moe"] else lay["rank"]
            st = states.get(i, {})
            for local, addr in maps[i].items():
                name = lay["local_to_global"].get(local, local)
                piece = {"fp32": fp32s[i].narrow(0, addr.start, addr.numel)}
                for k in MOMENTS:
                    if k in st:
                        piece[k] = st[k].narrow(0, addr.start, addr.numel)
                if part in frags.setdefault(name, {}):
                    raise ReshapeError(f"{path}: {name} partition {part} also held by another rank")
                frags[name][part] = piece
                step_of[name] = float(st["step"]) if "step" in st else None
    out = {}
    for name, parts in frags.items():
        ordered = [parts[p] for p in sorted(parts)]
        entry = {k: torch.cat([f[k] for f in ordered]).clone() for k in ordered[0]}
        entry["step"] = step_of[name]
        out[name] = entry
    return out


def _collect_zero0(tag_dir: str, layouts: list[dict]) -> dict[str, dict]:
    """Per global name, from ZeRO 0 files: one torch (or FP16_UnfusedOptimizer) state dict per expert-parallel rank."""
    kind = layouts[0]["optimizer"]
    weights: dict[str, torch.Tensor] = {}
    if kind == "torch":
        weights.update(load_pt(os.path.join(tag_dir, MODEL_STATES))["module"])
        for layer, n in enumerate(layouts[0]["num_experts"]):
            for g in range(n):
                weights.update(load_pt(os.path.join(tag_dir, f"layer_{layer}_expert_{g}_mp_rank_00_model_states.pt")))
    out: dict[str, dict] = {}
    for e, lay in sorted(_writers(layouts).items()):
        path = os.path.join(tag_dir, f"expp_rank_{e}_mp_rank_00_optim_states.pt")
        opt = load_pt(path, deepspeed_classes=True)["optimizer"]
        sd = opt["optimizer_state_dict"] if kind == "unfused" else opt
        if len(sd["param_groups"]) != len(lay["groups"]):
            raise ReshapeError(
                f"{path}: {len(sd['param_groups'])} optimizer groups, the layout says {len(lay['groups'])}"
            )
        for i, group in enumerate(lay["groups"]):
            idx = sd["param_groups"][i]["params"]
            if kind == "torch":
                if len(idx) != len(group["params"]):
                    raise ReshapeError(
                        f"{path}: group {i} has {len(idx)} parameters, the layout names {len(group['params'])}"
                    )
                for name, j in zip(group["params"], idx):
                    if name in out:
                        continue  # a replicated (non-expert) parameter: every expert-parallel rank has it
                    if name not in weights:
                        raise ReshapeError(f"{tag_dir}: no weights for trainable parameter {name}")
                    st = sd["state"].get(j, {})
                    out[name] = {
                        "fp32": weights[name].float().clone(),
                        "step": _step(st),
                        **{k: st[k].clone() for k in MOMENTS if k in st},
                    }
            else:  # unfused: an fp32 master per parameter, in the same order
                masters = opt["fp32_groups"][i]
                if len(idx) != len(group["params"]) or len(masters) != len(idx):
                    raise ReshapeError(
                        f"{path}: group {i} has {len(idx)} parameters and {len(masters)} fp32 "
                        f"masters, the layout names {len(group['params'])}"
                    )
                for name, j, master in zip(group["params"], idx, masters):
                    if name not in out:
                        st = sd["state"].get(j, {})
                        out[name] = {
                            "fp32": master.float().clone(),
                            "step": _step(st),
                            **{k: st[k].clone() for k in MOMENTS if k in st},
                        }
    return out


def _step(st: dict) -> Optional[float]:
    return float(st["step"]) if "step" in st else None


def collect(tag_dir: str, states: list[dict]) -> dict[str, dict]:
    """Every trainable parameter's portable entry, shapes restored and checked against the layout."""
    layouts = [s["layout"] for s in states]
    kind = layouts[0]["optimizer"]
    if kind == "zero":
        params = _collect_zero(tag_dir, layouts)
    elif kind in ("torch", "unfused"):
        params = _collect_zero0(tag_dir, layouts)
    else:
        raise ReshapeError(f"{tag_dir}: optimizer kind {kind!r} is not supported (ZeRO 0, 1 or 2 only)")
    shapes: dict[str, list[int]] = {}
    for lay in layouts:
        shapes.update(lay["shapes"])
    extra, lost = sorted(set(params) - set(shapes)), sorted(set(shapes) - set(params))
    if extra or lost:
        raise ReshapeError(
            f"{tag_dir}: optimizer state and layout disagree: missing {lost[:3]}, unexpected {extra[:3]}"
        )
    for name, entry in params.items():
        for k in ("fp32", *MOMENTS):
            if k in entry:
                if entry[k].numel() != math.prod(shapes[name]):
                    raise ReshapeError(
                        f"{tag_dir}: {name} {k} has {entry[k].numel()} elements, expected shape "
                        f"{shapes[name]} (a partition file missing or from another run?)"
                    )
                entry[k] = entry[k].reshape(shapes[name]).float()
    for r, st in enumerate(states):  # EMA: per rank, local names; replicated entries are identical
        if "ema" in st:
            loc = layouts[r]["local_to_global"]
            for local, t in st["ema"]["shadow"].items():
                name = loc.get(local, local)
                if name in params and "ema" not in params[name]:
                    params[name]["ema"] = t.float().clone()
    return params


def convert(tag_dir: str, dst: str, log: Callable[[str], None] = print) -> dict:
    """Write the portable form of the native checkpoint ``tag_dir`` to ``dst`` (atomically); returns its meta."""
    tag_dir = os.path.abspath(tag_dir)
    if os.path.exists(dst):
        raise ReshapeError(f"{dst} exists; remove it or choose another --dst")
    states = read_layouts(tag_dir)
    required_files(tag_dir, [s["layout"] for s in states])
    lay0 = states[0]["layout"]
    model_states = load_pt(os.path.join(tag_dir, MODEL_STATES))
    params = collect(tag_dir, states)
    dense = {n: e for n, e in params.items() if expert_id(n) is None}
    experts: dict[int, dict] = {}
    for n, e in params.items():
        if expert_id(n) is not None:
            experts.setdefault(expert_id(n), {})[n] = e
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(states[0]["step"]),
        "source": {
            "dir": tag_dir,
            "world_size": lay0["world_size"],
            "ep_size": lay0["ep_size"],
            "zero_stage": lay0["zero_stage"],
            "optimizer": lay0["optimizer"],
            "train_batch_size": int(model_states["ds_config"]["train_batch_size"]),
        },
        "engine": {k: int(model_states[k]) for k in ("global_steps", "global_samples", "skipped_steps")},
        "lr_scheduler": model_states.get("lr_scheduler"),
        "loaders": [s["loader"] for s in states],
        "rng": [s["rng"] for s in states],
        "num_experts": list(lay0["num_experts"]),
        "experts": sorted(experts),
        "num_groups": len(lay0["groups"]),
        "ema": all("ema" in e for e in params.values()),
    }
    tmp = dst.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save(dense, os.path.join(tmp, DENSE))
    for g, tensors in experts.items():
        torch.save(tensors, os.path.join(tmp, expert_file(g)))
    if os.path.isfile(os.path.join(tag_dir, "config.yaml")):
        shutil.copy2(os.path.join(tag_dir, "config.yaml"), os.path.join(tmp, "config.yaml"))
    torch.save(meta, os.path.join(tmp, META))  # last: its presence marks a complete conversion
    os.replace(tmp, dst)
    log(
        f"portable checkpoint {dst}: step {meta['step']}, {len(dense)} dense + "
        f"{sum(len(t) for t in experts.values())} expert tensors ({len(experts)} experts), from "
        f"{lay0['world_size']} ranks at ep_size {lay0['ep_size']}, ZeRO {lay0['zero_stage']}"
    )
    return meta


def read_meta(path: str) -> dict:
    meta = load_pt(os.path.join(path, META))
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ReshapeError(
            f"{os.path.join(path, META)}: format {meta.get('format')} v{meta.get('version')}, "
            f"expected {FORMAT} v{VERSION}"
        )
    return meta
