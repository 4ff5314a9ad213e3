"""What the training loop needs from a model and a loader, as ``typing.Protocol``s.

Why: ``train()`` takes its model and loader from factories (``train/loop.py::default_factories``
gives the real ones, ``moe.model.CareEditModel`` and ``data.loader.EditLoader``; the tests give a
stand-in model and loaders that inject faults). These protocols say what a factory's product must
offer, so the loop calls the methods instead of probing for them, and ``Trainer`` checks a product
once, when it is built, naming what is missing.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, runtime_checkable

from torch import nn


@runtime_checkable
class TrainableModel(Protocol):
    """A model ``train()`` can train: called on a batch, it returns an output with ``loss`` (scalar tensor),
    ``terms`` (unweighted loss terms), ``stats`` (floats to log) and ``num_tokens``."""

    def __call__(self, batch: Any) -> Any: ...

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters the optimizer updates (the frozen backbone is left out)."""
        ...

    def flops_per_token(self) -> float:
        """Training FLOPs per token for the logged MFU; 0 when unknown."""
        ...

    def compile_regions(self, **compile_kwargs: Any) -> str:
        """Compile what can be compiled (``train.compile``); a one-line summary for the log, "" if nothing."""
        ...

    def routing_warnings(self, stats: dict[str, float]) -> list[str]:
        """Warnings about the routing read from a step's logged ``stats`` (e.g. a collapsed router)."""
        ...


@runtime_checkable
class Resumable(Protocol):
    """What a checkpoint saves and restores of a loader: its position."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class TrainLoader(Resumable, Protocol):
    """An endless iterable of batches (each with ``.to(device, dtype)`` and ``batch_size``) that resumes
    from its ``state_dict`` and counts the samples it skipped."""

    def __iter__(self) -> Iterator[Any]: ...

    def skip_stats(self) -> dict[str, int]:
        """Skipped samples per reason so far (logged as ``data/...``)."""
        ...


def require(obj: object, protocol: type, what: str) -> None:
    """Raise TypeError naming the methods of ``protocol`` that ``obj`` (``what``, e.g. "the model") lacks.

    The loop calls these methods without probing; this check runs once, where the object enters it."""
    if isinstance(obj, protocol):
        return
    members = {
        name
        for klass in protocol.__mro__
        if klass not in (object, Protocol)
        for name, value in vars(klass).items()
        if callable(value) and (not name.startswith("_") or name in ("__call__", "__iter__"))
    }
    missing = sorted(name for name in members if not hasattr(obj, name))
    raise TypeError(
        f"{what} ({type(obj).__name__}) lacks {', '.join(missing)} of {protocol.__name__} (train/contracts.py)"
    )
