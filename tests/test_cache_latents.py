"""launch/cache_latents.py: cached latents and text embeddings are what the model computes on the fly."""

from __future__ import annotations

import dataclasses

import torch
from omegaconf import OmegaConf

from data.config import DataConfig
from data.loader import build_val_batch
from data.synthetic import write_synthetic
from launch.cache_latents import main as cache_main
from moe.model import build_model
from tests.helpers.model_configs import TINY


def test_cached_shards_give_the_same_model_inputs_as_raw_images(tmp_path):
    raw = write_synthetic(str(tmp_path / "raw"), train=0, val=6, test=0, size=32, samples_per_shard=3, progress=False)
    cfg_path = tmp_path / "cfg.yaml"
    OmegaConf.save(OmegaConf.create({"model": TINY, "data": {"image_size": 32}}), cfg_path)
    assert (
        cache_main(
            [
                "--config",
                str(cfg_path),
                "--src",
                raw["val"],
                "--out",
                str(tmp_path / "cached"),
                "--batch-size",
                "4",
                "--keep-images",
            ]
        )
        == 0
    )
    cached_pattern = str(tmp_path / "cached" / "cached-{000000..000000}.tar")

    cached = build_val_batch(DataConfig(val_shards=cached_pattern, image_size=32, cached=True), 6)
    plain = build_val_batch(DataConfig(val_shards=raw["val"], image_size=32), 6)
    assert cached.keys == plain.keys and cached.source_latent is not None
    assert torch.equal(cached.fine_mask, plain.fine_mask)

    torch.manual_seed(0)
    from tests.helpers.model_configs import tiny_model_config

    model = build_model(tiny_model_config())
    from_cache = model.encode_conditions(cached)
    on_the_fly = model.encode_conditions(dataclasses.replace(plain))
    torch.testing.assert_close(from_cache.base, on_the_fly.base, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.encode_target(cached), model.encode_target(plain), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(from_cache.pooled, on_the_fly.pooled, rtol=1e-4, atol=1e-5)
    n = from_cache.text.shape[1]
    torch.testing.assert_close(from_cache.text, on_the_fly.text[:, :n], rtol=1e-4, atol=1e-5)
    assert torch.equal(from_cache.has_ref, on_the_fly.has_ref)
    if on_the_fly.reference is not None:
        torch.testing.assert_close(from_cache.reference, on_the_fly.reference, rtol=1e-4, atol=1e-5)
