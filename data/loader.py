"""Streaming loader: WebDataset shards -> checked, augmented, bucketed ``EditBatch``es.

Ordering (what makes resume exact, see docs/DATA.md):

* Each (rank, worker) pair is a *slot* ``s = rank * W + worker`` of ``S = world_size * W``.
  The shard stream is the concatenation of epoch permutations (seeded by ``seed, epoch``); slot
  ``s`` reads positions ``s, s + S, s + 2S, ...`` of it. Over an epoch every shard is read by
  exactly one slot (rank and worker splitting in one step, with rank and world size passed in
  explicitly, never read from torch.distributed).
* Inside a shard, ``webdataset.shuffle`` with an rng seeded by ``(seed, epoch, shard)`` and a
  buffer that restarts at each shard. So "sample i of shard position k of slot s" is a fixed
  sample, and a worker's progress is two integers ``(pos, offset)``.
* Augmentation randomness is seeded by ``(seed, epoch, shard, i)``.
* DataLoader hands out batches round-robin over workers, so batch ``n`` comes from worker
  ``n % W``. After a restart at step N the physical worker ``p`` plays logical worker
  ``(p + N) % W``, which keeps that mapping.

A batch carries ``extras["data_state"]``: its worker's ``(pos, offset)`` after the batch, the
positions of samples still waiting in other aspect buckets, and cumulative skip counts.
``EditLoader`` keeps the latest per worker: that is ``state_dict()``. Resuming skips whole shards
without opening them and skips ``offset`` raw samples of one shard without decoding them.

Bad samples are skipped, counted per reason (``data.schema.SKIP_REASONS``), logged with a rate
limit, and past ``max_bad_fraction`` (after ``min_samples_before_bad_check``) the worker raises
an error naming the shard.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from collections import Counter
from typing import Any, Iterator, Optional

import torch
import webdataset as wds
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data import augment
from data.arith import ceil_div
from data.batch import EditBatch
from data.cache import collate_cached, decode_cached_sample
from data.config import DataConfig
from data.schema import SKIP_REASONS, SampleError, decode_sample, region_boxes, tags_to_ids
from data.shards import expand_shards

log = logging.getLogger(__name__)
STATE_VERSION = 1


def as_config(cfg: DataConfig | DictConfig) -> DataConfig:
    """Accept a DataConfig or an OmegaConf DictConfig built from it (``OmegaConf.structured``)."""
    if isinstance(cfg, DataConfig):
        return cfg
    obj = OmegaConf.to_object(cfg)
    return obj if isinstance(obj, DataConfig) else DataConfig(**obj)


def shard_positions(
    n_shards: int, slot: int, n_slots: int, seed: int, shuffle: bool, epoch: Optional[int], start: int = 0
) -> Iterator[tuple[int, int, int]]:
    """``(pos, epoch, shard_index)`` read by ``slot``; infinite if ``epoch`` is None, else that epoch only."""
    perms: dict[int, list[int]] = {}
    k = start
    if epoch is not None:  # first position of this slot inside the epoch
        k = max(k, ceil_div(epoch * n_shards - slot, n_slots))
    while True:
        g = slot + k * n_slots
        e, i = divmod(g, n_shards)
        if epoch is not None and e != epoch:
            return
        if e not in perms:
            perms = {e: list(range(n_shards))}
            if shuffle:
                random.Random(f"shards:{seed}:{e}").shuffle(perms[e])
        yield k, e, perms[e][i]
        k += 1


class SkipCounter:
    """Per-worker counts of seen and skipped samples, with rate-limited logging and the stop rule."""

    def __init__(self, cfg: DataConfig, skips: Optional[dict] = None, seen: int = 0):
        self.cfg = cfg
        self.skips = Counter({r: 0 for r in SKIP_REASONS})
        self.skips.update(skips or {})
        self.seen = seen
        self.by_shard: Counter = Counter()
        self._last_log = 0.0

    def bad(self, reason: str, url: str, message: str) -> None:
        self.skips[reason] += 1
        self.by_shard[url] += 1
        n = self.skips[reason]
        now = time.monotonic()
        if n <= 3 or n % 1000 == 0 or now - self._last_log > 60:
            self._last_log = now
            log.warning("data: skipped sample (%s, #%d of this reason) in %s: %s", reason, n, url, message)
        total = sum(self.skips.values())
        if self.seen >= self.cfg.min_samples_before_bad_check and total > self.cfg.max_bad_fraction * self.seen:
            worst = ", ".join(f"{u} ({c})" for u, c in self.by_shard.most_common(3))
            raise RuntimeError(
                f"data: {total} of {self.seen} samples bad (> max_bad_fraction={self.cfg.max_bad_fraction}); "
                f"last bad shard {url}; worst shards: {worst}; reasons: "
                f"{ {r: c for r, c in self.skips.items() if c} }"
            )


def _stack_float(items: list[dict], name: str) -> Optional[torch.Tensor]:
    if items[0].get(name) is None:
        return None
    return augment.to_float(torch.stack([it[name] for it in items]))


def _stack_region_labels(items: list[dict]) -> Optional[torch.Tensor]:
    """[B, 1, H, W] long region labels (``augment.region_coarse``), zeros for a sample without regions;
    None when no sample of the batch has them."""
    labels = [it.get("region_labels") for it in items]
    if all(lab is None for lab in labels):
        return None
    like = next(lab for lab in labels if lab is not None)
    return torch.stack([(lab if lab is not None else torch.zeros_like(like)).long() for lab in labels])


def _batch_fields(items: list[dict]) -> dict[str, Any]:
    """The ``EditBatch`` fields every batch has, stacked from prepared samples."""
    tags = [it["tag_ids"] for it in items]
    tag_ids = torch.full((len(items), max(1, max(len(t) for t in tags))), -1, dtype=torch.long)
    for i, t in enumerate(tags):
        tag_ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    has_ref = torch.tensor([it["has_ref"] for it in items], dtype=torch.bool)

    def stack_ref(name: str, like: str) -> Optional[torch.Tensor]:
        if items[0].get(like) is None:
            return None
        return torch.stack([it[name] if it[name] is not None else torch.zeros_like(it[like]) for it in items])

    return dict(
        has_reference=has_ref,
        fine_mask=torch.stack([it["fine_mask"] for it in items]),
        coarse_mask=torch.stack([it["coarse_mask"] for it in items]),
        bbox=torch.tensor([it["bbox"] for it in items], dtype=torch.long),
        region_labels=_stack_region_labels(items),
        instruction=[it["instruction"] for it in items],
        task=[it["task"] for it in items],
        tag_ids=tag_ids,
        keys=[it["key"] for it in items],
        source=_stack_float(items, "source"),
        target=_stack_float(items, "target"),
        reference=augment.to_float(ref) if (ref := stack_ref("reference", "source")) is not None else None,
    )


def collate_images(items: list[dict]) -> EditBatch:
    """A batch of samples decoded from images."""
    return EditBatch(**_batch_fields(items))


def collate_with_cache(items: list[dict]) -> EditBatch:
    """A batch of cached samples: the common fields plus latents and text embeddings (``data.cache``)."""
    return EditBatch(**_batch_fields(items), **collate_cached(items))


@dataclasses.dataclass
class WorkerState:
    """One worker's place in its shard stream, restored from its saved ``data_state`` and reported with
    every batch (the ordering it relies on: module docstring). The sample loop (``EditStream._run``)
    asks it what to skip; it never decodes a sample itself."""

    worker: int  # the logical worker
    counter: SkipCounter  # samples seen and skipped per reason
    pos: int = 0  # (pos, offset): the first raw sample of the stream not consumed before the restart
    offset: int = 0
    start: int = 0  # the first shard position to open
    skip_raw: int = 0  # approximate fast-forward (``start_step`` without a saved state): raw samples to pass
    pending: set = dataclasses.field(default_factory=set)  # origins (pos, idx) still in a bucket at the save
    tar_errors: set = dataclasses.field(default_factory=set)  # shard positions whose tar error is counted

    @classmethod
    def restore(
        cls, saved: dict, cfg: DataConfig, worker: int, slot: int, n_slots: int, n_shards: int
    ) -> "WorkerState":
        """From a batch's ``data_state`` ({} for a fresh start), or the start a resume at another shape
        chose (``start_global``; ``start_epoch`` in states saved by older versions): a fresh shard there."""
        pos, offset = saved.get("pos", 0), saved.get("offset", 0)
        pending = {tuple(p) for p in saved.get("pending", [])}
        start = min([pos] + [p for p, _ in pending])
        if "start_global" in saved:  # cross-configuration resume: first shard position not fully consumed
            start = max(0, ceil_div(saved["start_global"] - slot, n_slots))
            pos, offset = start, 0
        elif "start_epoch" in saved:  # (states saved by older versions) from the start of that epoch
            start = max(0, ceil_div(saved["start_epoch"] * n_shards - slot, n_slots))
            pos, offset = start, 0
        return cls(
            worker=worker,
            counter=SkipCounter(cfg, saved.get("skips"), saved.get("seen", 0)),
            pos=pos,
            offset=offset,
            start=start,
            skip_raw=saved.get("skip_raw", 0),
            pending=pending,
            tar_errors=set(saved.get("tar_errors", [])),
        )

    def consumed_shard(self, pos: int) -> bool:
        """Every sample of shard position ``pos`` was consumed before the restart: it is not even opened."""
        return pos < self.pos and not any(p == pos for p, _ in self.pending)

    def replayed(self, origin: tuple[int, int]) -> bool:
        """The raw sample at ``origin`` was read before the restart (it is re-read only if it was pending)."""
        return origin < (self.pos, self.offset)

    def passes(self, origin: tuple[int, int]) -> bool:
        """Skip the raw sample at ``origin`` undecoded: consumed before the restart, or fast-forwarded."""
        if self.replayed(origin) and origin not in self.pending:
            return True
        if self.skip_raw > 0:
            self.skip_raw -= 1
            return True
        return False

    def tar_error(self, pos: int, url: str, exn: Exception) -> None:
        """A shard's tar stream broke: one bad event per shard position, also across restarts."""
        if pos in self.tar_errors:  # re-read after a restart: counted before
            return
        self.tar_errors.add(pos)
        reason = "shard_open_error" if isinstance(exn, (FileNotFoundError, PermissionError)) else "corrupt_tar"
        self.counter.seen += 1
        self.counter.bad(reason, url, repr(exn)[:300])

    def report(self, pos: int, offset: int, epoch: int, waiting: list[tuple[int, int]]) -> dict:
        """The ``data_state`` a batch carries: resuming from it continues right after that batch."""
        return dict(
            worker=self.worker,
            pos=pos,
            offset=offset,
            epoch=epoch,
            pending=waiting,
            skips={r: c for r, c in self.counter.skips.items() if c},
            seen=self.counter.seen,
            tar_errors=sorted(p for p in self.tar_errors if p >= pos - 1),
        )


