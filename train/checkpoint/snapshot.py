"""Host copies of what a checkpoint writes, so that the files can be written while training goes on.

Why storages and not tensors: ``torch.save`` writes each storage once and whole, and tensors that share
a storage share it in the file too (ZeRO's fp32 partitions are saved as views of one flat buffer). A
snapshot therefore copies storage by storage, keyed as ``torch.save`` keys them, and rebuilds every
tensor as a view of its storage's copy at the same offset, size and stride. ``torch.save`` of the
snapshot then writes the file it would have written from the live state: on the CPU the same bytes
(``tests/test_async_checkpoint.py``). A tensor on a GPU is recorded in the file as a CPU tensor; every
loader of these checkpoints maps tensors to the CPU (``map_location``), so it loads the same.

GPU storages are copied into pinned host memory without waiting (``non_blocking``) on the current
stream, so the next step's in-place updates on that stream run after the copies; the writer waits for
the ``ready`` event before it reads them. torch's caching host allocator keeps the pinned blocks for the
next save, so only the first save pays for pinning.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass
class Snapshot:
    """A host copy of a state (``state``), the bytes of the storages it holds, and the event after which
    the copies from a GPU are complete (None when nothing came from a GPU)."""

    state: Any
    nbytes: int
    ready: Optional[Any] = None  # torch.cuda.Event

    def wait(self) -> None:
        """Block until the copies have landed (the writer calls it before reading ``state``)."""
        if self.ready is not None:
            self.ready.synchronize()


def _tensors(obj: Any, found: list[torch.Tensor], seen: set[int]) -> None:
    """Every tensor reachable through dicts, lists, tuples and plain objects' attributes."""
    if id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        found.append(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _tensors(v, found, seen)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _tensors(v, found, seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.nn.Module)) and not callable(obj):
        for v in vars(obj).values():
            _tensors(v, found, seen)


def storage_bytes(obj: Any) -> int:
    """The bytes ``torch.save`` writes for the tensors in ``obj``: each distinct storage once, whole."""
    found: list[torch.Tensor] = []
    _tensors(obj, found, set())
    sizes = {t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in found if t.layout == torch.strided}
    return sum(sizes.values())


def snapshot(obj: Any) -> Snapshot:
    """A copy of ``obj`` whose tensors live in host memory, storage sharing kept (module docstring).

    Containers and other objects are deep-copied too, so nothing the training changes later reaches the
    file: the optimizer's state dict holds the live moment tensors, the EMA its live shadow weights."""
    found: list[torch.Tensor] = []
    _tensors(obj, found, set())
    storages: dict[int, torch.UntypedStorage] = {}  # torch.save's key for a storage -> its host copy
    memo: dict[int, Any] = {}
    from_gpu = False
    for t in found:
        if t.layout != torch.strided:  # sparse and other layouts: a plain copy (not used by our checkpoints)
            memo[id(t)] = t.detach().to("cpu", copy=True)
            continue
        source = t.untyped_storage()
        host = storages.get(source._cdata)
        if host is None:
            pinned = t.device.type == "cuda"
            from_gpu |= pinned
            host = torch.empty(source.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
            host.copy_(source, non_blocking=pinned)
            storages[source._cdata] = host
        view = torch.empty(0, dtype=t.dtype).set_(host, t.storage_offset(), t.size(), t.stride())
        if isinstance(t, torch.nn.Parameter):
            view = torch.nn.Parameter(view, requires_grad=t.requires_grad)
        elif t.requires_grad:
            view.requires_grad_(True)
        memo[id(t)] = view
    ready = None
    if from_gpu:
        ready = torch.cuda.Event()
        ready.record()
    state = copy.deepcopy(obj, memo)
    return Snapshot(state=state, nbytes=sum(s.nbytes() for s in storages.values()), ready=ready)
