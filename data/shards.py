"""Shard names and the one shard writer: checked samples in, WebDataset tar shards and a skip report out.

Both ``data.build_shards`` (real data from a manifest) and ``data.synthetic`` write through
:func:`write_shards`, so the synthetic set exercises exactly the code path real data takes.
Writing itself is ``webdataset.ShardWriter``; this module adds the checks, the bbox derivation
from the fine mask, and the report of what was skipped and why. Every reader (the loader, the
caches, the evaluation) names shards with the same brace patterns: :func:`expand_shards`.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from data.schema import SampleError, bbox_from_mask, check_sample, encode_png, parse_meta

log = logging.getLogger(__name__)


@dataclass
class EditRecord:
    """One decoded edit before writing. ``mask`` is uint8 HxW, nonzero = edit region."""

    key: str
    src: Image.Image
    tgt: Image.Image
    mask: np.ndarray
    instruction: str
    task: str
    tags: dict
    source: str
    ref: Optional[Image.Image] = None
    extra: dict = field(default_factory=dict)  # merged into the json (e.g. original ids)


@dataclass
class ShardReport:
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    shards: list = field(default_factory=list)
    pattern: str = ""  # brace pattern of the shards written, e.g. DIR/edit-{000000..000003}.tar

    def to_json(self) -> dict:
        return dict(written=self.written, skipped=dict(self.skipped), shards=self.shards, pattern=self.pattern)


def expand_shards(spec: str) -> list[str]:
    """Brace patterns (``"::"``-separated) to a list of urls; local paths or ``pipe:`` commands."""
    urls = wds.shardlists.expand_urls(spec) if spec else []
    if not urls:
        raise ValueError(f"data: shard spec {spec!r} expands to no shards")
    return urls


def brace_pattern(out_dir: str, prefix: str, n: int) -> str:
    last = max(n - 1, 0)
    return os.path.join(out_dir, f"{prefix}-{{{0:06d}..{last:06d}}}.tar")


def record_to_sample(rec: EditRecord) -> dict[str, Any]:
    """Check a record and encode it as tar members; raises SampleError.

    The mask is binarised from "nonzero" (the producer's contract); the box is derived from it
    here and never taken from the producer, so it cannot disagree with the mask.
    """
    mask = np.where(np.asarray(rec.mask) > 0, 255, 0).astype(np.uint8)
    if mask.ndim != 2:
        raise SampleError("mask_not_binary", f"mask shape {mask.shape}")
    w, h = rec.src.size
    meta = dict(rec.extra)
    meta.update(
        instruction=rec.instruction.strip() if isinstance(rec.instruction, str) else rec.instruction,
        bbox=bbox_from_mask(mask),
        task=rec.task,
        tags=rec.tags,
        source=rec.source,
        width=w,
        height=h,
    )
    meta = parse_meta(meta)
    src = rec.src.convert("RGB")
    tgt = rec.tgt.convert("RGB")
    ref = rec.ref.convert("RGB") if rec.ref is not None else None
    check_sample(meta, src, tgt, Image.fromarray(mask, "L"), ref)
    sample = {
        "__key__": rec.key,
        "src.png": encode_png(src),
        "tgt.png": encode_png(tgt),
        "mask.png": encode_png(mask),
        "json": json.dumps(meta).encode(),
    }
    if ref is not None:
        sample["ref.png"] = encode_png(ref)
    return sample


def write_shards(
    records: Iterable[EditRecord | SampleError | dict],
    out_dir: str,
    prefix: str = "edit",
    shard_size_mb: float = 1000.0,
    max_count: int = 100_000,
    total: Optional[int] = None,
    progress: bool = True,
    report_name: Optional[str] = None,
) -> ShardReport:
    """Write records to ``out_dir/prefix-NNNNNN.tar``; returns (and saves) the report.

    ``records`` may yield a :class:`SampleError` in place of a record whose files could not be
    read, so the reader's failures land in the same report, or an already encoded sample (the
    output of :func:`record_to_sample`, e.g. computed in a process pool). The report is written as
    ``out_dir/<report_name or prefix>.report.json``; counts per reason are also logged.
    """
    os.makedirs(out_dir, exist_ok=True)
    report = ShardReport()
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    writer = wds.ShardWriter(
        pattern, maxsize=int(shard_size_mb * 1e6), maxcount=max_count, verbose=0, post=report.shards.append
    )
    seen_keys: set[str] = set()
    try:
        for rec in tqdm(records, total=total, disable=not progress, desc=f"shards {prefix}", unit="sample"):
            try:
                if isinstance(rec, SampleError):
                    raise rec
                sample = rec if isinstance(rec, dict) else record_to_sample(rec)
                if sample["__key__"] in seen_keys:
                    raise SampleError("duplicate_key", sample["__key__"])
            except SampleError as exn:
                report.skipped[exn.reason] += 1
                log.debug("skip %s", exn)
                continue
            seen_keys.add(sample["__key__"])
            writer.write(sample)
            report.written += 1
    finally:
        writer.close()
    if report.written == 0 and report.shards:
        # ShardWriter opens its first shard eagerly; an empty tar is not a shard.
        for s in report.shards:
            os.remove(s)
        report.shards = []
    report.shards = [os.path.abspath(s) for s in report.shards]
    report.pattern = brace_pattern(out_dir, prefix, len(report.shards)) if report.shards else ""
    with open(os.path.join(out_dir, f"{report_name or prefix}.report.json"), "w") as f:
        json.dump(report.to_json(), f, indent=1)
    for reason, n in sorted(report.skipped.items()):
        log.warning("%s: skipped %d samples: %s", prefix, n, reason)
    return report
