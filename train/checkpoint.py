"""Sharded DeepSpeed checkpoints with an atomic ``latest`` pointer, keep-last-K, and exact resume.

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
"value"}`` to the checkpoint whose held-out metric (``train/heldout.py``, evaluated at the checkpoint's
step) is the best so far; it moves only on a strict improvement. Each checkpoint's ``complete.json``
records the held-out metrics of its step, and ``best`` is chosen among the complete checkpoints on disk
(the previous best is never pruned), so a pointer lost to a kill, or one for another metric, is
rebuilt at the next save. Resume checks the marker (every file present at
its recorded size): ``--resume PATH`` refuses an incomplete checkpoint with the reason, and
``--resume auto`` falls back to the newest complete one before it, saying so. The frozen backbone is
not written (``exclude_frozen_parameters=True``); it is rebuilt from its own path, so loading is
non-strict and we verify that every trainable key was present instead.

Shape: a checkpoint resumes through DeepSpeed only at the world size, ep_size and ZeRO stage that
wrote it (``find`` checks this before the model is built and names the conversion command
otherwise). Each rank also records its ``layout`` (``train/layout.py``) so that
``python -m launch.reshape_checkpoint`` can turn the checkpoint into a portable one
(``train/portable.py``), which ``--resume`` loads at any shape (``train/portable_load.py``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as torch_dist
from omegaconf import OmegaConf

from train.config import CheckpointConfig, checkpoint_dir
from train.contracts import Resumable
from train.distributed import DistInfo, barrier
from train.layout import capture_layout
from train.portable import PORTABLE_DIR, ReshapeError, is_portable, read_meta
from train.rng import rng_state, seed_everything, set_rng_state

log = logging.getLogger(__name__)

LATEST = "latest"
BEST = "best"
TMP_PREFIX = ".tmp-"
COMPLETE = "complete.json"  # written last, before the rename: {step, world_size, files: {name: size}}
STEP_TAG = re.compile(r"^step\d{8}$")


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def _fsync(f: Any) -> int:
    """Flush and fsync an open file; its size."""
    f.flush()
    os.fsync(f.fileno())
    return os.fstat(f.fileno()).st_size


def _fsync_dir(path: str) -> None:
    """fsync a directory, so the names created or renamed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _recording_saves(engine: Any, root: str, written: dict[str, int]) -> Iterator[None]:
    """Every file DeepSpeed writes goes through ``engine.checkpoint_engine.save``: fsync each one and
    record its size (a later truncation is then detectable)."""
    ce = engine.checkpoint_engine
    original = ce.save

    def save(state_dict: Any, path: str) -> Any:
        result = original(state_dict, path)
        with open(path, "rb") as f:  # fsync through a read-only descriptor flushes the same file
            written[os.path.relpath(path, root)] = _fsync(f)
        return result

    ce.save = save
    try:
        yield
    finally:
        del ce.save


