"""Evaluate a trained CARE-Edit model on held-out shards: JSON + plot.

``python -m launch.eval --checkpoint RUN/checkpoints|TAG_DIR|weights.safetensors --data 'val-{000000..000000}.tar'
[--out DIR] [--steps N] [--limit N] [--batch-size N] [--seed N] [--device cpu|cuda] [--ema]
[--clip LOCAL_CLIP_DIR] [--dino LOCAL_DINOV2_DIR] [--image-size N] [--tag best | --tags a,b | --all-checkpoints]``

Metrics (train/eval/evaluation.py): edit success per task (train/eval/edit_success.py; for shards whose JSON
says what the target must contain, as data/synthetic.py writes them), L1, L2, L1 inside / outside
the fine mask, refined-mask IoU, expert utilisation per task; CLIP-I and CLIP-T with ``--clip``
(transformers CLIPModel + CLIPProcessor), DINO with ``--dino`` (AutoModel + AutoImageProcessor),
from local folders only. Metrics whose encoder is not given are listed as skipped, on the console
and in the JSON. Success, its failed criteria, L1 and mask IoU also come for the editors that need no
model on the same samples (train/baselines.py: do-nothing, paint bucket, copy-the-reference, noise)
and the oracle (the target returned). Prints a table of the model and baseline rows and why the
model's edits failed; writes ``eval.json`` (with the split: ``test`` for the sealed test split's
``test-*`` shards, which final tables report; tune on ``val``) and the plot ``eval.png`` into ``--out``.

With a run's checkpoint directory: ``--tag best`` (or ``latest``, ``step<N>``) evaluates that checkpoint;
``--all-checkpoints`` evaluates every complete checkpoint the run kept, ``--tags a,b,c`` the listed ones,
with the same samples and seeds, and writes one row per checkpoint against its step (train/eval/run_report.py):
``run_eval.md`` (table), ``run_eval.json`` (the rows, each checkpoint's full result, and the held-out
metrics the run itself recorded at that step) and ``run_eval.png`` (the metrics against the step).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Optional

if not __package__:  # run as a file (deepspeed launch/train.py): launch/by_path.py says why
    import by_path  # noqa: F401

# The project's modules are imported inside the functions, after the arguments are parsed: `--help` and a
# bad argument answer at once, before torch, DeepSpeed and the model load.


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="run checkpoint dir (uses 'latest'), a tag dir, or an export")
    p.add_argument("--data", required=True, help="held-out shards (brace pattern)")
    p.add_argument("--out", default="runs/eval", help="output folder for eval.json and eval.png")
    p.add_argument("--steps", type=int, default=8, help="sampling steps per edit")
    p.add_argument("--limit", type=int, default=64, help="evaluate at most this many samples")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-guidance", type=float, default=None, help="default: the recipe's model.sampling")
    p.add_argument("--image-guidance", type=float, default=None, help="default: the recipe's model.sampling")
    p.add_argument(
        "--keep-outside-box",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the sampler keeps the source outside each sample's box, an inpainting-style constraint "
        "(default: the recipe's model.sampling.keep_outside_box)",
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    p.add_argument("--image-size", type=int, default=None, help="default: the training config's data.image_size")
    p.add_argument("--clip", default=None, help="local CLIP folder (CLIPModel + processor) for CLIP-I / CLIP-T")
    p.add_argument("--dino", default=None, help="local DINOv2 folder (AutoModel + image processor) for DINO")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--tag", default=None, help="with a run's checkpoint dir: latest, best or step<N>")
    which.add_argument("--tags", default=None, help="comma-separated tags of a run: one table row per checkpoint")
    which.add_argument("--all-checkpoints", action="store_true", help="every complete checkpoint the run kept")
    return p.parse_args(argv)


def split_of(pattern: str) -> str:
    """ "test" for the sealed test split (shards named test-*), "val" for validation shards, else "other"."""
    from data.config import names_sealed_test_split

    if names_sealed_test_split(pattern):
        return "test"
    return "val" if "val-" in os.path.basename(pattern.split("::")[0]) else "other"


def checkpoints_to_evaluate(args: argparse.Namespace) -> list[str]:
    """The checkpoint directories of a run that ``--tags`` / ``--all-checkpoints`` name, oldest first, each
    once. Raises FileNotFoundError naming what is missing."""
    from train.checkpoint import list_checkpoints, resolve_tag

    if args.all_checkpoints:
        ckpt_dir = os.path.dirname(resolve_tag(args.checkpoint, "latest"))
        paths = list_checkpoints(ckpt_dir)
        if not paths:
            raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint")
    else:
        paths = [resolve_tag(args.checkpoint, t.strip()) for t in args.tags.split(",") if t.strip()]
    return sorted(set(paths), key=_step_of)


def _step_of(path: str) -> int:
    with open(os.path.join(path, "complete.json")) as f:
        return int(json.load(f)["step"])


def evaluate_checkpoint(checkpoint: str, args: argparse.Namespace, encoders: object) -> dict:
    """The evaluation result of one checkpoint (or export); raises WeightsError for an unusable one."""
    import dataclasses

    from omegaconf import OmegaConf

    from train.eval import EvalSettings, evaluate, iterate_heldout, load_for_inference

    model, cfg = load_for_inference(checkpoint, device=args.device, ema=args.ema)
    data_cfg = OmegaConf.to_object(cfg.data)
    if args.image_size:
        data_cfg = dataclasses.replace(data_cfg, image_size=args.image_size)
    settings = EvalSettings(
        steps=args.steps,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
        text_guidance=args.text_guidance,
        image_guidance=args.image_guidance,
        keep_outside_box=args.keep_outside_box,
    )
    t0 = time.time()
    result = evaluate(
        model,
        iterate_heldout(data_cfg, args.data, args.batch_size, args.limit),
        settings,
        encoders,
        args.device,
        on_batch=lambda n: print(f"  {n} samples ({time.time() - t0:.0f} s)", flush=True),
    )
    result.update(checkpoint=os.path.abspath(checkpoint), data=args.data, seconds=round(time.time() - t0, 1))
    result["split"] = split_of(args.data)
    return result


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from train.eval import EmbeddingEncoders, WeightsError, format_table, plot_results

    checkpoint = args.checkpoint
    try:
        if args.tag:
            from train.checkpoint import resolve_tag

            checkpoint = resolve_tag(args.checkpoint, args.tag)
        runs = checkpoints_to_evaluate(args) if args.tags or args.all_checkpoints else None
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    encoders = EmbeddingEncoders(args.clip, args.dino, args.device)
    for metric, why in encoders.skipped().items():
        print(f"skipping {metric}: {why}")
    try:
        if runs is not None:
            return evaluate_run(runs, args, encoders)
        result = evaluate_checkpoint(checkpoint, args, encoders)
    except WeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "eval.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_results(result, os.path.join(args.out, "eval.png"))
    print(json.dumps(result["metrics"], indent=1))
    print(format_table(result))
    print(f"split: {result['split']} ({args.data})")
    print(f"wrote {os.path.join(args.out, 'eval.json')} and eval.png ({result['num_samples']} samples)")
    return 0


def evaluate_run(paths: list[str], args: argparse.Namespace, encoders: object) -> int:
    """Every checkpoint in ``paths`` with the same samples and seeds: run_eval.{md,json,png} in ``--out``."""
    from train.checkpoint import checkpoint_metrics
    from train.eval import markdown_table, plot_run, run_row

    rows, results = [], {}
    for path in paths:
        tag, step = os.path.basename(path), _step_of(path)
        print(f"{tag} (step {step}):", flush=True)
        result = evaluate_checkpoint(path, args, encoders)
        result["in_run"] = checkpoint_metrics(path)  # what the run's own held-out evaluation logged at this step
        rows.append(run_row(tag, step, result))
        results[tag] = result
    os.makedirs(args.out, exist_ok=True)
    table = markdown_table(rows)
    with open(os.path.join(args.out, "run_eval.md"), "w") as f:
        f.write(f"Held-out evaluation of {len(rows)} checkpoints ({args.data}, {rows[0]['num_samples']} samples, ")
        f.write(f"{args.steps} sampling steps, seed {args.seed}{', EMA' if args.ema else ''})\n\n{table}\n")
    with open(os.path.join(args.out, "run_eval.json"), "w") as f:
        json.dump({"checkpoint": os.path.abspath(args.checkpoint), "rows": rows, "results": results}, f, indent=1)
    plot_run(rows, os.path.join(args.out, "run_eval.png"))
    print(table)
    print(f"wrote run_eval.md, run_eval.json and run_eval.png into {args.out} ({len(rows)} checkpoints)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
