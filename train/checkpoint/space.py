"""Disk space and checkpoints: how big a checkpoint will be, the warning at start, the error when a save fails.

Why: a full disk during a save used to end in torch's zip writer's "unexpected pos ..." traceback, which
does not say that the disk is full, and nothing warned before the save that the space would not do. Now
the run warns at start when the free space of the checkpoint folder holds fewer than two checkpoints, and
a failed save stops every rank with ``CheckpointWriteError``: the folder, the free space, the checkpoint's
size, the file and the error, and the checkpoint ``latest`` still names (``launch/train.py`` exits with
code 7 when the disk was full, 8 for another write error; docs/FAULTS.md).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import torch
import torch.distributed as torch_dist

from train.checkpoint.disk import COMPLETE, read_latest
from train.checkpoint.layout import EXPERT_MARKER
from train.checkpoint.writer import WriteFailure, free_bytes

GB = 1e9


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (raised on every rank; ``latest`` was not moved)."""

    def __init__(self, message: str, disk_full: bool) -> None:
        super().__init__(message)
        self.disk_full = disk_full


def gb(n: Optional[float]) -> str:
    """Bytes as GB (MB below 0.1 GB, where the tests' checkpoints are)."""
    if n is None:
        return "unknown"
    return f"{n / GB:.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:.3f} MB"


def checkpoint_bytes(path: str) -> Optional[int]:
    """The bytes of a complete checkpoint's files, from its ``complete.json`` (None when it has none)."""
    import json

    try:
        with open(os.path.join(path, COMPLETE)) as f:
            return sum(int(v) for v in json.load(f)["files"].values())
    except (OSError, ValueError, KeyError):
        return None


TRAIN_STATE_BYTES = 16_000  # each rank's train_state file beyond its EMA: RNG states, loader position


def estimate_checkpoint_bytes(
    dense: int, experts: int, world_size: int, ep_size: int, zero_stage: int, weight_bytes: int, ema: bool
) -> int:
    """About the bytes of one checkpoint of every rank, before any was written (DeepSpeed 0.19.8's layout).

    ``dense``: trainable elements outside the experts (the same on every rank); ``experts``: the experts'
    trainable elements over one expert-parallel group (all experts once). Weights are written once at
    their dtype. AdamW's two fp32 moments: under ZeRO 1/2 once (partitioned), beside fp32 master weights;
    at ZeRO 0 every expert-parallel rank's optimizer file holds the dense moments with its experts', and
    the model file (rank 0) all of rank 0's again. The EMA (fp32) is written by every rank for the weights
    it holds. The tests hold it within 15% of what the tiny stand-in model writes."""
    master = 4 if (zero_stage > 0 or weight_bytes < 4) else 0
    if zero_stage > 0:
        moments = dense + experts
    else:
        moments = dense * (ep_size + 1) + experts + experts // ep_size
    total = (dense + experts) * weight_bytes + moments * (8 + master) + world_size * TRAIN_STATE_BYTES
    if ema:
        total += 4 * (dense * world_size + experts * world_size // ep_size)
    return int(total)


def estimate_for_engine(module: torch.nn.Module, world_size: int, ep_size: int, zero_stage: int, ema: bool) -> int:
    """``estimate_checkpoint_bytes`` for a built engine's module (collective: the ranks' expert counts)."""
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    dense = sum(p.numel() for n, p in named if EXPERT_MARKER not in n)
    mine = sum(p.numel() for n, p in named if EXPERT_MARKER in n)
    weight_bytes = named[0][1].element_size() if named else 4
    counts = [mine]
    if torch_dist.is_initialized() and world_size > 1:
        counts = [None] * world_size
        torch_dist.all_gather_object(counts, mine)
    experts = sum(counts[:ep_size])  # ranks 0..ep_size-1 form one expert-parallel group
    return estimate_checkpoint_bytes(dense, experts, world_size, ep_size, zero_stage, weight_bytes, ema)


def space_lines(directory: str, size: int, how: str) -> list[str]:
    """What a run prints at start about its checkpoints' space: their size and the free space, and a warning
    when the free space holds fewer than two of them (a save writes the new checkpoint before it prunes an
    old one)."""
    free = free_bytes(directory)
    where = os.path.abspath(directory)
    lines = [f"checkpoint space: about {gb(size)} per checkpoint ({how}); {gb(free)} free in {where}"]
    if free is not None and free < 2 * size:
        lines.append(
            f"warning: {where} has {gb(free)} free, fewer than two checkpoints of about {gb(size)}: a save will "
            "fail for lack of space unless space is freed or checkpoint.dir points elsewhere"
        )
    return lines


def write_error(
    directory: str,
    tag: str,
    failures: dict[int, WriteFailure],
    planned: int,
    free_after_cleanup: Optional[int],
) -> CheckpointWriteError:
    """The error every rank raises when a rank's write failed: what, where, how much space, what is kept."""
    rank, first = min(failures.items())
    where = os.path.abspath(directory)
    latest = _latest_tag(directory)
    kept = f"'latest' still names {latest}" if latest else "there is no complete checkpoint yet"
    last = checkpoint_bytes(os.path.join(directory, latest)) if latest else None
    size = f"this checkpoint holds {gb(planned)} of tensors" + (f" ({latest} takes {gb(last)})" if last else "")
    if first.disk_full:
        return CheckpointWriteError(
            f"checkpoint {tag} could not be written: the disk is full (or a quota was reached) in {where}: "
            f"{gb(first.free)} free when rank {rank} failed to write {first.file} ({first.error}), "
            f"{gb(free_after_cleanup)} after removing the partial checkpoint; {size}. {kept}. Free space there, "
            "or set checkpoint.dir (or run.dir) to a folder with room, then resume with --resume auto",
            disk_full=True,
        )
    return CheckpointWriteError(
        f"checkpoint {tag} could not be written in {where}: rank {rank} failed to write {first.file} "
        f"({first.error}); {size}. {kept}",
        disk_full=False,
    )


def _latest_tag(directory: str) -> Optional[str]:
    try:
        found = read_latest(directory)
    except FileNotFoundError:
        return None
    return found[1] if found else None


def gathered(value: Any, world_size: int) -> list[Any]:
    """Collective: every rank's ``value`` (a list of one on a single process)."""
    if not (torch_dist.is_initialized() and world_size > 1):
        return [value]
    out: list[Any] = [None] * world_size
    torch_dist.all_gather_object(out, value)
    return out
