"""Launch to the first step, and the training time each checkpoint costs, through the real trainer.

    python bench/bench_trainer_run.py                     # full FLUX shape on one GPU (the recipe below)
    python bench/bench_trainer_run.py --tiny              # a tiny random model on the CPU: a smoke run, not a result
    python bench/bench_trainer_run.py --launcher "deepspeed --num_gpus 1" [--steps 14 --every 4] [key=value ...]

What it runs, each a separate ``launch/train.py`` process on synthetic edits it writes first
(``data.synthetic``, ``--size`` px), every run logging each step (``logging.every=1``):

1. ``fresh``: checkpoints written beside the training (``checkpoint.async_save=true``), an empty compile
   cache (``train.compile_cache_dir`` in the bench folder, emptied first);
2. ``resumed``: ``--resume auto`` from run 1's last checkpoint, ``--resume-steps`` more steps, the compile
   cache warm;
3. ``blocking``: run 1 again in a new run folder with ``checkpoint.async_save=false`` (cache warm);
4. ``no_checkpoints``: the same with no checkpoint inside the run (``checkpoint.every`` past the end).

JSON lines:

* ``{"bench": "startup", "run": ..., "phases_s": {...}, "launch_to_first_step_s": ...}``: the trainer's
  ``start-up:`` lines (train/timing/startup.py: seconds per phase since the process started, the first step's
  parts), and ``wall_to_first_step_s``, the time from this script starting the command (launcher
  included) to the first step's line;
* ``{"bench": "checkpoint", "run": ..., "tag": ..., "blocked_s", "write_s", "gb", "gb_per_s"}``: each
  save's line (the step loop's own count of the time it stood still for the save);
* ``{"bench": "steps", "run": ..., "window_s", "median_step_s", "logged_samples_per_s_median", ...}``: the
  wall time (TensorBoard's event times of each step's scalars) from the end of step ``--warmup-steps + 1``
  to the end of the last step, which holds every save but the final one, and the median of the samples/s
  the trainer logged over those steps;
* ``{"bench": "checkpoint_cost", "async_lost_s_per_save", "blocking_lost_s_per_save", ...}``: the window of
  each run with saves minus that of ``no_checkpoints``, per save: what a save costs the training, whatever
  part of it the step loop counts as blocked (a writer thread also competes for the host).

Default recipe (the full-scale single-GPU run): ``configs/flux_full_1gpu.yaml`` with random frozen weights (no
paths), LoRA experts r64 at ep_size 1, ZeRO 2, compile on with CUDA graphs, 512 px, ``--steps 14`` with a
checkpoint every 4 steps (saves at 4, 8, 12 inside the window, the last at 14). ``--tiny``:
``bench/step_tiny.yaml`` at 32 px, compile off, ZeRO 2, 6 steps with a checkpoint every 2.
Extra ``key=value`` arguments are passed to every run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit  # noqa: E402

FULL = [
    "model.backbone.path=null",
    "model.vae.path=null",
    "model.text.t5_path=null",
    "model.text.clip_path=null",
    "data.num_workers=2",
]
TINY = ["train.zero_stage=2", "train.compile=false", "data.num_workers=1", "train.micro_batch=2"]
# searched anywhere in a line: a launcher may prefix the rank's lines
STARTUP = re.compile(r"start-up: (.+?): ([\d.]+) s")
FIRST_STEP = re.compile(r"start-up: launch to the end of the first step: ([\d.]+) s")
CHECKPOINT = re.compile(
    r"checkpoint (step\d+): training blocked ([\d.]+) s; written in ([\d.]+) s (?:beside the training|while the "
    r"training waited) \(([\d.]+) ([MG])B, ([\d.]+) GB/s\)"
)


def write_data(folder: str, size: int, train: int, val: int) -> tuple[str, str]:
    """Synthetic edit shards at ``size`` px (written once per folder); (train pattern, val pattern)."""
    cmd = [sys.executable, "-m", "data.synthetic", "--out", folder, "--size", str(size), "--train", str(train)]
    cmd += ["--val", str(val), "--test", "0", "--samples-per-shard", "50", "--if-absent"]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    with open(os.path.join(folder, "synthetic.json")) as f:
        patterns = json.load(f)["patterns"]
    return patterns["train"], patterns["val"]


def run_trainer(launcher: list[str], config: str, overrides: list[str], log: str, resume: bool = False) -> dict:
    """One training process; its console lines with their arrival times (seconds after the start)."""
    cmd = [*launcher, "launch/train.py", "--config", config, *overrides] + (["--resume", "auto"] if resume else [])
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    t0 = time.time()
    lines: list[tuple[float, str]] = []
    with open(log, "w") as f:
        f.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            lines.append((time.time() - t0, line.rstrip("\n")))
            f.write(line)
        rc = proc.wait()
    if rc != 0:
        tail = "\n".join(x for _, x in lines[-40:])
        raise RuntimeError(f"{' '.join(cmd)} exited with {rc}; log {log}:\n{tail}")
    return {"lines": lines}


def startup_record(name: str, lines: list[tuple[float, str]]) -> dict:
    phases: dict[str, float] = {}
    record: dict = {"bench": "startup", "run": name}
    for t, line in lines:
        m = FIRST_STEP.search(line)
        if m:
            record["launch_to_first_step_s"] = float(m.group(1))
            record["wall_to_first_step_s"] = round(t, 2)
            continue
        m = STARTUP.search(line)
        if m:
            phases[m.group(1)] = float(m.group(2))
            detail = re.search(r"first step: [\d.]+ s \((.*)\) \([\d.]+ s since launch\)", line)
            if detail:  # the first step's parts: "data 0.3 s, forward (compiles) 51.0 s, ..."
                for part in detail.group(1).split(", "):
                    k, v = part.rsplit(" ", 2)[0], part.rsplit(" ", 2)[1]
                    phases[f"first step/{k}"] = float(v)
    record["phases_s"] = phases
    return record


def checkpoint_records(name: str, lines: list[tuple[float, str]]) -> list[dict]:
    out = []
    for _, line in lines:
        m = CHECKPOINT.search(line)
        if m:
            size = float(m.group(4)) / (1000 if m.group(5) == "M" else 1)
            out.append(
                {
                    "bench": "checkpoint",
                    "run": name,
                    "tag": m.group(1),
                    "blocked_s": float(m.group(2)),
                    "write_s": float(m.group(3)),
                    "gb": size,
                    "gb_per_s": float(m.group(6)),
                }
            )
    return out


def step_events(tb_dir: str) -> tuple[dict[int, float], dict[int, float]]:
    """Per step: the wall time of its end (the first ``loss/total`` event at that step, logging.every=1) and the
    trainer's own ``perf/samples_per_s``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(tb_dir, size_guidance={"scalars": 0}).Reload()
    times: dict[int, float] = {}
    for e in events.Scalars("loss/total"):
        times.setdefault(e.step, e.wall_time)
    rates = {e.step: e.value for e in events.Scalars("perf/samples_per_s")}
    return times, rates