def _gather_files(written: dict[str, int]) -> dict[str, int]:
    """Collective: the union of every rank's {file: size}."""
    if not (torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return dict(written)
    parts: list = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(parts, written)
    files: dict[str, int] = {}
    for part in parts:
        files.update(part)
    return files


def verify_complete(path: str) -> Optional[str]:
    """None if checkpoint ``path`` is complete; else what is wrong with it (one line)."""
    marker = os.path.join(path, COMPLETE)
    if not os.path.isfile(marker):
        return f"no {COMPLETE} (its save did not finish, or it predates completeness markers)"
    try:
        with open(marker) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"unreadable {COMPLETE} ({e})"
    for name, size in sorted(files.items()):
        p = os.path.join(path, name)
        if not os.path.isfile(p):
            return f"file {name} is missing"
        actual = os.path.getsize(p)
        if actual != size:
            return f"file {name} has {actual} bytes, {size} were written (truncated or overwritten)"
    return None


class IncompleteCheckpoint(FileNotFoundError):
    """A checkpoint that resume must not load (missing or truncated files); the message says which."""


@dataclass
class Resumed:
    step: int
    path: str
    note: str = ""  # what a reshaped resume changed (printed by the loop)


@dataclass
class Found:
    """A checkpoint chosen by ``--resume``, inspected before the model is built."""

    load_dir: str
    tag: str
    step: int
    portable: bool
    note: str = ""  # why this one was chosen when it is not what was asked for (printed by the loop)

    @property
    def path(self) -> str:
        return os.path.join(self.load_dir, self.tag)


def reshape_command(path: str) -> str:
    return f"python -m launch.reshape_checkpoint --src {path}"


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
    def for_run(cls, cfg: Any, dist: DistInfo, before_save: Optional[Callable[[int], None]] = None) -> "Checkpointer":
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
        files = _gather_files(written)  # also the barrier: every shard of every rank is on disk
        final = self._commit(tmp_path, tag, step, files, metrics)
        barrier()
        self.saved_step = step
        return final

    def _write(self, engine: Any, tmp_path: str, step: int, loader: Resumable, ema: Any) -> dict[str, int]:
        """This rank's part, every file fsynced: DeepSpeed's shards, ``train_state_rank<r>.pt``, rank 0 the
        config. Returns {file name: size} of what this rank wrote."""
        written: dict[str, int] = {}
        with _recording_saves(engine, tmp_path, written):
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
            written[name] = _fsync(f)
        if self.dist.is_main:
            with open(os.path.join(tmp_path, "config.yaml"), "w") as f:
                f.write(self.config_yaml)
                written["config.yaml"] = _fsync(f)
        _fsync_dir(tmp_path)
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
                _fsync(f)
            _fsync_dir(tmp_path)
            if os.path.exists(final):  # re-saving the same step (e.g. end right after a periodic save)
                self._unpoint_best(tag)  # `best` never names a directory being replaced
                shutil.rmtree(final)
            os.replace(tmp_path, final)
            _fsync_dir(self.dir)
            self._write_pointer(LATEST, tag)
            self._update_best()
            self._prune(step)
        return final

    def _write_pointer(self, name: str, text: str) -> None:
        """Replace ``<dir>/<name>`` atomically: a temporary, fsynced, renamed over it, the directory fsynced."""
        tmp = os.path.join(self.dir, name + ".tmp")
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, os.path.join(self.dir, name))
        _fsync_dir(self.dir)  # make the rename itself durable

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
            _fsync_dir(self.dir)

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
        if not resume:
            return None
        note = ""
        if resume == "auto":
            where = self._latest_complete()
            if where is None:
                return None
            where, note = where
        else:
            path = os.path.abspath(resume)
            if os.path.isfile(os.path.join(path, LATEST)):
                where = read_latest(path)
                if where is None:
                    raise FileNotFoundError(f"--resume {resume}: 'latest' names no checkpoint")
            elif (
                os.path.isfile(os.path.join(path, "train_state_rank0.pt"))
                or is_portable(path)
                or os.path.isfile(os.path.join(path, COMPLETE))
            ):
                where = os.path.dirname(path), os.path.basename(path)
            else:
                raise FileNotFoundError(f"--resume {resume}: neither a checkpoint nor a directory with a 'latest' file")
            problem = None if is_portable(os.path.join(*where)) else verify_complete(os.path.join(*where))
            if problem:
                raise IncompleteCheckpoint(
                    f"--resume {resume}: checkpoint {os.path.join(*where)} is incomplete: {problem}. Resume from an "
                    f"earlier checkpoint, or with --resume auto (it falls back to the newest complete one)"
                )
        path = os.path.join(*where)
        if is_portable(path):
            return Found(where[0], where[1], int(read_meta(path)["step"]), portable=True, note=note)
        try:
            return Found(where[0], where[1], self._check_shape(path), portable=False, note=note)
        except ReshapeError:
            converted = os.path.join(where[0], PORTABLE_DIR, where[1])  # launch.reshape_checkpoint's default --dst
            if not is_portable(converted):
                raise
            if self.dist.is_main:
                log.warning("resume: %s is of another shape; using its conversion %s", path, converted)
            return Found(
                os.path.dirname(converted), where[1], int(read_meta(converted)["step"]), portable=True, note=note
            )

    def _latest_complete(self) -> Optional[tuple[tuple[str, str], str]]:
        """((dir, tag), note) for ``--resume auto``: what ``latest`` names if complete, else the newest
        complete checkpoint before it (the note says which was refused and why); None: fresh start."""
        p = os.path.join(self.dir, LATEST)
        if not os.path.isfile(p):
            return None
        with open(p) as f:
            tag = f.read().strip()
        path = os.path.join(self.dir, tag)
        problem = (
            "its directory is missing"
            if not os.path.isdir(path)
            else (None if is_portable(path) else verify_complete(path))
        )
        if problem is None:
            return (os.path.abspath(self.dir), tag), ""
        step = int(tag[4:]) if STEP_TAG.match(tag) else 1 << 62
        earlier = sorted((t for t in os.listdir(self.dir) if STEP_TAG.match(t) and int(t[4:]) < step), reverse=True)
        for t in earlier:
            if verify_complete(os.path.join(self.dir, t)) is None:
                note = f"checkpoint {tag} is incomplete ({problem}): fell back to {t}, the newest complete one"
                if self.dist.is_main:
                    log.warning("resume: %s", note)
                return (os.path.abspath(self.dir), t), note
        raise IncompleteCheckpoint(
            f"--resume auto: {path} (named by {p}) is incomplete ({problem}) and {self.dir} holds no earlier "
            f"complete checkpoint. Start afresh without --resume after moving {self.dir} away"
        )

    def _check_shape(self, path: str) -> int:
        """The step of native checkpoint ``path`` if this run can load it as is; else a ReshapeError."""
        # mmap: only the few scalars below are read from a file that also holds EMA and loader state
        state = torch.load(os.path.join(path, "train_state_rank0.pt"), map_location="cpu", weights_only=True, mmap=True)
        layout = state.get("layout")
        if layout is not None:
            ep, zero = int(layout["ep_size"]), int(layout["zero_stage"])
        else:  # written before layouts were recorded: its config says what it was
            saved = OmegaConf.load(os.path.join(path, "config.yaml"))
            ep, zero = int(saved.model.experts.ep_size), int(saved.train.zero_stage)
        saved_shape = (int(state["world_size"]), ep, zero)
        shape = (self.dist.world_size, self.ep_size, self.zero_stage)
        if saved_shape != shape:
            raise ReshapeError(
                f"checkpoint {path} was written by {saved_shape[0]} ranks at ep_size {saved_shape[1]}, ZeRO "
                f"{saved_shape[2]}; this run has {shape[0]} ranks at ep_size {shape[1]}, ZeRO {shape[2]}. DeepSpeed "
                f"cannot load it at another shape: convert it once with `{reshape_command(path)}`, then resume "
                f"again (--resume auto uses the conversion of its 'latest')"
            )
        return int(state["step"])

    def load(self, engine: Any, found: Found, loader: Resumable, ema: Any = None) -> Resumed:
        if found.portable:
            return self._load_portable(engine, found, loader, ema)
        path = found.path
        state_file = os.path.join(path, f"train_state_rank{self.dist.rank}.pt")
        if not os.path.isfile(state_file):
            raise FileNotFoundError(f"{state_file} missing: checkpoint written by a run with fewer ranks?")
        state = torch.load(state_file, map_location="cpu", weights_only=True)
        if state["world_size"] != self.dist.world_size:
            raise RuntimeError(
                f"checkpoint {path} was written by {state['world_size']} ranks, this run has "
                f"{self.dist.world_size}; exact resume needs the same layout"
            )
        missing = _load_engine_checkpoint(engine, found.load_dir, found.tag)
        trainable = {n for n, p in engine.module.named_parameters() if p.requires_grad}
        lost = sorted(trainable & missing)
        if lost:
            raise RuntimeError(f"checkpoint {path} lacks {len(lost)} trainable tensors, e.g. {lost[:3]}")
        loader.load_state_dict(state["loader"])
        if ema is not None:
            if "ema" not in state:
                raise RuntimeError(f"ema.enabled but checkpoint {path} has no EMA state")
            ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        return Resumed(step=int(state["step"]), path=path)

    def _load_portable(self, engine: Any, found: Found, loader: Resumable, ema: Any) -> Resumed:
        """Any shape. The loader gets every source rank's state and decides (see ``EditLoader.load_state_dict``).

        The RNG streams are per rank, so they continue only at the source's world size; otherwise each
        rank is reseeded from (run.seed, step, rank), which is deterministic but not the uninterrupted
        run's noise.
        """
        from train.portable_load import load_portable

        meta = load_portable(engine, found.path, ema)
        src = meta["source"]
        loader.load_state_dict({"per_rank": meta["loaders"]})
        notes = [
            f"portable checkpoint from {src['world_size']} ranks at ep_size {src['ep_size']}, ZeRO {src['zero_stage']}"
        ]
        if src["world_size"] == self.dist.world_size:
            set_rng_state(meta["rng"][self.dist.rank])
        else:
            seed_everything(self.seed * 1_000_003 + found.step * 1_009 + self.dist.rank + 1)
            notes.append("RNG reseeded from (run.seed, step, rank): the noise differs from an uninterrupted run")
        batch = int(engine.train_batch_size())
        if batch != src["train_batch_size"]:
            notes.append(f"global batch {src['train_batch_size']} -> {batch}: set train.grad_accum to keep it")
        note = "; ".join(notes)
        if self.dist.is_main:
            log.warning("resume: %s", note)
        return Resumed(step=int(meta["step"]), path=found.path, note=note)


