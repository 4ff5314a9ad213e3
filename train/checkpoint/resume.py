"""Resume: which checkpoint ``--resume auto|PATH`` means, whether this run's shape can load it, and loading it.

``find_checkpoint`` is cheap and runs before the model is built: it checks the completeness marker
(every file present at its recorded size; ``--resume PATH`` refuses an incomplete checkpoint with the
reason, ``--resume auto`` falls back to the newest complete one before it, saying so) and the shape.
A native checkpoint resumes through DeepSpeed only at the world size, ep_size and ZeRO stage that
wrote it; otherwise its conversion at ``<dir>/portable/<tag>`` is used if ``launch.reshape_checkpoint``
wrote one, else the error names that command. The frozen backbone is not in a checkpoint
(``exclude_frozen_parameters=True``); it is rebuilt from its own path, so loading is non-strict and
every trainable key is checked to be present instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
from omegaconf import OmegaConf

from train.checkpoint.disk import COMPLETE, LATEST, STEP_TAG, IncompleteCheckpoint, read_latest, verify_complete
from train.checkpoint.portable import PORTABLE_DIR, ReshapeError, is_portable, read_meta
from train.checkpoint.portable_load import load_portable
from train.contracts import Resumable
from train.distributed import DistInfo
from train.rng import seed_everything, set_rng_state

log = logging.getLogger(__name__)

Shape = tuple[int, int, int]  # (world size, ep_size, ZeRO stage): what a native checkpoint is tied to


@dataclass
class Resumed:
    step: int
    path: str
    note: str = ""  # what a reshaped resume changed (printed by the loop)


@dataclass
class Found:
    """A checkpoint chosen by ``--resume``, inspected before the model is built."""

    load_dir: str
    tag: str
    step: int
    portable: bool
    note: str = ""  # why this one was chosen when it is not what was asked for (printed by the loop)

    @property
    def path(self) -> str:
        return os.path.join(self.load_dir, self.tag)


def reshape_command(path: str) -> str:
    return f"python -m launch.reshape_checkpoint --src {path}"


# ---------------------------------------------------------------- finding
def find_checkpoint(directory: str, resume: Optional[str], shape: Shape, is_main: bool) -> Optional[Found]:
    """The checkpoint for ``--resume auto|PATH`` in a run's checkpoint ``directory`` (None: fresh start)."""
    if not resume:
        return None
    note = ""
    if resume == "auto":
        where = _latest_complete(directory, is_main)
        if where is None:
            return None
        where, note = where
    else:
        where = _named(resume)
    path = os.path.join(*where)
    if is_portable(path):
        return Found(where[0], where[1], int(read_meta(path)["step"]), portable=True, note=note)
    try:
        return Found(where[0], where[1], _check_shape(path, shape), portable=False, note=note)
    except ReshapeError:
        converted = os.path.join(where[0], PORTABLE_DIR, where[1])  # launch.reshape_checkpoint's default --dst
        if not is_portable(converted):
            raise
        if is_main:
            log.warning("resume: %s is of another shape; using its conversion %s", path, converted)
        return Found(os.path.dirname(converted), where[1], int(read_meta(converted)["step"]), portable=True, note=note)


def _named(resume: str) -> tuple[str, str]:
    """(dir, tag) of ``--resume PATH``: a checkpoint directory, or a run's checkpoint directory (its
    ``latest``); a native checkpoint must be complete."""
    path = os.path.abspath(resume)
    if os.path.isfile(os.path.join(path, LATEST)):
        where = read_latest(path)
        if where is None:
            raise FileNotFoundError(f"--resume {resume}: 'latest' names no checkpoint")
    elif (
        os.path.isfile(os.path.join(path, "train_state_rank0.pt"))
        or is_portable(path)
        or os.path.isfile(os.path.join(path, COMPLETE))
    ):
        where = os.path.dirname(path), os.path.basename(path)
    else:
        raise FileNotFoundError(f"--resume {resume}: neither a checkpoint nor a directory with a 'latest' file")
    problem = None if is_portable(os.path.join(*where)) else verify_complete(os.path.join(*where))
    if problem:
        raise IncompleteCheckpoint(
            f"--resume {resume}: checkpoint {os.path.join(*where)} is incomplete: {problem}. Resume from an "
            f"earlier checkpoint, or with --resume auto (it falls back to the newest complete one)"
        )
    return where


def _latest_complete(directory: str, is_main: bool) -> Optional[tuple[tuple[str, str], str]]:
    """((dir, tag), note) for ``--resume auto``: what ``latest`` names if complete, else the newest
    complete checkpoint before it (the note says which was refused and why); None: fresh start."""
    p = os.path.join(directory, LATEST)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        tag = f.read().strip()
    path = os.path.join(directory, tag)
    problem = (
        "its directory is missing"
        if not os.path.isdir(path)
        else (None if is_portable(path) else verify_complete(path))
    )
    if problem is None:
        return (os.path.abspath(directory), tag), ""
    step = int(tag[4:]) if STEP_TAG.match(tag) else 1 << 62
    earlier = sorted((t for t in os.listdir(directory) if STEP_TAG.match(t) and int(t[4:]) < step), reverse=True)
    for t in earlier:
        if verify_complete(os.path.join(directory, t)) is None:
            note = f"checkpoint {tag} is incomplete ({problem}): fell back to {t}, the newest complete one"
            if is_main:
                log.warning("resume: %s", note)
            return (os.path.abspath(directory), t), note
    raise IncompleteCheckpoint(
        f"--resume auto: {path} (named by {p}) is incomplete ({problem}) and {directory} holds no earlier "
        f"complete checkpoint. Start afresh without --resume after moving {directory} away"
    )