class EditStream(IterableDataset):
    """The per-worker pipeline; see the module docstring for the ordering it guarantees."""

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        batch_size: int,
        rank: int,
        world_size: int,
        exact: bool,
        start_step: int,
        states: dict[int, dict],
        epoch: Optional[int],
    ):
        self.cfg, self.urls, self.batch_size = cfg, urls, batch_size
        self.rank, self.world_size, self.exact = rank, world_size, exact
        self.start_step, self.states, self.epoch = start_step, states, epoch
        self.n_workers = max(cfg.num_workers, 1)
        # cached shards hold latents and text embeddings instead of images: the decode and the batch
        # layout are chosen once, here
        self._decode = self._decode_cached if cfg.cached else self._decode_images
        self._collate = collate_with_cache if cfg.cached else collate_images

    # -- one sample -------------------------------------------------------------------------------
    def _prepare(self, raw: dict, rng: Optional[random.Random]) -> dict:
        """Raw members -> tensors for collate; raises SampleError."""
        item = self._decode(raw, rng)
        meta = item["meta"]
        item.update(instruction=meta["instruction"], task=meta["task"], tag_ids=tags_to_ids(meta["tags"]))
        return item

    def _decode_images(self, raw: dict, rng: Optional[random.Random]) -> dict:
        """Images decoded, checked and augmented (one crop and flip for source, target and masks)."""
        cfg = self.cfg
        d = decode_sample(raw)
        out_hw = augment.choose_bucket(d["src"].width, d["src"].height, cfg.buckets, cfg.image_size)
        item = augment.transform(
            d["src"],
            d["tgt"],
            d["ref"],
            d["mask"],
            out_hw,
            None if self.exact else rng,
            cfg.random_crop_scale,
            cfg.hflip,
            d["meta"]["instruction"],
            region_boxes(d["meta"]),
        )
        item.update(key=d["key"], meta=d["meta"], has_ref=d["ref"] is not None)
        return item

    @staticmethod
    def _decode_cached(raw: dict, rng: Optional[random.Random]) -> dict:
        """A cached sample: its view was fixed when it was cached, so nothing is augmented."""
        return decode_cached_sample(raw)

    # -- the worker loop ----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[EditBatch]:
        info = get_worker_info()
        physical = info.id if info is not None else 0
        lw = (physical + self.start_step) % self.n_workers
        yield from self._run(lw, copy.deepcopy(self.states.get(lw, {})))

    def _run(self, lw: int, saved: dict) -> Iterator[EditBatch]:
        """The worker's batches: samples of its shard positions, bucketed by size, each batch with the
        state that resumes right after it."""
        slot, n_slots = self.rank * self.n_workers + lw, self.world_size * self.n_workers
        state = WorkerState.restore(saved, self.cfg, lw, slot, n_slots, len(self.urls))
        buckets: dict[tuple[int, int], list[dict]] = {}

        def waiting() -> list[tuple[int, int]]:
            return sorted(it["origin"] for b in buckets.values() for it in b)

        shuffle_shards = self.cfg.shuffle_shards and not self.exact
        positions = shard_positions(
            len(self.urls), slot, n_slots, self.cfg.seed, shuffle_shards, self.epoch, state.start
        )
        epoch = 0
        for pos, epoch, shard_index in positions:
            if state.consumed_shard(pos):
                continue  # fully consumed before the restart: not even opened
            for item in self._shard_samples(state, pos, epoch, shard_index):
                hw = tuple(item["fine_mask"].shape[-2:])
                buckets.setdefault(hw, []).append(item)
                if len(buckets[hw]) == self.batch_size:
                    batch = self._collate(buckets.pop(hw))
                    origin = item["origin"]
                    after = (state.pos, state.offset) if state.replayed(origin) else (origin[0], origin[1] + 1)
                    batch.extras["data_state"] = state.report(*after, epoch, waiting())
                    yield batch
        # finite mode: flush partial batches so every sample is yielded once, then report the
        # final counts (skips after the last batch would otherwise never reach the main process)
        if self.epoch is not None:
            for hw in sorted(buckets):
                batch = self._collate(buckets.pop(hw))
                batch.extras["data_state"] = state.report(1 << 62, 0, epoch, waiting())
                yield batch
            yield {"data_state": state.report(1 << 62, 0, epoch, waiting())}

    def _shard_samples(self, state: WorkerState, pos: int, epoch: int, shard_index: int) -> Iterator[dict]:
        """The prepared samples of the shard at position ``pos``, in the seeded shuffle's order, each with its
        ``origin`` (pos, raw index); those consumed before a restart and bad ones (counted) left out."""
        url = self.urls[shard_index]
        shard = ShardCursor(url=url, pos=pos)

        def on_tar_error(exn: Exception) -> bool:
            shard.broken = True
            state.tar_error(pos, url, exn)
            return False  # give up on this shard (the tar stream cannot be resynchronised)

        def mark_truncated(samples: Iterator[dict]) -> Iterator[dict]:
            """The sample grouped after a tar error is the partial one: part of that one event."""
            for s in samples:
                if shard.broken:
                    s["__truncated__"] = True
                yield s

        cfg = self.cfg
        stream = mark_truncated(wds.tarfile_to_samples(handler=on_tar_error)(iter([dict(url=url)])))
        if not self.exact and cfg.shuffle_buffer > 1:
            rng = random.Random(f"samples:{cfg.seed}:{epoch}:{shard_index}")
            stream = wds.shuffle(cfg.shuffle_buffer, initial=cfg.shuffle_buffer, rng=rng)(stream)
        for idx, raw in enumerate(stream):
            origin = (pos, idx)
            if state.passes(origin):
                continue
            if raw.get("__truncated__"):
                continue  # counted once, as the corrupt_tar event
            if not state.replayed(origin):
                state.counter.seen += 1
            try:
                item = self._prepare(raw, random.Random(f"aug:{cfg.seed}:{epoch}:{shard_index}:{idx}"))
            except SampleError as exn:
                state.counter.bad(exn.reason, url, f"{raw.get('__key__')}: {exn}")
                continue
            item["origin"] = origin
            yield item


