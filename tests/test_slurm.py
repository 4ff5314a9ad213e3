"""launch/slurm against a real one-node SLURM (tests/helpers/slurm_cluster.py): array sweeps, summary, USR1 preemption.

The SLURM tests need Debian's ``slurm-wlm`` and ``munge`` and root (the private test cluster runs
slurmd as SlurmUser=root); without them they are skipped with the reason. Set CARE_REQUIRE_SLURM=1
(CI) to turn "cannot start SLURM" into a failure instead of a skip. The training jobs run the
stand-in model (tests/helpers/train_entry.py via TRAIN_ENTRY, configs/toy_test.yaml) on gloo, one CPU each.
The grid and summary tests at the top need no SLURM. The last test runs `srun` alone (no batch script): the
ranks and the rendezvous come from SLURM's variables through train/distributed.py.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from tests.helpers.faults import Faults
from tests.helpers.slurm_cluster import Cluster, SlurmUnavailable, _which, start_cluster

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = ["logging.images_every=0", "logging.progress_bar=false"]


def _py(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)
    if check:
        assert p.returncode == 0, p.stdout + p.stderr
    return p


# ---------------------------------------------------------------- no SLURM needed


def test_ablation_grid_lists_sets_validates_them_and_prints_the_sbatch_line():
    out = _py("launch.slurm.grid", "configs/ablations.yaml").stdout
    rows = re.findall(r"^\s+(\d+)\s+(\S+)\s+(.+)$", out, re.M)
    assert [(int(i), n) for i, n, _ in rows] == list(
        enumerate(
            [
                "ablations-0-full",
                "ablations-1-uniform-router",
                "ablations-2-static-fusion",
                "ablations-3-no-repaint",
                "ablations-4-no-mixture",
                "ablations-5-k1",
                "ablations-6-k2",
                "ablations-7-k4",
                "ablations-8-absent-removed",
                "ablations-9-tag-moe",
                "ablations-10-adaptedit",
            ]
        )
    )
    assert [o for _, _, o in rows] == [
        "(base recipe)",
        "model.router.kind=uniform",
        "model.router.kind=static",
        "model.repaint.enabled=false",
        "model.mixture.enabled=false",
        "model.router.top_k=1",
        "model.router.top_k=2",
        "model.router.top_k=4",
        "model.router.mask_absent=true",
        "model.experts.kind=ffn model.router.top_k=1 model.loss.tag_alignment=0.1",
        "model.loss.region_alpha=2 model.repaint.mode=decoupled model.repaint.use_gt_mask_in_training=true",
    ]
    assert "CONFIG ERROR" not in out
    assert "mkdir -p runs/slurm && sbatch --array=0-10 launch/slurm/sweep.sbatch configs/ablations.yaml\n" in out
    task = _py(
        "launch.slurm.grid", "configs/ablations.yaml", "configs/tiny.yaml", "train.steps=5", "--task", "5", "--nul"
    ).stdout
    assert task.split("\0") == [
        "configs/tiny.yaml",
        "model.repaint.mode=coupled",  # the grid's common overrides: CARE-Edit's mask path
        "model.repaint.use_gt_mask_in_training=false",
        "model.repaint.within_coarse=false",
        "model.loss.region_alpha=0",
        "model.router.top_k=1",
        "train.steps=5",
        "run.name=ablations-5-k1",
        "",
    ]


def test_grid_rejects_bad_sets_and_out_of_range_tasks(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "name: g\nbase: configs/tiny.yaml\nsets:\n  - {name: a, overrides: [optim.lr=1]}\n"
        "  - {name: a, overrides: []}\n"
    )
    p = _py("launch.slurm.grid", str(bad), check=False)
    assert p.returncode == 2 and "duplicate set name 'a'" in p.stderr
    bad.write_text("name: g\nbase: configs/tiny.yaml\nsets:\n  - {name: a, overrides: [run.name=x]}\n")
    p = _py("launch.slurm.grid", str(bad), check=False)
    assert p.returncode == 2 and "run.name is set by the grid" in p.stderr
    good = tmp_path / "good.yaml"
    good.write_text("name: g\nbase: configs/tiny.yaml\nsets:\n  - {name: a, overrides: [model.router.top_k=9]}\n")
    p = _py("launch.slurm.grid", str(good), "--task", "1", check=False)
    assert p.returncode == 2 and "task 1 out of range (0..0)" in p.stderr
    p = _py("launch.slurm.grid", str(good), check=False)  # the set itself does not validate
    assert p.returncode == 2 and "CONFIG ERROR: model.router.top_k" in p.stdout and "sbatch" not in p.stdout


def test_summary_reads_losses_config_and_tensorboard(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for name, steps, last in (("sweep-0-a", 4, 4), ("sweep-1-b", 4, 2)):
        run = tmp_path / "runs" / name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(f"run: {{name: {name}}}\ntrain: {{steps: {steps}}}\nlogging: {{}}\n")
        recs = [{"step": s, "loss": 1.0 / s, "skipped": s == 2} for s in range(1, last + 1)]
        if last == 4:  # a resumed run appends steps 3..4 again after its step-2 checkpoint: the last record wins
            recs += [{"step": 3, "loss": 0.3, "skipped": False}, {"step": 4, "loss": 0.25, "skipped": False}]
        (run / "losses.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        w = SummaryWriter(str(run / "tb"))
        for s in range(2, last + 1, 2):
            w.add_scalar("loss/total", 2.0 / s, s)
            w.add_scalar("loss/diffusion", 1.0 / s, s)
            w.add_scalar("opt/lr", 0.1, s)
        w.close()
    out = _py("launch.slurm.summary", str(tmp_path / "runs" / "sweep-*"), "--csv", str(tmp_path / "s.csv")).stdout
    lines = out.strip().splitlines()
    assert lines[0] == "| run | status | step | steps | loss | skipped | tb_step | diffusion | total |"
    assert lines[2] == "| sweep-0-a | done | 4 | 4 | 0.25 | 1 | 4 | 0.25 | 0.5 |"
    assert lines[3] == "| sweep-1-b | incomplete | 2 | 4 | 0.5 | 1 | 2 | 0.5 | 1 |"
    with open(tmp_path / "s.csv") as f:
        csv_lines = f.read().splitlines()
    assert csv_lines[0] == "run,status,step,steps,loss,skipped,tb_step,diffusion,total" and len(csv_lines) == 3
    assert _py("launch.slurm.summary", str(tmp_path / "nothing"), check=False).returncode == 1


# ---------------------------------------------------------------- a real SLURM


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A private one-node SLURM for the whole session; daemons stopped by PID even when tests fail."""
    root = str(tmp_path_factory.mktemp("slurm"))
    try:
        cluster = start_cluster(root)
    except SlurmUnavailable as e:
        if os.environ.get("CARE_REQUIRE_SLURM") == "1":
            pytest.fail(f"CARE_REQUIRE_SLURM=1 but SLURM is unavailable: {e}")
        pytest.skip(f"no SLURM to test against: {str(e).splitlines()[0]}")
    try:
        yield cluster
    finally:
        cluster.cancel_all()
        cluster.stop()


