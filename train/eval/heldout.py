"""Held-out evaluation inside a training run: the numbers that say whether the editor improves.

The training loss says how well the denoiser fits the batches it trains on; it keeps falling while a
run overfits, or while its edits stay noise. Every ``logging.eval_every`` steps (and at the last step)
the loop calls :meth:`HeldOutEval.run` once, which measures on a fixed held-out subset:

* the flow-matching loss on the first ``logging.eval_samples`` samples of ``data.val_shards``, inside
  and outside the fine mask (``train.eval.evaluation.flow_mse_per_sample``: times 0.25 / 0.5 / 0.75 and
  noise from a generator seeded per chunk);
* sampled edits of ``logging.eval_edits`` of them, taken from the tasks in turn (:func:`balanced_by_task`;
  ``logging.eval_edit_steps`` steps, sampler
  noise from a seeded generator), scored by ``train.eval.evaluation.evaluate``, the code ``launch/eval.py``
  runs: success per task and its mean over tasks (``train.eval.edit_success``), L1 inside / outside the
  fine mask, refined-mask IoU.

Why it cannot change the training (a run with evaluation has the same losses as one without): it runs
inside ``rng_untouched`` with its own generators, on the module outside the DeepSpeed engine (no step
counters move), and ``edit`` / ``flow_mse_per_sample`` put the module back in training mode. The EMA
weights, when EMA is on, are copied into the module for the evaluation and the training weights copied
back bit for bit afterwards.

Ranks: every rank evaluates the same samples, like the image grid (``train.logging.edit_grid``). Under
expert parallelism a forward exchanges tokens with the other ranks of its expert group, so every rank
must make the same forwards; under ZeRO 1/2 each rank holds the whole module. Rank 0's numbers are
logged (the others compute the same ones). Evaluation runs eagerly, outside compiled graphs.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any, Callable, Iterator, Optional

import torch

from data.config import DataConfig
from data.shards import expand_shards
from train.config import LoggingConfig
from train.eval.evaluation import EvalSettings, ShardChecks, evaluate, flow_mse_per_sample, nanmean
from train.rng import rng_untouched


@contextlib.contextmanager
def ema_weights(module: torch.nn.Module, ema: Any) -> Iterator[None]:
    """The module holds ``ema``'s weights inside (nothing changes when ``ema`` is None); on exit the
    training weights are restored exactly (copied back from a clone, in their own dtype)."""
    if ema is None:
        yield
        return
    params = dict(module.named_parameters())
    saved: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, shadow in ema.shadow.items():
            saved[name] = params[name].detach().clone()
            params[name].copy_(shadow)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


class HeldOutEval:
    """The held-out samples (kept on the CPU), their success checks, and the evaluation of the module."""

    def __init__(
        self,
        cfg: LoggingConfig,
        samples: Any,
        checks: dict[str, Optional[dict]],
        device: torch.device,
        last_step: int,
        seed: int,
    ) -> None:
        """``cfg`` is the ``logging`` section (``eval_*``); ``last_step`` (``train.steps``) is evaluated too;
        ``seed`` (``run.seed``) seeds the sampled edits."""
        self.every = int(cfg.eval_every)
        self.last_step = int(last_step)
        self.edits = min(int(cfg.eval_edits), samples.batch_size)
        self.edit_index = balanced_by_task(list(samples.task), self.edits)
        self.edit_steps = int(cfg.eval_edit_steps)
        self.batch_size = int(cfg.eval_batch_size)
        self.seed = int(seed)
        self.samples = samples
        self.checks = checks
        self.device = device

    @classmethod
    def build(
        cls,
        cfg: LoggingConfig,
        data: DataConfig,
        val_batch_factory: Callable[[Any, int], Any],
        device: torch.device,
        last_step: int,
        seed: int,
    ) -> "HeldOutEval":
        """Read the held-out subset once (the first ``eval_samples`` of ``data.val_shards``, in file order)
        and the success check of each sample from its shard JSON. Leaves the RNG streams as they were."""
        with rng_untouched():
            samples = val_batch_factory(data, int(cfg.eval_samples))
        checks: dict[str, Optional[dict]] = {}
        if data.val_shards:
            reader = ShardChecks(expand_shards(data.val_shards))
            checks = {key: reader.get(key) for key in samples.keys}
        return cls(cfg, samples, checks, device, last_step, seed)

    def due(self, step: int) -> bool:
        return self.every > 0 and (step % self.every == 0 or step == self.last_step)

    def run(self, module: torch.nn.Module, ema: Any, dtype: torch.dtype) -> dict[str, float]:
        """Collective (every rank, same samples): ``{"val/...": value}``, NaN-valued metrics left out, plus
        ``val/seconds``. Identical weights give identical numbers (fixed samples, noise, times, seeds)."""
        t0 = time.perf_counter()
        with rng_untouched(), ema_weights(module, ema), torch.compiler.set_stance("force_eager"), torch.no_grad():
            metrics = self._flow_loss(module, dtype)
            if self.edits:
                metrics.update(self._edit_metrics(module, dtype))
        out = {k: v for k, v in metrics.items() if not math.isnan(v)}
        out["val/seconds"] = time.perf_counter() - t0
        return out

    def _chunks(self, n: int, index: Optional[list[int]] = None) -> Iterator[Any]:
        """Batches of ``eval_batch_size`` of the samples ``index`` (default: the first ``n``)."""
        index = list(range(n)) if index is None else index
        for start in range(0, len(index), self.batch_size):
            yield self.samples.select(index[start : start + self.batch_size])

    def _flow_loss(self, module: torch.nn.Module, dtype: torch.dtype) -> dict[str, float]:
        values: dict[str, list[float]] = {"val/flow_loss": [], "val/flow_loss_inside": [], "val/flow_loss_outside": []}
        for i, chunk in enumerate(self._chunks(self.samples.batch_size)):
            per_sample = flow_mse_per_sample(module, chunk.to(self.device, dtype), seed=self.seed + i)
            for key, v in zip(values, per_sample):
                values[key].extend(v.tolist())
        return {k: nanmean(v) for k, v in values.items()}

    def _edit_metrics(self, module: torch.nn.Module, dtype: torch.dtype) -> dict[str, float]:
        """The edits of ``eval_edits`` samples spread over the tasks, scored by ``train.eval.evaluation.evaluate``."""

        def batches() -> Iterator[Any]:
            for chunk in self._chunks(self.edits, self.edit_index):
                chunk = chunk.to(self.device, dtype)
                chunk.extras["checks"] = {k: self.checks.get(k) for k in chunk.keys}
                yield chunk

        settings = EvalSettings(
            steps=self.edit_steps,
            limit=self.edits,
            batch_size=self.batch_size,
            seed=self.seed,
            flow_loss=False,
            group_by_task=False,  # one sampler call per chunk: the same calls on every rank, fewer forwards
        )
        result = evaluate(module, batches(), settings, device=str(self.device))
        m = result["metrics"]
        out = {
            "val/success_mean": m.get("success_mean_over_tasks", math.nan),
            "val/success_ci95": m.get("success_mean_over_tasks_ci95", math.nan),
            "val/success_samples": m.get("success", math.nan),
            "val/l1": m["l1"],
            "val/l1_inside": m["l1_inside"],
            "val/l1_outside": m["l1_outside"],
            "val/l1_outside_box": m["l1_outside_box"],
            "val/mask_iou": m["mask_iou"],
        }
        for task, row in sorted(result["per_task"].items()):
            out[f"val/success/{task}"] = row.get("success", math.nan)
        return out


def balanced_by_task(tasks: list[str], n: int) -> list[int]:
    """``n`` sample indices taken from the tasks in turn (in order of first appearance, each task's samples
    in file order), so that a few edits cover every task the held-out subset has: shards written task
    by task would otherwise give the first ``n`` samples one or two tasks."""
    queues: dict[str, list[int]] = {}
    for i, t in enumerate(tasks):
        queues.setdefault(t, []).append(i)
    picked: list[int] = []
    while len(picked) < min(n, len(tasks)):
        for queue in queues.values():
            if queue and len(picked) < n:
                picked.append(queue.pop(0))
    return sorted(picked)
