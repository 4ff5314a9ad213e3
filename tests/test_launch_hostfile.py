"""The ``deepspeed --hostfile`` launch path on one host: real launch/train.py, tiny model, gloo.

What DeepSpeed 0.19.8's runner does with a hostfile (deepspeed/launcher/runner.py): a hostfile always
means "multi-node" to it, so before launching it (a) checks passwordless ssh to the first host, and
(b) asks that host for its address over ssh (``hostname -I``) unless ``--master_addr`` is given. With
a single host in the file it then launches locally (``deepspeed.launcher.launch``, no pdsh). So on one
host without ssh to itself the command needs ``--no_ssh_check --master_addr 127.0.0.1``:

    deepspeed --hostfile hostfile --no_ssh_check --master_addr 127.0.0.1 launch/train.py --config ...

Across nodes without pdsh/ssh, ``--no_ssh --node_rank=N --master_addr=<node 0>`` runs the same command
on every node (each node starts its own slots); the second test runs that with two "nodes" of one
slot each on this host. The pdsh path (several hosts, ssh) cannot run here: docs/SLURM.md.

Each launch must compute exactly what 2 ranks started by hand (RANK/WORLD_SIZE/MASTER_* set, the
train_harness way) compute: same losses bit for bit, both ranks in a world of 2, ep_size 2 experts
split across them, and a finished run with its checkpoint.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
import torch

from tests.helpers.train_harness import LAUNCH, ROOT, free_port, read_losses, start_ranks
from tests.helpers.train_harness import TINY_CONFIG as TINY

pytestmark = pytest.mark.multiprocess
STEPS = 3
ARGS = [
    f"train.steps={STEPS}",
    "checkpoint.every=2",
    "logging.every=1",
    "logging.images_every=0",
    "logging.progress_bar=false",
    "data.num_workers=0",
    "model.experts.ep_size=2",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_shards):
    """The same 2-rank run started by hand (env-var rendezvous): the losses every launcher must give."""
    run = str(tmp_path_factory.mktemp("by-hand"))
    ranks = start_ranks(2, run, tiny_shards + ARGS, entry=LAUNCH, config=TINY)
    codes = ranks.wait(300)
    assert codes == [0, 0], ranks.output()[-4000:]
    losses = read_losses(run, "tiny")
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def _env() -> dict[str, str]:
    """No rendezvous or rank variables from the test process: the launcher must set them all."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=ROOT, DS_ACCELERATOR="cpu")
    return env


def _runner(hostfile: str, run_dir: str, shards: list[str], *launcher_args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deepspeed.launcher.runner",
        "--hostfile",
        hostfile,
        *launcher_args,
        LAUNCH,
        "--config",
        TINY,
        f"run.dir={run_dir}",
        *shards,
        *ARGS,
    ]


def _start(cmd: list[str], log_path) -> tuple[subprocess.Popen, object]:
    """The runner in its own process group: on failure we stop it with its launcher and ranks."""
    log = open(log_path, "w")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    ), log


def _wait_all(procs: list[tuple[subprocess.Popen, object]], timeout: float = 300) -> list[int]:
    try:
        return [p.wait(timeout=timeout) for p, _ in procs]
    finally:
        for p, log in procs:  # a failed node leaves the others waiting at the rendezvous: stop them
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
            log.close()


def _check_run(run_dir: str, reference: dict[int, float]) -> None:
    tiny = os.path.join(run_dir, "tiny")
    assert read_losses(run_dir, "tiny") == reference  # bit for bit: same ranks, same data, same sums
    with open(os.path.join(tiny, "checkpoints", "latest")) as f:
        assert f.read() == f"step{STEPS:08d}"
    ckpt = os.path.join(tiny, "checkpoints", f"step{STEPS:08d}")
    for r in range(2):  # every rank saw a world of 2 and knew its own rank
        state = torch.load(os.path.join(ckpt, f"train_state_rank{r}.pt"), map_location="cpu", weights_only=True)
        assert (state["rank"], state["world_size"], state["step"]) == (r, 2, STEPS)
    files = set(os.listdir(ckpt))
    # ep_size 2: one optimizer shard per expert-parallel rank, one file per expert of each expert layer
    assert {"expp_rank_0_mp_rank_00_optim_states.pt", "expp_rank_1_mp_rank_00_optim_states.pt"} <= files
    assert "expp_rank_2_mp_rank_00_optim_states.pt" not in files
    assert {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in range(3) for e in range(4)} <= files


def test_single_host_hostfile_runs_two_ranks(tmp_path, tiny_shards, reference):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run = str(tmp_path / "run")
    cmd = _runner(
        str(hostfile),
        run,
        tiny_shards,
        "--no_ssh_check",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
    )
    codes = _wait_all([_start(cmd, tmp_path / "runner.log")])
    out = (tmp_path / "runner.log").read_text()
    assert codes == [0], out[-4000:]
    assert "nnodes=1, num_local_procs=2, node_rank=0" in out and "dist_world_size=2" in out, out[-4000:]
    assert "--local_rank=1" in out  # the launcher's own local launch (no pdsh/ssh)
    assert f"done: step {STEPS}" in out
    _check_run(run, reference)


def test_two_node_hostfile_without_ssh_one_command_per_node(tmp_path, tiny_shards, reference):
    """``--no_ssh --node_rank N``: what each node of a 2-node job runs, here both on this host."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")  # names only key the world info: not resolved
    run, port = str(tmp_path / "run"), str(free_port())
    procs = []
    for node in range(2):
        cmd = _runner(
            str(hostfile),
            run,
            tiny_shards,
            "--no_ssh",
            f"--node_rank={node}",
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            port,
        )
        procs.append(_start(cmd, tmp_path / f"node{node}.log"))
    codes = _wait_all(procs)
    outs = [(tmp_path / f"node{node}.log").read_text() for node in range(2)]
    assert codes == [0, 0], "\n".join(o[-3000:] for o in outs)
    for node, out in enumerate(outs):
        assert f"nnodes=2, num_local_procs=1, node_rank={node}" in out, out[-3000:]
        assert "global_rank_mapping=defaultdict(<class 'list'>, {'node-a': [0], 'node-b': [1]})" in out
        assert "--local_rank=0" in out  # each node numbers its own processes from 0
    assert f"done: step {STEPS}" in outs[0]  # rank 0 lives on node 0
    _check_run(run, reference)