def steps_record(name: str, tb_dir: str, first: int, last: int, every: int) -> dict:
    times, rates = step_events(tb_dir)
    missing = [s for s in range(first, last + 1) if s not in times]
    if missing:
        raise RuntimeError(f"{name}: no step time for steps {missing} in {tb_dir}")
    intervals = [times[s] - times[s - 1] for s in range(first + 1, last + 1)]
    saves = [s for s in range(first, last) if every and s % every == 0]  # each delays the step after it
    return {
        "bench": "steps",
        "run": name,
        "first_step": first,
        "last_step": last,
        "window_s": round(times[last] - times[first], 3),
        "median_step_s": round(statistics.median(intervals), 4),
        "max_step_s": round(max(intervals), 4),
        "logged_samples_per_s_median": round(statistics.median(rates[s] for s in range(first + 1, last + 1)), 3),
        "saves_in_window": len(saves),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value for every run")
    p.add_argument("--tiny", action="store_true", help="bench/step_tiny.yaml at 32 px on the CPU: a smoke run")
    p.add_argument(
        "--config", default=None, help="default: configs/flux_full_1gpu.yaml (bench/step_tiny.yaml with --tiny)"
    )
    p.add_argument("--launcher", default=None, help=f'default: "{sys.executable}" (one process)')
    p.add_argument("--out", default="runs/bench_trainer_run", help="the bench folder (data, runs, logs, cache)")
    p.add_argument("--size", type=int, default=None, help="image size (default 512, --tiny 32)")
    p.add_argument("--steps", type=int, default=None, help="steps per run (default 14, --tiny 6)")
    p.add_argument("--every", type=int, default=None, help="checkpoint.every (default 4, --tiny 2)")
    p.add_argument("--warmup-steps", type=int, default=None, help="steps before the timed window (default 3, --tiny 1)")
    p.add_argument("--resume-steps", type=int, default=2, help="steps of the resumed run")
    p.add_argument("--runs", default="fresh,resumed,blocking,no_checkpoints", help="which runs, in this order")
    a = p.parse_args()
    config = a.config or ("bench/step_tiny.yaml" if a.tiny else "configs/flux_full_1gpu.yaml")
    size = a.size or (32 if a.tiny else 512)
    steps = a.steps or (6 if a.tiny else 14)
    every = a.every or (2 if a.tiny else 4)
    warmup = a.warmup_steps if a.warmup_steps is not None else (1 if a.tiny else 3)
    launcher = shlex.split(a.launcher) if a.launcher else [sys.executable]
    out = os.path.abspath(a.out)
    runs = a.runs.split(",")
    os.makedirs(out, exist_ok=True)

    from bench.common import environment

    emit({"bench": "env", **environment(), "config": config, "size": size, "steps": steps, "every": every})
    train_pattern, val_pattern = write_data(os.path.join(out, f"data{size}"), size, 400, 8)
    cache = os.path.join(out, "compile_cache")
    shutil.rmtree(cache, ignore_errors=True)  # the first run compiles from nothing
    common = [
        f"data.train_shards={train_pattern}",
        f"data.val_shards={val_pattern}",
        f"data.image_size={size}",
        f"train.steps={steps}",
        f"checkpoint.every={every}",
        "checkpoint.keep=2",
        "logging.every=1",
        "logging.images_every=0",
        "logging.eval_every=0",
        "logging.progress_bar=false",
        f"train.compile_cache_dir={cache}",
        *(TINY if a.tiny else FULL),
        *a.overrides,
    ]
    per_run = {
        "fresh": ["checkpoint.async_save=true"],
        "resumed": ["checkpoint.async_save=true", f"train.steps={steps + a.resume_steps}"],
        "blocking": ["checkpoint.async_save=false"],
        "no_checkpoints": [f"checkpoint.every={steps + 1000}"],
    }
    windows: dict[str, dict] = {}
    for name in runs:
        run_name = "fresh" if name == "resumed" else name
        run_dir = os.path.join(out, "runs")
        if name != "resumed":
            shutil.rmtree(os.path.join(run_dir, run_name), ignore_errors=True)
        overrides = common + [f"run.dir={run_dir}", f"run.name={run_name}", *per_run[name]]
        result = run_trainer(launcher, config, overrides, os.path.join(out, f"{name}.log"), resume=name == "resumed")
        emit(startup_record(name, result["lines"]))
        for record in checkpoint_records(name, result["lines"]):
            emit(record)
        if name != "resumed":
            tb = os.path.join(run_dir, run_name, "tb")
            windows[name] = steps_record(name, tb, warmup + 1, steps, _every(per_run[name], every))
            emit(windows[name])
    if "no_checkpoints" in windows:
        ref = windows["no_checkpoints"]
        cost: dict = {"bench": "checkpoint_cost", "reference_window_s": ref["window_s"]}
        for name, key in (("fresh", "async_lost_s_per_save"), ("blocking", "blocking_lost_s_per_save")):
            if name in windows and windows[name]["saves_in_window"]:
                w = windows[name]
                cost[key] = round((w["window_s"] - ref["window_s"]) / w["saves_in_window"], 3)
        emit(cost)


def _every(overrides: list[str], default: int) -> int:
    for o in overrides:
        if o.startswith("checkpoint.every="):
            return int(o.split("=", 1)[1])
    return default


if __name__ == "__main__":
    main()
