"""The ablation grid on the pretrained miniature: every set of configs/ablations.yaml, fine-tuned on the
same frozen base, over several seeds, scored on held-out edits beside doing nothing.

    python bench/ablations.py [--config configs/mid.yaml] [--steps N] [--micro-batch N]
        [--checkpoint-every 500] [--seeds 0 1 2] [--variants full k1 ...] [--device cuda] [--parallel 11]
        [--eval-limit 200] [--eval-steps 20] [--eval-batch-size 200] [--out runs/ablations] [--write docs/RESULTS.md]
        [--results DIR] [--images ablations] [--report-only] [--set key=value ...]

The variants are the ``sets`` of configs/ablations.yaml (the file the SLURM sweep runs), each applied
with the grid's ``common`` overrides on top of ``--config`` (by default the one-H200 recipe, on the
embedded pretrained base; its steps are where that recipe's held-out success stops rising), then
``--set`` overrides. Every (variant, seed) is one job of three
commands a user would type, ``--parallel`` jobs at a time (several small runs share one GPU):

1. ``python -m launch.train`` with the seed, steps, batch and a checkpoint every ``--checkpoint-every``
   steps (all kept: the success-against-steps frontier comes from them);
2. ``python -m launch.eval --all-checkpoints``: success per task, L1 inside / outside the fine mask,
   refined-mask IoU, and the do-nothing and oracle rows, on the same held-out samples for every run;
3. ``python bench/routing_maps.py`` on the last checkpoint: routing maps per task as images and each
   expert's mean combine weight inside and outside the fine mask, per expert layer.

On one GPU, start CUDA MPS first (``nvidia-cuda-mps-control -d``): the runs' small kernels then share
the GPU instead of taking turns (eleven runs of `configs/mid.yaml` at once on one H200 trained 1,000
steps each in 260-303 s).

A job's result goes to ``--results`` (default ``OUT/results``) as ``<variant>_s<seed>.json``; a job
whose result exists is not run again, so an interrupted grid (or one spread over several GPU calls)
resumes. The report (Markdown between the ``<!-- ablation-grid:start/end -->`` markers of ``--write``,
or ``--section``'s) is built from every result there by :func:`report`: per variant, mean and sample std over seeds and the paired
difference to the full model; success against steps; the routing of each task; and one verdict per
claim of the papers (:data:`CLAIMS`), by a paired t-test over seeds at the 95% level.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.common import environment as bench_environment  # noqa: E402
from bench.common import run_logged  # noqa: E402
from data.synthetic import written_patterns  # noqa: E402
from train.config import load_config  # noqa: E402

GRID = os.path.join(ROOT, "configs", "ablations.yaml")
REFERENCE = "full"  # the variant every other one is compared with (the grid's first set)
TASKS = ("add", "recolor", "remove", "replace", "style")
LOCAL_TASKS = ("add", "recolor", "remove", "replace")  # edits confined to the mask (style is global)
EXPERTS = ("text", "mask", "reference", "base")
# two-sided 95% critical values of Student's t, by degrees of freedom (a paired test over n seeds: n - 1)
T_CRIT_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


# ------------------------------------------------------------------------------------------ the grid
def load_variants(path: str = GRID) -> dict[str, list[str]]:
    """name -> dotlist overrides: the grid's ``sets``, each after the grid's ``common`` overrides."""
    from omegaconf import OmegaConf

    grid = OmegaConf.load(path)
    common = [str(o) for o in (grid.get("common") or [])]
    variants = {str(s.name): common + [str(o) for o in s.overrides] for s in grid.sets}
    if REFERENCE not in variants:
        raise ValueError(f"{path}: the grid needs a set named {REFERENCE!r} (the model the others are compared with)")
    return variants


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower()


def job_name(variant: str, seed: int) -> str:
    return f"{slug(variant)}_s{seed}"


def train_command(variant: str, seed: int, overrides: list[str], args: argparse.Namespace) -> list[str]:
    """``python -m launch.train`` for one (variant, seed): the recipe, the grid's settings, the variant."""
    every = args.checkpoint_every or args.steps
    return [
        sys.executable,
        "-m",
        "launch.train",
        "--config",
        args.config,
        f"run.dir={os.path.join(args.out, 'runs')}",
        f"run.name={job_name(variant, seed)}",
        f"run.seed={seed}",
        f"data.seed={seed}",
        f"train.steps={args.steps}",
        "train.time_budget_s=0",  # every arm trains the same steps: a paired comparison, not one of speed
        f"train.micro_batch={args.micro_batch}",
        f"checkpoint.every={every}",
        f"checkpoint.keep={args.steps // every + 1}",
        f"logging.eval_every={every}",
        "logging.images_every=0",
        "logging.progress_bar=false",
        f"data.train_shards={written_patterns(args.data)['train']}",
        f"data.val_shards={written_patterns(args.data)['val']}",
        *args.set,
        *overrides,
    ]


