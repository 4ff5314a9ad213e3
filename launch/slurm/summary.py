"""Collect the final metrics of many runs (a sweep, an ablation grid) into one table.

    python -m launch.slurm.summary 'runs/ablations-*'              # markdown table on stdout
    python -m launch.slurm.summary runs/ --csv runs/ablations.csv  # ... and a CSV file
    python -m launch.slurm.summary 'runs/ablations-*' --format csv # CSV on stdout

Each argument is a run directory (it holds ``losses.jsonl``), a directory of run directories, or a
glob of either. What is read, all of it written by the training loop (train/loop.py) on rank 0:

* ``losses.jsonl``: one record per optimizer step, ``{"step", "loss", "skipped"}``; a resumed run
  appends the steps after its checkpoint again, so the last record of a step wins. ``step`` is the
  last step recorded, ``loss`` that step's total loss (mean over ranks), ``skipped`` the number of
  skipped steps.
* ``config.yaml`` (the resolved config): ``steps`` = train.steps; ``status`` is ``done`` when
  ``step`` reached it, else ``incomplete`` (still running, preempted and not yet resumed, or failed).
* TensorBoard scalars in ``tb/`` (``logging.tensorboard_dir``): every ``loss/<term>`` at the last
  step it was logged (``tb_step``; the loop always logs the final step): the mean of that term over
  the last ``logging.every`` steps. One column per term (``loss/total`` as ``total``).
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import math
import os
import re
import sys
from typing import Any, Optional

FIXED = ("run", "status", "step", "steps", "loss", "skipped", "tb_step")


def find_runs(patterns: list[str]) -> list[str]:
    runs: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) or ([pattern] if os.path.isdir(pattern) else [])
        for m in matches:
            if os.path.isfile(os.path.join(m, "losses.jsonl")):
                runs.append(m)
            elif os.path.isdir(m):
                runs.extend(sorted(os.path.dirname(p) for p in glob.glob(os.path.join(m, "*", "losses.jsonl"))))
    seen, out = set(), []
    for r in runs:
        key = os.path.realpath(r)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return sorted(out, key=_natural_key)


def _natural_key(path: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", os.path.basename(os.path.normpath(path)))]


def read_losses(run: str) -> tuple[Optional[int], Optional[float], int]:
    """(last step, its loss, skipped steps) from losses.jsonl (the last record of a step wins)."""
    by_step: dict[int, dict] = {}
    with open(os.path.join(run, "losses.jsonl")) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            by_step[int(rec["step"])] = rec
    if not by_step:
        return None, None, 0
    last = max(by_step)
    return last, float(by_step[last]["loss"]), sum(1 for r in by_step.values() if r.get("skipped"))


def read_config(run: str) -> dict:
    path = os.path.join(run, "config.yaml")
    if not os.path.isfile(path):
        return {}
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) or {}


def read_tb_terms(tb_dir: str) -> tuple[Optional[int], dict[str, float]]:
    """Every ``loss/<term>`` scalar at its last logged step (the largest step; the latest write wins)."""
    if not os.path.isdir(tb_dir):
        return None, {}
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(tb_dir, size_guidance={event_accumulator.SCALARS: 0})
    acc.Reload()
    terms: dict[str, float] = {}
    last_step = None
    for tag in acc.Tags().get("scalars", []):
        if not tag.startswith("loss/"):
            continue
        events = acc.Scalars(tag)
        if not events:
            continue
        ev = max(events, key=lambda e: (e.step, e.wall_time))
        terms[tag[len("loss/") :]] = float(ev.value)
        last_step = ev.step if last_step is None else max(last_step, ev.step)
    return last_step, terms


def collect(run: str) -> dict[str, Any]:
    cfg = read_config(run)
    step, loss, skipped = read_losses(run)
    steps = (cfg.get("train") or {}).get("steps")
    tb_dir = (cfg.get("logging") or {}).get("tensorboard_dir") or os.path.join(run, "tb")
    tb_step, terms = read_tb_terms(tb_dir)
    status = "done" if step is not None and steps is not None and step >= steps else "incomplete"
    row: dict[str, Any] = {
        "run": (cfg.get("run") or {}).get("name") or os.path.basename(os.path.normpath(run)),
        "status": status,
        "step": step,
        "steps": steps,
        "loss": loss,
        "skipped": skipped,
        "tb_step": tb_step,
    }
    row.update(terms)
    return row


def columns(rows: list[dict[str, Any]]) -> list[str]:
    terms = sorted({k for r in rows for k in r if k not in FIXED}, key=lambda k: (k == "total", k))
    return list(FIXED) + terms


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = columns(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def to_csv(rows: list[dict[str, Any]]) -> str:
    cols = columns(rows)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(cols)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in cols])
    return buf.getvalue()


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories, directories of runs, or globs (quote them)")
    p.add_argument("--format", choices=("markdown", "csv"), default="markdown", help="what to print on stdout")
    p.add_argument("--csv", default=None, help="also write the table as CSV to this file")
    p.add_argument("--markdown", default=None, help="also write the table as markdown to this file")
    a = p.parse_args(argv)
    runs = find_runs(a.runs)
    if not runs:
        print(f"no runs (directories with losses.jsonl) match {a.runs}", file=sys.stderr)
        return 1
    rows = [collect(r) for r in runs]
    sys.stdout.write(to_markdown(rows) if a.format == "markdown" else to_csv(rows))
    for path, text in ((a.csv, to_csv), (a.markdown, to_markdown)):
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(text(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
