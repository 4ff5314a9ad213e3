"""The synthetic benchmark as a scientific check: train the tiny config with each ablation, evaluate.

``python bench/ablations.py [--steps 20] [--seeds 0 1] [--image-size 32] [--micro-batch 4]
[--eval-limit 16] [--eval-steps 4] [--parallel 2] [--out runs/ablations] [--write docs/RESULTS.md]``

Each (variant, seed) runs in its own process (``--one VARIANT SEED``): ``train.loop.train`` on the
synthetic train shards, then ``train.evaluation.evaluate`` on the held-out val shards from the
checkpoint it wrote (loaded through ``train.export``, as a user would). Results are JSON per run
under ``--out``; the parent prints a JSON summary and, with ``--write``, the Markdown table of means
and spreads (sample std over seeds) that docs/RESULTS.md holds, between the markers named after
``--out``'s last component (``<!-- ablation-table-<name>:start -->``). Finished runs are reused (delete
``--out`` to start over), so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

UNTRAINED = "untrained (init)"
GRID = os.path.join(ROOT, "configs", "ablations.yaml")


def load_variants(path: str = GRID) -> dict[str, list[str]]:
    """name -> dotlist overrides of configs/tiny.yaml: the sets of the ablation grid (the same file the
    SLURM sweep runs), its ``common`` overrides first, and the untrained row (the full model as
    initialised, no training step: what training bought)."""
    from omegaconf import OmegaConf

    grid = OmegaConf.load(path)
    common = list(grid.get("common") or [])
    variants = {str(s.name): common + [str(o) for o in s.overrides] for s in grid.sets}
    variants[UNTRAINED] = []
    return variants


VARIANTS: dict[str, list[str]] = load_variants()
REFERENCE = next(iter(VARIANTS))  # the grid's first set: the full model
METRICS = ("flow_mse", "flow_mse_inside", "flow_mse_outside", "l1", "l1_inside", "l1_outside", "mask_iou")
SYNTH = "artifacts/synthetic"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def run_one(variant: str, seed: int, args: argparse.Namespace) -> dict:
    """Train one (variant, seed) in this process, then evaluate its checkpoint on the held-out split."""
    from train.config import load_config
    from train.evaluation import EvalSettings, evaluate, iterate_heldout
    from train.export import load_for_inference
    from train.loop import train

    run_root = os.path.join(args.out, f"{slug(variant)}_seed{seed}")
    overrides = [
        f"run.dir={run_root}",
        f"run.seed={seed}",
        f"data.seed={seed}",
        f"train.steps={args.steps}",
        f"train.micro_batch={args.micro_batch}",
        f"data.image_size={args.image_size}",
        f"schedule.warmup_steps={max(1, args.steps // 10)}",
        "logging.images_every=0",
        "logging.progress_bar=false",
        f"logging.every={max(1, args.steps // 4)}",
        f"checkpoint.every={args.steps}",
        "checkpoint.keep=1",
        f"data.train_shards={args.data}/train-{{000000..000007}}.tar",
        f"data.val_shards={args.data}/val-{{000000..000000}}.tar",
        *VARIANTS[variant],
    ]
    cfg = load_config(os.path.join(ROOT, "configs", "tiny.yaml"), overrides)
    t0 = time.time()
    if variant == UNTRAINED:  # the same seeded build training starts from, evaluated as is
        from train.export import build_inference_model

        model, steps, losses = build_inference_model(cfg), 0, [float("nan")]
    elif os.path.isfile(os.path.join(run_root, "tiny", "checkpoints", f"step{args.steps:08d}", "config.yaml")):
        steps = args.steps  # trained before (--reeval): evaluate the finished checkpoint again
        losses = [json.loads(line)["loss"] for line in open(os.path.join(run_root, "tiny", "losses.jsonl"))]
        model, cfg = load_for_inference(os.path.join(run_root, "tiny", "checkpoints"))
    else:
        steps = train(cfg).step
        losses = [json.loads(line)["loss"] for line in open(os.path.join(run_root, "tiny", "losses.jsonl"))]
        model, cfg = load_for_inference(os.path.join(run_root, "tiny", "checkpoints"))
    train_s = time.time() - t0
    settings = EvalSettings(
        steps=args.eval_steps, limit=args.eval_limit, batch_size=args.eval_limit, seed=0, group_by_task=False
    )
    t1 = time.time()
    ev = evaluate(
        model, iterate_heldout(OmegaConf_to(cfg.data), cfg.data.val_shards, args.eval_limit, args.eval_limit), settings
    )
    out = {
        "variant": variant,
        "seed": seed,
        "overrides": VARIANTS[variant],
        "steps": steps,
        "first_loss": losses[0],
        "final_loss": sum(losses[-5:]) / len(losses[-5:]),
        "train_s": round(train_s, 1),
        "eval_s": round(time.time() - t1, 1),
        **ev,
    }
    with open(os.path.join(args.out, f"{slug(variant)}_seed{seed}.json"), "w") as f:
        json.dump(out, f, indent=1)
    return out


def OmegaConf_to(node):  # noqa: N802 - tiny helper kept local to avoid importing omegaconf at module level
    from omegaconf import OmegaConf

    return OmegaConf.to_object(node)


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else float("nan")
    return m, sd


def paired_delta(results: list[dict], variant: str, metric: str, reference: str = REFERENCE) -> str:
    """Mean ± std over seeds of (variant - reference) for the same seed: same data order and frozen
    weights, so the seed-to-seed spread that both share cancels."""
    ref = {r["seed"]: r["metrics"][metric] for r in results if r["variant"] == reference}
    d = [r["metrics"][metric] - ref[r["seed"]] for r in results if r["variant"] == variant and r["seed"] in ref]
    m, sd = mean_std(d)
    return "-" if math.isnan(m) else f"{m:+.4f} ± {sd:.4f}" if not math.isnan(sd) else f"{m:+.4f}"


def table(results: list[dict]) -> str:
    """Markdown: one row per variant, mean ± sample std over seeds, plus the final training loss."""
    cols = ["final train loss", *METRICS]
    lines = [
        "| variant | seeds | " + " | ".join(cols) + " | Δ flow_mse vs full, paired |",
        "|---|---|" + "---|" * (len(cols) + 1),
    ]
    for variant in VARIANTS:
        rs = [r for r in results if r["variant"] == variant]
        if not rs:
            continue
        cells = []
        for c in cols:
            vals = [r["final_loss"] if c == "final train loss" else r["metrics"][c] for r in rs]
            m, sd = mean_std(vals)
            cells.append("-" if math.isnan(m) else f"{m:.4f} ± {sd:.4f}" if not math.isnan(sd) else f"{m:.4f}")
        cells.append(paired_delta(results, variant, "flow_mse"))
        lines.append(f"| {variant} | {len(rs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--eval-limit", type=int, default=16)
    p.add_argument("--eval-steps", type=int, default=4)
    p.add_argument("--parallel", type=int, default=2, help="runs at a time (each with OMP_NUM_THREADS=1)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), help="subset of: " + ", ".join(VARIANTS))
    p.add_argument("--data", default=SYNTH, help="synthetic set (python -m data.synthetic --out DIR)")
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--write", default=None, help="write the table into this Markdown file (between markers)")
    p.add_argument("--one", nargs=2, metavar=("VARIANT", "SEED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.one:
        run_one(args.one[0], int(args.one[1]), args)
        return 0
    t0 = time.time()
    jobs = [(v, s) for s in args.seeds for v in args.variants]
    pending = [j for j in jobs if not os.path.isfile(os.path.join(args.out, f"{slug(j[0])}_seed{j[1]}.json"))]
    passthrough = [
        f"--steps={args.steps}",
        f"--image-size={args.image_size}",
        f"--micro-batch={args.micro_batch}",
        f"--eval-limit={args.eval_limit}",
        f"--eval-steps={args.eval_steps}",
        f"--data={args.data}",
        f"--out={args.out}",
    ]
    running: list[tuple[subprocess.Popen, tuple[str, int]]] = []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR"):
        env.pop(k, None)
    failed = []
    while pending or running:
        while pending and len(running) < args.parallel:
            v, s = pending.pop(0)
            log = open(os.path.join(args.out, f"{slug(v)}_seed{s}.log"), "w")
            proc = subprocess.Popen(
                [sys.executable, __file__, *passthrough, "--one", v, str(s)],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            running.append((proc, (v, s)))
        time.sleep(2)
        for proc, job in list(running):
            if proc.poll() is not None:
                running.remove((proc, job))
                print(f"[{time.time() - t0:6.0f} s] {job[0]} seed {job[1]}: exit {proc.returncode}", flush=True)
                if proc.returncode != 0:
                    failed.append(job)
    results = []  # every finished run of these seeds in --out (also variants not run this time)
    for v, s in [(v, s) for s in args.seeds for v in VARIANTS]:
        path = os.path.join(args.out, f"{slug(v)}_seed{s}.json")
        if os.path.isfile(path):
            with open(path) as f:
                results.append(json.load(f))
    md = table(results)
    print(md)
    trained = [r for r in results if r["steps"] > 0]
    summary = {
        "wall_s": round(time.time() - t0, 1),
        "runs": len(results),
        "failed": failed,
        "train_s_per_run": round(sum(r["train_s"] for r in trained) / max(1, len(trained)), 1),
        "eval_s_per_run": round(sum(r["eval_s"] for r in results) / max(1, len(results)), 1),
    }
    print(json.dumps(summary))
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"summary": summary, "table": md, "args": vars(args)}, f, indent=1)
    if args.write:
        write_table(args.write, md, f"ablation-table-{os.path.basename(os.path.normpath(args.out))}")
    return 1 if failed else 0


def write_table(path: str, md: str, name: str) -> None:
    """Replace the text between the ``name`` table markers of ``path`` (or append them)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = open(path).read() if os.path.isfile(path) else ""
    block = f"{start}\n{md}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text += "\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    sys.exit(main())