def _run(cmd: list[str], log: str) -> None:
    run_logged(cmd, log, ROOT)


def run_job(variant: str, seed: int, overrides: list[str], args: argparse.Namespace) -> dict:
    """Train, evaluate every checkpoint, map the routing; write and return the job's result."""
    name = job_name(variant, seed)
    result_path = os.path.join(results_dir(args), f"{name}.json")
    if os.path.isfile(result_path):
        with open(result_path) as f:
            return json.load(f)
    logs = os.path.join(args.out, "logs")
    ckpts = os.path.join(args.out, "runs", name, "checkpoints")
    eval_dir, routing_dir = os.path.join(args.out, "eval", name), os.path.join(args.out, "routing", name)
    val = written_patterns(args.data)["val"]
    t0 = time.time()
    _run(train_command(variant, seed, overrides, args), os.path.join(logs, f"{name}.train.log"))
    t1 = time.time()
    _run(
        [sys.executable, "-m", "launch.eval", "--checkpoint", ckpts, "--all-checkpoints", "--data", val,
         "--device", args.device, "--out", eval_dir, "--limit", str(args.eval_limit),
         "--steps", str(args.eval_steps), "--batch-size", str(args.eval_batch_size)],
        os.path.join(logs, f"{name}.eval.log"),
    )  # fmt: skip
    t2 = time.time()
    _run(
        [sys.executable, os.path.join("bench", "routing_maps.py"), "--checkpoint", ckpts, "--data", val,
         "--out", routing_dir, "--per-task", str(args.routing_per_task), "--steps", str(args.eval_steps),
         "--device", args.device],
        os.path.join(logs, f"{name}.routing.log"),
    )  # fmt: skip
    with open(os.path.join(eval_dir, "run_eval.json")) as f:
        evals = json.load(f)
    with open(os.path.join(routing_dir, "routing.json")) as f:
        routing = json.load(f)
    by_step = {}
    for row in evals["rows"]:
        full = evals["results"][row["tag"]]
        by_step[str(row["step"])] = {k: full[k] for k in ("metrics", "per_task", "baselines", "num_samples")}
    result = {
        "variant": variant,
        "seed": seed,
        "config": args.config,
        "overrides": overrides,
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "set": args.set,
        "train_wall_s": round(t1 - t0, 1),
        "eval_wall_s": round(t2 - t1, 1),
        "by_step": by_step,
        "routing": routing,
        "environment": getattr(args, "environment", None),
    }
    os.makedirs(os.path.dirname(result_path), exist_ok=True)
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp, result_path)  # a result file is whole or absent: resuming trusts it
    return result


def results_dir(args: argparse.Namespace) -> str:
    return args.results or os.path.join(args.out, "results")


def environment() -> dict:
    """What the numbers were measured with: date, device, library versions (``bench.common``'s, and transformers)."""
    import transformers

    return bench_environment() | {"transformers": transformers.__version__}


