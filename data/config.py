"""``DataConfig``: every knob of the data layer, as an OmegaConf structured config.

Plain types and defaults only, so ``OmegaConf.structured(DataConfig)`` merges YAML onto it and
type-checks it; :meth:`DataConfig.validate` rejects values that would fail later and far away
(in a worker process, hours in) with a ``ValueError`` that names the key.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List

# Shards of the sealed test split are named ``test-*`` (data.synthetic writes them so): final tables only.
SEALED_TEST = re.compile(r"(^|[/\\{,:])test-")


def names_sealed_test_split(pattern: str) -> bool:
    """True when a shard pattern names a shard of the sealed test split (a file name starting ``test-``)."""
    return bool(SEALED_TEST.search(pattern))


@dataclass
class DataConfig:
    train_shards: str = ""  # brace pattern(s), "::"-separated; local paths or "pipe:cmd ..." urls
    val_shards: str = ""
    image_size: int = 256  # fixed output size (square) when buckets is empty; multiple of 8
    buckets: List[List[int]] = field(default_factory=list)  # [[h, w], ...] aspect buckets, or [] = fixed
    resampled: bool = True  # infinite stream of epochs (training); False: one epoch per iteration
    shuffle_shards: bool = True  # new shard permutation every epoch (seeded)
    shuffle_buffer: int = 1000  # sample shuffle buffer within a shard; 1 = no sample shuffle
    seed: int = 0
    num_workers: int = 2  # DataLoader workers per rank (0 = in the training process)
    prefetch_factor: int = 2  # batches prefetched per worker
    max_bad_fraction: float = 0.01  # stop the run when more than this fraction of samples is bad ...
    min_samples_before_bad_check: int = 1000  # ... once a worker has seen at least this many
    cached: bool = False  # read *.latent.safetensors / *.text.safetensors (data.cache); no augmentation
    random_crop_scale: float = 0.8  # min area fraction of the random crop; 1.0 = no random crop
    hflip: bool = False  # random horizontal flip (never for instructions that say left/right)

    def validate(self) -> "DataConfig":
        """Raise ``ValueError("data.<key>: ...")`` for impossible values; returns self."""

        def bad(key: str, why: str) -> None:
            raise ValueError(f"data.{key}={getattr(self, key)!r}: {why}")

        for key in ("train_shards", "val_shards"):
            if names_sealed_test_split(getattr(self, key)):
                bad(key, "names the sealed test split (test-*): no training or in-run evaluation reads it")
        if self.image_size <= 0 or self.image_size % 8:
            bad("image_size", "must be a positive multiple of 8 (VAE downsampling)")
        for b in self.buckets:
            if len(b) != 2 or any((not isinstance(v, int)) or v <= 0 or v % 8 for v in b):
                bad("buckets", f"each bucket is [h, w] with positive multiples of 8, got {b!r}")
        if self.shuffle_buffer < 1:
            bad("shuffle_buffer", "must be >= 1 (1 disables sample shuffling)")
        if self.num_workers < 0:
            bad("num_workers", "must be >= 0")
        if self.prefetch_factor < 1:
            bad("prefetch_factor", "must be >= 1")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            bad("max_bad_fraction", "must be in [0, 1]")
        if self.min_samples_before_bad_check < 0:
            bad("min_samples_before_bad_check", "must be >= 0")
        if not 0.0 < self.random_crop_scale <= 1.0:
            bad("random_crop_scale", "must be in (0, 1]")
        if self.cached and self.buckets:
            bad("buckets", "cached shards have one fixed size (the crop is baked in); use buckets=[]")
        if self.cached and (self.random_crop_scale < 1.0 or self.hflip):
            pass  # augmentation is ignored in cached mode (documented), not an error
        return self
