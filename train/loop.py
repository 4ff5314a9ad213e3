"""The training loop. One optimizer step reads top to bottom in ``train`` below.

Set-up order matters: the config is already validated (launch/train.py) before we get here; then
the process group, the model (seeded identically on all ranks, so a random-init frozen backbone is
rebuilt bit-identically on resume), the engine, the checkpoint to resume from, the loader positioned
at that step, and only then the loop.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf

from train.checkpoint import Checkpointer, rng_untouched, seed_everything
from train.config import CUDA_GRAPH_MODES, checkpoint_dir, run_dir, save_resolved, tensorboard_dir
from train.distributed import DistInfo, init_distributed
from train.engine import build_engine
from train.guards import StepGuard, discard_step, is_oom, oom_advice
from train.logging import MetricLogger, edit_grid, mean_over_ranks
from train.signals import PreemptionFlag

ModelFactory = Callable[[Any], torch.nn.Module]
LoaderFactory = Callable[..., Any]


@dataclass
class TrainResult:
    step: int  # optimizer steps completed
    skipped_steps: int
    preempted: bool
    checkpoint: Optional[str]  # last checkpoint written


def default_factories() -> tuple[ModelFactory, LoaderFactory, Callable[[Any, int], Any]]:
    from data.loader import build_train_loader, build_val_batch
    from moe.model import build_model

    return build_model, build_train_loader, build_val_batch


def train(cfg: Any, resume: Optional[str] = None, model_factory: Optional[ModelFactory] = None,
          loader_factory: Optional[LoaderFactory] = None,
          val_batch_factory: Optional[Callable[[Any, int], Any]] = None) -> TrainResult:
    """Train ``cfg`` (validated, read-only); ``resume`` is None, "auto" or a checkpoint path."""
    if model_factory is None or loader_factory is None or val_batch_factory is None:
        defaults = default_factories()
        model_factory = model_factory or defaults[0]
        loader_factory = loader_factory or defaults[1]
        val_batch_factory = val_batch_factory or defaults[2]
    dist = init_distributed()
    os.makedirs(run_dir(cfg), exist_ok=True)
    if dist.is_main:
        save_resolved(cfg, os.path.join(run_dir(cfg), "config.yaml"))
    # ---- which checkpoint to resume, checked against this run's shape before the (costly) model exists
    ckpt = Checkpointer(cfg, dist, crash_hook=_crash_hook(cfg, dist))
    found = ckpt.find(resume)

    # ---- model + engine (same seed on every rank: identical dense init, identical frozen weights)
    seed_everything(cfg.run.seed)
    model_cfg = OmegaConf.to_object(cfg.model)
    data_cfg = OmegaConf.to_object(cfg.data)
    model = model_factory(model_cfg)
    eng = build_engine(cfg, model, dist)
    engine = eng.engine
    compiled = None
    # compiled in place (parameter names do not change) and lazily (traced at the first step), after the
    # engine has cast the parameters: what can be traced whole depends on their dtype
    if cfg.train.compile and hasattr(model, "compile_regions"):
        mode = {} if cfg.train.compile_mode == "default" else {"mode": cfg.train.compile_mode}
        compiled = model.compile_regions(backend=cfg.train.compile_backend, **mode)
    # CUDA graph trees are told where each optimizer step begins: the outputs of the step before (its
    # gradients included) are dead by then; inside a step the trees track which outputs are alive
    cuda_graphs = cfg.train.compile and cfg.train.compile_mode in CUDA_GRAPH_MODES
    seed_everything(cfg.run.seed + 1 + dist.rank)  # per-rank noise / timesteps from here on

    # ---- resume: position the loader, load everything
    start_step = found.step if found else 0
    loader = loader_factory(data_cfg, cfg.train.micro_batch, dist.rank, dist.world_size, start_step=start_step)
    resumed = ckpt.load(engine, found, loader, eng.ema) if found else None
    start_step = resumed.step if resumed else 0
    reshaped_ckpt = None
    if found and found.portable:  # a native checkpoint of the new shape at once: `--resume auto` works from here
        reshaped_ckpt = ckpt.save(engine, start_step, loader, eng.ema)
    val_batch = None
    if cfg.logging.images_every:
        with rng_untouched():
            val_batch = val_batch_factory(data_cfg, cfg.logging.num_images).to(dist.device, eng.dtype)

    logger = MetricLogger(cfg, dist, tensorboard_dir(cfg), os.path.join(run_dir(cfg), "images"), cfg.train.steps,
                          start_step, _flops_per_token(engine.module))
    logger.print(f"run dir {os.path.abspath(run_dir(cfg))} | tensorboard --logdir {os.path.abspath(tensorboard_dir(cfg))}"
                 f" | checkpoints {os.path.abspath(checkpoint_dir(cfg))}"
                 + (f" | resumed from {found.tag} at step {start_step}" if found else "")
                 + (f" | compiled ({cfg.train.compile_backend}, {cfg.train.compile_mode}): {compiled}" if compiled else "")
                 + (f" ({resumed.note})" if resumed and resumed.note else ""))
    losses_file = open(os.path.join(run_dir(cfg), "losses.jsonl"), "a") if dist.is_main else None
    guard = StepGuard(cfg.guards.max_consecutive_skips)
    preempt = PreemptionFlag()
    nan_steps = set(cfg.debug.nan_at_steps)
    gas = cfg.train.grad_accum
    step, last_ckpt, preempted = start_step, reshaped_ckpt, False
    batches = iter(loader)
    try:
        while step < cfg.train.steps:
            if preempt.should_stop(dist.device):  # collective: every rank stops at the same boundary
                preempted = True
                break
            t_step = time.perf_counter()
            # ---- one optimizer step: gas micro-batches, each forward -> agreed loss check -> backward
            skipped, reason, stepped_micro, scalars, samples, tokens = False, "", 0, {}, 0, 0
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            try:
                for micro in range(gas):
                    batch = _next_batch(batches)
                    if skipped:
                        continue  # keep consuming data so positions stay deterministic
                    batch = batch.to(dist.device, eng.dtype)
                    out = engine(batch)
                    loss = out.loss
                    if step + 1 in nan_steps and dist.rank == 0:  # test hook: poison one rank only
                        loss = loss * float("nan")
                    if guard.loss_is_bad(loss):
                        skipped, reason = True, "non-finite loss"
                        continue
                    engine.backward(loss)
                    _accumulate(scalars, loss, out, gas)
                    samples += batch.batch_size
                    tokens += int(out.num_tokens)
                    if micro < gas - 1:
                        engine.step()  # not a boundary: DeepSpeed only counts the micro-step
                        stepped_micro += 1
                grad_norm = None
                if not skipped and cfg.train.zero_stage == 0:  # ZeRO 1/2: DeepSpeed checks and reports it
                    grad_norm = guard.grad_norm(engine.module, dist.device, cfg.model.experts.ep_size)
                    if not math.isfinite(grad_norm):
                        skipped, reason = True, "non-finite gradient norm"
                if skipped:
                    discard_step(engine, gas - stepped_micro)
                else:
                    engine.step()
                    if not engine.was_step_applied():  # ZeRO 1/2 found a non-finite grad norm
                        skipped, reason = True, "non-finite gradient norm"
                    if grad_norm is None and engine.get_global_grad_norm() is not None:
                        grad_norm = float(engine.get_global_grad_norm())
            except RuntimeError as e:
                if is_oom(e):
                    raise RuntimeError(f"step {step + 1}: {oom_advice(cfg)}") from e
                raise
            step += 1
            step_loss = mean_over_ranks({"loss": scalars.get("loss/total", float("nan"))}, dist.device)["loss"]
            if losses_file:
                losses_file.write(json.dumps({"step": step, "loss": step_loss, "skipped": skipped}) + "\n")
                losses_file.flush()
            guard.record(skipped, step, reason)  # raises TooManySkippedSteps (same step on all ranks)
            if skipped:
                logger.print(f"step {step}: skipped ({reason}); {guard.consecutive} in a row, {guard.total} total")
            elif eng.ema is not None:
                eng.ema.update(engine.module)
            if cfg.debug.step_sleep_s:
                time.sleep(max(0.0, cfg.debug.step_sleep_s - (time.perf_counter() - t_step)))

            # ---- bookkeeping: logs, images, checkpoints
            if grad_norm is not None and not skipped:
                scalars["opt/grad_norm"] = grad_norm
            logger.accumulate(scalars, samples, tokens)
            if step % cfg.logging.every == 0 or step == cfg.train.steps:
                extra = {"opt/lr": eng.scheduler.get_last_lr()[0], "guard/skipped_steps": float(guard.total)}
                extra.update({f"data/{k}": float(v) for k, v in _skip_stats(loader).items()})
                logger.flush(step, extra)
            if val_batch is not None and step % cfg.logging.images_every == 0:
                with rng_untouched():  # sampling runs eagerly (edit_grid), outside the graphs
                    grid = edit_grid(engine.module, val_batch, cfg.logging.edit_steps, seed=cfg.run.seed)
                logger.image_grid(step, grid)
            if step % cfg.checkpoint.every == 0:
                last_ckpt = ckpt.save(engine, step, loader, eng.ema)
        if last_ckpt is None or not last_ckpt.endswith(f"{step:08d}"):
            last_ckpt = ckpt.save(engine, step, loader, eng.ema)
        logger.print(("preempted: " if preempted else "done: ") + f"step {step}, checkpoint {last_ckpt}, "
                     f"{guard.total} skipped steps")
    finally:
        preempt.restore()
        logger.close()
        if losses_file:
            losses_file.close()
    return TrainResult(step=step, skipped_steps=guard.total, preempted=preempted, checkpoint=last_ckpt)


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


def _skip_stats(loader: Any) -> dict[str, int]:
    return loader.skip_stats() if hasattr(loader, "skip_stats") else {}


def _flops_per_token(model: torch.nn.Module) -> float:
    return float(model.flops_per_token()) if hasattr(model, "flops_per_token") else 0.0


def _crash_hook(cfg: Any, dist: DistInfo) -> Optional[Callable[[int], None]]:
    """Test hook: rank 0 SIGKILLs itself mid-save (shards written, ``latest`` not yet updated)."""
    at = int(cfg.debug.crash_in_save_at_step)
    if at < 0:
        return None

    def hook(step: int) -> None:
        if step == at and dist.is_main:
            os.kill(os.getpid(), signal.SIGKILL)

    return hook
