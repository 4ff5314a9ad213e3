"""The training loop: ``Trainer.train`` is a short loop around ``Trainer.train_step``.

Set-up order matters (``Trainer.__init__``): the config is already validated (launch/train.py) before
we get here; then the process group, the run lock, the checkpoint to resume from (inspected before
the costly model exists), the model (seeded identically on all ranks, so a random-init frozen
backbone is rebuilt bit-identically on resume), the engine, the loader positioned at that step, the
resumed state, and only then the loop.

Faults are injected through the seams the constructor takes (model and loader factories) and the
methods tests may patch (``Checkpointer._commit``); the loop itself has no test switches.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig

from data.config import DataConfig
from data.loader import build_train_loader, build_val_batch
from moe.config import ModelConfig
from moe.encoders import weights_read_seconds
from moe.model import build_model
from train.checkpoint import Checkpointer, Found, Resumed
from train.config import (
    CUDA_GRAPH_MODES,
    TrainConfig,
    as_train_config,
    checkpoint_dir,
    run_dir,
    save_resolved,
    tensorboard_dir,
)
from train.contracts import TrainableModel, TrainLoader, require
from train.distributed import init_distributed
from train.engine import build_engine
from train.eval import HeldOutEval
from train.faults import (
    HangWatchdog,
    PreemptionFlag,
    ReplicaCheck,
    StepGuard,
    acquire_run_lock,
    discard_step,
    is_oom,
    oom_advice,
)
from train.logging import MetricLogger, edit_grid, mean_over_ranks
from train.rng import rng_untouched, seed_everything
from train.timing import StartupClock, TimeBudget, init_device, random_init_parts, use_compile_cache

ModelFactory = Callable[[ModelConfig], TrainableModel]
LoaderFactory = Callable[..., TrainLoader]  # (data section, micro-batch, rank, world size, start_step=...)
ValBatchFactory = Callable[[DataConfig, int], Any]  # (data section, n) -> one batch of held-out samples


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    skipped_steps: int
    preempted: bool
    checkpoint: Optional[str]  # last checkpoint written


@dataclass
class StepResult:
    """What one optimizer step produced (identical on every rank except ``scalars``/``samples``/``tokens``)."""

    step: int  # the step just completed (1-based)
    loss: float  # total loss, mean over ranks (nan when skipped)
    skipped: bool
    reason: str = ""  # why it was skipped
    grad_norm: Optional[float] = None
    scalars: dict[str, float] = field(default_factory=dict)  # this rank's micro-batch means of the loss terms
    samples: int = 0
    tokens: int = 0


def default_factories() -> tuple[ModelFactory, LoaderFactory, ValBatchFactory]:
    """The real model, loader and held-out batch (``tests/helpers`` hands ``train()`` stand-ins instead)."""
    return build_model, build_train_loader, build_val_batch


def train(
    cfg: TrainConfig | DictConfig,
    resume: Optional[str] = None,
    model_factory: Optional[ModelFactory] = None,
    loader_factory: Optional[LoaderFactory] = None,
    val_batch_factory: Optional[ValBatchFactory] = None,
) -> TrainResult:
    """Train ``cfg`` (validated: ``load_config``'s tree or a ``TrainConfig``); ``resume`` is None, "auto" or a
    checkpoint path."""
    defaults = default_factories() if None in (model_factory, loader_factory, val_batch_factory) else (None,) * 3
    trainer = Trainer(
        cfg, resume, model_factory or defaults[0], loader_factory or defaults[1], val_batch_factory or defaults[2]
    )
    try:
        return trainer.train()
    finally:
        trainer.close()


class Trainer:
    """One run: built once, then ``train()``; ``close()`` releases the run lock, logger and watchdog."""

    def __init__(
        self,
        cfg: TrainConfig | DictConfig,
        resume: Optional[str],
        model_factory: ModelFactory,
        loader_factory: LoaderFactory,
        val_batch_factory: ValBatchFactory,
    ) -> None:
        self.startup = StartupClock()  # where the time from launch to the first step goes (train/timing/startup.py)
        self.startup.mark("imports and config")
        # the typed tree (TrainConfig), converted once here; each component is handed its own section
        self.cfg: TrainConfig = as_train_config(cfg)
        cfg = self.cfg
        self.dist = dist = init_distributed()
        self.startup.attach(_rank0_print(dist), torch.cuda.synchronize if dist.on_gpu else None)
        self.lock = acquire_run_lock(run_dir(cfg), dist)  # before anything is written to the run dir
        self.startup.mark("process group and run lock")
        g = cfg.guards
        self.watchdog = HangWatchdog(g.hang_factor, g.hang_min_s, g.hang_warmup_steps, rank=dist.rank)
        self.preempt = PreemptionFlag()
        self.logger: Optional[MetricLogger] = None
        self.losses_file = None
        try:
            self._build(resume, model_factory, loader_factory, val_batch_factory)
        except BaseException:
            self.close()
            raise

    def _build(
        self,
        resume: Optional[str],
        model_factory: ModelFactory,
        loader_factory: LoaderFactory,
        val_batch_factory: ValBatchFactory,
    ) -> None:
        cfg, dist = self.cfg, self.dist
        if dist.is_main:
            save_resolved(cfg, os.path.join(run_dir(cfg), "config.yaml"))
        # ---- which checkpoint to resume, checked against this run's shape before the (costly) model exists
        self.replicas: Optional[ReplicaCheck] = None
        self.ckpt = Checkpointer.for_run(cfg, dist, before_save=self._check_replicas)
        found = self.ckpt.find(resume)
        # the held-out subset is read before the model is built: a missing val_shards stops in a second
        self.heldout = None
        if cfg.logging.eval_every:
            self.heldout = HeldOutEval.build(
                cfg.logging, cfg.data, val_batch_factory, dist.device, cfg.train.steps, cfg.run.seed
            )
        self.val_metrics: tuple[int, dict[str, float]] = (-1, {})  # the last evaluation: (step, metrics)
        self.startup.mark("checkpoint lookup" + (" and held-out samples" if self.heldout else ""))
        model, compiled = self._build_model(model_factory)
        seed_everything(cfg.run.seed + 1 + dist.rank)  # per-rank noise / timesteps from here on
        resumed = self._resume(found, loader_factory)
        space = self.ckpt.space_report(self.engine, found, self.parts.ema is not None)
        self.val_batch = None
        if cfg.logging.images_every:
            with rng_untouched():
                self.val_batch = val_batch_factory(cfg.data, cfg.logging.num_images).to(dist.device, self.parts.dtype)
        self._start_logging(model, found, resumed, compiled)
        self.startup.attach(self.logger.print)
        self.startup.mark("logger" + (" and image batch" if self.val_batch is not None else ""))
        for line in space:
            self.logger.print(line)
        self._start_budget()
        self.guard = StepGuard(cfg.guards.max_consecutive_skips)
        self.batches = iter(self.loader)

    def _build_model(self, model_factory: ModelFactory) -> tuple[TrainableModel, Optional[str]]:
        """The model and its engine, seeded alike on every rank (identical dense init, identical frozen
        weights), compiled when ``train.compile`` asks; (model, the compile summary or None)."""
        cfg = self.cfg
        seed_everything(cfg.run.seed)
        device = init_device(cfg, self.dist.device)
        read_before = weights_read_seconds()
        with torch.device(device):  # random-init parts drawn where they will train, not on the CPU then moved
            model = model_factory(cfg.model)
        require(model, TrainableModel, "the model factory's model")
        read = weights_read_seconds() - read_before
        drawn = random_init_parts(cfg.model)
        self.startup.mark(
            "model build",
            (f", of which {read:.1f} s reading weights from local folders" if read else "")
            + (f"; random frozen weights ({', '.join(drawn)}) drawn on {device}" if drawn else ""),
        )
        if drawn and device.type != "cpu":
            self.startup.print(
                f"note: the random frozen weights of {', '.join(drawn)} were drawn on {device.type}: "
                "launch/export.py, launch/eval.py and launch/edit.py rebuild them on the CPU, with other values "
                "(train.init_on_device=false draws them on the CPU)"
            )
        self.parts = build_engine(cfg, model, self.dist)
        self.engine = self.parts.deepspeed
        self.replicas = ReplicaCheck(self.engine.module, cfg.guards.replica_check_every)
        self.startup.mark("engine")
        compiled = None
        # compiled in place (parameter names do not change) and lazily (traced at the first step), after the
        # engine has cast the parameters: what can be traced whole depends on their dtype
        if cfg.train.compile:
            cache = use_compile_cache(cfg)  # before anything compiles: a resumed run reuses the graphs
            mode = {} if cfg.train.compile_mode == "default" else {"mode": cfg.train.compile_mode}
            compiled = model.compile_regions(backend=cfg.train.compile_backend, **mode)
            self.startup.mark("compile set-up", f" (graphs compile in the first step; cache {cache})")
        # CUDA graph trees are told where each optimizer step begins: the outputs of the step before (its
        # gradients included) are dead by then; inside a step the trees track which outputs are alive
        self.cuda_graphs = cfg.train.compile and cfg.train.compile_mode in CUDA_GRAPH_MODES
        return model, compiled

    def _resume(self, found: Optional[Found], loader_factory: LoaderFactory) -> Optional[Resumed]:
        """The loader positioned at the resumed step, and everything ``found`` holds loaded (None: a fresh start)."""
        cfg, dist = self.cfg, self.dist
        self.loader = loader_factory(
            cfg.data, cfg.train.micro_batch, dist.rank, dist.world_size, start_step=found.step if found else 0
        )
        require(self.loader, TrainLoader, "the loader factory's loader")
        self.startup.mark("loader")
        resumed = self.ckpt.load(self.engine, found, self.loader, self.parts.ema) if found else None
        if found:
            self.startup.mark(f"checkpoint load ({found.tag})")
        self.step = resumed.step if resumed else 0
        self.last_ckpt: Optional[str] = None
        if found and found.portable:  # a native checkpoint of the new shape at once: `--resume auto` works from here
            self.last_ckpt = self.ckpt.save(self.engine, self.step, self.loader, self.parts.ema)
        return resumed

    def _start_logging(
        self, model: TrainableModel, found: Optional[Found], resumed: Optional[Resumed], compiled: Optional[str]
    ) -> None:
        """The metric logger, the run's first line (where everything is, what was resumed and compiled) and
        ``losses.jsonl`` (rank 0)."""
        cfg, dist = self.cfg, self.dist
        self.logger = MetricLogger(
            cfg.logging,
            dist,
            tensorboard_dir(cfg),
            os.path.join(run_dir(cfg), "images"),
            cfg.train.steps,
            self.step,
            float(model.flops_per_token()),
        )
        self.logger.print(
            f"run dir {os.path.abspath(run_dir(cfg))} | tensorboard --logdir {os.path.abspath(tensorboard_dir(cfg))}"
            f" | checkpoints {os.path.abspath(checkpoint_dir(cfg))}"
            + (f" | {self.lock.note}" if self.lock.note else "")
            + (f" | resumed from {found.tag} at step {self.step}" if found else "")
            + (f" ({found.note})" if found and found.note else "")
            + (f" | compiled ({cfg.train.compile_backend}, {cfg.train.compile_mode}): {compiled}" if compiled else "")
            + (f" ({resumed.note})" if resumed and resumed.note else "")
        )
        if cfg.checkpoint.best_metric and cfg.checkpoint.every % cfg.logging.eval_every:
            self.logger.print(
                f"warning: checkpoint.every ({cfg.checkpoint.every}) is not a multiple of logging.eval_every "
                f"({cfg.logging.eval_every}): only checkpoints at evaluated steps compete for 'best'"
            )
        self.losses_file = open(os.path.join(run_dir(cfg), "losses.jsonl"), "a") if dist.is_main else None

    def _start_budget(self) -> None:
        """The step count: train.steps, or, with train.time_budget_s, what the budget decides once its
        calibration steps are timed (a run resumed past them keeps the count its checkpoint's schedule holds)."""
        t = self.cfg.train
        self.budget = TimeBudget(t.time_budget_s, t.time_budget_calibration, t.steps, self.step)
        if t.time_budget_s and not self.budget.active:
            self._set_total_steps(int(self.parts.scheduler.total))
        else:
            self._set_total_steps(t.steps)  # a changed train.steps on resume is honoured, as always

    def _set_total_steps(self, steps: int) -> None:
        self.total_steps = steps
        self.parts.scheduler.total = steps  # the cosine ends here
        if self.heldout is not None:
            self.heldout.last_step = steps
        self.logger.set_total(steps)

    def _apply_budget(self) -> None:
        """At the end of the budget's calibration: set the step count it decides, and say so."""
        decision = self.budget.decide(self.step, lambda d: mean_over_ranks(d, self.dist.device))
        if decision is not None:
            self._set_total_steps(decision.steps)
            self.logger.print(
                f"time budget {self.cfg.train.time_budget_s:.0f} s: {decision.step_s:.3f} s a step after "
                f"{decision.elapsed_s:.0f} s for {self.step} steps -> {decision.steps} steps"
                + (" (train.steps caps it)" if decision.steps == self.cfg.train.steps else "")
            )

    # ------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        preempted = False
        while self.step < self.total_steps:
            self.budget.step_started(self.step + 1)
            with self.watchdog.step(self.step + 1):
                self.watchdog.phase("all-reduce: preemption flag")
                if self.preempt.should_stop(self.dist.device):  # collective: every rank stops at the same boundary
                    preempted = True
                    break
                result = self.train_step()
            self.step = result.step
            self.watchdog.phase(f"step {self.step}: checkpoint commit")
            self.ckpt.poll(self.step)  # a checkpoint written beside the training is committed once all have it
            self.record(result)
            self._apply_budget()
            self.watchdog.phase(f"step {self.step}: replica check / checkpoint")
            self.replicas.maybe_check(self.step)
            self.last_ckpt = (
                self.ckpt.maybe_save(self.engine, self.step, self.loader, self.parts.ema, self._metrics_at(self.step))
                or self.last_ckpt
            )
            self._log_checkpoints()
        self.watchdog.phase(f"step {self.step}: final checkpoint")
        self.last_ckpt = (  # and waits for every write: the process may exit after this
            self.ckpt.save_final(self.engine, self.step, self.loader, self.parts.ema, self._metrics_at(self.step))
            or self.last_ckpt
        )
        self._log_checkpoints()
        took = "" if self.budget.t0 is None else f", {time.perf_counter() - self.budget.t0:.0f} s of training"
        self.logger.print(
            ("preempted: " if preempted else "done: ") + f"step {self.step}, checkpoint "
            f"{self.last_ckpt}, {self.guard.total} skipped steps{took}"
        )
        return TrainResult(
            step=self.step, skipped_steps=self.guard.total, preempted=preempted, checkpoint=self.last_ckpt
        )

    def train_step(self) -> StepResult:
        """One optimizer step: ``grad_accum`` micro-batches, each forward -> agreed loss check -> backward.

        A non-finite loss (on any rank) or gradient norm skips the whole step on every rank; the
        remaining micro-batches are still drawn so data positions stay deterministic.
        """
        cfg, engine, phase = self.cfg, self.engine, self._phase
        gas = cfg.train.grad_accum
        res = StepResult(step=self.step + 1, loss=float("nan"), skipped=False)
        stepped_micro = 0
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()
        try:
            for micro in range(gas):
                phase("data")
                batch = _next_batch(self.batches)
                if res.skipped:
                    continue
                batch = batch.to(self.dist.device, self.parts.dtype)
                phase("forward (expert all-to-alls)")
                out = engine(batch)
                phase("all-reduce: loss check")
                if self.guard.loss_is_bad(out.loss):
                    res.skipped, res.reason = True, "non-finite loss"
                    continue
                phase("backward (gradient reduction)")
                engine.backward(out.loss)
                _accumulate(res.scalars, out.loss, out, gas)
                res.samples += batch.batch_size
                res.tokens += int(out.num_tokens)
                if micro < gas - 1:
                    engine.step()  # not a boundary: DeepSpeed only counts the micro-step
                    stepped_micro += 1
            if not res.skipped and cfg.train.zero_stage == 0:  # ZeRO 1/2: DeepSpeed checks and reports it
                phase("all-reduce: gradient norm")
                res.grad_norm = self.guard.grad_norm(engine.module, self.dist.device, cfg.model.experts.ep_size)
                if not math.isfinite(res.grad_norm):
                    res.skipped, res.reason = True, "non-finite gradient norm"
            phase("optimizer step")
            if res.skipped:
                discard_step(engine, gas - stepped_micro)
            else:
                engine.step()
                if not engine.was_step_applied():  # ZeRO 1/2 found a non-finite grad norm
                    res.skipped, res.reason = True, "non-finite gradient norm"
                if res.grad_norm is None and engine.get_global_grad_norm() is not None:
                    res.grad_norm = float(engine.get_global_grad_norm())
        except RuntimeError as e:
            if is_oom(e):
                raise RuntimeError(f"step {res.step}: {oom_advice(cfg)}") from e
            raise
        phase("all-reduce: loss mean")
        res.loss = mean_over_ranks({"loss": res.scalars.get("loss/total", float("nan"))}, self.dist.device)["loss"]
        return res

    def _phase(self, name: str) -> None:
        """The step entered phase ``name``: for the watchdog, and in the first step for the start-up timing."""
        self.watchdog.phase(name)
        if self.startup is not None:
            self.startup.step_phase(name)

    def record(self, res: StepResult) -> None:
        """After a step: EMA, the held-out evaluation, losses.jsonl, the skip guard, console/TensorBoard, images."""
        cfg, step = self.cfg, res.step
        if self.startup is not None:  # the first step of this process: where the start-up time went
            self.startup.first_step_done()
            self.logger.scalars(step, self.startup.scalars())
            self.startup = None
        if not res.skipped and self.parts.ema is not None:
            self.parts.ema.update(self.engine.module)
        val = self.evaluate_heldout(step)
        if self.losses_file:
            line = {"step": step, "loss": res.loss, "skipped": res.skipped} | ({"val": val} if val else {})
            self.losses_file.write(json.dumps(line) + "\n")
            self.losses_file.flush()
        self.guard.record(res.skipped, step, res.reason)  # raises TooManySkippedSteps (same step on all ranks)
        if res.skipped:
            self.logger.print(
                f"step {step}: skipped ({res.reason}); {self.guard.consecutive} in a row, {self.guard.total} total"
            )
        if res.grad_norm is not None and not res.skipped:
            res.scalars["opt/grad_norm"] = res.grad_norm
        self.logger.accumulate(res.scalars, res.samples, res.tokens)
        if step % cfg.logging.every == 0 or step == self.total_steps:
            extra = {"opt/lr": self.parts.scheduler.get_last_lr()[0], "guard/skipped_steps": float(self.guard.total)}
            extra.update({f"data/{k}": float(v) for k, v in self.loader.skip_stats().items()})
            self.logger.flush(step, extra)
            # a router that sends every token of a sample the same way (or is certain everywhere)
            # trains no specialisation: say so where the user looks
            for line in self.engine.module.routing_warnings(res.scalars):
                self.logger.print(f"step {step}: warning: {line}")
        if self.val_batch is not None and step % cfg.logging.images_every == 0:
            self.watchdog.phase(f"step {step}: image grid")
            with rng_untouched():  # sampling runs eagerly (edit_grid), outside the graphs
                grid = edit_grid(self.engine.module, self.val_batch, cfg.logging.edit_steps, seed=cfg.run.seed)
            self.logger.image_grid(step, grid)

    def evaluate_heldout(self, step: int) -> dict[str, float]:
        """The held-out evaluation when it is due (collective: every rank), logged by rank 0; {} otherwise."""
        if self.heldout is None or not self.heldout.due(step):
            return {}
        self.watchdog.phase(f"step {step}: held-out evaluation")
        metrics = self.heldout.run(self.engine.module, self.parts.ema, self.parts.dtype)
        self.val_metrics = (step, metrics)
        self.logger.eval_metrics(step, metrics)
        return metrics

    def _metrics_at(self, step: int) -> Optional[dict[str, float]]:
        """The held-out metrics of ``step`` for its checkpoint (the `best` pointer), if it was evaluated."""
        return self.val_metrics[1] if self.val_metrics[0] == step else None

    def _check_replicas(self, step: int) -> None:
        """Run before every checkpoint write: a checkpoint of diverged replicas is never committed."""
        if self.replicas is not None:
            self.replicas.check(step)

    def _log_checkpoints(self) -> None:
        """A line and TensorBoard scalars for each checkpoint committed since the last call."""
        for report in self.ckpt.reports():
            self.logger.checkpoint_saved(report)

    def close(self) -> None:
        if getattr(self, "ckpt", None) is not None:
            self.ckpt.close()
        self.watchdog.close()
        self.preempt.restore()
        if self.logger is not None:
            self.logger.close()
        if self.losses_file:
            self.losses_file.close()
        self.lock.release()


def _rank0_print(dist: Any) -> Callable[[str], None]:
    return (lambda line: print(line, flush=True)) if dist.is_main else (lambda line: None)


def _next_batch(batches: Any) -> Any:
    """The next batch, without letting the data path touch the training RNG.

    torch's DataLoader draws its workers' base seed from the global CPU generator when an iterator
    is created, which happens at step 1 of a fresh run but right after the RNG restore of a resumed
    one; that one draw shifted every later noise sample and broke exact resume.
    """
    with torch.random.fork_rng(devices=[]):
        return next(batches)


def _accumulate(scalars: dict[str, float], loss: torch.Tensor, out: Any, gas: int) -> None:
    """Micro-batch means of the total loss, every unweighted term and the expert utilisation."""
    items = {"loss/total": loss}
    items.update({f"loss/{k}": v for k, v in out.terms.items()})
    for k, v in items.items():
        scalars[k] = scalars.get(k, 0.0) + float(v.detach()) / gas
    for k, v in out.stats.items():
        scalars[k] = scalars.get(k, 0.0) + float(v) / gas
