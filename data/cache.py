"""Latent / text-embedding caches: shards of the same schema with the encoders' outputs baked in.

The encoders are caller-supplied callables, so the data layer never imports the model::

    encode_images(Tensor[B, 3, H, W] in [-1, 1]) -> Tensor[B, C, h, w]
    encode_text(list[str]) -> (embeds [B, L, D], mask [B, L] bool, pooled [B, Dp])

Each cached sample keeps ``json`` (width/height/bbox of the cached view) and ``mask.png`` and adds
``latent.safetensors`` (``source``, ``target``, optional ``reference``) and ``text.safetensors``
(``embeds``, ``mask``, ``pooled``); ``keep_images=True`` also keeps the images of the cached view.
Caching fixes the view: every sample is centre-cropped and resized to ``image_size`` once (the
loader's evaluation view), so the loader applies **no augmentation** in cached mode.
"""

from __future__ import annotations

import io
import json
import logging
from collections import Counter
from typing import Callable, Iterator

import torch
import webdataset as wds
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from data import augment
from data.schema import (
    SampleError,
    bbox_from_mask,
    check_regions,
    decode_sample,
    encode_png,
    mask_array,
    parse_meta,
    region_boxes,
)
from data.shards import ShardReport, expand_shards, write_shards

log = logging.getLogger(__name__)
ImageEncoder = Callable[[Tensor], Tensor]
TextEncoder = Callable[[list[str]], tuple[Tensor, Tensor, Tensor]]


def _raw_samples(pattern: str, skipped: Counter) -> Iterator[dict]:
    def handler(exn: Exception) -> bool:
        skipped["corrupt_tar"] += 1
        log.warning("cache: unreadable shard data: %r", exn)
        return False

    for url in expand_shards(pattern):
        yield from wds.tarfile_to_samples(handler=handler)(iter([dict(url=url)]))


def _to_png(t: Tensor) -> bytes:
    return encode_png(t.permute(1, 2, 0).numpy())  # uint8 [3, h, w] from augment.transform


def _encode_batch(
    items: list[dict], encode_images: ImageEncoder, encode_text: TextEncoder, keep_images: bool
) -> list[dict]:
    with torch.no_grad():

        def enc(imgs: list[Tensor]) -> Tensor:
            return encode_images(augment.to_float(torch.stack(imgs))).float().cpu()

        src = enc([it["source"] for it in items])
        tgt = enc([it["target"] for it in items])
        with_ref = [i for i, it in enumerate(items) if it["reference"] is not None]
        ref = enc([items[i]["reference"] for i in with_ref]) if with_ref else None
        embeds, mask, pooled = encode_text([it["meta"]["instruction"] for it in items])
    out = []
    for i, it in enumerate(items):
        lat = {"source": src[i].contiguous(), "target": tgt[i].contiguous()}
        if i in with_ref:
            lat["reference"] = ref[with_ref.index(i)].contiguous()
        text = {
            "embeds": embeds[i].float().cpu().contiguous(),
            "mask": mask[i].bool().cpu().contiguous(),
            "pooled": pooled[i].float().cpu().contiguous(),
        }
        h, w = it["fine_mask"].shape[-2:]
        meta = dict(it["meta"], width=int(w), height=int(h), bbox=list(it["bbox"]))
        sample = {
            "__key__": it["key"],
            "json": json.dumps(meta).encode(),
            "mask.png": encode_png((it["fine_mask"][0].numpy() > 0).astype("uint8") * 255),
            "latent.safetensors": st_save(lat),
            "text.safetensors": st_save(text),
        }
        if keep_images:
            sample["src.png"], sample["tgt.png"] = _to_png(it["source"]), _to_png(it["target"])
            if it["reference"] is not None:
                sample["ref.png"] = _to_png(it["reference"])
        out.append(sample)
    return out