def _submit(
    cluster: Cluster, work: str, script: str, *args: str, sbatch: tuple[str, ...] = (), faults: Faults | None = None
) -> int:
    """sbatch from the repository root (CARE_ROOT = SLURM_SUBMIT_DIR), job working dir ``work`` (logs there);
    ``faults`` reach the training tasks through sbatch's exported environment (tests/helpers/faults.py)."""
    os.makedirs(os.path.join(work, "runs", "slurm"), exist_ok=True)
    env = cluster.env(
        TRAIN_ENTRY="tests/helpers/train_entry.py",
        PYTHON=sys.executable,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        **(faults or Faults()).to_env(),
    )
    return cluster.sbatch(f"--chdir={work}", "--time=10", *sbatch, f"launch/slurm/{script}", *args, cwd=ROOT, env=env)


def _read(path: str) -> str:
    with open(path, errors="replace") as f:
        return f.read()


def _losses(run_dir: str) -> dict[int, float]:
    out: dict[int, float] = {}
    for line in _read(os.path.join(run_dir, "losses.jsonl")).splitlines():
        rec = json.loads(line)
        out[rec["step"]] = rec["loss"]  # last record of a step wins (resume rewrites nothing before it)
    return out


def _latest(run_dir: str) -> str:
    return _read(os.path.join(run_dir, "checkpoints", "latest")).strip()