# ---------------------------------------------------------------------------------------- statistics
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation of the finite values (std NaN for fewer than two)."""
    vals = [v for v in values if v is not None and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else math.nan
    return m, sd


def paired_t(diffs: list[float]) -> tuple[float, float, float, int]:
    """(mean, std, t statistic, n) of paired differences; t is +-inf when all differences are equal and
    non-zero, NaN for fewer than two or all zero."""
    m, sd = mean_std(diffs)
    n = len([d for d in diffs if not math.isnan(d)])
    if n < 2 or math.isnan(m):
        return m, sd, math.nan, n
    if sd == 0:
        return m, sd, (math.copysign(math.inf, m) if m != 0 else math.nan), n
    return m, sd, m / (sd / math.sqrt(n)), n


def verdict(t: float, n: int) -> str:
    """A claim that ``a > b``, tested on the paired differences a - b over n seeds (two-sided, 95%)."""
    if n < 2 or math.isnan(t):
        return "not resolved"
    crit = T_CRIT_95.get(n - 1, 1.96)
    return "supported" if t >= crit else "contradicted" if t <= -crit else "not resolved"


# ------------------------------------------------------------------------------------- result access
def final_step(result: dict) -> str:
    return str(max(int(s) for s in result["by_step"]))


def success(result: dict, step: Optional[str] = None, tasks: Optional[tuple[str, ...]] = None) -> float:
    """Held-out success at ``step`` (default: the last): the mean over tasks, or over ``tasks``."""
    ev = result["by_step"][step or final_step(result)]
    if tasks is None:
        return ev["metrics"]["success_mean_over_tasks"]
    vals = [ev["per_task"][t]["success"] for t in tasks if t in ev["per_task"]]
    return sum(vals) / len(vals) if vals else math.nan


def metric(result: dict, key: str) -> float:
    return result["by_step"][final_step(result)]["metrics"].get(key, math.nan)


def inside_weights(result: dict, task: str) -> dict[str, float]:
    """Each expert's mean combine weight inside the fine mask for ``task``, averaged over expert layers."""
    layers = result["routing"].get(task, {})
    out = {}
    for e in EXPERTS:
        vals = [lay["weight_inside_mask"].get(e, math.nan) for lay in layers.values()]
        out[e] = mean_std(vals)[0]
    return out


def top_expert(results: list[dict], task: str) -> str:
    """'name weight' of the expert with the largest mean inside-mask weight for ``task`` over the seeds."""
    per_seed = [inside_weights(r, task) for r in results if task in r["routing"]]
    means = {e: mean_std([w[e] for w in per_seed])[0] for e in EXPERTS}
    means = {e: m for e, m in means.items() if not math.isnan(m)}
    if not means:
        return "-"
    best = max(means, key=means.get)
    return f"{best} {means[best]:.2f}"


def routing_contrast(results: list[dict]) -> tuple[float, float]:
    """(task spread, seed spread) of one variant's inside-mask combine weights: the std over tasks of each
    (layer, expert) weight, averaged over (layer, expert) and seeds; and the std over seeds of the same
    weights, averaged over (task, layer, expert). Experts specialise by task when the first clearly
    exceeds the second (routing that differs between tasks more than between training seeds)."""
    cells: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in results:
        for task, layers in r["routing"].items():
            for layer, lay in layers.items():
                for e, w in lay["weight_inside_mask"].items():
                    if w is not None and not math.isnan(w):
                        cells.setdefault((task, layer, e), {})[r["seed"]] = w
    seeds = sorted({r["seed"] for r in results})
    task_spread = []
    for s in seeds:
        for layer, e in {(k[1], k[2]) for k in cells}:
            vals = [cells[(t, layer, e)][s] for t in TASKS if s in cells.get((t, layer, e), {})]
            if len(vals) > 1:
                task_spread.append(mean_std(vals)[1])
    seed_spread = [mean_std(list(v.values()))[1] for v in cells.values() if len(v) > 1]
    return mean_std(task_spread)[0], mean_std(seed_spread)[0]


# --------------------------------------------------------------------------------------------- claims
@dataclass(frozen=True)
class Claim:
    """The papers' claim that ``better`` beats ``worse`` on held-out success (mean over ``tasks``)."""

    text: str
    better: str
    worse: str
    tasks: Optional[tuple[str, ...]] = None