def read_latest(ckpt_dir: str) -> Optional[tuple[str, str]]:
    """(dir, tag) named by ``<ckpt_dir>/latest``, or None when there is none."""
    p = os.path.join(ckpt_dir, LATEST)
    if not os.path.isfile(p):
        return None
    with open(p) as f:
        tag = f.read().strip()
    if not tag or not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise FileNotFoundError(f"{p} names '{tag}', which is not a checkpoint directory")
    return os.path.abspath(ckpt_dir), tag


def improves(value: float, than: float, mode: str) -> bool:
    """Strictly better in direction ``mode`` ('max' or 'min'): a tie keeps the earlier checkpoint."""
    return value > than if mode == "max" else value < than


def read_best(ckpt_dir: str) -> Optional[dict]:
    """The ``best`` pointer of a checkpoint directory ({tag, step, metric, mode, value}), or None when there
    is none or it cannot be read (written atomically, so that means it was never written)."""
    p = os.path.join(ckpt_dir, BEST)
    try:
        with open(p) as f:
            pointer = json.load(f)
    except (OSError, ValueError):
        return None
    return pointer if isinstance(pointer, dict) and isinstance(pointer.get("tag"), str) else None


def checkpoint_metrics(path: str) -> dict[str, float]:
    """The held-out metrics recorded in a complete checkpoint's marker ({} when none or incomplete)."""
    if verify_complete(path) is not None:
        return {}
    with open(os.path.join(path, COMPLETE)) as f:
        return dict(json.load(f).get("metrics") or {})