@pytest.mark.multiprocess
def test_sweep_array_of_three_runs_then_summary(slurm, tmp_path):
    work = str(tmp_path)
    grid = tmp_path / "toygrid.yaml"
    grid.write_text(
        "name: toygrid\nbase: configs/toy_test.yaml\n"
        f"common: [run.dir={work}/runs, train.steps=4, checkpoint.every=2, logging.every=2]\n"
        "sets:\n"
        "  - {name: lr1, overrides: [optim.lr=1.0e-3]}\n"
        "  - {name: lr3, overrides: [optim.lr=3.0e-3]}\n"
        "  - {name: uniform, overrides: [model.router.kind=uniform, optim.lr=1.0e-2]}\n"
    )
    listing = _py("launch.slurm.grid", str(grid), "--world-size", "1").stdout
    assert f"sbatch --array=0-2 launch/slurm/sweep.sbatch {grid}" in listing
    job = _submit(slurm, work, "sweep.sbatch", str(grid), *TOY, sbatch=("--array=0-2", "--ntasks=1"))
    tasks = slurm.wait_done(job, timeout=240)
    logs = {i: os.path.join(work, "runs", "slurm", f"care-sweep-{job}_{i}.out") for i in range(3)}
    assert sorted(t["ArrayTaskId"] for t in tasks) == ["0", "1", "2"]
    for t in tasks:
        log = logs[int(t["ArrayTaskId"])]
        assert t["JobState"] == "COMPLETED" and t["ExitCode"] == "0:0", f"{t}\n{_read(log)[-3000:]}"
    names = ["toygrid-0-lr1", "toygrid-1-lr3", "toygrid-2-uniform"]
    for i, name in enumerate(names):
        log = _read(logs[i])
        assert f"grid {grid} task {i}:" in log and "done: step 4" in log, log[-3000:]
        run = os.path.join(work, "runs", name)
        assert max(_losses(run)) == 4 and _latest(run) == "step00000004"
    lrs = [re.search(r"lr: ([0-9.e-]+)", _read(os.path.join(work, "runs", n, "config.yaml"))).group(1) for n in names]
    assert [float(x) for x in lrs] == [1e-3, 3e-3, 1e-2]  # each task got its own set
    assert "kind: uniform" in _read(os.path.join(work, "runs", names[2], "config.yaml"))

    csv_path = os.path.join(work, "summary.csv")
    out = _py("launch.slurm.summary", os.path.join(work, "runs", "toygrid-*"), "--csv", csv_path).stdout
    rows = [line for line in out.strip().splitlines()[2:]]
    assert len(rows) == 3, out
    for name, row in zip(names, rows):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[:4] == [name, "done", "4", "4"], row
        assert all(math.isfinite(float(c)) for c in cells[4:5] + cells[7:]), row
    header = out.splitlines()[0]
    assert "| diffusion | load_balance | total |" in header  # every loss term of the stand-in model
    assert len(_read(csv_path).strip().splitlines()) == 4


