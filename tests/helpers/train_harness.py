"""Spawn training ranks as subprocesses (gloo, env-var rendezvous) and read what they wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Optional

from tests.helpers.faults import Faults

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENTRY = os.path.join(ROOT, "tests", "helpers", "train_entry.py")
TOY_CONFIG = os.path.join(ROOT, "configs", "toy_test.yaml")
LAUNCH = os.path.join(ROOT, "launch", "train.py")
TINY_CONFIG = os.path.join(ROOT, "configs", "tiny.yaml")


def tiny_shards(out: str) -> list[str]:
    """Synthetic 64x64 shards (3 train, 1 val) in ``out``; the overrides that point tiny.yaml at them."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "data.synthetic",
            "--out",
            str(out),
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
        ],
        check=True,
        cwd=ROOT,
        capture_output=True,
    )
    return [
        f"data.train_shards={out}/train-{{000000..000002}}.tar",
        f"data.val_shards={out}/val-{{000000..000000}}.tar",
    ]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Ranks:
    procs: list[subprocess.Popen]
    logs: list[str]

    def wait(self, timeout: float = 240) -> list[int]:
        deadline = time.time() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.time())))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError("ranks timed out:\n" + self.output()) from None
        return codes

    def kill(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def output(self, rank: int = 0) -> str:
        with open(self.logs[rank]) as f:
            return f.read()

    def report(self, codes: list[int], chars: int = 4000) -> str:
        """The exit codes and the log tail of rank 0 and of every rank that failed (a rank that dies at
        exit after rank 0 finished shows nothing in rank 0's log)."""
        ranks = [0] + [r for r, c in enumerate(codes) if c != 0 and r != 0]
        return f"exit codes {codes}:\n" + "\n".join(f"--- rank {r} ---\n{self.output(r)[-chars:]}" for r in ranks)


def start_ranks(
    world: int,
    run_dir: str,
    overrides: list[str],
    resume: str | None = None,
    entry: str = ENTRY,
    config: str = TOY_CONFIG,
    tag: str = "run",
    faults: Optional[Faults] = None,
    env: Optional[dict[str, str]] = None,
    prefix: Optional[list[str]] = None,
) -> Ranks:
    """Start ``world`` processes of the training entry with RANK/WORLD_SIZE/MASTER_* set (gloo on CPU).

    ``faults`` reach the entry's factories (tests/helpers/faults.py); ``env`` adds variables (e.g. SLURM_JOB_ID);
    ``prefix`` runs each process through a command (e.g. one that mounts a small file system first).
    """
    port = free_port()
    procs, logs = [], []
    os.makedirs(run_dir, exist_ok=True)
    for rank in range(world):
        rank_env = {
            **os.environ,
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": ROOT,
            "DS_ACCELERATOR": "cpu",
            **(faults or Faults()).to_env(),
            **(env or {}),
        }
        cmd = [*(prefix or []), sys.executable, entry, "--config", config, f"run.dir={run_dir}", *overrides]
        if resume:
            cmd += ["--resume", resume]
        log = os.path.join(run_dir, f"{tag}.rank{rank}.log")
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=rank_env))
        logs.append(log)
    return Ranks(procs, logs)


def run_ranks(
    world: int,
    run_dir: str,
    overrides: list[str],
    resume: str | None = None,
    timeout: float = 240,
    expect_ok: bool = True,
    tag: str = "run",
    faults: Optional[Faults] = None,
    env: Optional[dict[str, str]] = None,
) -> Ranks:
    ranks = start_ranks(world, run_dir, overrides, resume, tag=tag, faults=faults, env=env)
    codes = ranks.wait(timeout)
    if expect_ok:
        assert codes == [0] * world, ranks.report(codes)
    return ranks


def read_losses(run_dir: str, name: str = "toy") -> dict[int, float]:
    """step -> loss (the last record of each step wins: a resumed run rewrites steps after its checkpoint)."""
    out: dict[int, float] = {}
    with open(os.path.join(run_dir, name, "losses.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out[rec["step"]] = rec["loss"]
    return out


def read_records(run_dir: str, name: str = "toy") -> list[dict]:
    with open(os.path.join(run_dir, name, "losses.jsonl")) as f:
        return [json.loads(line) for line in f]


def wait_for_step(run_dir: str, step: int, ranks: Ranks, timeout: float = 180, name: str = "toy") -> None:
    """Block until rank 0 has recorded ``step`` in losses.jsonl (fails if the ranks exit first)."""
    path = os.path.join(run_dir, name, "losses.jsonl")
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path) and any(r["step"] >= step for r in read_records(run_dir, name)):
            return
        if any(p.poll() is not None for p in ranks.procs):
            raise AssertionError(f"a rank exited before step {step}:\n" + ranks.output()[-4000:])
        time.sleep(0.05)
    ranks.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s:\n" + ranks.output()[-4000:])
