"""The process's random generators: seed them, save and restore them, and run code that leaves them as found.

Why apart from train/checkpoint/: the checkpoint stores these states for an exact resume, but the
held-out evaluation (train/eval/heldout.py), the logged image grid (train/loop.py) and the export
(train/eval/export.py) use them too, and none of those is about checkpoints.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any, Iterator

import numpy as np
import torch


def rng_state() -> dict:
    """Python, numpy and torch (CPU + current CUDA device) RNG states, as weights_only-loadable types."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "gauss": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's generators (all ranks, all processes of the project)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def rng_untouched() -> Iterator[None]:
    """Whatever runs inside leaves Python's, numpy's and torch's generators as it found them. For
    logging: drawing the validation batch and sampling its edits must not change the training run's
    noise, or a run's losses would depend on how often it logs images."""
    state = rng_state()
    try:
        yield
    finally:
        set_rng_state(state)


def set_rng_state(state: dict) -> None:
    random.setstate(_to_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _to_tuple(x: Any) -> Any:
    return tuple(_to_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x
