"""The benchmark's world and its splits: deterministic per split, disjoint between splits, the same for
any number of rendering processes, and as varied as its docstring says (six shapes, three finishes,
three textures, overlaps, checks that match the instructions)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from data import world
from data.synthetic import EDIT_KINDS, SPLITS, make_sample, write_synthetic


def _digest(rec) -> str:
    h = hashlib.sha256()
    for im in (rec.src, rec.tgt, rec.ref):
        if im is not None:
            h.update(np.asarray(im).tobytes())
    h.update(rec.mask.tobytes() + rec.instruction.encode() + json.dumps(rec.extra, sort_keys=True).encode())
    return h.hexdigest()


@pytest.mark.parametrize("split", SPLITS)
def test_each_split_is_a_pure_function_of_seed_split_and_index(split):
    assert [_digest(make_sample(0, split, i, 64)) for i in (0, 5, 9)] == [
        _digest(make_sample(0, split, i, 64)) for i in (0, 5, 9)
    ]
    assert _digest(make_sample(0, split, 3, 64)) != _digest(make_sample(1, split, 3, 64))  # the seed matters


def test_train_val_and_test_streams_are_disjoint():
    n = 150
    keys, sources = {}, {}
    for split in SPLITS:
        recs = [make_sample(0, split, i, 32) for i in range(n)]
        keys[split] = {r.key for r in recs}
        sources[split] = {hashlib.sha256(np.asarray(r.src).tobytes()).hexdigest() for r in recs}
        assert len(sources[split]) == n  # no two scenes of a split are the same picture
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not keys[a] & keys[b] and not sources[a] & sources[b], (a, b)


def test_rendering_processes_do_not_change_the_shards(tmp_path):
    members = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        write_synthetic(
            str(out), train=70, val=0, test=0, size=32, samples_per_shard=40, progress=False, workers=workers
        )
        members[workers] = [
            {k: v for k, v in s.items() if k not in ("__url__", "__local_path__")}
            for s in wds.WebDataset(sorted(str(p) for p in out.glob("train-*.tar")), shardshuffle=False)
        ]
    assert len(members[1]) == 70 and members[1] == members[2]


def test_the_world_is_as_varied_as_documented():
    recs = [make_sample(0, "train", i, 64) for i in range(300)]
    assert {r.task for r in recs} == set(EDIT_KINDS)
    checks = [r.extra["check"] for r in recs]
    assert {c["shape"] for c in checks if "shape" in c} == set(world.SHAPES)
    assert {c["finish"] for c in checks if "finish" in c} == set(world.FINISHES)
    assert {c["style"] for c in checks if "style" in c} == set(world.STYLES)
    rng = np.random.default_rng(0)
    scenes = [world.scene(rng) for _ in range(200)]
    assert set(Counter(bg["kind"] for bg, _ in scenes)) == set(world.TEXTURES)
    assert Counter(len(objs) for _, objs in scenes).keys() >= {2, 3, 4}
    sizes = [o["r"] for _, objs in scenes for o in objs]
    assert min(sizes) < world.MIN_R + 0.01 and max(sizes) > world.MAX_R - 0.01
    overlapping = sum(
        any(np.hypot(a["cx"] - b["cx"], a["cy"] - b["cy"]) < a["r"] + b["r"] for a in objs for b in objs if a is not b)
        for _, objs in scenes
    )
    assert overlapping > 20  # objects do overlap, a little


def test_checks_match_the_instructions_and_nothing_changes_outside_the_mask():
    for i in range(80):
        rec = make_sample(0, "val", i, 64)
        check = rec.extra["check"]
        assert check["version"] == 2
        src, tgt, inside = np.asarray(rec.src, np.int16), np.asarray(rec.tgt, np.int16), rec.mask > 0
        assert np.abs(src - tgt)[~inside].max(initial=0) == 0
        assert (rec.ref is not None) == (rec.task == "replace")
        if rec.task == "style":
            assert inside.all() and world.STYLES[check["style"]] == rec.instruction
            continue
        if rec.task in ("add", "recolor"):
            assert check["color"] in rec.instruction and tuple(check["rgb"]) == world.COLORS[check["color"]]
        if rec.task == "add":
            phrase = " ".join(check[k] for k in ("color", "finish", "shape"))
            assert rec.instruction == "add " + world.a_or_an(phrase)
        if rec.task in ("recolor", "remove", "replace"):
            assert f"the {check['old_color']} {check['old_finish']} {check['old_shape']}" in rec.instruction
        if rec.task == "replace":
            assert check["shape"] != check["old_shape"]


def test_a_finish_is_never_one_flat_colour():
    """No single colour matches more than about two thirds of a finished object's pixels within the
    checker's match distance: the reason a flat fill cannot pass a recolor, an add or a replace."""
    from train.eval.edit_success import MATCH

    for finish in world.FINISHES:
        for name, rgb in world.COLORS.items():
            o = dict(shape="circle", color=name, finish=finish, cx=0.5, cy=0.5, r=0.3)
            m = world.shape_mask("circle", 0.5, 0.5, 0.3, 64)
            px = world.finish_colors(rgb, finish, o, 64)[m] / 255.0  # [N, 3]
            best = max(((np.linalg.norm(px - c, axis=1) < MATCH).mean() for c in px[::7]), default=0)
            assert best < 0.7, (finish, name, best)