def resolve_tag(path: str, tag: str) -> str:
    """The checkpoint directory named by ``tag`` in a run's checkpoint directory ``path`` (or in
    ``path/checkpoints`` when ``path`` is a run directory): ``latest``, ``best``, or a ``step<N>`` tag.
    Raises FileNotFoundError saying what is missing."""
    ckpt_dir = path
    if not os.path.isfile(os.path.join(path, LATEST)) and os.path.isdir(os.path.join(path, "checkpoints")):
        ckpt_dir = os.path.join(path, "checkpoints")
    if tag == LATEST:
        if not os.path.isfile(os.path.join(ckpt_dir, LATEST)):
            raise FileNotFoundError(f"{ckpt_dir}: no 'latest' pointer (not a run's checkpoint directory?)")
        found = read_latest(ckpt_dir)
        target = found[1] if found else ""
    elif tag == BEST:
        pointer = read_best(ckpt_dir)
        if pointer is None:
            raise FileNotFoundError(
                f"{ckpt_dir}: no 'best' pointer (a run keeps one when checkpoint.best_metric is set and "
                "logging.eval_every evaluates at its checkpoint steps)"
            )
        target = pointer["tag"]
    else:
        target = tag
    full = os.path.join(ckpt_dir, target)
    problem = "no such directory" if not os.path.isdir(full) else verify_complete(full)
    if problem:
        raise FileNotFoundError(f"{full} ('{tag}'): not a complete checkpoint: {problem}")
    return full


def list_checkpoints(ckpt_dir: str) -> list[str]:
    """The complete ``step<N>`` checkpoint directories of a run, oldest first."""
    return [
        os.path.join(ckpt_dir, t)
        for t in sorted(os.listdir(ckpt_dir))
        if STEP_TAG.match(t) and verify_complete(os.path.join(ckpt_dir, t)) is None
    ]


def _load_engine_checkpoint(engine: Any, load_dir: str, tag: str) -> set[str]:
    """``engine.load_checkpoint`` non-strict; returns the module keys the checkpoint did not provide."""
    module = engine.module
    captured: list = []
    original = module.load_state_dict

    def capturing(state_dict, strict=True, **kw):
        result = original(state_dict, strict=strict, **kw)
        captured.append(set(result.missing_keys))
        return result

    module.load_state_dict = capturing
    try:
        path, _ = engine.load_checkpoint(
            load_dir, tag=tag, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
    finally:
        del module.load_state_dict
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load {os.path.join(load_dir, tag)}")
    if not captured:
        raise RuntimeError("DeepSpeed loaded no module state dict; cannot verify trainable keys")
    return set.intersection(*captured)
