"""The evaluation's report: a console table and a bar plot of :func:`train.eval.evaluation.evaluate`'s result.

Rows are the model and the editors that need no model on the same samples (``train.eval.baselines``:
do-nothing, paint bucket, copy-the-reference, noise, and the oracle that returns the target), so every
number can be read against what doing nothing, a flat fill and a perfect edit score. Under the table,
the share of the model's edits failing each success criterion, per task, says why edits fail. The plot uses matplotlib when it is installed and PIL primitives otherwise
(matplotlib is not a dependency); both draw axes, labels and the values on the bars.
"""

from __future__ import annotations

import math
from typing import Any, Optional

ROW_NAMES = {
    "model": "model",
    "do_nothing": "do-nothing",
    "paint_bucket": "paint-bucket",
    "paint_bucket_target_colour": "paint-bucket(target-colour)",
    "copy_reference": "copy-reference",
    "noise": "noise",
    "oracle": "oracle",
}
PIXEL_METRICS = {
    "l1_inside": "L1 inside",
    "l1_outside": "L1 outside",
    "l1_outside_box": "L1 outside box",
    "mask_iou": "mask IoU",
}
MEAN = "mean"  # the success column averaged over tasks
ROW_COLOURS = {
    "model": (60, 120, 200),
    "do-nothing": (170, 170, 170),
    "paint-bucket": (230, 150, 40),
    "paint-bucket(target-colour)": (240, 200, 120),
    "copy-reference": (160, 90, 190),
    "noise": (90, 90, 90),
    "oracle": (90, 170, 90),
}
EXPERT_COLOURS = {"text": (230, 50, 50), "mask": (50, 200, 50), "reference": (50, 100, 255), "base": (150, 150, 150)}


def report_rows(result: dict) -> dict[str, dict]:
    """``{row name: {"metrics", "per_task"}}``: the model, then the baselines the result holds."""
    rows = {ROW_NAMES["model"]: {"metrics": result["metrics"], "per_task": result["per_task"]}}
    for key, row in result.get("baselines", {}).items():
        rows[ROW_NAMES.get(key, key)] = row
    return rows


def _tasks(result: dict) -> list[str]:
    return sorted(result["per_task"])


def _success_of(row: dict, task: str) -> float:
    if task == MEAN:
        return row["metrics"].get("success_mean_over_tasks", math.nan)
    return row["per_task"].get(task, {}).get("success", math.nan)


def _fmt(v: Optional[float]) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_table(result: dict) -> str:
    """Plain-text table: one line per row; success per task and its mean over tasks, then the pixel metrics."""
    tasks = _tasks(result)
    cols = [f"success {t}" for t in tasks] + [f"success {MEAN}"] + list(PIXEL_METRICS.values())
    rows = report_rows(result)
    name_w = max(len(n) for n in rows)
    widths = [max(len(c), 6) for c in cols]
    lines = [" ".join([" " * name_w] + [c.rjust(w) for c, w in zip(cols, widths)])]
    for name, row in rows.items():
        values = [_success_of(row, t) for t in tasks + [MEAN]] + [row["metrics"].get(k) for k in PIXEL_METRICS]
        lines.append(" ".join([name.ljust(name_w)] + [_fmt(v).rjust(w) for v, w in zip(values, widths)]))
    by_mask: dict[str, list[str]] = {}
    for k, row in result.get("baselines", {}).items():
        if "mask_iou_of" in row:
            by_mask.setdefault(row["mask_iou_of"], []).append(ROW_NAMES.get(k, k))
    notes = ["mask IoU: model = its refined mask"] + [f"{', '.join(n)} = the {m}" for m, n in by_mask.items()]
    lines.append("; ".join(notes) + " (each against the fine mask)")
    lines += failure_lines(result)
    if "success" in result.get("skipped_metrics", {}):
        lines.append(f"success unavailable: {result['skipped_metrics']['success']}")
    elif result.get("num_checked") is not None:
        lines.append(f"success over {result['num_checked']} of {result['num_samples']} samples (those with a check)")
    g, settings = result.get("guidance") or {}, result.get("settings") or {}
    if g.get("text") is not None and g.get("image") is not None and "steps" in settings:
        keep = {True: ", the source kept outside the box", False: ", free outside the box"}.get(
            g.get("keep_outside_box"), ""
        )
        lines.append(
            f"sampling: {settings['steps']} Euler steps, text guidance {g['text']}, image guidance {g['image']}{keep}"
        )
    return "\n".join(lines)


