"""Trained weights out of a DeepSpeed checkpoint: read, merge expert-parallel shards, save, load.

Why this module exists: a training checkpoint (``train/checkpoint/``) is a directory of DeepSpeed
shards that only the same DeepSpeed layout can resume. Inference and evaluation want the *trained*
weights alone, at ``experts.ep_size=1``, on any device. What the checkpoint holds (DeepSpeed 0.19.8):

* ``mp_rank_00_model_states.pt`` ``["module"]``: every non-expert tensor that was not frozen
  (LoRA, router, repaint, mixture, mask encoder, condition embeddings, tag predictor), written once;
* ``layer_<l>_expert_<g>_mp_rank_00_model_states.pt``: one file per expert of each expert layer.
  DeepSpeed already rewrote the keys from the local expert id (``deepspeed_experts.<local>``) to the
  global one (``ep_rank * num_local_experts + local``), so merging is a union; we still check that the
  id inside every key matches the file name, so a renamed or misplaced file cannot load silently;
* ``train_state_rank<r>.pt`` ``["ema"]["shadow"]``: EMA of *that rank's* trainable parameters, keyed
  with *local* expert ids. Ranks ``0..ep_size-1`` together hold every expert (``ep_rank = rank % ep_size``,
  ``moe.model.default_ep_rank``); here we do rename local -> global;
* ``config.yaml``: the resolved training config.

The frozen parts (VAE, text encoders, backbone) are not in the checkpoint: they are rebuilt from
their own paths, or randomly initialised from the config after seeding with ``run.seed`` exactly as
``train/loop.py`` does before building the model, so the same frozen weights come back.

Loading never unpickles code: ``torch.load(..., weights_only=True)`` for DeepSpeed's ``.pt`` files,
safetensors for exports. Every read error is re-raised as :class:`WeightsError` naming the file.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf, read_write
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from moe.model import build_model
from train.checkpoint import EXPERT_MARKER, expert_id, global_expert_name
from train.config import load_config
from train.rng import seed_everything

EXPORT_FORMAT = "care-edit-trained-weights"
EXPORT_VERSION = "1"
MODEL_STATES = "mp_rank_00_model_states.pt"
_EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


class WeightsError(RuntimeError):
    """A checkpoint or weights file that cannot be used; the message names the file and why."""


# ------------------------------------------------------------------------------------------ reading
def resolve_checkpoint(path: str) -> str:
    """The tag directory for ``path``: a run's checkpoint dir (follows ``latest``) or a tag dir itself."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise WeightsError(f"{path}: no such checkpoint directory")
    if os.path.isfile(os.path.join(path, MODEL_STATES)):
        return path
    latest = os.path.join(path, "latest")
    if os.path.isfile(latest):
        with open(latest) as f:
            tag = f.read().strip()
        tag_dir = os.path.join(path, tag)
        if not tag or not os.path.isfile(os.path.join(tag_dir, MODEL_STATES)):
            raise WeightsError(f"{latest} names '{tag}', which is not a complete checkpoint")
        return tag_dir
    raise WeightsError(f"{path}: neither a checkpoint (no {MODEL_STATES}) nor a directory with a 'latest' file")


def load_pt(path: str) -> Any:
    """``torch.load`` with ``weights_only=True`` (no code runs); any failure names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise WeightsError(f"{path}: missing") from None
    except Exception as e:  # truncated zip, bad pickle, disallowed global, ...
        raise WeightsError(f"{path}: corrupt or unreadable checkpoint file ({type(e).__name__}: {e})") from None


def checkpoint_config(tag_dir: str, overrides: Optional[list[str]] = None) -> DictConfig:
    """The resolved training config saved next to the checkpoint, re-validated, at ``ep_size=1``."""
    path = os.path.join(tag_dir, "config.yaml")
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: missing (every checkpoint carries its resolved config)")
    return load_config(path, ["model.experts.ep_size=1", *(overrides or [])])


def _raw_config(tag_dir: str) -> DictConfig:
    return OmegaConf.load(os.path.join(tag_dir, "config.yaml"))


def read_checkpoint_tensors(tag_dir: str, ema: bool = False) -> dict[str, Tensor]:
    """Every trained tensor of the checkpoint, expert names with *global* ids (an ep_size 1 layout).

    ``ema=True`` returns the EMA weights instead (error if the checkpoint has none).
    """
    raw = _raw_config(tag_dir)
    ep_size = int(raw.model.experts.ep_size)
    num_experts = 1 if raw.model.experts.get("kind") == "one_lora" else len(raw.model.experts.enabled)
    if ema:
        return _read_ema(tag_dir, ep_size, num_experts // ep_size)
    module_file = os.path.join(tag_dir, MODEL_STATES)
    state = load_pt(module_file)
    if not isinstance(state, dict) or "module" not in state:
        raise WeightsError(f"{module_file}: not a DeepSpeed model-states file (no 'module')")
    tensors = {k: v for k, v in state["module"].items() if EXPERT_MARKER not in k}
    files = sorted(glob.glob(os.path.join(tag_dir, "layer_*_expert_*_mp_rank_00_model_states.pt")))
    for f in files:
        file_expert = int(_EXPERT_FILE.search(f).group(2))
        for key, value in load_pt(f).items():
            if expert_id(key) != file_expert:
                raise WeightsError(f"{f}: key {key!r} does not belong to expert {file_expert}")
            if key in tensors:
                raise WeightsError(f"{f}: {key!r} also appears in another expert file")
            tensors[key] = value
    return tensors


def _read_ema(tag_dir: str, ep_size: int, num_local: int) -> dict[str, Tensor]:
    """EMA shadows of ranks 0..ep_size-1 (one per expert-parallel rank), local -> global expert ids."""
    tensors: dict[str, Tensor] = {}
    for rank in range(ep_size):
        f = os.path.join(tag_dir, f"train_state_rank{rank}.pt")
        state = load_pt(f)
        if "ema" not in state:
            raise WeightsError(f"{f}: no EMA state (was the run trained with ema.enabled=true?)")
        for name, value in state["ema"]["shadow"].items():
            if EXPERT_MARKER in name:
                tensors[global_expert_name(name, rank % ep_size, num_local)] = value
            elif rank == 0:  # replicated weights: identical on every rank
                tensors[name] = value
    return tensors


# ------------------------------------------------------------------------------------------ model
def build_inference_model(cfg: DictConfig, device: str = "cpu") -> nn.Module:
    """The model of ``cfg`` at ep_size 1, frozen weights as training built them, on ``device``."""
    model_cfg = OmegaConf.to_object(cfg.model)
    model_cfg.experts.ep_size = 1
    seed_everything(int(cfg.run.seed))
    with torch.device("cpu"):  # same RNG stream as training (CPU generator), then move
        model = build_model(model_cfg, ep_rank=0)
    return model.to(device).eval()


def trainable_tensors(model: nn.Module, tensors: dict[str, Tensor], source: str) -> dict[str, Tensor]:
    """Exactly the model's trainable parameters out of ``tensors``; every one present, shapes equal."""
    wanted = dict(model.trainable_named_parameters())
    missing = sorted(set(wanted) - set(tensors))
    if missing:
        raise WeightsError(f"{source}: lacks {len(missing)} of {len(wanted)} trainable tensors, e.g. {missing[:3]}")
    bad = [
        f"{n} {tuple(tensors[n].shape)} vs model {tuple(p.shape)}"
        for n, p in wanted.items()
        if tuple(tensors[n].shape) != tuple(p.shape)
    ]
    if bad:
        raise WeightsError(f"{source}: shape mismatch for {len(bad)} tensors, e.g. {bad[:3]}")
    return {n: tensors[n] for n in wanted}