CLAIMS = (
    Claim("a learned condition-aware router beats static fusion", "full", "static-fusion"),
    Claim("a learned condition-aware router beats a uniform router", "full", "uniform-router"),
    Claim("Mask Repaint helps", "full", "no-repaint"),
    Claim("Mask Repaint helps on local edits", "full", "no-repaint", LOCAL_TASKS),
    Claim("Mask Repaint helps on the global edit (style)", "full", "no-repaint", ("style",)),
    Claim("the Latent Mixture helps", "full", "no-mixture"),
    Claim("K = 3 of 4 beats K = 1", "full", "k1"),
    Claim("K = 3 of 4 beats K = 2", "full", "k2"),
    Claim("K = 3 of 4 beats K = 4", "full", "k4"),
    Claim("TAG-MoE's task-aligned gating beats CARE-Edit's router", "tag-moe", "full"),
    Claim("AdaptEdit's region-aware loss and decoupled mask predictor beat CARE-Edit's", "adaptedit", "full"),
    Claim("removing absent conditions' experts from the top-K helps", "absent-removed", "full"),
)


def paired(by_variant: dict[str, list[dict]], a: str, b: str, value) -> list[float]:
    """value(result of a) - value(result of b) for every seed both have."""
    rb = {r["seed"]: r for r in by_variant.get(b, [])}
    return [value(r) - value(rb[r["seed"]]) for r in by_variant.get(a, []) if r["seed"] in rb]


def claim_rows(by_variant: dict[str, list[dict]]) -> list[dict]:
    rows = []
    for c in CLAIMS:
        d = paired(by_variant, c.better, c.worse, lambda r, c=c: success(r, tasks=c.tasks))
        m, sd, t, n = paired_t(d)
        rows.append({"claim": c.text, "better": c.better, "worse": c.worse, "tasks": c.tasks, "diffs": d,
                     "mean": m, "std": sd, "t": t, "n": n, "verdict": verdict(t, n)})  # fmt: skip
    return rows


# --------------------------------------------------------------------------------------------- report
def _pct(m: float, sd: float = math.nan) -> str:
    if math.isnan(m):
        return "-"
    return f"{100 * m:.1f}%" if math.isnan(sd) else f"{100 * m:.1f} ± {100 * sd:.1f}%"


def _num(m: float, sd: float = math.nan) -> str:
    if math.isnan(m):
        return "-"
    return f"{m:.3f}" if math.isnan(sd) else f"{m:.3f} ± {sd:.3f}"


def _pp(m: float, sd: float) -> str:
    if math.isnan(m):
        return "-"
    return f"{100 * m:+.1f} pt" if math.isnan(sd) else f"{100 * m:+.1f} ± {100 * sd:.1f} pt"


def group(results: list[dict], variants: list[str]) -> dict[str, list[dict]]:
    by = {v: sorted([r for r in results if r["variant"] == v], key=lambda r: r["seed"]) for v in variants}
    return {v: rs for v, rs in by.items() if rs}


