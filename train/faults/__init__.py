"""What keeps a long run honest when something goes wrong (docs/FAULTS.md):

* ``guards.py``: a non-finite loss or gradient norm skips the step on every rank, too many in a row
  stop the run; an out-of-memory error names the setting to lower;
* ``signals.py``: SIGTERM / SIGUSR1 stop every rank at the same step boundary, after a checkpoint;
* ``watchdog.py``: a step that hangs dumps every thread's stack and exits with a code SLURM requeues;
* ``runlock.py``: one live copy of a run per run directory;
* ``replica_check.py``: replicated weights are compared across ranks before every checkpoint.

Everything outside this folder imports from here.
"""

from train.faults.guards import StepGuard, TooManySkippedSteps, discard_step, is_oom, oom_advice
from train.faults.replica_check import ReplicaCheck, ReplicaMismatch, fingerprint
from train.faults.runlock import RunLock, RunLocked, acquire_run_lock
from train.faults.signals import PreemptionFlag
from train.faults.watchdog import HANG_EXIT_CODE, HangWatchdog

__all__ = [
    "HANG_EXIT_CODE",
    "HangWatchdog",
    "PreemptionFlag",
    "ReplicaCheck",
    "ReplicaMismatch",
    "RunLock",
    "RunLocked",
    "StepGuard",
    "TooManySkippedSteps",
    "acquire_run_lock",
    "discard_step",
    "fingerprint",
    "is_oom",
    "oom_advice",
]
