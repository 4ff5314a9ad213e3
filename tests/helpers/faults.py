"""Faults injected into a training run through its seams (loader and model factories, a patched method).

Why here and not in the loop: the training loop has no test switches; a subprocess test describes the
faults it wants as JSON in ``$CARE_TEST_FAULTS`` (``tests.helpers.train_harness.start_ranks(faults=...)``) and
``tests/helpers/train_entry.py`` wraps the factories with ``wrap_factories``:

* the loader wrapper knows which optimizer step each micro-batch belongs to (the loader is built at
  ``start_step``), sleeps where a step should be slow or stall, and tags batches in ``extras``;
* the model's ``forward`` (patched on the instance: parameter names unchanged) acts on the tags:
  it poisons the loss with NaN, or perturbs one parameter of this rank's replica;
* ``Checkpointer._commit`` is patched to SIGKILL the process after every shard is on disk, or
  ``Checkpointer._write_pointer`` to SIGKILL it in the middle of moving ``best``;
* the checkpoint writer's jobs are slowed (``RankWrites.run_jobs``: a sleep before each file), so a test can
  act while a checkpoint is being written beside the training; DeepSpeed's file writer
  (``TorchCheckpointEngine.save``) fails on one rank as a full disk makes it fail.
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator

import torch

FAULTS_ENV = "CARE_TEST_FAULTS"
NAN_TAG = "fault_nan"
PERTURB_TAG = "fault_perturb"
UNUSED_TAG = "fault_unused"


@dataclass
class Faults:
    nan_at_steps: list[int] = field(default_factory=list)  # this rank's loss is NaN at these steps...
    nan_rank: int = 0  # ...on this rank only
    step_sleep_s: float = 0.0  # every step of every rank lasts at least this long (the loader sleeps)
    stall_at_step: int = 0  # one rank's data stalls once, at the start of this step (0 = never)...
    stall_rank: int = 1
    stall_s: float = 0.0  # ...for this long
    perturb_at_step: int = 0  # one rank's copy of a replicated parameter is nudged (0 = never)...
    perturb_rank: int = 1
    perturb_param: str = "adapter.weight"
    unused_at_step: int = 0  # one rank runs a submodule without autograd, so its weights get no gradient...
    unused_rank: int = 1
    unused_module: str = "head"  # ...(what a condition absent from one rank's batch can do to its path)
    hetero_experts: bool = False  # not a fault: the toy's experts get different sizes (tests.helpers.toy_model)
    toy_eval: bool = False  # not a fault: the toy gains what the held-out evaluation reads (tests.helpers.eval_toy)
    crash_in_best_at_step: int = 0  # every rank SIGKILLs itself while moving `best` to this step's checkpoint
    skip_bucket_check: bool = False  # train.engine.check_bucket_layout patched out, to show what it prevents
    crash_in_save_at_step: int = 0  # every rank SIGKILLs itself after writing this step's checkpoint files
    grad_accum: int = 1  # micro-batches per step (to map loader positions to steps)
    slow_write_s: float = 0.0  # the checkpoint writer thread sleeps this long before each file
    disk_full_at_step: int = 0  # one rank's DeepSpeed file write of this step's checkpoint fails (0 = never)...
    disk_full_rank: int = 1
    disk_full_error: str = "enospc"  # ...with OSError ENOSPC, or "zip": torch's zip writer's short-write error

    def to_env(self) -> dict[str, str]:
        return {FAULTS_ENV: json.dumps(asdict(self))}

    @classmethod
    def from_env(cls) -> "Faults":
        return cls(**json.loads(os.environ.get(FAULTS_ENV, "{}")))


class FaultyLoader:
    """Wraps a loader: per-step sleeps and stalls, fault tags on the batches of chosen steps."""

    def __init__(self, inner: Any, faults: Faults, rank: int, start_step: int) -> None:
        self.inner, self.faults, self.rank, self.start_step = inner, faults, rank, start_step

    def __iter__(self) -> Iterator[Any]:
        f = self.faults
        for i, batch in enumerate(self.inner):
            step, first_micro = self.start_step + i // f.grad_accum + 1, i % f.grad_accum == 0
            if first_micro and f.step_sleep_s:
                time.sleep(f.step_sleep_s)
            if first_micro and step == f.stall_at_step and self.rank == f.stall_rank:
                time.sleep(f.stall_s)
            if step in f.nan_at_steps and self.rank == f.nan_rank:
                batch.extras[NAN_TAG] = True
            if step == f.perturb_at_step and self.rank == f.perturb_rank and first_micro:
                batch.extras[PERTURB_TAG] = f.perturb_param
            if step == f.unused_at_step and self.rank == f.unused_rank:
                batch.extras[UNUSED_TAG] = f.unused_module
            yield batch

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)

    def skip_stats(self) -> dict[str, int]:
        return self.inner.skip_stats()


def patch_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model`` act on the fault tags its batches carry (see the module docstring)."""
    forward = model.forward
    params = dict(model.named_parameters())

    def faulty_forward(batch: Any, *args: Any, **kwargs: Any) -> Any:
        name = batch.extras.get(PERTURB_TAG)
        if name:
            with torch.no_grad():
                params[name].view(-1)[0] += 1e-3
        unused = batch.extras.get(UNUSED_TAG)
        if unused:
            module = model.get_submodule(unused)
            module.forward = torch.no_grad()(module.forward)  # same output, but its weights get no gradient
        try:
            out = forward(batch, *args, **kwargs)
        finally:
            if unused:
                del module.forward
        if batch.extras.get(NAN_TAG):
            out.loss = out.loss * float("nan")
        return out

    model.forward = faulty_forward
    return model


