"""Captioned scenes of the synthetic world: the text-to-image data a miniature base is pretrained on.

The edit set (:mod:`data.synthetic`) needs a base model that already knows its world, as FLUX knows
photographs before anyone fine-tunes it to edit. The generator knows every object it draws, so each
scene comes with an exact caption::

    "a red striped circle, a blue shaded square and a green checkered ring"
    "a yellow shaded triangle and a pink striped cross, with inverted colors"   (a styled scene)
    "a cyan checkered diamond on a white background"                            (a reference-style image)

Scenes are drawn with the edit set's own world (:mod:`data.world`: backgrounds, shapes, finishes,
palette, styles) and sizes, at 128 px, then resized with the loader's filter, so the base sees the
same pixels the editor will.
Everything is a function of (seed, index): a dataset of N scenes is the same on any machine.

:data:`VOCABULARY` lists every word the generator writes, in captions and in edit instructions;
the miniature's word-level tokenizer is built from it (``pretrain.text_to_image``).
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image

from data import world

RENDER_SIZE = 128  # the edit set's shard resolution; scenes are resized from it like shard images
STYLE_SUFFIX = {"invert": "with inverted colors", "sepia": "in sepia", "grayscale": "in grayscale"}
P_STYLE = 0.15  # share of styled scenes (the edit set's style task transforms whole images)
P_REFERENCE = 0.15  # share of single objects on white (what a reference image looks like)

# Every word of the generator's captions and instructions, in a fixed order (token ids follow it:
# append only, so a rebuilt tokenizer keeps the ids of a base trained before).
VOCABULARY: list[str] = (
    ["a", "an", "and", ",", "on", "white", "background", "with", "inverted", "colors", "in", "sepia", "posterized"]
    + ["red", "green", "blue", "yellow", "purple", "orange", "cyan", "black", "circle", "square", "triangle"]
    + ["make", "the", "remove", "replace", "object", "reference", "image", "add", "invert", "of", "apply"]
    + ["filter", "posterize", "to"]
    + ["pink", "diamond", "cross", "ring", "striped", "checkered", "shaded", "convert", "grayscale"]
)
assert set(world.COLORS) | set(world.SHAPES) | set(world.FINISHES) <= set(VOCABULARY)


def caption(objs: list[dict], style: str | None = None, on_white: bool = False) -> str:
    """The caption of a scene: its objects from left to right, joined as English lists are."""
    phrases = [world.a_or_an(world.object_phrase(o)) for o in sorted(objs, key=lambda o: o["cx"])]
    text = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    if on_white:
        text += " on a white background"
    if style is not None:
        text += f", {STYLE_SUFFIX[style]}"
    return text


def make_scene(seed: int, index: int, size: int) -> tuple[np.ndarray, str]:
    """Scene ``index`` of the pretraining set: (uint8 image [size, size, 3], caption)."""
    rng = np.random.default_rng([seed, 7, index, 2])  # 7: apart from the edit set's splits; 2: this world
    kind = rng.uniform()
    if kind < P_REFERENCE:  # one object, centred and large, on white: like a reference image
        obj = world.on_white(world.new_object(rng, []))
        img, text = world.render(None, [obj], RENDER_SIZE), caption([obj], on_white=True)
    else:
        bg, objs = world.scene(rng, 1, 4)  # 1-4 objects: edits add to and remove from 2-4
        img = world.render(bg, objs, RENDER_SIZE)
        style = None
        if kind < P_REFERENCE + P_STYLE:
            style = list(world.STYLES)[int(rng.integers(len(world.STYLES)))]
            img = world.apply_style(img, style)
        text = caption(objs, style)
    if size != RENDER_SIZE:
        img = np.asarray(Image.fromarray(img).resize((size, size), Image.BILINEAR))
    return img, text


SCENES_PER_TASK = 1000  # a worker's share of a parallel make_scenes


def make_scenes(seed: int, start: int, count: int, size: int, workers: int = 1) -> tuple[np.ndarray, list[str]]:
    """Scenes ``start .. start + count - 1``: (uint8 [count, size, size, 3], captions).

    ``workers`` > 1 renders blocks of :data:`SCENES_PER_TASK` scenes in that many processes (20,000
    scenes take ~45 s in one, a sixth of the one-H200 recipe's pretraining). Every scene draws from its
    own seeded stream, so the arrays are the same for any number of workers."""
    if workers > 1 and count >= 2 * SCENES_PER_TASK:
        blocks = [
            (seed, s, min(SCENES_PER_TASK, start + count - s), size)
            for s in range(start, start + count, SCENES_PER_TASK)
        ]
        # spawn, not fork: the caller has usually started torch's threads already
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_scene_block, blocks))
        return np.concatenate([p[0] for p in parts]), [t for p in parts for t in p[1]]
    images, texts = zip(*(make_scene(seed, i, size) for i in range(start, start + count)))
    return np.stack(images), list(texts)


def _scene_block(args: tuple[int, int, int, int]) -> tuple[np.ndarray, list[str]]:
    return make_scenes(*args)
