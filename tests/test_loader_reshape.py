"""The loader resumed at another world size: continues from the shards consumed, skips nothing, says so."""

from __future__ import annotations

import logging

from data.config import DataConfig
from data.loader import build_train_loader

SHARD = 6


def _setup(raw_shards, n_shards=8):
    pattern, keys = raw_shards([SHARD] * n_shards)
    cfg = DataConfig(
        train_shards=pattern,
        image_size=32,
        num_workers=0,
        shuffle_buffer=5,
        resampled=False,
        min_samples_before_bad_check=10_000,
    )
    return cfg, keys


def _keys(loader, n=None):
    out = []
    for b in loader:
        out += b.keys
        if n is not None and len(out) >= n:
            break
    return out


def test_two_ranks_to_one_continues_from_consumed_shards(raw_shards, caplog):
    cfg, keys = _setup(raw_shards)
    old = [build_train_loader(cfg, 4, r, 2) for r in range(2)]
    seen = _keys(old[0], 16) + _keys(old[1], 8)  # uneven on purpose: rank 0 is a shard further
    states = [ld.state_dict() for ld in old]
    new = build_train_loader(cfg, 4, 0, 1)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        new.load_state_dict({"per_rank": states})
    assert "not an exact resume" in caplog.text
    assert new.state_dict()["samples_seen"] == 24 and new.state_dict()["step"] == 6  # totals over the old ranks
    rest = _keys(new)  # the rest of this epoch (finite mode: one iter is one epoch)
    assert set(seen) | set(rest) == set(keys)  # nothing skipped
    again = set(seen) & set(rest)
    assert len(again) <= 2 * SHARD  # at most the shard each old slot was in the middle of
    assert len(again) < len(seen)  # not a restart of the epoch


def test_one_rank_state_only_restarts_the_epoch_with_a_warning(raw_shards, caplog):
    cfg, keys = _setup(raw_shards, 4)
    a = build_train_loader(cfg, 4, 1, 2)
    _keys(a, 4)
    b = build_train_loader(cfg, 4, 0, 1)
    with caplog.at_level(logging.WARNING, logger="data.loader"):
        b.load_state_dict(a.state_dict())
    assert "start of epoch 0" in caplog.text
    assert set(_keys(b)) == set(keys)
