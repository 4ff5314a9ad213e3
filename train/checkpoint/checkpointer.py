"""The checkpointer of a run: when to save, the commit protocol, ``best``, pruning; resume through it.

What DeepSpeed does (0.19.8, ``DeepSpeedEngine.save_checkpoint``): every rank writes its shards into
``<dir>/<tag>/``, then rank 0 rewrites ``<dir>/latest`` with ``open(..., "w")`` *before* the final
barrier, i.e. while other ranks may still be writing, and non-atomically (a kill between truncate and
write leaves an empty pointer). So we pass ``save_latest=False`` and commit ourselves:

1. all ranks save under a temporary tag ``.tmp-<tag>`` (DeepSpeed shards + our per-rank
   ``train_state_rank<r>.pt``: step, loader position, RNG states, EMA; rank 0 adds ``config.yaml``),
   and fsync every file they wrote (DeepSpeed's go through ``engine.checkpoint_engine.save``, which
   we wrap to fsync and record each file's size);
2. the ranks gather {file: size} of everything written (this is also the barrier: every shard of
   every rank is on disk);
3. rank 0 writes the completeness marker ``complete.json`` (step, world size, every file and its
   size), fsyncs it and the directory, renames ``.tmp-<tag>`` to ``<tag>`` (atomic on POSIX), fsyncs
   the checkpoint directory, writes ``latest.tmp``, fsyncs and ``os.replace``-s it onto ``latest``
   (atomic), fsyncs again, moves ``best`` the same way when this checkpoint improves the held-out
   metric, then deletes checkpoints beyond the last K (never the one ``best`` names).

A kill at any point leaves ``latest`` naming the previous complete checkpoint; a stale ``.tmp-*``
directory is ignored and removed by the next save.

``best`` (with ``checkpoint.best_metric``): a JSON pointer ``{"tag", "step", "metric", "mode",
"value"}`` to the checkpoint whose held-out metric (``train/eval/heldout.py``, evaluated at the
checkpoint's step) is the best so far; it moves only on a strict improvement. Each checkpoint's
``complete.json`` records the held-out metrics of its step, and ``best`` is chosen among the complete
checkpoints on disk (the previous best is never pruned), so a pointer lost to a kill, or one for another
metric, is rebuilt at the next save.

Each rank also records its ``layout`` (``train/checkpoint/layout.py``) so that
``python -m launch.reshape_checkpoint`` can turn the checkpoint into a portable one
(``train/checkpoint/portable.py``), which ``--resume`` loads at any shape (``resume.py``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from typing import Any, Callable, Optional

import torch
from omegaconf import OmegaConf

from train.checkpoint.disk import (
    BEST,
    COMPLETE,
    LATEST,
    STEP_TAG,
    TMP_PREFIX,
    checkpoint_metrics,
    fsync_dir,
    fsync_file,
    gather_files,
    improves,
    read_best,
    recording_saves,
    step_tag,
    write_pointer,
)
from train.checkpoint.layout import capture_layout
from train.checkpoint.resume import Found, Resumed, find_checkpoint, load_converted, load_native
from train.config import CheckpointConfig, TrainConfig, checkpoint_dir
from train.contracts import Resumable
from train.distributed import DistInfo, barrier
from train.rng import rng_state


class Checkpointer:
    """Decides when to save, saves and loads the whole training state (commit protocol: module docstring).

    ``before_save(step)`` runs on every rank before anything of a checkpoint is written (the trainer
    passes its replica-consistency check): if it raises, ``latest`` keeps naming the previous one.
    """

    def __init__(
        self,
        cfg: CheckpointConfig,
        directory: str,
        dist: DistInfo,
        *,
        ep_size: int,
        zero_stage: int,
        seed: int,
        config_yaml: str,
        before_save: Optional[Callable[[int], None]] = None,
    ) -> None:
        """``cfg`` is the ``checkpoint`` section. The rest is what a checkpoint records or checks beyond it:
        the run's parallel shape (``ep_size``, ``zero_stage``; the world size is ``dist``'s), the seed a
        reshaped resume reseeds from, and the resolved config written into every checkpoint."""
        self.cfg = cfg
        self.dist = dist
        self.dir = directory
        self.every = int(cfg.every)
        self.keep = int(cfg.keep)
        self.ep_size, self.zero_stage, self.seed = int(ep_size), int(zero_stage), int(seed)
        self.config_yaml = config_yaml
        self.before_save = before_save
        self.saved_step: Optional[int] = None  # the step of the last checkpoint this process wrote
        self._layout: Optional[dict] = None
        os.makedirs(self.dir, exist_ok=True)

    @classmethod
    def for_run(
        cls, cfg: TrainConfig, dist: DistInfo, before_save: Optional[Callable[[int], None]] = None
    ) -> "Checkpointer":
        """The checkpointer of a run's whole config (``TrainConfig`` or the tree ``load_config`` returns):
        the one place that picks its section and the few facts of other sections it needs."""
        return cls(
            cfg.checkpoint,
            checkpoint_dir(cfg),
            dist,
            ep_size=cfg.model.experts.ep_size,
            zero_stage=cfg.train.zero_stage,
            seed=cfg.run.seed,
            config_yaml=OmegaConf.to_yaml(cfg, resolve=True),
            before_save=before_save,
        )

    # ---------------------------------------------------------------- save
    def maybe_save(
        self, engine: Any, step: int, loader: Resumable, ema: Any = None, metrics: Optional[dict[str, float]] = None
    ) -> Optional[str]:
        """Save at every ``checkpoint.every``-th step; the path written, or None."""
        if step % self.every == 0:
            return self.save(engine, step, loader, ema, metrics)
        return None

    def save_final(
        self, engine: Any, step: int, loader: Resumable, ema: Any = None, metrics: Optional[dict[str, float]] = None
    ) -> Optional[str]:
        """Save at the end of a run (done or preempted) unless this step is already saved."""
        if self.saved_step == step:
            return None
        return self.save(engine, step, loader, ema, metrics)

    def save(
        self, engine: Any, step: int, loader: Resumable, ema: Any = None, metrics: Optional[dict[str, float]] = None
    ) -> str:
        """Collective: write checkpoint ``step`` under a temporary name, then commit it (rank 0).

        ``metrics``: the held-out evaluation of this step (rank 0's are used), recorded in ``complete.json``
        and judged for the ``best`` pointer; None when the step was not evaluated."""
        if self.before_save is not None:
            self.before_save(step)
        tag = step_tag(step)
        tmp_path = os.path.join(self.dir, TMP_PREFIX + tag)
        if self.dist.is_main and os.path.exists(tmp_path):
            shutil.rmtree(tmp_path)
        barrier()
        written = self._write(engine, tmp_path, step, loader, ema)
        files = gather_files(written)  # also the barrier: every shard of every rank is on disk
        final = self._commit(tmp_path, tag, step, files, metrics)
        barrier()
        self.saved_step = step
        return final

    def _write(self, engine: Any, tmp_path: str, step: int, loader: Resumable, ema: Any) -> dict[str, int]:
        """This rank's part, every file fsynced: DeepSpeed's shards, ``train_state_rank<r>.pt``, rank 0 the
        config. Returns {file name: size} of what this rank wrote."""
        written: dict[str, int] = {}
        with recording_saves(engine, tmp_path, written):
            engine.save_checkpoint(
                self.dir,
                tag=os.path.basename(tmp_path),
                client_state={"step": step},
                save_latest=False,
                exclude_frozen_parameters=True,
            )
        if self._layout is None:  # fixed for the run: which optimizer slot holds which global parameter
            self._layout = capture_layout(engine, self.dist.rank, self.dist.world_size, self.ep_size)
        state = {
            "step": step,
            "rank": self.dist.rank,
            "world_size": self.dist.world_size,
            "loader": loader.state_dict(),
            "rng": rng_state(),
            "layout": self._layout,
        }
        if ema is not None:
            state["ema"] = ema.state_dict()
        name = f"train_state_rank{self.dist.rank}.pt"
        with open(os.path.join(tmp_path, name), "wb") as f:
            torch.save(state, f)
            written[name] = fsync_file(f)
        if self.dist.is_main:
            with open(os.path.join(tmp_path, "config.yaml"), "w") as f:
                f.write(self.config_yaml)
                written["config.yaml"] = fsync_file(f)
        fsync_dir(tmp_path)
        return written

    def _commit(
        self, tmp_path: str, tag: str, step: int, files: dict[str, int], metrics: Optional[dict[str, float]] = None
    ) -> str:
        """Rank 0: the completeness marker, then rename the directory to ``tag``, move ``latest`` (and
        ``best`` on an improvement), prune."""
        final = os.path.join(self.dir, tag)
        if self.dist.is_main:
            marker = {"step": step, "world_size": self.dist.world_size, "files": files}
            if metrics:
                marker["metrics"] = metrics
            with open(os.path.join(tmp_path, COMPLETE), "w") as f:
                json.dump(marker, f, indent=0)
                fsync_file(f)
            fsync_dir(tmp_path)
            if os.path.exists(final):  # re-saving the same step (e.g. end right after a periodic save)
                self._unpoint_best(tag)  # `best` never names a directory being replaced
                shutil.rmtree(final)
            os.replace(tmp_path, final)
            fsync_dir(self.dir)
            self._write_pointer(LATEST, tag)
            self._update_best()
            self._prune(step)
        return final

    def _write_pointer(self, name: str, text: str) -> None:
        """Replace ``<dir>/<name>`` atomically (a method: the fault tests interrupt it)."""
        write_pointer(self.dir, name, text)

    # ---------------------------------------------------------------- best
    def _update_best(self) -> None:
        """Point ``best`` at the complete checkpoint on disk with the best value of ``checkpoint.best_metric``
        in its marker (rank 0, after ``latest``). The previous best is always on disk (never pruned), so the
        pointer moves only to a strictly better checkpoint (a tie keeps the earlier step); a missing pointer,
        or one for another metric, is rebuilt the same way."""
        metric, mode = self.cfg.best_metric, self.cfg.best_mode
        if not metric:
            return
        best: Optional[tuple[str, int, float]] = None
        for tag in sorted(t for t in os.listdir(self.dir) if STEP_TAG.match(t)):  # oldest first: ties keep it
            value = checkpoint_metrics(os.path.join(self.dir, tag)).get(metric)
            if value is not None and math.isfinite(value) and (best is None or improves(value, best[2], mode)):
                best = (tag, int(tag[4:]), float(value))
        if best is None:
            return
        pointer = {"tag": best[0], "step": best[1], "metric": metric, "mode": mode, "value": best[2]}
        if read_best(self.dir) != pointer:
            self._write_pointer(BEST, json.dumps(pointer))

    def _unpoint_best(self, tag: str) -> None:
        """Remove ``best`` if it names ``tag`` (about to be replaced); the next update rebuilds it from disk."""
        pointer = read_best(self.dir)
        if pointer is not None and pointer.get("tag") == tag:
            os.remove(os.path.join(self.dir, BEST))
            fsync_dir(self.dir)

    def _prune(self, step: int) -> None:
        """Keep the last K checkpoints up to ``step`` and the one ``best`` names (later ones, left by a run
        that resumed from an earlier checkpoint, are overwritten as this run reaches their steps)."""
        best = read_best(self.dir)
        tags = sorted(
            t
            for t in os.listdir(self.dir)
            if STEP_TAG.match(t) and int(t[4:]) <= step and os.path.isdir(os.path.join(self.dir, t))
        )
        for t in tags[: -self.keep]:
            if best is not None and t == best["tag"]:
                continue  # the checkpoint `best` names is kept whatever its age
            shutil.rmtree(os.path.join(self.dir, t), ignore_errors=True)
        for t in os.listdir(self.dir):  # stale temporaries from killed saves
            if t.startswith(TMP_PREFIX):
                shutil.rmtree(os.path.join(self.dir, t), ignore_errors=True)

    # ---------------------------------------------------------------- load
    def find(self, resume: Optional[str]) -> Optional[Found]:
        """The checkpoint for ``--resume auto|PATH`` (None: fresh start), inspected: cheap, before the model exists.

        A native checkpoint must match this run's world size, ep_size and ZeRO stage; otherwise its
        conversion at ``<dir>/portable/<tag>`` is used if ``launch.reshape_checkpoint`` wrote one (so
        ``--resume auto``, e.g. in a requeued SLURM job, needs no new argument), else this stops with
        the conversion command. A portable checkpoint fits any shape.
        """
        shape = (self.dist.world_size, self.ep_size, self.zero_stage)
        return find_checkpoint(self.dir, resume, shape, self.dist.is_main)

    def load(self, engine: Any, found: Found, loader: Resumable, ema: Any = None) -> Resumed:
        if found.portable:
            return load_converted(engine, found, loader, ema, self.dist, self.seed)
        return load_native(engine, found, loader, ema, self.dist)
