"""The checkpointer of a run: when to save, the commit protocol, ``best``, pruning; resume through it.

What DeepSpeed does (0.19.8, ``DeepSpeedEngine.save_checkpoint``): every rank writes its shards into
``<dir>/<tag>/``, then rank 0 rewrites ``<dir>/latest`` with ``open(..., "w")`` *before* the final
barrier, i.e. while other ranks may still be writing, and non-atomically (a kill between truncate and
write leaves an empty pointer). So we pass ``save_latest=False`` and commit ourselves:

1. all ranks save under a temporary tag ``.tmp-<tag>`` (DeepSpeed shards + our per-rank
   ``train_state_rank<r>.pt``: step, loader position, RNG states, EMA; rank 0 adds ``config.yaml``),
   and fsync every file they wrote (DeepSpeed's go through ``engine.checkpoint_engine.save``, which
   ``writer.py`` routes to fsync and record each file's size). With ``checkpoint.async_save`` the state
   is copied to host memory at the step boundary and a thread writes it while training goes on
   (``snapshot.py``, ``writer.py``);
2. once every rank has written (at the first step boundary where all say so, or when the next save or
   the end of the run waits for it), the ranks gather {file: size} of everything written and whether a
   write failed; a failure stops every rank with ``CheckpointWriteError`` (``space.py``: for a full disk,
   the folder, the free space and the checkpoint's size) and the partial ``.tmp-<tag>`` is removed;
3. rank 0 writes the completeness marker ``complete.json`` (step, world size, every file and its
   size), fsyncs it and the directory, renames ``.tmp-<tag>`` to ``<tag>`` (atomic on POSIX), fsyncs
   the checkpoint directory, writes ``latest.tmp``, fsyncs and ``os.replace``-s it onto ``latest``
   (atomic), fsyncs again, moves ``best`` the same way when this checkpoint improves the held-out
   metric, then deletes checkpoints beyond the last K (never the one ``best`` names).

One save is in flight at a time: a save first waits for the previous one to be committed, so pruning
and the removal of stale temporaries never touch a checkpoint that is being written.

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
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

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
    improves,
    read_best,
    step_tag,
    write_pointer,
)
from train.checkpoint.layout import capture_layout
from train.checkpoint.resume import Found, Resumed, find_checkpoint, load_converted, load_native
from train.checkpoint.snapshot import snapshot, storage_bytes
from train.checkpoint.space import (
    GB,
    checkpoint_bytes,
    estimate_for_engine,
    gathered,
    space_lines,
    write_error,
)
from train.checkpoint.writer import RankWrites, free_bytes, save_torch, through_engine
from train.config import CheckpointConfig, TrainConfig, checkpoint_dir
from train.contracts import Resumable
from train.distributed import DistInfo, all_ranks_any, barrier
from train.rng import rng_state


@dataclass
class SaveReport:
    """What one committed save cost: the step loop's time in it, the slowest rank's write, the bytes."""

    tag: str
    step: int
    path: str
    asynchronous: bool
    blocked_s: float  # the step loop stood still this long for it (host copy, waiting, commit)
    write_s: float  # the slowest rank's time writing and fsyncing its files
    bytes: int  # every rank's files
    committed_at: int  # the step at whose boundary it was committed (latest moved)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / GB / max(self.write_s, 1e-9)


@dataclass
class _InFlight:
    """The one save that is written but not yet committed (the same on every rank)."""

    step: int
    tag: str
    tmp_path: str
    metrics: Optional[dict[str, float]]
    writes: RankWrites
    asynchronous: bool
    blocked_s: float = 0.0


class Checkpointer:
    """Decides when to save, saves and loads the whole training state (commit protocol: module docstring).

    ``before_save(step)`` runs on every rank before anything of a checkpoint is written (the trainer
    passes its replica-consistency check): if it raises, ``latest`` keeps naming the previous one.

    With ``checkpoint.async_save`` a save copies the state to host memory at the step boundary and
    returns; a thread writes the files while training goes on, and the checkpoint is committed at the
    first step boundary where every rank has finished (``poll``), or when the next save, the end of the
    run or a preemption waits for it (``wait``). One save is in flight at a time. ``reports()`` hands
    the trainer each committed save's timing.
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
        self.asynchronous = bool(cfg.async_save)
        self.ep_size, self.zero_stage, self.seed = int(ep_size), int(zero_stage), int(seed)
        self.config_yaml = config_yaml
        self.before_save = before_save
        self.saved_step: Optional[int] = None  # the step of the last checkpoint this process started to write
        self.step = 0  # the step boundary the trainer is at (for the reports)
        self._layout: Optional[dict] = None
        self._in_flight: Optional[_InFlight] = None
        self._reports: list[SaveReport] = []
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
        """Start a save at every ``checkpoint.every``-th step (committed later with ``checkpoint.async_save``);
        the path the checkpoint has once committed, or None."""
        if step % self.every == 0:
            return self.start_save(engine, step, loader, ema, metrics)
        return None

    def save_final(
        self, engine: Any, step: int, loader: Resumable, ema: Any = None, metrics: Optional[dict[str, float]] = None
    ) -> Optional[str]:
        """Save at the end of a run (done or preempted) unless this step is already saved, and wait until
        every save is committed: the process may exit after this."""
        self.step = step
        path = None if self.saved_step == step else self.start_save(engine, step, loader, ema, metrics)
        self.wait()
        return path

    def save(
        self, engine: Any, step: int, loader: Resumable, ema: Any = None, metrics: Optional[dict[str, float]] = None
    ) -> str:
        """Collective: write checkpoint ``step`` and commit it; returns its path once committed."""
        path = self.start_save(engine, step, loader, ema, metrics)
        self.wait()
        return path

    def start_save(
        self, engine: Any, step: int, loader: Resumable, ema: Any = None, metrics: Optional[dict[str, float]] = None
    ) -> str:
        """Collective: write checkpoint ``step`` under a temporary name, then commit it (rank 0): at once, or
        with ``checkpoint.async_save`` once its files are written (``poll`` / ``wait``). Returns the path
        the checkpoint has once committed.

        ``metrics``: the held-out evaluation of this step (rank 0's are used), recorded in ``complete.json``
        and judged for the ``best`` pointer; None when the step was not evaluated."""
        self.wait()  # one save in flight: the previous one is committed before this one starts
        t0 = time.perf_counter()
        if self.before_save is not None:
            self.before_save(step)
        tag = step_tag(step)
        tmp_path = os.path.join(self.dir, TMP_PREFIX + tag)
        if self.dist.is_main and os.path.exists(tmp_path):
            shutil.rmtree(tmp_path)
        barrier()
        writes = RankWrites(tmp_path)
        self._write(engine, writes, step, loader, ema)
        if self.asynchronous:
            writes.start()
        self._in_flight = _InFlight(step, tag, tmp_path, metrics, writes, self.asynchronous)
        self._in_flight.blocked_s = time.perf_counter() - t0
        self.saved_step = step
        if not self.asynchronous:
            self.wait()
        return os.path.join(self.dir, tag)

    def _write(self, engine: Any, writes: RankWrites, step: int, loader: Resumable, ema: Any) -> None:
        """This rank's part: DeepSpeed's shards, ``train_state_rank<r>.pt``, rank 0 the config. Written and
        fsynced now, or (asynchronous) copied to host memory and queued for ``writes``' thread."""
        t0 = time.perf_counter()
        with through_engine(engine, writes, divert=self.asynchronous):
            engine.save_checkpoint(
                self.dir,
                tag=os.path.basename(writes.root),
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
        own = {f"train_state_rank{self.dist.rank}.pt": state}
        if self.dist.is_main:
            own["config.yaml"] = self.config_yaml
        for name, content in own.items():
            if isinstance(content, str):
                data = content.encode()
                write = lambda f, data=data: f.write(data)  # noqa: E731
            else:
                if self.asynchronous:
                    snap = snapshot(content)
                    writes.planned += snap.nbytes
                    content = snap.state
                else:
                    writes.planned += storage_bytes(content)
                write = save_torch(content)
            job = writes.file_job(name, write)
            if self.asynchronous:
                writes.jobs.append((name, job))
            else:
                writes.attempt(name, job)
        if not self.asynchronous:
            writes.attempt(".", lambda: fsync_dir(writes.root))
            writes.seconds = time.perf_counter() - t0

    # ---------------------------------------------------------------- commit of the save in flight
    def poll(self, step: int) -> None:
        """Collective, at a step boundary: commit the save in flight if every rank has written its files."""
        self.step = step
        job = self._in_flight
        if job is None:
            return
        t0 = time.perf_counter()
        everyone_done = not all_ranks_any(not job.writes.done(), self.dist.device)
        job.blocked_s += time.perf_counter() - t0
        if everyone_done:
            self._finish()

    def wait(self) -> None:
        """Collective: block until the save in flight is written, then commit it (nothing when none is)."""
        job = self._in_flight
        if job is None:
            return
        t0 = time.perf_counter()
        job.writes.join()
        job.blocked_s += time.perf_counter() - t0
        self._finish()

    def reports(self) -> list[SaveReport]:
        """The saves committed since the last call, oldest first."""
        out, self._reports = self._reports, []
        return out

    def close(self) -> None:
        """Let a write in flight finish (not committed: ``latest`` keeps the previous checkpoint), so a run that
        stops with an error does not exit in the middle of a file."""
        if self._in_flight is not None:
            self._in_flight.writes.join()
            self._in_flight = None

    def _finish(self) -> None:
        """Collective: agree on the outcome of every rank's writes, then commit (rank 0) or stop every rank."""
        job = self._in_flight
        t0 = time.perf_counter()
        self._in_flight = None
        w = job.writes
        outcome = gathered((w.written, w.failure, w.planned, w.seconds), self.dist.world_size)
        failures = {r: o[1] for r, o in enumerate(outcome) if o[1] is not None}
        if failures:
            free_after = None
            if self.dist.is_main:
                shutil.rmtree(job.tmp_path, ignore_errors=True)  # give back the space the partial files took
                free_after = free_bytes(self.dir)
            error = write_error(self.dir, job.tag, failures, sum(o[2] for o in outcome), free_after)
            raise error from w.exception
        files: dict[str, int] = {}
        for o in outcome:
            files.update(o[0])
        final = self._commit(job.tmp_path, job.tag, job.step, files, job.metrics)
        barrier()
        job.blocked_s += time.perf_counter() - t0
        self._reports.append(
            SaveReport(
                tag=job.tag,
                step=job.step,
                path=final,
                asynchronous=job.asynchronous,
                blocked_s=job.blocked_s,
                write_s=max(o[3] for o in outcome),
                bytes=sum(files.values()),
                committed_at=max(self.step, job.step),
            )
        )

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

    # ---------------------------------------------------------------- space
    def space_report(self, engine: Any, found: Optional[Found], ema: bool) -> list[str]:
        """Collective: the size of a checkpoint and the free space of the checkpoint folder, and a warning when
        it holds fewer than two checkpoints. The size is the resumed checkpoint's, or (before the first save)
        estimated from the trainable and optimizer state (``space.estimate_checkpoint_bytes``)."""
        size = checkpoint_bytes(found.path) if found is not None and not found.portable else None
        how = f"the size of {found.tag}" if size else "estimated from the trainable and optimizer state"
        if size is None:
            module = engine.module
            size = estimate_for_engine(module, self.dist.world_size, self.ep_size, self.zero_stage, ema)
        return space_lines(self.dir, size, how)

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
