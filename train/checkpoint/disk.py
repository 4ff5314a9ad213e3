"""A run's checkpoint directory on disk: tag names, the completeness marker, the ``latest`` and ``best``
pointers, and the fsyncs that make each of them durable.

Why apart from the checkpointer: the launch scripts (export, eval, reshape) read these names and
pointers without a training run, and a resume checks them before any model exists.

    <checkpoint dir>/latest         the tag of the last complete checkpoint (replaced atomically)
    <checkpoint dir>/best           JSON {"tag", "step", "metric", "mode", "value"} (with checkpoint.best_metric)
    <checkpoint dir>/step<N>/complete.json   {step, world_size, files: {name: size}, metrics}: written last
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Optional

LATEST = "latest"
BEST = "best"
TMP_PREFIX = ".tmp-"
COMPLETE = "complete.json"  # written last, before the rename: {step, world_size, files: {name: size}}
STEP_TAG = re.compile(r"^step\d{8}$")


class IncompleteCheckpoint(FileNotFoundError):
    """A checkpoint that resume must not load (missing or truncated files); the message says which."""


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def fsync_file(f: Any) -> int:
    """Flush and fsync an open file; its size."""
    f.flush()
    os.fsync(f.fileno())
    return os.fstat(f.fileno()).st_size


def fsync_dir(path: str) -> None:
    """fsync a directory, so the names created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_pointer(directory: str, name: str, text: str) -> None:
    """Replace ``<directory>/<name>`` atomically: a temporary, fsynced, renamed over it, the directory fsynced."""
    tmp = os.path.join(directory, name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, name))
    fsync_dir(directory)  # make the rename itself durable


def verify_complete(path: str) -> Optional[str]:
    """None if checkpoint ``path`` is complete; else what is wrong with it (one line)."""
    marker = os.path.join(path, COMPLETE)
    if not os.path.isfile(marker):
        return f"no {COMPLETE} (its save did not finish, or it predates completeness markers)"
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {COMPLETE} ({e})"
    for name, size in sorted(files.items()):
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            return f"file {name} is missing"
        actual = os.path.getsize(p)
        if actual != size:
            return f"file {name} has {actual} bytes, {size} were written (truncated or overwritten)"
    return None


def read_latest(ckpt_dir: str) -> Optional[tuple[str, str]]:
    """(dir, tag) named by ``<ckpt_dir>/latest``, or None when there is none."""
    p = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        tag = f.read().strip()
    if not tag or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise FileNotFoundError(f"{p} names '{tag}', which is not a checkpoint directory")
    return os.path.abspath(ckpt_dir), tag


def improves(value: float, than: float, mode: str) -> bool:
    """Strictly better in direction ``mode`` ('max' or 'min'): a tie keeps the earlier checkpoint."""
    return value > than if mode == "max" else value < than


def read_best(ckpt_dir: str) -> Optional[dict]:
    """The ``best`` pointer of a checkpoint directory ({tag, step, metric, mode, value}), or None when there
    is none or it cannot be read (written atomically, so that means it was never written)."""
    p = os.path.join(ckpt_dir, BEST)
    try:
        with open(p) as f:
            pointer = json.load(f)
    except (OSError, ValueError):
        return None
    return pointer if isinstance(pointer, dict) and isinstance(pointer.get("tag"), str) else None


def checkpoint_metrics(path: str) -> dict[str, float]:
    """The held-out metrics recorded in a complete checkpoint's marker ({} when none or incomplete)."""
    if verify_complete(path) is not None:
        return {}
    with open(os.path.join(path, COMPLETE)) as f:
        return dict(json.load(f).get("metrics") or {})


def resolve_tag(path: str, tag: str) -> str:
    """The checkpoint directory named by ``tag`` in a run's checkpoint directory ``path`` (or in
    ``path/checkpoints`` when ``path`` is a run directory): ``latest``, ``best``, or a ``step<N>`` tag.
    Raises FileNotFoundError saying what is missing."""
    ckpt_dir = path
    if not os.path.isfile(os.path.join(path, LATEST)) and os.path.isdir(os.path.join(path, "checkpoints")):
        ckpt_dir = os.path.join(path, "checkpoints")
    if tag == LATEST:
        if not os.path.isfile(os.path.join(ckpt_dir, LATEST)):
            raise FileNotFoundError(f"{ckpt_dir}: no 'latest' pointer (not a run's checkpoint directory?)")
        found = read_latest(ckpt_dir)
        target = found[1] if found else ""
    elif tag == BEST:
        pointer = read_best(ckpt_dir)
        if pointer is None:
            raise FileNotFoundError(
                f"{ckpt_dir}: no 'best' pointer (a run keeps one when checkpoint.best_metric is set and "
                "logging.eval_every evaluates at its checkpoint steps)"
            )
        target = pointer["tag"]
    else:
        target = tag
    full = os.path.join(ckpt_dir, target)
    problem = "no such directory" if not os.path.isdir(full) else verify_complete(full)
    if problem:
        raise FileNotFoundError(f"{full} ('{tag}'): not a complete checkpoint: {problem}")
    return full


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """The complete ``step<N>`` checkpoint directories of a run, oldest first."""
    return [
        os.path.join(ckpt_dir, t)
        for t in sorted(os.listdir(ckpt_dir))
        if STEP_TAG.match(t) and verify_complete(os.path.join(ckpt_dir, t)) is None
    ]
