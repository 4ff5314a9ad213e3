"""The first synthetic world (``python -m data.synthetic --world v1``), kept so its sets stay reproducible.

Its edits are easy for a model-free editor: a flat fill of the box in the named colour passed most of
them under the first checker, which is why :mod:`data.world` replaced it. Scenes are a textured gradient background with 2-3 non-overlapping shapes (circle, square,
triangle) in named colours, each (colour, shape) pair unique in its scene so instructions are
unambiguous. Edits, with exact fine masks::

    recolor  "make the red circle blue"           mask = the object
    remove   "remove the green square"            mask = the object
    replace  "replace the blue triangle with the object in the reference image"
                                                  mask = old | new object; ref = new object on white
    add      "add a yellow circle"                mask = the new object
    style    "invert the colors of the image" / sepia / posterize      mask = the whole image

Each sample's JSON also holds a ``check`` field: what the target must contain (the new colour, the
removed object's colour, the style), which ``train.edit_success`` uses to say whether an edit
succeeded.

Everything is a function of (seed, split, index), so a sample does not depend on how many were
generated, and the splits use disjoint seeds and key prefixes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from data.shards import EditRecord

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "purple": (140, 50, 180),
    "orange": (245, 140, 30),
    "cyan": (40, 210, 220),
    "black": (20, 20, 20),
}
SHAPES = ["circle", "square", "triangle"]
EDIT_KINDS = ["recolor", "remove", "replace", "add", "style"]
STYLES = {
    "invert": "invert the colors of the image",
    "sepia": "apply a sepia filter to the image",
    "posterize": "posterize the image",
}
SPLIT_IDS = {"train": 0, "val": 1, "test": 2}


def shape_mask(kind: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean HxW mask of a shape of 'radius' r centred at (cx, cy)."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if kind == "circle":
        return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    if kind == "square":
        return (np.abs(xx - cx) <= r * 0.85) & (np.abs(yy - cy) <= r * 0.85)
    # upward triangle inscribed in the circle of radius r
    top, base = cy - r, cy + r * 0.6
    half = (yy - top) / (base - top) * r * 0.95
    return (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A two-colour gradient with a soft stripe texture (float HxWx3 in 0..255)."""
    c0, c1 = rng.uniform(90, 230, 3), rng.uniform(90, 230, 3)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    t = np.clip(0.5 + (xx - 0.5) * np.cos(ang) + (yy - 0.5) * np.sin(ang), 0, 1)[..., None]
    img = c0 * (1 - t) + c1 * t
    freq, phase = rng.uniform(3, 9), rng.uniform(0, 2 * np.pi)
    stripes = 10 * np.sin(2 * np.pi * freq * (xx * np.cos(ang + 1) + yy * np.sin(ang + 1)) + phase)
    return img + stripes[..., None]


def _place(rng, objs, size, r):
    for _ in range(50):
        cx, cy = rng.uniform(r + 2, size - r - 2, 2)
        if all((cx - o["cx"]) ** 2 + (cy - o["cy"]) ** 2 > (r + o["r"] + 3) ** 2 for o in objs):
            return cx, cy
    return None


def _new_obj(rng, objs, size, taken):
    r = rng.uniform(0.09, 0.16) * size
    pos = _place(rng, objs, size, r)
    free = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in taken]
    if pos is None or not free:
        return None
    color, kind = free[rng.integers(len(free))]
    return dict(kind=kind, color=color, cx=pos[0], cy=pos[1], r=r)


def render(bg: np.ndarray, objs: list[dict]) -> np.ndarray:
    img = bg.copy()
    for o in objs:
        img[shape_mask(o["kind"], o["cx"], o["cy"], o["r"], bg.shape[0])] = COLORS[o["color"]]
    return np.clip(img, 0, 255).astype(np.uint8)


def _style(img: np.ndarray, style: str) -> np.ndarray:
    x = img.astype(np.float32)
    if style == "invert":
        out = 255 - x
    elif style == "sepia":
        m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
        out = x @ m.T
    else:
        out = np.floor(x / 64) * 64 + 32
    return np.clip(out, 0, 255).astype(np.uint8)


