"""Start-up: where the time from launch to the first step goes, and the persistent compile cache.

Why: at full FLUX scale a run took minutes from launch to its first step (imports, random init of 12B
frozen parameters on the CPU, the engine, compiling the block graphs in the first step) with nothing on
the console to say which. ``StartupClock`` prints one line as each phase ends (rank 0):

    start-up: imports and config: 9.8 s (9.8 s since launch)
    start-up: process group, run lock, checkpoint lookup: 1.2 s (11.0 s since launch)
    start-up: model build: 31.0 s, of which 28.7 s reading weights from local folders (42.0 s since launch)
    start-up: engine: 4.1 s (46.1 s since launch)
    ...
    start-up: first step: 95.2 s: data 0.3 s, forward (compiles) 51.0 s, backward (compiles) 43.2 s, ...

and the phases go to TensorBoard as ``startup/<phase>_s`` at the first step.

The compile cache: inductor's caches (FX graphs, AOTAutograd, Triton kernels) live in
``TORCHINDUCTOR_CACHE_DIR``, by default under ``/tmp``, which a requeued job on another node does not
have. ``use_compile_cache`` points it at ``train.compile_cache_dir`` (default ``<run dir>/compile_cache``),
so a resumed run reuses what the first one compiled; a ``TORCHINDUCTOR_CACHE_DIR`` already in the
environment wins.
"""

from __future__ import annotations

import os
import re
import time
from typing import Callable, Optional

import torch

from moe.config import ModelConfig
from train.config import TrainConfig, run_dir

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def launch_time() -> float:
    """When this process started (seconds since the epoch; now, if the OS does not say)."""
    try:
        import psutil

        return float(psutil.Process(os.getpid()).create_time())
    except Exception:  # psutil missing or the process table unreadable: count from here
        return time.time()


class StartupClock:
    """Seconds per start-up phase, each printed as it ends, and the first step's phases (``step_phase``,
    called where the loop enters each phase of its first step). Lines wait until ``attach`` says where
    to print them (rank 0's console: the rank is known only once the process group is up)."""

    def __init__(self) -> None:
        self.t0 = launch_time()
        self.last = time.time()
        self.phases: dict[str, float] = {}
        self.sync: Callable[[], None] = lambda: None  # a device synchronisation: kernels count in their phase
        self._print: Optional[Callable[[str], None]] = None
        self._queued: list[str] = []
        self._step_marks: list[tuple[str, float]] = []

    def attach(self, print_fn: Callable[[str], None], sync: Optional[Callable[[], None]] = None) -> None:
        """Print through ``print_fn`` from now on (and the lines so far); ``sync`` waits for the device."""
        self._print = print_fn
        if sync is not None:
            self.sync = sync
        for line in self._queued:
            print_fn(line)
        self._queued = []

    def print(self, line: str) -> None:
        if self._print is None:
            self._queued.append(line)
        else:
            self._print(line)

    def mark(self, name: str, note: str = "") -> float:
        """The phase ``name`` ended now: print its line; its seconds."""
        self.sync()
        now = time.time()
        seconds = now - (self.t0 if not self.phases else self.last)
        self.last = now
        self.phases[name] = seconds
        self.print(f"start-up: {name}: {seconds:.1f} s{note} ({now - self.t0:.1f} s since launch)")
        return seconds

    def step_phase(self, name: str) -> None:
        """The first step entered phase ``name`` (the watchdog's phase names)."""
        self.sync()
        self._step_marks.append((name, time.time()))

    def first_step_done(self) -> None:
        """The first step ended: one line with its phases, then the time from launch to here."""
        self.sync()
        now = time.time()
        parts: dict[str, float] = {}
        for (name, t), (_, t_next) in zip(self._step_marks, self._step_marks[1:] + [("", now)]):
            key = _short(name)
            parts[key] = parts.get(key, 0.0) + t_next - t
        detail = ", ".join(f"{k} {v:.1f} s" for k, v in parts.items())
        self.mark("first step", f" ({detail})" if detail else "")
        for k, v in parts.items():
            self.phases[f"first step/{k}"] = v
        self.print(f"start-up: launch to the end of the first step: {now - self.t0:.1f} s")
        self.phases["total"] = now - self.t0
        self._step_marks = []

    def scalars(self) -> dict[str, float]:
        """The phases as TensorBoard scalars (``startup/<phase>_s``)."""
        return {f"startup/{_slug(k)}_s": v for k, v in self.phases.items()}


def _short(phase: str) -> str:
    """A watchdog phase as a start-up part: 'forward (expert all-to-alls)' -> 'forward'."""
    name = phase.split(" (")[0].replace("all-reduce: ", "")
    return {"forward": "forward (compiles)", "backward": "backward (compiles)"}.get(name, name)


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9/]+", "_", name.lower()).strip("_")


def use_compile_cache(cfg: TrainConfig) -> str:
    """Point inductor's caches at ``train.compile_cache_dir`` (default ``<run dir>/compile_cache``) unless
    ``TORCHINDUCTOR_CACHE_DIR`` names another folder already; the directory in use. Call before anything
    compiles (inductor reads the variable whenever it opens its caches).

    torch itself sets the variable to its default (``/tmp/torchinductor_<user>``) the first time it asks for
    the folder, which importing diffusers does: that value counts as unset."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get(CACHE_ENV)
    if current is None or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        chosen = cfg.train.compile_cache_dir or os.path.join(run_dir(cfg), "compile_cache")
        os.environ[CACHE_ENV] = os.path.abspath(chosen)
    os.makedirs(os.environ[CACHE_ENV], exist_ok=True)
    return os.environ[CACHE_ENV]


def random_init_parts(model: ModelConfig) -> list[str]:
    """The frozen parts of ``model`` built from random weights (no local folder): their values depend on
    the device they are drawn on."""
    parts = []
    if model.backbone.path is None:
        parts.append("backbone")
    if model.vae.kind != "pixel_unshuffle" and model.vae.path is None:
        parts.append("vae")
    if model.text.t5_path is None:
        parts.append("t5")
    if model.text.clip_path is None:
        parts.append("clip")
    return parts


def init_device(cfg: TrainConfig, device: torch.device) -> torch.device:
    """Where the model is built: the training device with ``train.init_on_device``, else the CPU."""
    return device if cfg.train.init_on_device else torch.device("cpu")
