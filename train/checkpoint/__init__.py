"""Checkpoints: sharded DeepSpeed checkpoints committed atomically, exact resume, and conversion to any shape.

* ``Checkpointer`` (``checkpointer.py``): when to save, the commit protocol (``latest`` and ``best``
  move only onto complete checkpoints), pruning; ``find`` / ``load`` for ``--resume`` (``resume.py``);
* ``snapshot.py`` / ``writer.py``: the host copy of a checkpoint's state and the thread that writes it
  (``checkpoint.async_save``), every file fsynced and a failed write recorded for the ranks to agree on;
* ``space.py``: a checkpoint's size before the first save, the warning when the disk will not hold two,
  and ``CheckpointWriteError`` (a full disk named, with the free space and the size);
* ``disk.py``: the directory's names, completeness markers and pointers, read by the launch scripts too;
* ``layout.py``: which rank held which experts and optimizer slots, recorded at save time;
* ``portable.py`` / ``portable_load.py``: a checkpoint converted once to a shape-independent one
  (``python -m launch.reshape_checkpoint``), and loaded at any world size, ep_size and ZeRO stage.

Everything outside this folder imports from here.
"""

from train.checkpoint.checkpointer import Checkpointer, SaveReport
from train.checkpoint.disk import (
    BEST,
    COMPLETE,
    LATEST,
    IncompleteCheckpoint,
    checkpoint_metrics,
    list_checkpoints,
    read_best,
    read_latest,
    resolve_tag,
    step_tag,
    verify_complete,
)
from train.checkpoint.layout import EXPERT_MARKER, expert_id, global_expert_name
from train.checkpoint.portable import PORTABLE_DIR, ReshapeError, convert, load_pt, read_layouts
from train.checkpoint.resume import Found, Resumed
from train.checkpoint.space import CheckpointWriteError

__all__ = [
    "BEST",
    "COMPLETE",
    "EXPERT_MARKER",
    "LATEST",
    "PORTABLE_DIR",
    "CheckpointWriteError",
    "Checkpointer",
    "Found",
    "IncompleteCheckpoint",
    "ReshapeError",
    "Resumed",
    "SaveReport",
    "checkpoint_metrics",
    "convert",
    "expert_id",
    "global_expert_name",
    "list_checkpoints",
    "load_pt",
    "read_best",
    "read_latest",
    "read_layouts",
    "resolve_tag",
    "step_tag",
    "verify_complete",
]
