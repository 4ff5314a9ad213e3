"""Preemption signals: SIGTERM / SIGUSR1 ask for a checkpoint at the next step boundary and a clean exit.

Why a flag and not work in the handler: a handler runs between two Python bytecodes, possibly inside
a collective; saving there would deadlock or tear a checkpoint. SLURM signals ranks at slightly
different times (or only some of them), so the flag is all-reduced at every step boundary and all
ranks stop together.
"""

from __future__ import annotations

import signal
from types import FrameType
from typing import Optional

import torch

from train.distributed import all_ranks_any

PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    """Installs handlers on construction; ``should_stop`` is the collective check at a step boundary."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        self._previous = {}
        for sig in PREEMPT_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.received = signum

    def should_stop(self, device: torch.device) -> bool:
        """Collective: True on all ranks if any rank received a preemption signal."""
        return all_ranks_any(self.received is not None, device)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
