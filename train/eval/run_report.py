"""A run's checkpoints side by side: their held-out metrics against the step, as a table and a line plot.

``launch/eval.py --all-checkpoints`` (or ``--tags``) evaluates each checkpoint with
``train.eval.evaluation.evaluate`` and hands the results here: one row per checkpoint, ordered by step,
written as markdown (``run_eval.md``), JSON (``run_eval.json``) and a PNG (``run_eval.png``). The plot
is drawn with PIL primitives (matplotlib is not a dependency): one panel per group of metrics, the step
on the x axis, every axis labelled, with tick values, a marker per checkpoint and a legend.
"""

from __future__ import annotations

import math
from typing import Any, Optional

# (panel title, y-axis label, [(metric key, legend name)], fixed y range or None to fit the values)
SUCCESS_PANEL = "edit success"
PANELS: list[tuple[str, str, list[tuple[str, str]], Optional[tuple[float, float]]]] = [
    (SUCCESS_PANEL, "fraction of samples", [("success_mean_over_tasks", "mean over tasks")], (0.0, 1.0)),
    (
        "L1 to the target inside / outside the fine mask",
        "mean |edit - target|",
        [("l1_inside", "inside"), ("l1_outside", "outside")],
        None,
    ),
    ("refined-mask IoU against the fine mask", "IoU", [("mask_iou", "IoU")], (0.0, 1.0)),
    (
        "held-out flow-matching loss",
        "MSE of the velocity",
        [("flow_mse", "all"), ("flow_mse_inside", "inside"), ("flow_mse_outside", "outside")],
        None,
    ),
]
TABLE_COLUMNS = [
    ("success_mean_over_tasks", "success mean"),
    ("l1_inside", "L1 inside"),
    ("l1_outside", "L1 outside"),
    ("mask_iou", "mask IoU"),
    ("flow_mse", "flow loss"),
    ("flow_mse_inside", "flow inside"),
    ("flow_mse_outside", "flow outside"),
]
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def run_row(tag: str, step: int, result: dict) -> dict:
    """One checkpoint's row: its tag and step, the model's metrics, success per task."""
    return {
        "tag": tag,
        "step": step,
        "metrics": dict(result["metrics"]),
        "success_per_task": {t: row.get("success", math.nan) for t, row in sorted(result["per_task"].items())},
        "num_samples": result.get("num_samples"),
    }


def _tasks(rows: list[dict]) -> list[str]:
    return sorted({t for r in rows for t in r["success_per_task"]})


def _value(row: dict, key: str) -> float:
    if key.startswith("success/"):
        return row["success_per_task"].get(key[len("success/") :], math.nan)
    return row["metrics"].get(key, math.nan)


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None or math.isnan(v) else f"{v:.3f}"


def markdown_table(rows: list[dict]) -> str:
    """| step | tag | success mean | success <task> ... | L1 inside | ... | one line per checkpoint."""
    tasks = _tasks(rows)
    cols = TABLE_COLUMNS[:1] + [(f"success/{t}", f"success {t}") for t in tasks] + TABLE_COLUMNS[1:]
    head = "| step | tag | " + " | ".join(name for _, name in cols) + " |"
    rule = "|---:|---|" + "---:|" * len(cols)
    lines = [head, rule]
    for r in rows:
        lines.append(f"| {r['step']} | {r['tag']} | " + " | ".join(_fmt(_value(r, k)) for k, _ in cols) + " |")
    return "\n".join(lines)


def _panels(rows: list[dict]) -> list[tuple[str, str, list[tuple[str, list[float]]], Optional[tuple]]]:
    """(title, y label, [(legend, value per row)], y range) per panel; series with no value are left out."""
    out = []
    for title, ylabel, series, yrange in PANELS:
        if title == SUCCESS_PANEL:
            series = series + [(f"success/{t}", t) for t in _tasks(rows)]
        values = [(name, [_value(r, key) for r in rows]) for key, name in series]
        values = [(n, v) for n, v in values if any(not math.isnan(x) for x in v)]
        if values:
            out.append((title, ylabel, values, yrange))
    return out


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


def _fit_range(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    lo, hi = min(finite), max(finite)
    pad = (hi - lo) * 0.1 or max(abs(hi) * 0.1, 1e-3)
    return max(lo - pad, 0.0) if lo >= 0 else lo - pad, hi + pad


def plot_run(rows: list[dict], path: str) -> None:
    """PNG: one panel per metric group, value against the optimizer step, axes labelled, ticks with values."""
    from PIL import Image, ImageDraw

    panels = _panels(rows)
    steps = [r["step"] for r in rows]
    left, right, top, plot_h, bottom, width = 96, 170, 34, 190, 50, 820
    panel_h = top + plot_h + bottom
    img = Image.new("RGB", (width, max(panel_h * len(panels), panel_h)), "white")
    d = ImageDraw.Draw(img)
    x_lo, x_hi = (min(steps), max(steps)) if steps else (0, 1)
    if x_lo == x_hi:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    plot_w = width - left - right

    def xpix(s: float) -> int:
        return left + int(round((s - x_lo) / (x_hi - x_lo) * plot_w))

    for k, (title, ylabel, series, yrange) in enumerate(panels):
        y_top = k * panel_h + top
        y0 = y_top + plot_h
        lo, hi = yrange or _fit_range([v for _, vals in series for v in vals])

        def ypix(v: float, lo: float = lo, hi: float = hi, y0: int = y0) -> int:
            return y0 - int(round((min(max(v, lo), hi) - lo) / (hi - lo) * plot_h))

        d.text((left, k * panel_h + 8), title, fill="black")
        for tick in _ticks(lo, hi):  # y ticks with values, light grid
            y = ypix(tick)
            d.line([(left + 1, y), (left + plot_w - 1, y)], fill=(225, 225, 225))
            d.line([(left - 4, y), (left, y)], fill="black")
            d.text((left - 44, y - 6), f"{tick:.3g}", fill="black")
        d.rectangle([left, y_top, left + plot_w, y0], outline="black")
        shown = steps if len(steps) <= 10 else steps[:: math.ceil(len(steps) / 10)]
        for s in shown:  # x ticks at the checkpoints' steps
            x = xpix(s)
            d.line([(x, y0), (x, y0 + 4)], fill="black")
            d.text((x - 3 * len(str(s)), y0 + 7), str(s), fill="black")
        d.text((left + plot_w // 2 - 40, y0 + 24), "optimizer step", fill="black")
        _vertical_text(img, ylabel, (6, y_top + plot_h // 2))
        for j, (name, vals) in enumerate(series):
            colour = COLOURS[j % len(COLOURS)]
            points = [(xpix(s), ypix(v)) for s, v in zip(steps, vals) if not math.isnan(v)]
            if len(points) > 1:
                d.line(points, fill=colour, width=2)
            for x, y in points:
                d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            ly = y_top + 6 + 16 * j  # legend, right of the plot
            d.rectangle([left + plot_w + 12, ly + 2, left + plot_w + 22, ly + 10], fill=colour)
            d.text((left + plot_w + 28, ly), name, fill="black")
    img.save(path)


def _vertical_text(img: Any, text: str, centre_left: tuple[int, int]) -> None:
    """``text`` rotated 90 degrees (reading upwards), its left edge at x, centred on y."""
    from PIL import Image, ImageDraw

    w = 7 * len(text) + 4
    label = Image.new("RGB", (w, 14), "white")
    ImageDraw.Draw(label).text((2, 1), text, fill="black")
    label = label.rotate(90, expand=True)
    x, y = centre_left
    img.paste(label, (x, max(0, y - label.height // 2)))
