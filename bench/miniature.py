"""The miniature pipeline end to end: pretrain a base, fine-tune CARE-Edit on it, score held-out edits.

    python bench/miniature.py --base-config configs/base_tiny.yaml --base DIR --edit-config configs/tiny.yaml \
        [--device cuda] [--out runs/miniature] [--data DIR] [--train-samples N] [--data-workers N] \
        [--parallel 4] [--eval-split test|val] [--eval-limit 64] [--eval-steps 20] [--eval-batch-size 32] \
        [--variant NAME key=value ...] ...

1. the synthetic edit set (``python -m data.synthetic --if-absent``: ``--train-samples`` training samples
   rendered in ``--data-workers`` processes, the validation and the sealed test split);
2. the base (``python -m launch.pretrain_base``), unless ``--base`` already holds one (``digests.json``);
3. one CARE-Edit run per ``--variant`` (``launch/train.py`` on the edit config with the base's paths and
   the variant's overrides; ``--parallel`` at a time: several small runs share one GPU);
4. ``launch/eval.py`` on each run's last checkpoint, on ``--eval-split`` (the sealed test split unless
   told otherwise): edit success per task, L1 inside / outside the mask and the box, IoU, beside every
   row that needs no model and the oracle.

Each stage is the command a user types; this script only sequences them and gathers the results.
Prints one JSON line per run and writes ``OUT/summary.json``. Finished stages are reused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import run_logged  # noqa: E402
from data.synthetic import written_patterns  # noqa: E402


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-config", default="configs/base_tiny.yaml")
    p.add_argument("--base", required=True, help="the base's folder (pretrained here unless it holds one)")
    p.add_argument("--base-override", action="append", default=[], help="key=value for the pretraining recipe")
    p.add_argument("--edit-config", default="configs/tiny.yaml")
    p.add_argument("--data", default="artifacts/synthetic")
    p.add_argument("--train-samples", type=int, default=10000, help="training samples of the synthetic set")
    p.add_argument("--data-workers", type=int, default=os.cpu_count() or 1, help="processes rendering the set")
    p.add_argument("--eval-split", default="test", choices=("test", "val"), help="test: the sealed split")
    p.add_argument(
        "--eval-both-samplers",
        action="store_true",
        help="score each run with the sampler keeping the source outside the box (eval/<name>-keep) and "
        "free outside it (eval/<name>-free), besides the recipe's own (eval/<name>)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="runs/miniature")
    p.add_argument("--parallel", type=int, default=1)
    p.add_argument("--eval-limit", type=int, default=64)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument(
        "--eval-batch-size", type=int, default=32, help="held-out samples per edit batch (a GPU takes all 200)"
    )
    p.add_argument(
        "--variant",
        nargs="+",
        action="append",
        default=None,
        metavar=("NAME", "KEY=VALUE"),
        help="a CARE-Edit run: its name and overrides of the edit config (repeatable)",
    )
    return p.parse_args(argv)


def _run(cmd: list[str], log: str) -> None:
    run_logged(cmd, log, ROOT)


def evaluate(checkpoints: str, out: str, name: str, args: argparse.Namespace) -> None:
    """launch/eval.py on a run's last checkpoint; a name ending in -keep / -free forces the sampler's
    keep_outside_box on / off (otherwise the recipe's)."""
    t0 = time.time()
    _run(
        [sys.executable, "launch/eval.py", "--checkpoint", checkpoints, "--data", args.patterns[args.eval_split]]
        + ["--device", args.device, "--out", out, "--limit", str(args.eval_limit), "--steps", str(args.eval_steps)]
        + ["--batch-size", str(args.eval_batch_size)]
        + {"-keep": ["--keep-outside-box"], "-free": ["--no-keep-outside-box"]}.get(name[-5:], []),
        os.path.join(args.out, "logs", f"{name}.eval.log"),
    )
    print(json.dumps(dict(stage=f"eval {name}", seconds=round(time.time() - t0, 1))), flush=True)


def edit_run(name: str, overrides: list[str], args: argparse.Namespace) -> dict:
    """Train one CARE-Edit variant on the base and evaluate it (reused when its eval.json exists)."""
    run_dir = os.path.join(args.out, "runs")
    eval_dir = os.path.join(args.out, "eval", name)
    result_path = os.path.join(eval_dir, "eval.json")
    if not os.path.isfile(result_path):
        t0 = time.time()
        base = os.path.abspath(args.base)
        _run(
            [
                sys.executable,
                "launch/train.py",
                "--config",
                args.edit_config,
                f"run.dir={run_dir}",
                f"run.name={name}",
                f"model.backbone.path={base}",
                f"model.text.t5_path={base}",
                f"model.text.clip_path={base}",
                f"data.train_shards={args.patterns['train']}",
                f"data.val_shards={args.patterns['val']}",
                "logging.progress_bar=false",
                *overrides,
            ],
            os.path.join(args.out, "logs", f"{name}.train.log"),
        )
        train_s = time.time() - t0
        evaluate(os.path.join(run_dir, name, "checkpoints"), eval_dir, name, args)
        for sampler in ("-keep", "-free") if args.eval_both_samplers else ():
            evaluate(os.path.join(run_dir, name, "checkpoints"), eval_dir + sampler, name + sampler, args)
        with open(result_path) as f:
            result = json.load(f)
        result["train_wall_s"] = round(train_s, 1)
        with open(result_path, "w") as f:
            json.dump(result, f, indent=1)
    row = dict(name=name, overrides=overrides)
    for suffix in ("", "-keep", "-free"):
        path = os.path.join(args.out, "eval", name + suffix, "eval.json")
        if os.path.isfile(path):
            with open(path) as f:
                result = json.load(f)
            row["result" + suffix.replace("-", "_")] = dict(
                train_wall_s=result.get("train_wall_s"),
                success_mean_over_tasks=result["metrics"].get("success_mean_over_tasks"),
                success_per_task={t: d.get("success") for t, d in result["per_task"].items()},
                l1_outside_box=result["metrics"].get("l1_outside_box"),
                metrics=result.get("metrics"),
                baselines=result.get("baselines"),
            )
    return row


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    _run(
        [sys.executable, "-m", "data.synthetic", "--out", args.data, "--if-absent"]
        + ["--train", str(args.train_samples), "--workers", str(args.data_workers)],
        os.path.join(args.out, "logs", "data.log"),
    )
    args.patterns = written_patterns(args.data)
    print(json.dumps(dict(stage="data", seconds=round(time.time() - t0, 1))), flush=True)
    if not os.path.isfile(os.path.join(args.base, "digests.json")):
        _run(
            [
                sys.executable,
                "-m",
                "launch.pretrain_base",
                "--config",
                args.base_config,
                "--out",
                args.base,
                "--device",
                args.device,
                *args.base_override,
            ],
            os.path.join(args.out, "logs", "pretrain.log"),
        )
        print(json.dumps(dict(stage="pretrain", seconds=round(time.time() - t0, 1))), flush=True)
    variants = args.variant or [["default"]]
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        futures = [pool.submit(edit_run, v[0], v[1:], args) for v in variants]
        results = []
        for fut in futures:
            try:
                res = fut.result()
            except RuntimeError as e:
                res = dict(error=str(e)[-2000:])
            results.append(res)
            print(json.dumps(res), flush=True)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(dict(results=results, seconds=round(time.time() - t0, 1)), f, indent=1)
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
