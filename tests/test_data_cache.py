"""Cached shards: the loader returns exactly the stand-in encoders' outputs of the evaluation view."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.cache import cache_shards
from data.config import DataConfig
from data.loader import build_train_loader, build_val_batch
from tests.helpers.raw_shards import broken_raw, valid_raw, write_raw_shard


def encode_images(x):
    return F.avg_pool2d(x, 4)  # [B, 3, H/4, W/4]


def encode_text(texts):
    words = [t.split() for t in texts]
    L = max(len(w) for w in words)
    embeds = torch.zeros(len(texts), L, 2)
    mask = torch.zeros(len(texts), L, dtype=torch.bool)
    for i, ws in enumerate(words):
        for j, w in enumerate(ws):
            embeds[i, j] = torch.tensor([len(w), sum(map(ord, w)) % 97], dtype=torch.float)
            mask[i, j] = True
    return embeds, mask, embeds.sum(1)


def test_cache_roundtrip(tmp_path):
    samples = [valid_raw(i, size=48) for i in range(9)] + [broken_raw(valid_raw(50, size=48), "missing_key")]
    write_raw_shard(str(tmp_path / "raw" / "r-000000.tar"), samples)
    raw_pattern = str(tmp_path / "raw" / "r-{000000..000000}.tar")
    rep = cache_shards(
        raw_pattern, str(tmp_path / "c"), encode_images, encode_text, image_size=32, batch_size=4, progress=False
    )
    assert rep.written == 9 and dict(rep.skipped) == {"missing_key": 1}

    raw_view = build_val_batch(DataConfig(val_shards=raw_pattern, image_size=32), 9)
    cfg = DataConfig(train_shards=rep.pattern, image_size=32, cached=True, num_workers=0)
    got = [b for b in build_train_loader(cfg, 4, 0, 1, exact=True)]
    assert [k for b in got for k in b.keys] == raw_view.keys
    b = got[0]
    assert b.source is None and b.source_latent.shape == (4, 3, 8, 8)
    assert torch.allclose(b.source_latent, encode_images(raw_view.source[:4]), atol=1e-6)
    assert torch.allclose(b.target_latent, encode_images(raw_view.target[:4]), atol=1e-6)
    assert torch.equal(b.fine_mask, raw_view.fine_mask[:4]) and torch.equal(b.bbox, raw_view.bbox[:4])
    for i in range(4):
        if raw_view.has_reference[i]:
            assert torch.allclose(b.reference_latent[i], encode_images(raw_view.reference[i : i + 1])[0], atol=1e-6)
        else:
            assert not b.reference_latent[i].any()
    e, m, p = encode_text(raw_view.instruction[:4])
    assert torch.equal(b.text_mask[:, : m.shape[1]], m) and not b.text_mask[:, m.shape[1] :].any()
    assert torch.allclose(b.text_embeds[:, : e.shape[1]], e) and torch.allclose(b.pooled_text, p)