@dataclasses.dataclass
class ShardCursor:
    """The shard a worker reads now. The tar-error handler webdataset calls and the truncation
    marker both run inside the shard's stream, so they read (and the handler sets) these fields."""

    url: str = ""
    pos: int = 0  # position in the slot's shard stream
    broken: bool = False  # a tar error ended this shard: the sample grouped after it is partial


def _identity(x: Any) -> Any:
    return x


class EditLoader:
    """Iterable of ``EditBatch`` with ``state_dict``/``load_state_dict`` and skip statistics.

    Every ``iter()`` continues from the current state (so ``load_state_dict`` then ``iter`` resumes).
    In finite mode (``exact`` or ``resampled=False``) one ``iter()`` is one epoch.
    """

    def __init__(
        self,
        cfg: DataConfig,
        urls: list[str],
        batch_size: int,
        rank: int,
        world_size: int,
        exact: bool = False,
        start_step: int = 0,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} not in [0, world_size={world_size})")
        self.cfg, self.urls, self.batch_size = cfg, urls, batch_size
        self.rank, self.world_size, self.exact = rank, world_size, exact
        self.finite = exact or not cfg.resampled
        self.n_workers = max(cfg.num_workers, 1)
        self.step, self.epoch, self.samples_seen = 0, 0, 0
        self._workers: dict[int, dict] = {}
        self._skips_done: Counter = Counter()  # skips of finished epochs (finite mode)
        if start_step:
            self._fast_forward(start_step)

    def _fast_forward(self, n: int) -> None:
        """Without a saved state: skip n batches assuming none had bad samples (see docs/DATA.md)."""
        self.step, self.samples_seen = n, n * self.batch_size
        W = self.n_workers
        for lw in range(W):
            nb = (n - lw + W - 1) // W if n > lw else 0
            self._workers[lw] = dict(skip_raw=nb * self.batch_size)

    def _config_key(self) -> dict:
        return dict(
            world_size=self.world_size,
            rank=self.rank,
            num_workers=self.n_workers,
            batch_size=self.batch_size,
            seed=self.cfg.seed,
            n_shards=len(self.urls),
            shuffle_buffer=self.cfg.shuffle_buffer,
            exact=self.exact,
        )

    def __iter__(self) -> Iterator[EditBatch]:
        ds = EditStream(
            self.cfg,
            self.urls,
            self.batch_size,
            self.rank,
            self.world_size,
            self.exact,
            self.step,
            copy.deepcopy(self._workers),
            self.epoch if self.finite else None,
        )
        kw = dict(prefetch_factor=self.cfg.prefetch_factor) if self.cfg.num_workers > 0 else {}
        dl = DataLoader(ds, batch_size=None, num_workers=self.cfg.num_workers, collate_fn=_identity, **kw)
        for batch in dl:
            if isinstance(batch, dict):  # end-of-stream state report (finite mode), not a batch
                self._workers[batch["data_state"]["worker"]] = batch["data_state"]
                continue
            st = batch.extras["data_state"]
            self._workers[st["worker"]] = st
            self.step += 1
            self.samples_seen += batch.batch_size
            yield batch
        if self.finite:  # next iter() is the next epoch; keep the counts of this one
            self._skips_done.update(self.skip_stats())
            self._skips_done -= Counter()  # drop zeros
            self.epoch += 1
            self._workers = {}

    def skip_stats(self) -> dict[str, int]:
        """Skipped samples per reason, summed over this rank's workers (as of their last batch)."""
        total: Counter = Counter({r: 0 for r in SKIP_REASONS})
        total.update(self._skips_done)
        for st in self._workers.values():
            total.update(st.get("skips", {}))
        return dict(total)

    def state_dict(self) -> dict:
        """This rank's position; gather all ranks' (e.g. all_gather_object) for an exact resume."""
        epochs = [st["epoch"] for st in self._workers.values() if "epoch" in st]
        return dict(
            version=STATE_VERSION,
            step=self.step,
            epoch=min(epochs) if epochs else self.epoch,
            samples_seen=self.samples_seen,
            global_samples=self.step * self.batch_size * self.world_size,
            config=self._config_key(),
            workers={str(k): v for k, v in self._workers.items()},
            skips_done=dict(self._skips_done),
        )

    def load_state_dict(self, sd: dict) -> None:
        """Resume. Accepts this rank's state, or ``{"per_rank": [state of rank 0, 1, ...]}``.

        Same world size, workers, batch size, seed and shards: exact. Otherwise (e.g. a resume at
        another GPU count) it continues from the shards consumed, not exactly: every new slot starts
        at the first position of the global shard stream that some old slot had not finished
        (``_first_unfinished``). No sample is skipped; the shards the old slots were in the middle
        of (at most one per old slot) are read again, in the new split. The step and sample counts
        carry over as totals over all old ranks, split evenly; a warning says so. Given one rank's
        state only, its counts carry over and every slot restarts at the start of the saved epoch.
        """
        per_rank = sd["per_rank"] if "per_rank" in sd else [sd]
        own = per_rank[self.rank] if len(per_rank) == self.world_size else per_rank[0]
        for st in per_rank:
            if st is not None and st.get("version") != STATE_VERSION:
                raise ValueError(f"data loader state version {st.get('version')} != {STATE_VERSION}")
        if own["config"] == self._config_key():
            self._skips_done = Counter(own.get("skips_done", {}))
            self.step, self.samples_seen = own["step"], own["samples_seen"]
            self.epoch = own["epoch"] if self.finite else 0
            self._workers = {int(k): v for k, v in own["workers"].items()}
            return
        if (
            any(st is None for st in per_rank)
            or len({st["config"]["world_size"] for st in per_rank}) != 1
            or len(per_rank) != per_rank[0]["config"]["world_size"]
        ):
            self._restart_epoch(own)  # not every old rank's state: only the epoch is known
            return
        start = self._first_unfinished(per_rank)
        total_samples = sum(st["samples_seen"] for st in per_rank)
        self.samples_seen = total_samples // self.world_size
        self.step = self.samples_seen // self.batch_size
        self.epoch = min(st["epoch"] for st in per_rank) if self.finite else 0
        log.warning(
            "data: loader state from %d rank(s) with %s, now %s: not an exact resume; continuing at "
            "shard position %d of the stream (epoch %d), %d samples seen before; partly read shards are "
            "read again",
            len(per_rank),
            own["config"],
            self._config_key(),
            start,
            start // len(self.urls),
            total_samples,
        )
        skips: Counter = Counter()
        self._skips_done = Counter()
        if self.rank == 0:  # the old counts, once
            for st in per_rank:
                self._skips_done.update(st.get("skips_done", {}))
                for w in st["workers"].values():
                    skips.update(w.get("skips", {}))
        self._workers = {lw: dict(start_global=start) for lw in range(self.n_workers)}
        self._workers[0]["skips"] = dict(skips)

    def _restart_epoch(self, sd: dict) -> None:
        """One old rank's state at another layout: its counts carry over, every slot restarts its epoch."""
        self._skips_done = Counter(sd.get("skips_done", {}))
        log.warning(
            "data: loader state of one rank from %s, now %s: resuming at the start of epoch %d, not exactly",
            sd["config"],
            self._config_key(),
            sd["epoch"],
        )
        self.step, self.samples_seen = sd["step"], sd["samples_seen"]
        self.epoch = sd["epoch"] if self.finite else 0
        skips: Counter = Counter()
        for st in sd["workers"].values():
            skips.update(st.get("skips", {}))
        self._workers = {lw: dict(start_epoch=sd["epoch"]) for lw in range(self.n_workers)}
        self._workers[0]["skips"] = dict(skips)

    def _first_unfinished(self, per_rank: list[dict]) -> int:
        """The smallest global shard position some old slot had not finished (all before it were read).

        Old slot ``s`` of ``S`` read positions ``s, s + S, ...``; with next position ``pos`` (or an
        earlier one still waiting in an aspect bucket) everything of it below ``s + pos * S`` is done.
        """
        if any(st["config"]["n_shards"] != len(self.urls) for st in per_rank):
            raise ValueError(
                f"data: saved loader read {per_rank[0]['config']['n_shards']} shards, "
                f"now {len(self.urls)}: the shard stream differs, cannot continue it"
            )
        firsts = []
        for st in per_rank:
            w_old = st["config"]["num_workers"]
            n_slots = st["config"]["world_size"] * w_old
            for lw in range(w_old):
                slot = st["config"]["rank"] * w_old + lw
                ws = st["workers"].get(str(lw), {})
                if "start_global" in ws:  # an old resume this worker had not yet moved on from
                    firsts.append(ws["start_global"])
                elif "start_epoch" in ws:
                    firsts.append(ws["start_epoch"] * len(self.urls))
                else:
                    pos = min([ws.get("pos", 0)] + [p for p, _ in ws.get("pending", [])])
                    firsts.append(slot + pos * n_slots)
        return min(firsts)