@pytest.mark.multiprocess
def test_usr1_preemption_requeues_and_resumes_to_the_uninterrupted_result(slurm, tmp_path):
    """2 ranks under srun (ep_size 2): USR1 to the batch shell -> checkpoint -> requeue -> resume."""
    work = str(tmp_path)
    steps = 10
    common = [
        f"run.dir={work}/runs",
        f"train.steps={steps}",
        "checkpoint.every=4",
        "logging.every=2",
        "model.experts.ep_size=2",
        *TOY,
    ]
    two = ("--ntasks-per-node=2",)
    pre = _submit(
        slurm,
        work,
        "train.sbatch",
        "configs/toy_test.yaml",
        *common,
        "run.name=pre",
        sbatch=two,
        faults=Faults(step_sleep_s=0.4),
    )
    ref = _submit(slurm, work, "train.sbatch", "configs/toy_test.yaml", *common, "run.name=ref", sbatch=two)
    pre_run, ref_run = os.path.join(work, "runs", "pre"), os.path.join(work, "runs", "ref")
    pre_log = os.path.join(work, "runs", "slurm", f"care-train-{pre}.out")
    deadline = time.time() + 150
    while not (os.path.exists(os.path.join(pre_run, "losses.jsonl")) and max(_losses(pre_run) or {0: 0}) >= 2):
        state = slurm.job(pre).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"{state}\n" + (
            _read(pre_log) if os.path.exists(pre_log) else ""
        )
        assert time.time() < deadline, "training did not reach step 2"
        time.sleep(0.2)
    slurm.run("scancel", "--signal=USR1", "--batch", str(pre))  # what --signal=B:USR1@T does at T
    done = slurm.wait_done(pre, timeout=240)[0]
    log = _read(pre_log)
    assert done["JobState"] == "COMPLETED" and done["ExitCode"] == "0:0", f"{done}\n{log[-4000:]}"
    assert done["Restarts"] == "1", f"{done}\n{log[-4000:]}"
    stopped = int(re.search(r"preempted: step (\d+)", log).group(1))
    assert 2 <= stopped < steps, log[-4000:]
    assert "batch shell got SIGUSR1" in log
    assert f"requeueing job {pre}; it resumes from step {stopped}" in log
    assert re.search(r"job \d+ restart 1 on ", log)
    assert f"resumed from step{stopped:08d} at step {stopped}" in log
    assert f"done: step {steps}" in log

    ref_done = slurm.wait_done(ref, timeout=240)[0]
    ref_log = _read(os.path.join(work, "runs", "slurm", f"care-train-{ref}.out"))
    assert ref_done["JobState"] == "COMPLETED" and ref_done["Restarts"] == "0", f"{ref_done}\n{ref_log[-3000:]}"
    assert "requeueing" not in ref_log and "resumed from" not in ref_log
    got, want = _losses(pre_run), _losses(ref_run)
    assert max(got) == max(want) == steps
    assert got == want  # every step, the final loss included, bit for bit
    assert _latest(pre_run) == _latest(ref_run) == f"step{steps:08d}"

    # A finished run is not trained again: resubmitting it (or a stray requeue) exits at once.
    again = _submit(
        slurm,
        work,
        "train.sbatch",
        "configs/toy_test.yaml",
        *common,
        "run.name=ref",
        sbatch=("--ntasks-per-node=2", "--job-name=again"),
    )
    again_done = slurm.wait_done(again, timeout=120)[0]
    again_log = _read(os.path.join(work, "runs", "slurm", f"again-{again}.out"))
    assert again_done["JobState"] == "COMPLETED" and again_done["Restarts"] == "0", again_log
    assert f"run already finished (step {steps} >= train.steps {steps})" in again_log
    assert "srun" not in again_log and _losses(ref_run) == want


# ---------------------------------------------------------------- srun alone, no batch script

# What train/distributed.py derives inside an srun task, and a gloo all-reduce over that rendezvous.
_PROBE = """
import json, os
import torch, torch.distributed as dist
from train.distributed import fill_env_defaults
fill_env_defaults()
dist.init_process_group("gloo")
t = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(t)
keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID")
print("PROBE " + json.dumps({**{k: os.environ[k] for k in keys}, "sum": t.item()}), flush=True)
dist.destroy_process_group()
"""