def report(results: list[dict], variants: list[str], env: dict, command: str, images: Optional[str] = None) -> str:
    """The grid as Markdown: main table, success against steps, routing per task, verdicts."""
    by = group(results, variants)
    if REFERENCE not in by:
        raise ValueError(f"no result for the reference variant {REFERENCE!r}")
    ref = by[REFERENCE][0]
    seeds = sorted({r["seed"] for rs in by.values() for r in rs})
    steps_done = sorted({int(s) for rs in by.values() for r in rs for s in r["by_step"]})
    ev = ref["by_step"][final_step(ref)]
    counts = ", ".join(f"{t} {ev['per_task'][t]['count']}" for t in TASKS if t in ev["per_task"])
    envs = [r.get("environment") or env for rs in by.values() for r in rs]
    measured = "; ".join(
        sorted(
            {
                f"{e.get('date')} on {e.get('device')} (torch {e.get('torch')}, deepspeed {e.get('deepspeed')}, "
                f"diffusers {e.get('diffusers')}, transformers {e.get('transformers')})"
                for e in envs
            }
        )
    )
    recipe = f"`{ref.get('config', 'configs/tiny.yaml')}`'s recipe and frozen base"
    pinned = [*ref["overrides"], *ref["set"]]  # the reference's overrides are the grid's common ones
    if pinned:
        recipe += " with " + ", ".join(f"`{s}`" for s in pinned)
    lines = [
        f"Measured {measured}. Seeds {', '.join(map(str, seeds))}; {ref['steps']} steps of micro-batch "
        f"{ref['micro_batch']} on {recipe}; held-out: {ev['num_samples']} samples ({counts}), the same for every run.",
        "",
        "```bash",
        command,
        "```",
        "",
        "**Per variant** (final checkpoint; mean ± sample std over seeds; Δ: the paired difference to `full`"
        " on the same seed, mean ± std):",
        "",
        "| variant | seeds | " + " | ".join(TASKS) + " | mean success | Δ success vs full | L1 inside | L1 outside |"
        " mask IoU | train wall |",
        "|---|---|" + "---|" * (len(TASKS) + 6),
    ]
    for v, rs in by.items():
        cells = [_pct(*mean_std([success(r, tasks=(t,)) for r in rs])) for t in TASKS]
        cells.append("**" + _pct(*mean_std([success(r) for r in rs])) + "**")
        d = paired(by, v, REFERENCE, success)
        cells.append("-" if v == REFERENCE else _pp(*mean_std(d)))
        cells += [_num(*mean_std([metric(r, k) for r in rs])) for k in ("l1_inside", "l1_outside", "mask_iou")]
        cells.append(f"{mean_std([r['train_wall_s'] for r in rs])[0]:.0f} s")
        lines.append(f"| {v} | {len(rs)} | " + " | ".join(cells) + " |")
    for b, label in (("do_nothing", "do-nothing (the source)"), ("oracle", "oracle (the target)")):
        row = ev["baselines"][b]
        cells = [_pct(row["per_task"][t]["success"]) if t in row["per_task"] else "-" for t in TASKS]
        cells += [_pct(row["metrics"]["success_mean_over_tasks"]), "-"]
        cells += [_num(row["metrics"][k]) for k in ("l1_inside", "l1_outside", "mask_iou")] + ["-"]
        lines.append(f"| {label} | - | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**Success against steps** (mean over tasks, mean ± std over seeds, every kept checkpoint):",
        "",
        "| variant | " + " | ".join(f"step {s}" for s in steps_done) + " |",
        "|---|" + "---|" * len(steps_done),
    ]
    for v, rs in by.items():
        cells = [_pct(*mean_std([success(r, str(s)) for r in rs if str(s) in r["by_step"]])) for s in steps_done]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "**Routing per task** (`bench/routing_maps.py` on the final checkpoint, "
        f"{ref['routing'] and len(next(iter(ref['routing'].values())))} expert layers): each expert's mean combine weight"
        " inside the fine mask, averaged over layers and seeds, for the full model; for every variant, how much"
        " its routing differs between tasks against how much it differs between seeds.",
        "",
        "| task (full) | " + " | ".join(EXPERTS) + " |",
        "|---|" + "---|" * len(EXPERTS),
    ]
    for t in TASKS:
        per_seed = [inside_weights(r, t) for r in by[REFERENCE] if t in r["routing"]]
        if per_seed:
            lines.append(f"| {t} | " + " | ".join(_num(*mean_std([w[e] for w in per_seed])) for e in EXPERTS) + " |")
    lines += [
        "",
        "Every variant's routing per task: the expert with the largest mean combine weight inside the fine mask"
        " (averaged over layers and seeds) and that weight; beside it, how much the routing differs between tasks"
        " and between seeds (the std over tasks, resp. seeds, of each layer's and expert's weight, averaged).",
        "",
        "| variant | " + " | ".join(TASKS) + " | spread between tasks | between seeds | ratio |",
        "|---|" + "---|" * (len(TASKS) + 3),
    ]
    contrast = {}
    for v, rs in by.items():
        ts, ss = routing_contrast(rs)
        contrast[v] = (ts, ss)
        ratio = ts / ss if ss and not math.isnan(ss) and ss > 0 else math.nan
        cells = [top_expert(rs, t) for t in TASKS]
        cells += [_num(ts), _num(ss), "-" if math.isnan(ratio) else f"{ratio:.1f}"]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    if images:
        lines += ["", "Routing maps (rows: samples; columns: source | coarse mask | refined mask | routing map |"
                  " target | edit; routing colours: text red, mask green, reference blue, base grey), seed "
                  f"{seeds[0]}: " + ", ".join(f"[{v}]({images}/routing_{slug(v)}.png)" for v in by
                                             if os.path.isfile(os.path.join(ROOT, 'docs', images, f'routing_{slug(v)}.png')))]  # fmt: skip
    lines += [
        "",
        "**Claims** (held-out success, paired over seeds; verdict by a two-sided paired t-test at 95%: "
        "supported / contradicted when the difference is significant in / against the claim's direction):",
        "",
        "| claim | compared | Δ success (mean ± std) | per seed | t | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for row in claim_rows(by):
        if row["n"] == 0:
            continue
        scope = "" if row["tasks"] is None else f" ({', '.join(row['tasks'])})"
        per_seed = ", ".join(f"{100 * d:+.0f}" for d in row["diffs"])
        t = "-" if math.isnan(row["t"]) else f"{row['t']:+.1f}"
        lines.append(
            f"| {row['claim']} | {row['better']} - {row['worse']}{scope} | {_pp(row['mean'], row['std'])} |"
            f" {per_seed} | {t} | {row['verdict']} |"
        )
    ts, ss = contrast.get(REFERENCE, (math.nan, math.nan))
    spec = "supported" if ts > 2 * ss else "not resolved"  # NaN compares False
    lines.append(
        f"| experts specialise by task | full's routing spread between tasks against 2x between seeds | "
        f"{_num(ts)} vs {_num(ss)} | - | - | {spec} |"
    )
    return "\n".join(lines)


def write_section(path: str, md: str, name: str = "ablation-grid") -> None:
    """Replace the text between the ``name`` markers of ``path`` (or append the section)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = open(path).read() if os.path.isfile(path) else ""
    block = f"{start}\n{md}\n{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text += "\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def stack_routing_images(out: str, variant: str, seed: int, dest: str) -> Optional[str]:
    """One PNG of a run's per-task routing grids, tasks stacked top to bottom (None if none were made)."""
    from PIL import Image

    folder = os.path.join(out, "routing", job_name(variant, seed))
    tiles = [Image.open(p) for t in TASKS if os.path.isfile(p := os.path.join(folder, f"routing_{t}.png"))]
    if not tiles:
        return None
    w, h = max(t.width for t in tiles), sum(t.height for t in tiles) + 4 * (len(tiles) - 1)
    canvas = Image.new("RGB", (w, h), (255, 255, 255))
    y = 0
    for tile in tiles:
        canvas.paste(tile, (0, y))
        y += tile.height + 4
    os.makedirs(dest, exist_ok=True)
    path = os.path.join(dest, f"routing_{slug(variant)}.png")
    canvas.quantize(colors=128).save(path, optimize=True)  # flat shapes: 128 colours keep them, 5x smaller
    return path


def load_results(folder: str) -> list[dict]:
    if not os.path.isdir(folder):
        return []
    results = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json") and name != "environment.json":
            with open(os.path.join(folder, name)) as f:
                results.append(json.load(f))
    return results


# ----------------------------------------------------------------------------------------------- main
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/mid.yaml", help="the recipe every variant modifies")
    p.add_argument("--grid", default=GRID, help="the variants: its `sets` (and `common` overrides)")
    p.add_argument("--steps", type=int, default=None, help="default: the recipe's train.steps")
    p.add_argument("--micro-batch", type=int, default=None, help="default: the recipe's train.micro_batch")
    p.add_argument("--checkpoint-every", type=int, default=500, help="kept checkpoints: the frontier's points")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=None, help="a subset of the grid's sets (default: all)")
    p.add_argument("--set", action="append", default=[], help="key=value for every run (after the recipe)")
    p.add_argument("--device", default="cpu", help="where evaluation runs (training picks the GPU when present)")
    p.add_argument("--parallel", type=int, default=1, help="jobs at a time")
    p.add_argument("--eval-limit", type=int, default=200)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--eval-batch-size", type=int, default=200)
    p.add_argument("--routing-per-task", type=int, default=6)
    p.add_argument("--data", default="artifacts/synthetic", help="the synthetic set (made here when absent)")
    p.add_argument("--out", default="runs/ablations")
    p.add_argument("--results", default=None, help="one JSON per finished job (default: OUT/results)")
    p.add_argument("--write", default=None, help="write the report into this Markdown file (between markers)")
    p.add_argument("--images", default=None, help="folder under docs/ for the routing-map images of the report")
    p.add_argument("--image-variants", nargs="+", default=["full", "static-fusion", "k1"])
    p.add_argument("--section", default="ablation-grid", help="the report's marker name in --write")
    p.add_argument("--report-only", action="store_true", help="only build the report from OUT/results")
    args = p.parse_args(argv)
    if args.steps is None or args.micro_batch is None:  # the recipe's own, so they live in one place
        train = load_config(os.path.join(ROOT, args.config), []).train
        args.steps = train.steps if args.steps is None else args.steps
        args.micro_batch = train.micro_batch if args.micro_batch is None else args.micro_batch
    return args


