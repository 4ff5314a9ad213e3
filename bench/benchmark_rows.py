"""The benchmark's rows that need no model, on a split: is the checker right there?

    python bench/benchmark_rows.py --data 'artifacts/synthetic/test-{000000..000000}.tar' [--image-size 64] \
        [--limit 400]

Scores the editors of ``train/eval/baselines.py`` (do-nothing, paint bucket, paint bucket in the target's
colour, copy-the-reference, noise, oracle) with the evaluation's own code (``train.eval.evaluate``, a
stand-in editor that returns the source) on the split's samples at the given resolution, and prints one
JSON line per row: success per task, its mean over tasks, L1 outside the box, and per task the share
of samples failing each criterion. The checker is right when the oracle passes (>= 98% on every task)
and do-nothing, noise and the paint bucket fail (<= 5% on every task): the last line says whether.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from types import SimpleNamespace
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data.config import DataConfig  # noqa: E402
from train.eval import BASELINES, CRITERIA, EvalSettings, evaluate, iterate_heldout  # noqa: E402

MUST_FAIL = ("do_nothing", "noise", "paint_bucket")


class ReturnsTheSource:
    """A stand-in editor: ``evaluate`` needs one, and scores the baseline rows beside it."""

    def edit(self, batch, num_steps, text_guidance, image_guidance, generator, **_):
        return SimpleNamespace(images=batch.source, refined_mask=batch.coarse_mask, utilisation={})


def rows(data: str, image_size: int, limit: int, batch_size: int = 50) -> dict[str, dict]:
    """``{baseline: {"success": {task: share}, "mean": share, "l1_outside_box": L1, "failed": {task: {criterion: share}}}}``."""
    settings = EvalSettings(steps=1, limit=limit, batch_size=batch_size, flow_loss=False)
    cfg = DataConfig(image_size=image_size, shuffle_buffer=1)
    result = evaluate(ReturnsTheSource(), iterate_heldout(cfg, data, batch_size, limit), settings)
    out = {}
    for name in BASELINES:
        row = result["baselines"][name]
        out[name] = dict(
            success={t: round(d["success"], 4) for t, d in sorted(row["per_task"].items())},
            mean=round(row["metrics"]["success_mean_over_tasks"], 4),
            l1_outside_box=round(row["metrics"]["l1_outside_box"], 4),
            failed={
                t: {c: round(d[f"fail_{c}"], 3) for c in CRITERIA if d.get(f"fail_{c}", 0) > 0}
                for t, d in sorted(row["per_task"].items())
            },
            count={t: d["count"] for t, d in sorted(row["per_task"].items())},
        )
    return out


def checker_is_right(table: dict[str, dict]) -> bool:
    return min(table["oracle"]["success"].values()) >= 0.98 and all(
        max(table[b]["success"].values()) <= 0.05 for b in MUST_FAIL
    )


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--limit", type=int, default=400)
    a = p.parse_args(argv)
    table = rows(a.data, a.image_size, a.limit)
    for name, row in table.items():
        print(json.dumps(dict(row=name, data=a.data, image_size=a.image_size) | row))
    ok = checker_is_right(table)
    print(json.dumps(dict(checker_is_right=ok, oracle_min=min(table["oracle"]["success"].values()))))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