def crash_in_save(at_step: int) -> None:
    """Every rank SIGKILLs itself when it reaches the commit of checkpoint ``at_step`` (its files written)."""
    from train.checkpoint import Checkpointer

    commit = Checkpointer._commit

    def crashing_commit(self: Checkpointer, tmp_path: str, tag: str, step: int, *args: Any) -> str:
        if step == at_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return commit(self, tmp_path, tag, step, *args)

    Checkpointer._commit = crashing_commit


def crash_in_best(at_step: int) -> None:
    """Rank 0 SIGKILLs itself after writing the new `best` pointer's temporary file, before its rename
    (``latest`` already names checkpoint ``at_step``); the other ranks are killed by the harness or hang
    up on the lost peer."""
    from train.checkpoint import BEST, Checkpointer

    write = Checkpointer._write_pointer

    def crashing_write(self: Checkpointer, name: str, text: str) -> None:
        if name == BEST and json.loads(text)["step"] == at_step:
            with open(os.path.join(self.dir, name + ".tmp"), "w") as f:
                f.write(text[: len(text) // 2])  # a torn temporary, as a kill mid-write leaves it
            os.kill(os.getpid(), signal.SIGKILL)
        write(self, name, text)

    Checkpointer._write_pointer = crashing_write


def slow_background_writes(seconds: float) -> None:
    """The checkpoint writer thread sleeps ``seconds`` before each file it writes (the training goes on)."""
    from train.checkpoint.writer import RankWrites

    def slow_jobs(self: RankWrites) -> None:
        self.jobs = [(name, _after_sleep(job, seconds)) for name, job in self.jobs]
        run_jobs(self)

    run_jobs = RankWrites.run_jobs
    RankWrites.run_jobs = slow_jobs


def _after_sleep(job: Callable[[], None], seconds: float) -> Callable[[], None]:
    def slow() -> None:
        time.sleep(seconds)
        job()

    return slow


def full_disk(at_step: int, rank: int, error: str) -> None:
    """Rank ``rank``'s first DeepSpeed file of checkpoint ``at_step`` fails as on a full disk: ``OSError``
    ENOSPC, or ("zip") the RuntimeError torch's zip writer raises after a short write."""
    import errno

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from train.checkpoint import step_tag

    save = TorchCheckpointEngine.save

    def failing_save(self: Any, state_dict: Any, path: str) -> None:
        if int(os.environ.get("RANK", "0")) == rank and step_tag(at_step) in path:
            with open(path, "wb") as f:
                f.write(b"PK" + bytes(1000))  # what was written before the disk filled up
            if error == "zip":
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2373056 vs 2372944")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        save(self, state_dict, path)

    TorchCheckpointEngine.save = failing_save


def wrap_factories(faults: Faults, model_factory: Callable, loader_factory: Callable) -> tuple[Callable, Callable]:
    """The factories ``train()`` takes, with ``faults`` injected; also patches the save if asked."""
    if faults.crash_in_save_at_step:
        crash_in_save(faults.crash_in_save_at_step)
    if faults.crash_in_best_at_step:
        crash_in_best(faults.crash_in_best_at_step)
    if faults.slow_write_s:
        slow_background_writes(faults.slow_write_s)
    if faults.disk_full_at_step:
        full_disk(faults.disk_full_at_step, faults.disk_full_rank, faults.disk_full_error)
    if faults.skip_bucket_check:
        import train.engine

        train.engine.check_bucket_layout = lambda *args, **kwargs: None

    def build_model(model_cfg: Any) -> torch.nn.Module:
        model = model_factory(model_cfg)
        if faults.hetero_experts:
            from tests.helpers.toy_model import make_experts_heterogeneous

            model = make_experts_heterogeneous(model)
        if faults.toy_eval:
            from tests.helpers.eval_toy import with_eval_interface

            model = with_eval_interface(model)
        return patch_forward(model)

    def build_loader(
        data_cfg: Any, batch_size: int, rank: int, world_size: int, start_step: int = 0, **kw: Any
    ) -> FaultyLoader:
        inner = loader_factory(data_cfg, batch_size, rank, world_size, start_step=start_step, **kw)
        return FaultyLoader(inner, faults, rank, start_step)

    return build_model, build_loader
