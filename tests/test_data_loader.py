"""The streaming loader: exact-once epochs, exact resume, skip counting, the stop rule, alignment."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.config import DataConfig
from data.loader import build_train_loader, build_val_batch, shard_positions
from data.schema import bbox_from_mask
from data.shards import EditRecord, write_shards
from tests.helpers.raw_shards import (
    BREAKAGES,
    broken_raw,
    coord_image,
    truncate_inside,
    valid_raw,
    wide_raw,
    write_raw_shard,
)


def _cfg(pattern, **kw):
    base = dict(
        train_shards=pattern,
        val_shards=pattern,
        image_size=32,
        num_workers=2,
        shuffle_buffer=5,
        random_crop_scale=0.6,
        min_samples_before_bad_check=10_000,
    )
    base.update(kw)
    return DataConfig(**base)


def _take(loader, n):
    out = []
    for b in loader:
        out.append(b.keys)
        if len(out) == n:
            break
    return out


def test_shard_positions_cover_each_shard_once_per_epoch():
    for n_shards, n_slots in [(7, 4), (3, 4), (8, 2)]:
        for epoch in range(3):
            got = []
            for slot in range(n_slots):
                got += [s for _, e, s in shard_positions(n_shards, slot, n_slots, 0, True, epoch)]
            assert sorted(got) == list(range(n_shards))
    # infinite mode: permutations differ between epochs
    gen = shard_positions(7, 0, 1, 0, True, None)
    seq = [next(gen)[2] for _ in range(14)]
    assert sorted(seq[:7]) == list(range(7)) and seq[:7] != seq[7:]


def test_exact_mode_every_sample_once_across_2_ranks_x_2_workers(raw_shards):
    pattern, keys = raw_shards([5, 6, 7, 3, 4, 6])
    seen = []
    for rank in range(2):
        loader = build_train_loader(_cfg(pattern), batch_size=4, rank=rank, world_size=2, exact=True)
        seen += [k for b in loader for k in b.keys]
    assert len(seen) == len(keys) == 31
    assert sorted(seen) == sorted(keys)


@pytest.mark.parametrize("with_buckets", [False, True])
def test_resume_gives_the_batches_of_the_uninterrupted_run(tmp_path, raw_shards, with_buckets):
    if with_buckets:  # mixed aspect ratios: samples wait in buckets across batches
        pattern, _ = raw_shards([9, 8, 10, 7], make=lambda i: (wide_raw if i % 3 == 0 else valid_raw)(i))
        kw = dict(buckets=[[32, 32], [32, 48]])
    else:
        pattern, _ = raw_shards([9, 8, 10, 7])
        kw = {}
    # a bad sample in the part before the restart: its skip must not shift the order after it
    # bad data in the part before the restart: skipping it must not shift the order after it,
    # and its counts must neither be lost nor counted twice
    write_raw_shard(
        str(tmp_path / "s-000004.tar"),
        [valid_raw(100), broken_raw(valid_raw(101), "decode_error"), valid_raw(102), valid_raw(103)],
    )
    tail = [valid_raw(110 + i) for i in range(5)]
    truncate_inside(write_raw_shard(str(tmp_path / "s-000005.tar"), tail), tail[3]["__key__"] + ".tgt.png")
    pattern = pattern.replace("000003}", "000005}")
    cfg = _cfg(pattern, **kw)
    full_loader = build_train_loader(cfg, 3, rank=1, world_size=2)
    full = _take(full_loader, 16)
    first = build_train_loader(cfg, 3, rank=1, world_size=2)
    assert _take(first, 7) == full[:7]
    state = first.state_dict()
    assert state["step"] == 7 and state["samples_seen"] == 21
    resumed = build_train_loader(cfg, 3, rank=1, world_size=2)
    resumed.load_state_dict({"per_rank": [None, state]})
    assert _take(resumed, 9) == full[7:]
    assert resumed.skip_stats() == full_loader.skip_stats()
    assert full_loader.skip_stats()["corrupt_tar"] >= 1 and full_loader.skip_stats()["decode_error"] >= 1
    # the resampled stream runs past the end of an epoch (each rank sees ~20 samples per epoch)
    assert sum(len(k) for k in full) > 30


def test_start_step_without_state_fast_forwards_clean_data_exactly(raw_shards):
    pattern, _ = raw_shards([9, 8, 10, 7])
    cfg = _cfg(pattern)
    full = _take(build_train_loader(cfg, 3, rank=0, world_size=2), 12)
    assert _take(build_train_loader(cfg, 3, rank=0, world_size=2, start_step=5), 7) == full[5:]


def test_resume_with_other_world_size_keeps_step_and_epoch(raw_shards):
    pattern, _ = raw_shards([6, 6, 6, 6])
    cfg = _cfg(pattern)
    a = build_train_loader(cfg, 4, 0, 2)
    _take(a, 5)
    sd = a.state_dict()
    b = build_train_loader(cfg, 4, 0, 1)
    b.load_state_dict(sd)
    batches = _take(b, 3)
    assert b.state_dict()["step"] == 8 and b.state_dict()["samples_seen"] == 32
    assert len(batches) == 3 and all(len(k) == 4 for k in batches)
    assert b.state_dict()["epoch"] >= sd["epoch"]


def _broken_tree(tmp_path):
    good = [valid_raw(i) for i in range(10)]
    bad = [broken_raw(valid_raw(20 + i), how) for i, how in enumerate(BREAKAGES)]
    mixed = good[:3] + bad[:2] + good[3:6] + bad[2:] + good[6:]
    write_raw_shard(str(tmp_path / "b-000000.tar"), mixed)
    tail = [valid_raw(40 + i) for i in range(6)]
    path = write_raw_shard(str(tmp_path / "b-000001.tar"), tail)
    truncate_inside(path, tail[3]["__key__"] + ".src.png")  # samples 0-2 survive
    return str(tmp_path / "b-{000000..000001}.tar"), [s["__key__"] for s in good + tail[:3]]


def test_bad_samples_are_skipped_and_counted_by_reason(tmp_path):
    pattern, good_keys = _broken_tree(tmp_path)
    loader = build_train_loader(_cfg(pattern), 4, 0, 1, exact=True)
    seen = [k for b in loader for k in b.keys]
    assert sorted(seen) == sorted(good_keys)
    stats = loader.skip_stats()
    expected = {how: 1 for how in BREAKAGES} | {"corrupt_tar": 1}
    assert {r: c for r, c in stats.items() if c} == expected


def test_too_many_bad_samples_stop_with_the_shard_name(tmp_path):
    write_raw_shard(str(tmp_path / "ok-000000.tar"), [valid_raw(i) for i in range(8)])
    write_raw_shard(
        str(tmp_path / "ok-000001.tar"), [broken_raw(valid_raw(10 + i), "empty_instruction") for i in range(8)]
    )
    cfg = _cfg(
        str(tmp_path / "ok-{000000..000001}.tar"),
        num_workers=1,
        shuffle_shards=False,
        max_bad_fraction=0.25,
        min_samples_before_bad_check=8,
    )
    with pytest.raises(RuntimeError, match=r"ok-000001\.tar") as err:
        _take(build_train_loader(cfg, 2, 0, 1), 100)
    assert "max_bad_fraction" in str(err.value)
    # below the threshold: trains on, the bad ones counted
    cfg.max_bad_fraction = 0.6
    loader = build_train_loader(cfg, 2, 0, 1)
    assert len(_take(loader, 12)) == 12 and loader.skip_stats()["empty_instruction"] >= 8


def _coord_shards(tmp_path, n=12, w=120, h=90):
    """Source = target = coordinate image; masks are discs at varying places."""
    recs = []
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        cx, cy, r = 10 + 9 * i % (w - 20), 10 + 7 * i % (h - 20), 4 + i % 5
        mask = (((xx - cx) ** 2 + (yy - cy) ** 2) <= r * r).astype(np.uint8) * 255
        recs.append(
            EditRecord(
                key=f"c{i:03d}",
                src=coord_image(w, h),
                tgt=coord_image(w, h),
                mask=mask,
                instruction="edit",
                task="recolor",
                tags={},
                source="synthetic",
            )
        )
    rep = write_shards(recs, str(tmp_path), prefix="coord", max_count=6, progress=False)
    return rep.pattern, {r.key: r.mask for r in recs}


def test_augmentation_keeps_images_and_masks_aligned(tmp_path):
    pattern, masks = _coord_shards(tmp_path)
    cfg = _cfg(pattern, image_size=48, random_crop_scale=0.3, hflip=True, shuffle_buffer=1, num_workers=0)
    flips = 0
    for b in _iter_batches(build_train_loader(cfg, 4, 0, 1), 6):
        assert torch.equal(b.source, b.target)  # one crop for both
        for i, key in enumerate(b.keys):
            fine = b.fine_mask[i, 0].numpy() > 0
            x0, y0, x1, y1 = b.bbox[i].tolist()
            assert fine.any() and bbox_from_mask(fine) == [x0, y0, x1, y1]  # tight box of the fine mask
            assert (b.coarse_mask[i, 0].numpy() > 0).sum() == (x1 - x0) * (y1 - y0)
            assert not (fine & ~(b.coarse_mask[i, 0].numpy() > 0)).any()
            # every fine-mask pixel came from (next to) a fine-mask pixel of the original
            px = ((b.source[i] + 1) * 127.5).numpy()
            sx, sy = np.rint(px[0][fine]).astype(int), np.rint(px[1][fine]).astype(int)
            orig = masks[key] > 0
            near = np.zeros_like(orig)
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    near |= np.roll(orig, (dy, dx), (0, 1))
            assert near[sy.clip(0, 89), sx.clip(0, 119)].all()
            # cropped, not just resized: 48 output pixels span fewer than the 90 source rows
            col = px[1][:, 24]
            assert col[-1] - col[0] < 90
            flips += int(px[0][24, -1] < px[0][24, 0])
    assert 0 < flips < 24  # hflip happens, and not always


def _iter_batches(loader, n):
    for i, b in enumerate(loader):
        yield b
        if i + 1 == n:
            return


def test_val_batch_is_fixed_and_in_file_order(raw_shards):
    pattern, keys = raw_shards([5, 5])
    cfg = _cfg(pattern, buckets=[[32, 48]])
    a, b = build_val_batch(cfg, 7), build_val_batch(cfg, 7)
    assert a.keys == keys[:7] and torch.equal(a.source, b.source)
    assert a.source.shape == (7, 3, 32, 32) and a.tag_ids.dtype == torch.long
    assert ((a.tag_ids == -1) | (a.tag_ids >= 0)).all() and (a.tag_ids[:, 0] >= 1).all()


def test_pipe_urls_stream_like_local_files(raw_shards):
    pattern, keys = raw_shards([4, 5])
    cfg = _cfg(f"pipe:cat {pattern}", num_workers=0)
    assert sorted(k for b in build_train_loader(cfg, 4, 0, 1, exact=True) for k in b.keys) == sorted(keys)


def test_resume_inside_a_truncated_shard_does_not_count_its_error_twice(tmp_path):
    samples = [valid_raw(i) for i in range(9)]
    truncate_inside(write_raw_shard(str(tmp_path / "t-000000.tar"), samples), samples[7]["__key__"] + ".src.png")
    cfg = _cfg(str(tmp_path / "t-{000000..000000}.tar"), num_workers=0, shuffle_buffer=50)
    full_loader = build_train_loader(cfg, 2, 0, 1)
    full = _take(full_loader, 5)  # 7 good samples per pass: the 5th batch starts the second pass
    first = build_train_loader(cfg, 2, 0, 1)
    _take(first, 2)
    assert first.skip_stats()["corrupt_tar"] == 1
    resumed = build_train_loader(cfg, 2, 0, 1)
    resumed.load_state_dict(first.state_dict())
    assert _take(resumed, 3) == full[2:]
    assert resumed.skip_stats()["corrupt_tar"] == full_loader.skip_stats()["corrupt_tar"] == 2
