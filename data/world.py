"""The synthetic world the benchmark edits: patterned objects of six shapes on textured backgrounds.

Why this world: every edit in it needs an editor. A flat fill of the user's box (the paint bucket)
fails it, because

* every object has a *finish* (striped, checkered or shaded) that a recolor must keep and an add or a
  replace must draw, and no single colour matches more than about half of a finished object's pixels;
* objects come in six shapes (circle, square, triangle, diamond, cross, ring) whose box is not the
  shape, so paint that fills the box changes background the edit must leave alone;
* every background is a gradient under a texture (stripes, checks or smooth noise) strong enough that
  the mean colour around a removed object is not the background under it: a removal must continue
  the texture;
* a replacement takes its shape, colour and finish from the reference image, an addition from the
  instruction ("add a blue striped diamond").

Objects have varied sizes and may overlap a little (later ones are drawn on top). Patterns are laid out
in the object's own frame (period and phase follow its centre and radius), so the reference image,
which shows the object larger, carries the same pattern the target has.

Everything is a pure function of its arguments; :func:`scene` draws a scene from a numpy Generator and
:func:`render` draws it at any size (coordinates are fractions of the image side).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 120, 180),
}
SHAPES = ["circle", "square", "triangle", "diamond", "cross", "ring"]
FINISHES = ["striped", "checkered", "shaded"]
TEXTURES = ["stripes", "checks", "noise"]
STYLES = {
    "invert": "invert the colors of the image",
    "sepia": "apply a sepia filter to the image",
    "grayscale": "convert the image to grayscale",
}
MIN_R, MAX_R = 0.11, 0.20  # object radius as a fraction of the image side
MAX_OVERLAP = 0.25  # two objects' centres are at least (1 - MAX_OVERLAP) x (r1 + r2) apart

Obj = dict  # {"shape", "color", "finish", "cx", "cy", "r"}: centre and radius as fractions of the side


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as fractions of the side: (xx, yy), each [size, size]."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int) -> np.ndarray:
    """Boolean [size, size]: the shape of radius ``r`` centred at (cx, cy) (fractions of the side)."""
    xx, yy = _grid(size)
    dx, dy = (xx - cx) / r, (yy - cy) / r
    if shape == "circle":
        return dx * dx + dy * dy <= 1.0
    if shape == "square":
        return (np.abs(dx) <= 0.82) & (np.abs(dy) <= 0.82)
    if shape == "triangle":  # upward, inscribed in the unit circle
        return (dy >= -1.0) & (dy <= 0.6) & (np.abs(dx) <= (dy + 1.0) / 1.6 * 0.95)
    if shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= 1.0
    if shape == "cross":
        return ((np.abs(dx) <= 0.32) & (np.abs(dy) <= 0.95)) | ((np.abs(dy) <= 0.32) & (np.abs(dx) <= 0.95))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= 1.0) & (d2 >= 0.5**2)
    raise ValueError(f"unknown shape {shape!r} (known: {', '.join(SHAPES)})")


def finish_colors(color: tuple[int, int, int], finish: str, obj: Obj, size: int) -> np.ndarray:
    """float [size, size, 3]: the object's colour at every pixel under its finish (masked by the caller).

    striped: diagonal bands of the colour and its dark tone; checkered: cells of the colour and its light
    tint; shaded: lit from the upper left, from a light tint to a dark tone. Period, cells and light all
    follow the object's centre and radius."""
    c = np.asarray(color, np.float32)
    dark, light = c * 0.45, c + (255.0 - c) * 0.6
    xx, yy = _grid(size)
    u, v = (xx - obj["cx"]) / obj["r"], (yy - obj["cy"]) / obj["r"]
    if finish == "striped":  # bands across the diagonal, half a radius wide, a band edge through the centre
        on = np.floor((u + v) * np.sqrt(0.5) / 0.5) % 2 == 0
    elif finish == "checkered":  # cells of half a radius, a corner at the centre
        on = (np.floor(u / 0.5) + np.floor(v / 0.5)) % 2 == 0
    elif finish == "shaded":
        t = np.clip((u + v) * np.sqrt(0.5), -1.0, 1.0)[..., None]  # -1 upper left .. 1 lower right
        return np.where(t < 0, c + (light - c) * (-t), c + (dark - c) * t)
    else:
        raise ValueError(f"unknown finish {finish!r} (known: {', '.join(FINISHES)})")
    return np.where(on[..., None], c, dark if finish == "striped" else light)


def texture(rng: np.random.Generator, size: int) -> dict:
    """Parameters of a background: a two-colour gradient under one texture, drawn at any size by
    :func:`render_background`."""
    kind = TEXTURES[int(rng.integers(len(TEXTURES)))]
    bg = dict(
        kind=kind,
        c0=rng.uniform(80, 200, 3).round(1).tolist(),
        c1=rng.uniform(80, 200, 3).round(1).tolist(),
        angle=float(rng.uniform(0, 2 * np.pi)),
        amp=float(rng.uniform(30, 45)),
        tint=rng.uniform(0.6, 1.0, 3).round(3).tolist(),  # the texture's colour: not only grey
    )
    if kind == "stripes":
        bg.update(period=float(rng.uniform(0.10, 0.18)), tex_angle=float(rng.uniform(0, np.pi)))
    elif kind == "checks":
        bg.update(cell=float(rng.uniform(0.07, 0.12)), tex_angle=float(rng.choice([0.0, np.pi / 4])))
    else:  # smooth noise: a few plane waves of random direction, period and phase
        waves = 4
        bg.update(
            periods=rng.uniform(0.12, 0.3, waves).round(4).tolist(),
            angles=rng.uniform(0, 2 * np.pi, waves).round(4).tolist(),
            phases=rng.uniform(0, 2 * np.pi, waves).round(4).tolist(),
        )
    return bg


