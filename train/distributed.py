"""Process-group set-up that works under `deepspeed`, `torchrun`, SLURM `srun` and as a plain process.

Why: `make train` on a laptop runs ``python -m launch.train`` with no launcher, while clusters use
the deepspeed launcher (which sets RANK/WORLD_SIZE/LOCAL_RANK and passes --local_rank) or srun
(SLURM_PROCID/SLURM_NTASKS/...). We fill the env vars DeepSpeed expects and pick nccl on GPU, gloo
on CPU.
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist (what rank 0 runs on under srun's block distribution):
    'gpu[003-010,012],cpu1' -> 'gpu003'; 'rack[1-2]n[3-4]' -> 'rack1n3' (``scontrol show hostnames``'s first)."""
    s = nodelist.strip()
    host, i = [], 0
    while i < len(s) and s[i] != ",":  # the first entry: up to the first comma outside brackets
        if s[i] == "[":
            end = s.find("]", i)
            if end < 0:
                raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}")
            host.append(s[i + 1 : end].split(",")[0].split("-")[0])
            i = end + 1
        else:
            host.append(s[i])
            i += 1
    if not host or "]" in host:
        raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}")
    return "".join(host)


def fill_env_defaults() -> None:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from SLURM or single-process defaults.

    Under ``srun`` (one task per GPU) the rendezvous is the first node of the step (of the job when
    SLURM gives no step list) on a port derived from the job id, so that jobs sharing a node do not
    collide (launch/slurm/ uses the same rule; two concurrent steps of one job need their own
    MASTER_PORT). Only srun tasks count: a batch script's own shell also carries SLURM_PROCID=0 and
    SLURM_NTASKS=N but no SLURM_STEP_ID, and a ``python launch/train.py`` started there without srun
    is one process, not rank 0 of N waiting forever for the others.
    """
    in_step = "SLURM_STEP_ID" in os.environ or "SLURM_STEPID" in os.environ
    if "RANK" not in os.environ and in_step and "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
        # a task bound to one GPU (--gpus-per-task=1, --gpu-bind=single:1) sees it as device 0 (as task.sh)
        os.environ.setdefault(
            "LOCAL_RANK", "0" if visible and "," not in visible else os.environ.get("SLURM_LOCALID", "0")
        )
        nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
        if nodelist:
            os.environ.setdefault("MASTER_ADDR", first_host(nodelist))
        if "SLURM_JOB_ID" in os.environ:
            os.environ.setdefault("MASTER_PORT", str(10000 + int(os.environ["SLURM_JOB_ID"]) % 20000))
    elif "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        print(
            f"warning: SLURM_NTASKS={os.environ['SLURM_NTASKS']} but this process was not started by srun: "
            "training as a single process (start one task per GPU with `srun`)",
            file=sys.stderr,
            flush=True,
        )
    single = "RANK" not in os.environ
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port() if single else 29500)


def init_distributed() -> DistInfo:
    """Initialise the default process group through DeepSpeed (gloo on CPU, nccl on GPU)."""
    import deepspeed

    fill_env_defaults()
    on_gpu = torch.cuda.is_available()
    local_rank = int(os.environ["LOCAL_RANK"])
    if on_gpu:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if not torch_dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo", auto_mpi_discovery=False)
    return DistInfo(
        rank=torch_dist.get_rank(), world_size=torch_dist.get_world_size(), local_rank=local_rank, device=device
    )


def all_ranks_any(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is True on any rank (the step-boundary agreement primitive)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def barrier() -> None:
    if torch_dist.is_initialized():
        torch_dist.barrier()


def shutdown_distributed() -> None:
    """Tear the process group down while the interpreter is still whole: a barrier, then
    ``destroy_process_group``. For the end of a run that every rank finished.

    Left to interpreter exit, gloo's worker threads may still hold finished asynchronous work (ZeRO's
    overlapped reductions) whose tensors are released after Python is torn down: that release takes
    the GIL and the process dies of SIGABRT after a run that succeeded (seen on one rank of two, at
    random). The barrier keeps a rank from tearing down while another is still in a collective.
    """
    if torch_dist.is_initialized():
        if torch_dist.get_world_size() > 1:
            torch_dist.barrier()
        torch_dist.destroy_process_group()