def failure_lines(result: dict) -> list[str]:
    """Per task, the share of the model's checked edits that failed each criterion (an edit may fail
    several): what the edits get wrong."""
    names = [k for k in result["metrics"] if k.startswith("fail_")]
    lines = []
    for task in _tasks(result):
        d = result["per_task"][task]
        parts = [f"{k[5:]} {d[k]:.0%}" for k in names if not math.isnan(d.get(k, math.nan)) and d[k] > 0]
        if parts or any(not math.isnan(d.get(k, math.nan)) for k in names):
            lines.append(f"  {task}: " + (", ".join(parts) if parts else "no criterion failed"))
    return ["model's edits failing each criterion:"] + lines if lines else []


def _panels(result: dict) -> list[tuple[str, list[str], dict[str, list[float]], dict[str, tuple]]]:
    """(title, group labels, {series: values per group}, {series: colour}) for each panel."""
    tasks = _tasks(result)
    rows = report_rows(result)
    row_colours = {n: ROW_COLOURS.get(n, (0, 0, 0)) for n in rows}
    panels = [
        (
            "edit success per task (fraction of samples)",
            tasks + [MEAN],
            {n: [_success_of(r, t) for t in tasks + [MEAN]] for n, r in rows.items()},
            row_colours,
        ),
        (
            "L1 to the target inside / outside the fine mask; mask IoU",
            list(PIXEL_METRICS.values()),
            {n: [r["metrics"].get(k, math.nan) for k in PIXEL_METRICS] for n, r in rows.items()},
            row_colours,
        ),
    ]
    util = result.get("utilisation_per_task", {})
    experts = sorted({e for d in util.values() for e in d})
    if experts:
        groups = sorted(util)
        panels.append(
            (
                "expert utilisation per task (fraction of tokens routed)",
                groups,
                {e: [util[g].get(e, math.nan) for g in groups] for e in experts},
                {e: EXPERT_COLOURS.get(e, (0, 0, 0)) for e in experts},
            )
        )
    return panels


def plot_results(result: dict, path: str) -> None:
    """PNG of the report's panels (success, pixel metrics, expert utilisation) with values on the bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pil(_panels(result), path)
        return
    _plot_matplotlib(plt, _panels(result), path)


def _plot_matplotlib(plt: Any, panels: list, path: str) -> None:
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8, 1.6 * max(len(p[1]) for p in panels)), 3.6 * len(panels)))
    for ax, (title, groups, series, colours) in zip(list(axes) if len(panels) > 1 else [axes], panels):
        width = 0.8 / max(len(series), 1)
        for j, (name, values) in enumerate(series.items()):
            xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(groups))]
            bars = ax.bar(
                xs,
                [0 if math.isnan(v) else v for v in values],
                width,
                label=name,
                color=[c / 255 for c in colours[name]],
            )
            ax.bar_label(bars, labels=[_fmt(v) if not math.isnan(v) else "n/a" for v in values], fontsize=7)
        ax.set_xticks(range(len(groups)), groups)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("value")
        ax.set_title(title)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_pil(panels: list, path: str) -> None:
    from PIL import Image, ImageDraw

    bar_w, gap, left, top_pad, plot_h, bottom_pad = 30, 24, 50, 52, 180, 36
    panel_h = top_pad + plot_h + bottom_pad
    group_w = [len(p[2]) * bar_w + gap for p in panels]
    width = left + max(gw * len(p[1]) for gw, p in zip(group_w, panels)) + 20
    width = max(width, 640)
    img = Image.new("RGB", (width, panel_h * len(panels)), "white")
    d = ImageDraw.Draw(img)
    for k, ((title, groups, series, colours), gw) in enumerate(zip(panels, group_w)):
        y_top = k * panel_h + top_pad
        y0 = y_top + plot_h  # the x axis
        d.text((left, k * panel_h + 6), title, fill="black")
        lx = width - 20 - sum(24 + 6 * len(name) for name in series)  # legend, right-aligned, one row
        for name in series:
            d.rectangle([lx, k * panel_h + 22, lx + 10, k * panel_h + 32], fill=colours[name])
            d.text((lx + 14, k * panel_h + 21), name, fill="black")
            lx += 24 + 6 * len(name)
        d.line([(left, y_top), (left, y0)], fill="black")
        d.line([(left, y0), (width - 10, y0)], fill="black")
        for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = y0 - int(tick * plot_h)
            d.line([(left - 4, y), (left, y)], fill="black")
            d.text((left - 34, y - 6), f"{tick:.2f}", fill="black")
        for i, group in enumerate(groups):
            gx = left + gap // 2 + i * gw
            for j, name in enumerate(series):
                v = series[name][i]
                x = gx + j * bar_w
                if math.isnan(v):
                    d.text((x + 2, y0 - 14), "n/a", fill="black")
                    continue
                top = y0 - int(min(max(v, 0.0), 1.0) * plot_h)
                d.rectangle([x, top, x + bar_w - 4, y0], fill=colours[name])
                d.text((x, top - 12), f"{v:.2f}", fill="black")
            d.text((gx, y0 + 6), group, fill="black")
    img.save(path)