def _color_check(name: str, prefix: str = "") -> dict:
    return {f"{prefix}color": name, f"{prefix}rgb": list(COLORS[name])}


def make_sample(seed: int, split: str, index: int, size: int = 128) -> EditRecord:
    """The sample ``index`` of ``split``: a pure function of its arguments.

    The JSON's ``check`` field says what the target must contain, for ``train.edit_success``:
    ``color``/``rgb`` (0..255) and ``shape`` of the object the target gains (recolor, add, replace),
    ``old_color``/``old_rgb`` (and ``old_shape``) of the one it loses (recolor, remove, replace),
    ``style`` for a style edit.
    """
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    bg = background(rng, size)
    objs: list[dict] = []
    for _ in range(int(rng.integers(2, 4))):
        o = _new_obj(rng, objs, size, {(p["color"], p["kind"]) for p in objs})
        if o is not None:
            objs.append(o)
    src = render(bg, objs)
    kind = EDIT_KINDS[int(rng.integers(len(EDIT_KINDS)))]
    taken = {(p["color"], p["kind"]) for p in objs}
    ref = None
    target = objs[int(rng.integers(len(objs)))]
    name = f"{target['color']} {target['kind']}"
    old_mask = shape_mask(target["kind"], target["cx"], target["cy"], target["r"], size)
    pres = ["background"]
    if kind == "add":
        new = _new_obj(rng, objs, size, taken)
        if new is None:  # crowded scene: fall back to a recolor (still deterministic)
            kind = "recolor"
        else:
            tgt = render(bg, objs + [new])
            mask = shape_mask(new["kind"], new["cx"], new["cy"], new["r"], size)
            instruction = f"add a {new['color']} {new['kind']}"
            pres = ["background", "layout"]
            check = dict(_color_check(new["color"]), shape=new["kind"])
    if kind == "recolor":
        colors = [c for c in COLORS if c != target["color"] and (c, target["kind"]) not in taken]
        color = colors[int(rng.integers(len(colors)))]
        tgt = render(bg, [dict(o, color=color) if o is target else o for o in objs])
        mask, instruction = old_mask, f"make the {name} {color}"
        pres = ["background", "structure"]
        check = dict(_color_check(color), **_color_check(target["color"], "old_"), shape=target["kind"])
    elif kind == "remove":
        tgt = render(bg, [o for o in objs if o is not target])
        mask, instruction = old_mask, f"remove the {name}"
        check = dict(_color_check(target["color"], "old_"), old_shape=target["kind"])
    elif kind == "replace":
        choices = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in taken and s != target["kind"]]
        color, shape = choices[int(rng.integers(len(choices)))]
        new = dict(target, color=color, kind=shape)
        tgt = render(bg, [new if o is target else o for o in objs])
        mask = old_mask | shape_mask(shape, new["cx"], new["cy"], new["r"], size)
        ref = render(np.full_like(bg, 255.0), [dict(new, cx=size / 2, cy=size / 2, r=size * 0.3)])
        instruction = f"replace the {name} with the object in the reference image"
        check = dict(
            _color_check(color), shape=shape, **_color_check(target["color"], "old_"), old_shape=target["kind"]
        )
    elif kind == "style":
        style = list(STYLES)[int(rng.integers(len(STYLES)))]
        tgt = _style(src, style)
        mask, instruction = np.ones((size, size), bool), STYLES[style]
        pres = ["layout", "structure"]
        check = dict(style=style)
    return EditRecord(
        key=f"syn{seed}-{split}-{index:07d}",
        src=Image.fromarray(src),
        tgt=Image.fromarray(tgt),
        ref=Image.fromarray(ref) if ref is not None else None,
        mask=mask.astype(np.uint8) * 255,
        instruction=instruction,
        task=kind,
        tags={"scope": "global" if kind == "style" else "local", "type": kind, "preservation": pres},
        source="synthetic",
        extra={"check": check},
    )