@torch.no_grad()
def load_trained(model: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """Copy the trained tensors into ``model`` (strict over trainable parameters, nothing extra)."""
    wanted = dict(model.trainable_named_parameters())
    extra = sorted(set(tensors) - set(wanted))
    if extra:
        raise WeightsError(
            f"{source}: {len(extra)} tensors are not trainable parameters of the model, e.g. {extra[:3]}"
        )
    for name, value in trainable_tensors(model, tensors, source).items():
        wanted[name].copy_(value.to(wanted[name].dtype))


# ------------------------------------------------------------------------------------------ export
def export_checkpoint(checkpoint: str, out: str, ema: bool = False) -> dict[str, Tensor]:
    """Write the trained weights (or EMA) of ``checkpoint`` + its config as one safetensors file."""
    tag_dir = resolve_checkpoint(checkpoint)
    cfg = checkpoint_config(tag_dir)
    model = build_inference_model(cfg)
    tensors = trainable_tensors(model, read_checkpoint_tensors(tag_dir, ema=ema), tag_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "format": EXPORT_FORMAT,
        "version": EXPORT_VERSION,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "source": tag_dir,
        "ema": str(bool(ema)).lower(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, out)  # never leave a half-written export under the final name
    return tensors


def read_export(path: str) -> tuple[dict[str, Tensor], DictConfig]:
    """(tensors, config) of an exported file; a corrupt, truncated or foreign file raises WeightsError."""
    if not os.path.isfile(path):
        raise WeightsError(f"{path}: no such weights file")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError: header too large / incomplete / invalid JSON / short data
        raise WeightsError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from None
    if meta.get("format") != EXPORT_FORMAT or "config" not in meta:
        raise WeightsError(f"{path}: not a care-edit export (metadata format={meta.get('format')!r})")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
        tmp.write(meta["config"])
    try:
        cfg = load_config(tmp.name, ["model.experts.ep_size=1"])
    finally:
        os.unlink(tmp.name)
    return tensors, cfg


def load_for_inference(
    checkpoint: str, device: str = "cpu", ema: bool = False, intervention: Optional[str] = None
) -> tuple[nn.Module, DictConfig]:
    """Model with trained weights from a checkpoint dir (run dir / tag dir) or an exported file.
    ``intervention``: the model's ``router.intervention`` set so (moe/intervention.py), validated with the
    rest of the model config before anything is built or read; None keeps the checkpoint's own."""
    if os.path.isfile(checkpoint):
        if ema:
            raise WeightsError(
                f"{checkpoint}: --ema applies to training checkpoints; an export already holds "
                "either the weights or the EMA (launch/export.py --ema)"
            )
        tensors, cfg = read_export(checkpoint)
        source = checkpoint
    else:
        tag_dir = resolve_checkpoint(checkpoint)
        cfg = checkpoint_config(tag_dir)
        tensors, source = read_checkpoint_tensors(tag_dir, ema=ema), tag_dir
    if intervention is not None:
        with read_write(cfg):  # a checkpoint's config is read-only: this one key changes, in this copy
            OmegaConf.update(cfg, "model.router.intervention", intervention, force_add=True)
        OmegaConf.to_object(cfg.model).validate()  # a bad name fails here, naming model.router.intervention
    model = build_inference_model(cfg, device="cpu")
    if not os.path.isfile(checkpoint):
        tensors = trainable_tensors(model, tensors, source)
    load_trained(model, tensors, source)
    return model.to(device).eval(), cfg
