"""Where a run's wall-clock time goes and how much of it the run may take.

* :mod:`train.timing.startup`: the time from launch to the first step, phase by phase (timing lines and
  TensorBoard scalars), the model built on its device, inductor's cache in the run folder;
* :mod:`train.timing.budget`: ``train.time_budget_s``, a run sized by wall-clock time: its step count
  set once from the first steps' speed.
"""

from train.timing.budget import TimeBudget, budget_steps
from train.timing.startup import CACHE_ENV, StartupClock, init_device, random_init_parts, use_compile_cache

__all__ = [
    "CACHE_ENV",
    "StartupClock",
    "TimeBudget",
    "budget_steps",
    "init_device",
    "random_init_parts",
    "use_compile_cache",
]