def build_train_loader(
    cfg: DataConfig, batch_size: int, rank: int, world_size: int, start_step: int = 0, exact: bool = False
) -> EditLoader:
    """The training loader over ``cfg.train_shards`` for one rank.

    ``exact=True``: one pass, every sample once across all ranks and workers, no shuffling or
    random augmentation, last batches partial (evaluation). ``start_step`` without a saved state
    fast-forwards approximately (exact only if no sample in the skipped range was bad); prefer
    ``load_state_dict``. ``cfg`` is validated where it was made (``train.config.load_config`` validates
    the data section with the rest; a ``DataConfig`` made otherwise is checked with its ``validate()``).
    """
    cfg = as_config(cfg)
    if not cfg.train_shards:
        raise ValueError("data.train_shards is empty: set it to a brace pattern of shards")
    return EditLoader(cfg, expand_shards(cfg.train_shards), batch_size, rank, world_size, exact, start_step)


def build_val_batch(cfg: DataConfig, n: int) -> EditBatch:
    """The first ``n`` valid samples of ``cfg.val_shards`` in file order, evaluation view, one batch.

    Always fixed size (``image_size``; buckets are ignored) so the samples stack into one batch.
    """
    cfg = as_config(cfg)
    if not cfg.val_shards:
        raise ValueError("data.val_shards is empty: set it to a brace pattern of shards")
    vcfg = dataclasses.replace(cfg, buckets=[], num_workers=0)
    loader = EditLoader(vcfg, expand_shards(cfg.val_shards), n, 0, 1, exact=True)
    for batch in loader:
        return batch
    raise ValueError(f"data: no valid sample in val_shards {cfg.val_shards!r}")
