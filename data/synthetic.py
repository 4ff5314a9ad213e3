"""The synthetic edit set: the embedded default data, the benchmark, and the test fixture.

Scenes come from :mod:`data.world` (patterned objects of six shapes on textured backgrounds). Edits,
each with an exact fine mask (the edited object's visible pixels)::

    recolor  "make the red striped circle blue"            the object keeps its shape and finish
    remove   "remove the green checkered square"           the background's texture continues under it
    replace  "replace the blue shaded triangle with the object in the reference image"
                                                           ref = the new object (shape, colour, finish) on white
    add      "add a yellow striped diamond"                where the user's box says
    style    "invert the colors of the image" / sepia / grayscale        mask = the whole image

Each sample's JSON holds a ``check`` field (``version: 2``) that the success checker
(``train.eval.edit_success``) and the model-free baseline editors (``train.eval.baselines``) read: the colour
the instruction names, the old object's colour, the style.

Splits: ``train``, ``val`` (tuning: in-run evaluation, guidance sweeps, ablations) and ``test`` (the
sealed split the final tables report, read by nothing that trains or tunes). Every sample is a pure
function of (seed, split, index): the splits draw from disjoint streams and key prefixes, and a sample
does not depend on how many were written. ``--world v1`` writes the first world (:mod:`data.world_v1`)
exactly as before.

    python -m data.synthetic --out DIR [--train 10000] [--val 200] [--test 400] [--size 128] [--seed 0]
        [--world v2|v1] [--workers N] [--if-absent]

writes ``DIR/{train,val,test}-NNNNNN.tar`` through :func:`data.shards.write_shards` (the writer real
data uses), rendering in ``--workers`` processes, and prints the brace patterns.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from data import world, world_v1
from data.shards import EditRecord, brace_pattern, record_to_sample, write_shards
from data.world import COLORS, FINISHES, SHAPES, STYLES, object_phrase  # noqa: F401 (the world's names)

EDIT_KINDS = ["recolor", "remove", "replace", "add", "style"]
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
SPLITS = tuple(SPLIT_IDS)
WORLDS = ("v2", "v1")
CHECK_VERSION = 2
DEFAULT_COUNTS = {"train": 10000, "val": 200, "test": 400}  # what `make data` writes
SAMPLES_PER_SHARD = 1000


def _rgb(name: str, prefix: str = "") -> dict:
    return {f"{prefix}color": name, f"{prefix}rgb": list(COLORS[name])}


def _record(key: str, src, tgt, mask, instruction: str, kind: str, check: dict, ref=None) -> EditRecord:
    pres = {
        "recolor": ["background", "structure"],
        "add": ["background", "layout"],
        "style": ["layout", "structure"],
    }.get(kind, ["background"])
    return EditRecord(
        key=key,
        src=Image.fromarray(src),
        tgt=Image.fromarray(tgt),
        ref=Image.fromarray(ref) if ref is not None else None,
        mask=mask.astype(np.uint8) * 255,
        instruction=instruction,
        task=kind,
        tags={"scope": "global" if kind == "style" else "local", "type": kind, "preservation": pres},
        source="synthetic",
        extra={"check": dict(check, version=CHECK_VERSION)},
    )


def make_sample(seed: int, split: str, index: int, size: int = 128, world_name: str = "v2") -> EditRecord:
    """Sample ``index`` of ``split``: a pure function of its arguments."""
    if world_name == "v1":
        return world_v1.make_sample(seed, split, index, size)
    if world_name != "v2":
        raise ValueError(f"unknown world {world_name!r} (known: {', '.join(WORLDS)})")
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index, 2])  # 2: a stream apart from world v1's
    bg, objs = world.scene(rng)
    src = world.render(bg, objs, size)
    kind = EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
    key = f"syn{seed}-{split}-{index:07d}"
    i = int(rng.integers(len(objs)))
    old = objs[i]
    if kind == "add":
        new = world.new_object(rng, objs)
        if new is None:  # a crowded scene: a recolor instead (still deterministic)
            kind = "recolor"
        else:
            after = objs + [new]
            check = dict(_rgb(new["color"]), shape=new["shape"], finish=new["finish"])
            mask = world.visible_mask(after, len(objs), size)
            return _record(
                key, src, world.render(bg, after, size), mask, f"add {world.a_or_an(object_phrase(new))}", kind, check
            )
    if kind == "style":
        style = list(STYLES)[int(rng.integers(len(STYLES)))]
        full = np.ones((size, size), bool)
        return _record(key, src, world.apply_style(src, style), full, STYLES[style], kind, dict(style=style))
    name = object_phrase(old)
    old_check = dict(_rgb(old["color"], "old_"), old_shape=old["shape"], old_finish=old["finish"])
    if kind == "recolor":
        taken = {(o["color"], o["shape"]) for o in objs}
        colors = [c for c in COLORS if c != old["color"] and (c, old["shape"]) not in taken]
        color = colors[int(rng.integers(len(colors)))]
        after = [dict(o, color=color) if j == i else o for j, o in enumerate(objs)]
        check = dict(_rgb(color), shape=old["shape"], finish=old["finish"], **old_check)
        mask = world.visible_mask(objs, i, size)
        return _record(key, src, world.render(bg, after, size), mask, f"make the {name} {color}", kind, check)
    if kind == "remove":
        after = objs[:i] + objs[i + 1 :]
        mask = world.visible_mask(objs, i, size)
        return _record(key, src, world.render(bg, after, size), mask, f"remove the {name}", kind, old_check)
    # replace: a new shape, colour and finish in the old object's place, shown by the reference image
    new = world.new_object(rng, [o for j, o in enumerate(objs) if j != i], avoid_shape=old["shape"])
    new = dict(new or world.new_object(rng, [], avoid_shape=old["shape"]), cx=old["cx"], cy=old["cy"], r=old["r"])
    after = [new if j == i else o for j, o in enumerate(objs)]
    mask = world.visible_mask(objs, i, size) | world.visible_mask(after, i, size)
    ref = world.render(None, [world.on_white(new)], size)
    check = dict(_rgb(new["color"]), shape=new["shape"], finish=new["finish"], **old_check)
    instruction = f"replace the {name} with the object in the reference image"
    return _record(key, src, world.render(bg, after, size), mask, instruction, "replace", check, ref=ref)


def generate(seed: int, split: str, n: int, size: int = 128, world_name: str = "v2") -> Iterator[EditRecord]:
    for i in range(n):
        yield make_sample(seed, split, i, size, world_name)


BLOCK = 64  # samples a worker renders and encodes per task


def _encoded_block(args: tuple[int, str, int, int, int, str]) -> list[dict]:
    seed, split, start, count, size, world_name = args
    return [record_to_sample(make_sample(seed, split, i, size, world_name)) for i in range(start, start + count)]


def encoded_samples(seed: int, split: str, n: int, size: int, world_name: str, workers: int) -> Iterator[dict]:
    """Samples 0..n-1 of ``split`` as tar members, in order, rendered and encoded in ``workers`` processes."""
    if workers <= 1:
        yield from (record_to_sample(r) for r in generate(seed, split, n, size, world_name))
        return
    blocks = [(seed, split, s, min(BLOCK, n - s), size, world_name) for s in range(0, n, BLOCK)]
    # spawn, not fork: a caller may have started torch's threads already
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for block in pool.map(_encoded_block, blocks, chunksize=4):
            yield from block


def write_synthetic(
    out: str,
    train: int = DEFAULT_COUNTS["train"],
    val: int = DEFAULT_COUNTS["val"],
    size: int = 128,
    seed: int = 0,
    samples_per_shard: int = SAMPLES_PER_SHARD,
    if_absent: bool = False,
    progress: bool = True,
    test: int = DEFAULT_COUNTS["test"],
    world_name: str = "v2",
    workers: int = 1,
) -> dict[str, str]:
    """Write every split with a count above 0; returns ``{split: brace pattern}``.

    With ``if_absent``, returns at once when ``out/synthetic.json`` records the same arguments and
    every shard it lists exists (``workers`` does not change what is written, so it is not compared).
    """
    args = dict(train=train, val=val, test=test, size=size, seed=seed, samples_per_shard=samples_per_shard)
    args["world"] = world_name
    summary_path = os.path.join(out, "synthetic.json")
    if if_absent and os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        if summary.get("args") == args and all(os.path.isfile(s) for s in summary["shards"]):
            return summary["patterns"]
    patterns, shards = {}, []
    for split, n in (("train", train), ("val", val), ("test", test)):
        if n <= 0:
            continue
        rep = write_shards(
            encoded_samples(seed, split, n, size, world_name, workers),
            out,
            prefix=split,
            max_count=samples_per_shard,
            shard_size_mb=1e6,
            total=n,
            progress=progress,
        )
        assert rep.written == n, f"synthetic generator produced invalid samples: {dict(rep.skipped)}"
        patterns[split] = rep.pattern
        shards += rep.shards
    with open(summary_path, "w") as f:
        json.dump(dict(args=args, patterns=patterns, shards=shards), f, indent=1)
    return patterns


def written_patterns(out: str) -> dict[str, str]:
    """``{split: brace pattern}`` of the set :func:`write_synthetic` wrote into ``out`` (its synthetic.json),
    or, before anything is written there, of the set its defaults (``make data``) will write."""
    path = os.path.join(out, "synthetic.json")
    if not os.path.isfile(path):
        return {split: brace_pattern(out, split, -(-n // SAMPLES_PER_SHARD)) for split, n in DEFAULT_COUNTS.items()}
    with open(path) as f:
        return json.load(f)["patterns"]


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description="Write the synthetic edit set as shards.")
    ap.add_argument("--out", required=True)
    ap.add_argument("--train", type=int, default=DEFAULT_COUNTS["train"])
    ap.add_argument("--val", type=int, default=DEFAULT_COUNTS["val"])
    ap.add_argument(
        "--test", type=int, default=DEFAULT_COUNTS["test"], help="the sealed test split (final tables only)"
    )
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--world", default="v2", choices=WORLDS, help="v1: the first world, as it was")
    ap.add_argument("--samples-per-shard", type=int, default=SAMPLES_PER_SHARD)
    ap.add_argument("--workers", type=int, default=1, help="rendering processes (the output does not change)")
    ap.add_argument("--if-absent", action="store_true", help="do nothing if these shards exist")
    a = ap.parse_args(argv)
    pats = write_synthetic(
        a.out, a.train, a.val, a.size, a.seed, a.samples_per_shard, a.if_absent, True, a.test, a.world, a.workers
    )
    for split, pat in pats.items():
        print(f"{split}: {pat}")


if __name__ == "__main__":
    main()