def _check_shape(path: str, shape: Shape) -> int:
    """The step of native checkpoint ``path`` if a run of ``shape`` can load it as is; else a ReshapeError."""
    # mmap: only the few scalars below are read from a file that also holds EMA and loader state
    state = torch.load(os.path.join(path, "train_state_rank0.pt"), map_location="cpu", weights_only=True, mmap=True)
    layout = state.get("layout")
    if layout is not None:
        ep, zero = int(layout["ep_size"]), int(layout["zero_stage"])
    else:  # written before layouts were recorded: its config says what it was
        saved = OmegaConf.load(os.path.join(path, "config.yaml"))
        ep, zero = int(saved.model.experts.ep_size), int(saved.train.zero_stage)
    saved_shape = (int(state["world_size"]), ep, zero)
    if saved_shape != shape:
        raise ReshapeError(
            f"checkpoint {path} was written by {saved_shape[0]} ranks at ep_size {saved_shape[1]}, ZeRO "
            f"{saved_shape[2]}; this run has {shape[0]} ranks at ep_size {shape[1]}, ZeRO {shape[2]}. DeepSpeed "
            f"cannot load it at another shape: convert it once with `{reshape_command(path)}`, then resume "
            f"again (--resume auto uses the conversion of its 'latest')"
        )
    return int(state["step"])


# ---------------------------------------------------------------- loading
def load_native(engine: Any, found: Found, loader: Resumable, ema: Any, dist: DistInfo) -> Resumed:
    """A checkpoint of this run's shape, through DeepSpeed, with this rank's loader, EMA and RNG state."""
    path = found.path
    state_file = os.path.join(path, f"train_state_rank{dist.rank}.pt")
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{state_file} missing: checkpoint written by a run with fewer ranks?")
    state = torch.load(state_file, map_location="cpu", weights_only=True)
    if state["world_size"] != dist.world_size:
        raise RuntimeError(
            f"checkpoint {path} was written by {state['world_size']} ranks, this run has "
            f"{dist.world_size}; exact resume needs the same layout"
        )
    missing = _load_engine_checkpoint(engine, found.load_dir, found.tag)
    trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
    lost = sorted(trainable & missing)
    if lost:
        raise RuntimeError(f"checkpoint {path} lacks {len(lost)} trainable tensors, e.g. {lost[:3]}")
    loader.load_state_dict(state["loader"])
    if ema is not None:
        if "ema" not in state:
            raise RuntimeError(f"ema.enabled but checkpoint {path} has no EMA state")
        ema.load_state_dict(state["ema"])
    set_rng_state(state["rng"])
    return Resumed(step=int(state["step"]), path=path)


def load_converted(engine: Any, found: Found, loader: Resumable, ema: Any, dist: DistInfo, seed: int) -> Resumed:
    """A portable checkpoint, at any shape. The loader gets every source rank's state and decides (see
    ``EditLoader.load_state_dict``).

    The RNG streams are per rank, so they continue only at the source's world size; otherwise each
    rank is reseeded from (run.seed, step, rank), which is deterministic but not the uninterrupted
    run's noise.
    """
    meta = load_portable(engine, found.path, ema)
    src = meta["source"]
    loader.load_state_dict({"per_rank": meta["loaders"]})
    notes = [
        f"portable checkpoint from {src['world_size']} ranks at ep_size {src['ep_size']}, ZeRO {src['zero_stage']}"
    ]
    if src["world_size"] == dist.world_size:
        set_rng_state(meta["rng"][dist.rank])
    else:
        seed_everything(seed * 1_000_003 + found.step * 1_009 + dist.rank + 1)
        notes.append("RNG reseeded from (run.seed, step, rank): the noise differs from an uninterrupted run")
    batch = int(engine.train_batch_size())
    if batch != src["train_batch_size"]:
        notes.append(f"global batch {src['train_batch_size']} -> {batch}: set train.grad_accum to keep it")
    note = "; ".join(notes)
    if dist.is_main:
        log.warning("resume: %s", note)
    return Resumed(step=int(meta["step"]), path=found.path, note=note)


def _load_engine_checkpoint(engine: Any, load_dir: str, tag: str) -> set[str]:
    """``engine.load_checkpoint`` non-strict; returns the module keys the checkpoint did not provide."""
    module = engine.module
    captured: list = []
    original = module.load_state_dict

    def capturing(state_dict, strict=True, **kw):
        result = original(state_dict, strict=strict, **kw)
        captured.append(set(result.missing_keys))
        return result

    module.load_state_dict = capturing
    try:
        path, _ = engine.load_checkpoint(
            load_dir, tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        del module.load_state_dict
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load {os.path.join(load_dir, tag)}")
    if not captured:
        raise RuntimeError("DeepSpeed loaded no module state dict; cannot verify trainable keys")
    return set.intersection(*captured)