def documented_command(args: argparse.Namespace, env: dict) -> str:
    """The command that makes this grid and its report (the run's device and parallelism as recorded)."""
    parts = ["python bench/ablations.py", f"--config {args.config}", f"--steps {args.steps}",
             f"--micro-batch {args.micro_batch}", f"--checkpoint-every {args.checkpoint_every}",
             "--seeds " + " ".join(map(str, args.seeds))]  # fmt: skip
    if args.variants:
        parts.append("--variants " + " ".join(args.variants))
    parts += [f"--set {s}" for s in args.set]
    parts += [
        f"--eval-limit {args.eval_limit}",
        f"--eval-steps {args.eval_steps}",
        f"--eval-batch-size {args.eval_batch_size}",
    ]
    if args.results:
        parts.append(f"--results {args.results}")
    parts += [f"--device {env.get('run_device', args.device)}", f"--parallel {env.get('run_parallel', args.parallel)}"]
    if args.write:
        parts.append(f"--write {args.write}")
    if args.images:
        parts.append(f"--images {args.images}")
    return " ".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    grid = load_variants(args.grid)
    variants = args.variants or list(grid)
    unknown = [v for v in variants if v not in grid]
    if unknown:
        print(f"error: --variants {unknown}: not sets of {args.grid} ({', '.join(grid)})", file=sys.stderr)
        return 2
    os.makedirs(os.path.join(args.out, "logs"), exist_ok=True)
    os.makedirs(results_dir(args), exist_ok=True)
    env_path = os.path.join(results_dir(args), "environment.json")
    failed = []
    if not args.report_only:
        args.environment = environment() | {"run_device": args.device, "run_parallel": args.parallel}
        if not os.path.isfile(env_path):  # the environment of the grid's first jobs (each result keeps its own)
            with open(env_path, "w") as f:
                json.dump(args.environment, f)
        _run([sys.executable, "-m", "data.synthetic", "--out", args.data, "--if-absent"],
             os.path.join(args.out, "logs", "data.log"))  # fmt: skip
        t0 = time.time()
        jobs = [(v, s) for s in args.seeds for v in variants]  # seed-major: every variant gets seed 0 first
        with ThreadPoolExecutor(max_workers=args.parallel) as pool:
            futures = {pool.submit(run_job, v, s, grid[v], args): (v, s) for v, s in jobs}
            for fut, (v, s) in futures.items():
                try:
                    r = fut.result()
                    line = {"job": job_name(v, s), "success": round(success(r), 4), "train_wall_s": r["train_wall_s"]}
                except RuntimeError as e:
                    failed.append(job_name(v, s))
                    line = {"job": job_name(v, s), "error": str(e)[-1500:]}
                print(json.dumps(line | {"elapsed_s": round(time.time() - t0)}), flush=True)
    results = [r for r in load_results(results_dir(args)) if r["variant"] in variants and r["seed"] in args.seeds]
    if not results:
        print("no finished runs to report", file=sys.stderr)
        return 1
    env = json.load(open(env_path)) if os.path.isfile(env_path) else {}
    if args.images:
        for v in args.image_variants:
            if any(r["variant"] == v for r in results):
                stack_routing_images(args.out, v, min(args.seeds), os.path.join(ROOT, "docs", args.images))
    md = report(results, variants, env, documented_command(args, env), args.images)
    print(md)
    if args.write:
        write_section(args.write, md, args.section)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