def render_background(bg: dict, size: int) -> np.ndarray:
    """float [size, size, 3] in 0..255 (before clipping)."""
    xx, yy = _grid(size)
    a = bg["angle"]
    t = np.clip(0.5 + (xx - 0.5) * np.cos(a) + (yy - 0.5) * np.sin(a), 0, 1)[..., None]
    base = np.asarray(bg["c0"], np.float32) * (1 - t) + np.asarray(bg["c1"], np.float32) * t
    if bg["kind"] == "stripes":
        ta = bg["tex_angle"]
        pattern = np.sin(2 * np.pi * (xx * np.cos(ta) + yy * np.sin(ta)) / bg["period"])
    elif bg["kind"] == "checks":
        ta = bg["tex_angle"]
        u, v = xx * np.cos(ta) + yy * np.sin(ta), -xx * np.sin(ta) + yy * np.cos(ta)
        pattern = ((np.floor(u / bg["cell"]) + np.floor(v / bg["cell"])) % 2) * 2.0 - 1.0
    else:
        pattern = sum(
            np.sin(2 * np.pi * (xx * np.cos(an) + yy * np.sin(an)) / p + ph)
            for p, an, ph in zip(bg["periods"], bg["angles"], bg["phases"])
        ) / np.sqrt(len(bg["periods"]) / 2.0)
    return base + bg["amp"] * pattern[..., None] * np.asarray(bg["tint"], np.float32)


def render(bg: Optional[dict], objs: list[Obj], size: int) -> np.ndarray:
    """uint8 [size, size, 3]: the background (white when None) with the objects drawn in order."""
    img = render_background(bg, size) if bg is not None else np.full((size, size, 3), 255.0, np.float32)
    for o in objs:
        m = shape_mask(o["shape"], o["cx"], o["cy"], o["r"], size)
        img[m] = finish_colors(COLORS[o["color"]], o["finish"], o, size)[m]
    return np.clip(img, 0, 255).round().astype(np.uint8)


def visible_mask(objs: list[Obj], index: int, size: int) -> np.ndarray:
    """Boolean [size, size]: the pixels of ``objs[index]`` that no later object covers."""
    o = objs[index]
    m = shape_mask(o["shape"], o["cx"], o["cy"], o["r"], size)
    for p in objs[index + 1 :]:
        m &= ~shape_mask(p["shape"], p["cx"], p["cy"], p["r"], size)
    return m


def place(rng: np.random.Generator, objs: list[Obj], r: float, tries: int = 60) -> Optional[tuple[float, float]]:
    """A centre for an object of radius ``r`` inside the image, overlapping each other object by at most
    :data:`MAX_OVERLAP` of the sum of radii; None when the scene is too crowded."""
    for _ in range(tries):
        cx, cy = rng.uniform(r + 0.02, 1 - r - 0.02, 2)
        if all(np.hypot(cx - o["cx"], cy - o["cy"]) >= (1 - MAX_OVERLAP) * (r + o["r"]) for o in objs):
            return float(cx), float(cy)
    return None


def new_object(rng: np.random.Generator, objs: list[Obj], avoid_shape: Optional[str] = None) -> Optional[Obj]:
    """A random object that fits beside ``objs``, its (colour, shape) unique in the scene (so a name like
    "the red circle" picks one object); None when none fits."""
    r = float(rng.uniform(MIN_R, MAX_R))
    pos = place(rng, objs, r)
    taken = {(o["color"], o["shape"]) for o in objs}
    free = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in taken and s != avoid_shape]
    if pos is None or not free:
        return None
    color, shape = free[int(rng.integers(len(free)))]
    finish = FINISHES[int(rng.integers(len(FINISHES)))]
    return dict(shape=shape, color=color, finish=finish, cx=pos[0], cy=pos[1], r=r)


def scene(rng: np.random.Generator, min_objects: int = 2, max_objects: int = 4) -> tuple[dict, list[Obj]]:
    """A background and ``min_objects``..``max_objects`` objects (fewer if the scene fills up)."""
    bg = texture(rng, 0)
    objs: list[Obj] = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        o = new_object(rng, objs)
        if o is not None:
            objs.append(o)
    return bg, objs


def apply_style(img: np.ndarray, style: str) -> np.ndarray:
    """uint8 [H, W, 3] -> the image under a global style."""
    x = img.astype(np.float32)
    if style == "invert":
        out = 255.0 - x
    elif style == "sepia":
        m = np.array([[0.393, 0.769, 0.189], [0.349, 0.686, 0.168], [0.272, 0.534, 0.131]], np.float32)
        out = x @ m.T
    elif style == "grayscale":
        out = (x @ np.array([0.299, 0.587, 0.114], np.float32))[..., None].repeat(3, -1)
    else:
        raise ValueError(f"unknown style {style!r} (known: {', '.join(STYLES)})")
    return np.clip(out, 0, 255).round().astype(np.uint8)


def object_phrase(o: Obj) -> str:
    """How captions and instructions name an object: "red striped circle"."""
    return f"{o['color']} {o['finish']} {o['shape']}"


def a_or_an(phrase: str) -> str:
    """The phrase with its indefinite article: "a red circle", "an orange ring"."""
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def on_white(o: Obj) -> Obj:
    """The object as a reference image shows it: centred and large (its pattern scales with it)."""
    return dict(o, cx=0.5, cy=0.5, r=0.3)