@pytest.mark.multiprocess
def test_srun_tasks_without_wrapper_take_ranks_and_rendezvous_from_slurm(slurm, tmp_path):
    """``srun --ntasks=2 python launch/train.py ...``: no batch script, no task.sh, no RANK/MASTER_* in
    the environment. train/distributed.py maps SLURM_PROCID/NTASKS/LOCALID and meets on the step's first
    node at 10000 + job id % 20000; the tiny model trains at ep_size 2 to the end and computes exactly
    what 2 ranks started by hand compute."""
    import torch

    from tests.helpers.train_harness import read_losses, start_ranks

    env = slurm.env(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, DS_ACCELERATOR="cpu")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    srun = [_which("srun"), "--ntasks=2", "--cpus-per-task=1", "--time=10", "--kill-on-bad-exit=1"]

    p = slurm.run(*srun, "--job-name=probe", sys.executable, "-c", _PROBE, cwd=ROOT, env=env, check=False, timeout=120)
    recs = sorted(
        (json.loads(line[6:]) for line in p.stdout.splitlines() if line.startswith("PROBE ")), key=lambda r: r["RANK"]
    )
    assert p.returncode == 0 and len(recs) == 2, p.stdout + p.stderr
    job = int(recs[0]["SLURM_JOB_ID"])
    for rank, rec in enumerate(recs):
        assert (rec["RANK"], rec["WORLD_SIZE"], rec["LOCAL_RANK"]) == (str(rank), "2", str(rank)), rec
        assert (rec["MASTER_ADDR"], rec["MASTER_PORT"]) == (slurm.hostname, str(10000 + job % 20000)), rec
        assert rec["SLURM_JOB_ID"] == str(job) and rec["sum"] == 3.0, rec  # both ranks met there

    syn = tmp_path / "synthetic"
    _py(
        "data.synthetic",
        "--out",
        str(syn),
        "--train",
        "48",
        "--val",
        "8",
        "--test",
        "0",
        "--size",
        "64",
        "--samples-per-shard",
        "16",
    )
    steps = 3
    args = [
        f"data.train_shards={syn}/train-{{000000..000002}}.tar",
        f"data.val_shards={syn}/val-{{000000..000000}}.tar",
        f"train.steps={steps}",
        "checkpoint.every=2",
        "logging.every=1",
        "data.num_workers=0",
        "model.experts.ep_size=2",
        *TOY,
    ]
    tiny_cfg = os.path.join(ROOT, "configs", "tiny.yaml")
    run = str(tmp_path / "srun")
    p = slurm.run(
        *srun,
        "--job-name=srun-train",
        sys.executable,
        "launch/train.py",
        "--config",
        tiny_cfg,
        f"run.dir={run}",
        *args,
        cwd=ROOT,
        env=env,
        check=False,
        timeout=300,
    )
    out = p.stdout + p.stderr
    assert p.returncode == 0 and f"done: step {steps}" in out, out[-4000:]
    assert "not started by srun" not in out
    ckpt = os.path.join(run, "tiny", "checkpoints", f"step{steps:08d}")
    for r in range(2):  # two ranks of one world, not two single-process runs
        state = torch.load(os.path.join(ckpt, f"train_state_rank{r}.pt"), map_location="cpu", weights_only=True)
        assert (state["rank"], state["world_size"], state["step"]) == (r, 2, steps)
    files = set(os.listdir(ckpt))
    assert {f"expp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)} <= files
    assert {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(3) for e in range(4)} <= files

    by_hand = str(tmp_path / "by-hand")
    ranks = start_ranks(2, by_hand, args, entry=os.path.join(ROOT, "launch", "train.py"), config=tiny_cfg)
    assert ranks.wait(300) == [0, 0], ranks.output()[-4000:]
    want = read_losses(by_hand, "tiny")
    assert sorted(want) == list(range(1, steps + 1))
    assert read_losses(run, "tiny") == want  # bit for bit