def cache_shards(
    in_pattern: str,
    out_dir: str,
    encode_images: ImageEncoder,
    encode_text: TextEncoder,
    image_size: int,
    batch_size: int = 16,
    prefix: str = "cached",
    keep_images: bool = False,
    shard_size_mb: float = 1000.0,
    progress: bool = True,
) -> ShardReport:
    """Read raw shards (checked like the loader does), encode, write cached shards to ``out_dir``."""
    skipped: Counter = Counter()

    def encoded() -> Iterator[dict]:
        pending: list[dict] = []
        for raw in _raw_samples(in_pattern, skipped):
            try:
                d = decode_sample(raw)
            except SampleError as exn:
                skipped[exn.reason] += 1
                continue
            it = augment.transform(d["src"], d["tgt"], d["ref"], d["mask"], (image_size, image_size), None)
            it.update(key=d["key"], meta=d["meta"])
            pending.append(it)
            if len(pending) == batch_size:
                yield from _encode_batch(pending, encode_images, encode_text, keep_images)
                pending = []
        if pending:
            yield from _encode_batch(pending, encode_images, encode_text, keep_images)

    report = write_shards(encoded(), out_dir, prefix, shard_size_mb, progress=progress)
    report.skipped.update(skipped)
    with open(f"{out_dir}/{prefix}.report.json", "w") as f:
        json.dump(report.to_json(), f, indent=1)
    return report


def decode_cached_sample(raw: dict) -> dict:
    """Raw cached members -> tensors for the loader's collate; raises SampleError."""
    missing = [m for m in ("json", "mask.png", "latent.safetensors", "text.safetensors") if m not in raw]
    if missing:
        raise SampleError("missing_key", f"missing {missing}")
    meta = parse_meta(raw["json"])
    try:
        lat, text = st_load(raw["latent.safetensors"]), st_load(raw["text.safetensors"])
        mask_img = Image.open(io.BytesIO(raw["mask.png"]))
        mask_img.load()
    except Exception as exn:
        raise SampleError("decode_error", str(exn)) from exn
    if "source" not in lat or "target" not in lat or not {"embeds", "mask", "pooled"} <= set(text):
        raise SampleError("missing_key", f"latents {sorted(lat)}, text {sorted(text)}")
    mask = mask_array(mask_img)
    if mask_img.size != (meta["width"], meta["height"]):
        raise SampleError("size_mismatch", f"mask {mask_img.size}, json {meta['width']}x{meta['height']}")
    bbox = bbox_from_mask(mask)
    if bbox != meta["bbox"]:
        raise SampleError("bad_bbox", f"json {meta['bbox']} mask {bbox}")
    h, w = mask.shape
    coarse, labels = augment.box_mask(bbox, h, w), None
    boxes = region_boxes(meta)
    if boxes is not None:  # a compositional sample: one box per region (data/augment.py)
        check_regions(boxes, mask)
        coarse, labels = augment.region_coarse([p > 0 for p in augment.split_by_boxes(mask, boxes)], h, w)
    return dict(
        key=raw.get("__key__", ""),
        meta=meta,
        has_ref="reference" in lat,
        bbox=bbox,
        fine_mask=torch.from_numpy(mask > 0).float()[None],
        coarse_mask=coarse,
        region_labels=labels,
        source_latent=lat["source"],
        target_latent=lat["target"],
        reference_latent=lat.get("reference"),
        text_embeds=text["embeds"],
        text_mask=text["mask"],
        pooled_text=text["pooled"],
    )


def collate_cached(items: list[dict]) -> dict:
    """The ``*_latent`` / ``text_*`` fields of an EditBatch; text padded to the longest in the batch."""
    L = max(it["text_embeds"].shape[0] for it in items)
    D = items[0]["text_embeds"].shape[-1]
    embeds = torch.zeros(len(items), L, D)
    tmask = torch.zeros(len(items), L, dtype=torch.bool)
    for i, it in enumerate(items):
        n = it["text_embeds"].shape[0]
        embeds[i, :n], tmask[i, :n] = it["text_embeds"], it["text_mask"]
    src = torch.stack([it["source_latent"] for it in items])
    return dict(
        source_latent=src,
        target_latent=torch.stack([it["target_latent"] for it in items]),
        reference_latent=torch.stack(
            [it["reference_latent"] if it["reference_latent"] is not None else torch.zeros_like(src[0]) for it in items]
        ),
        text_embeds=embeds,
        text_mask=tmask,
        pooled_text=torch.stack([it["pooled_text"] for it in items]),
    )
