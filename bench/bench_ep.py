"""Expert parallelism at full FLUX width: per-GPU throughput of CARE expert layers at ep 1 / 2 / 4.

    python3 -m torch.distributed.run --nproc_per_node N bench/bench_ep.py --ep E [--tokens 4096] [--layers 4]

FFN experts (hidden 3072 -> 12288 -> 3072, 4 experts, top-3, bf16), ``--layers`` expert layers, each
GPU routing its own ``--tokens`` target tokens per layer (weak scaling: the work per GPU is fixed).
One step = forward + backward of every layer, then the expert-gradient reduction data parallelism
needs: with ep_size < world size, every expert's gradient is all-reduced over the ranks holding a
copy of it (the expert-data-parallel group, as DeepSpeed does); with ep_size = world size nothing.
The all-to-all of tokens (ep > 1) and the gradient all-reduce are timed from the profiler's NCCL
kernels; the step is timed on the host after a barrier and a device synchronisation (it includes
the waits that make expert parallelism cost something). Rank 0 prints one JSON line per run; compare runs of the same --tokens/--layers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from bench.common import emit, environment  # noqa: E402
from moe.dispatch import AllToAllDispatcher  # noqa: E402
from moe.expert_layer import CareMoE  # noqa: E402
from moe.experts import FfnExpert, packed_width  # noqa: E402
from moe.router import topk_routing  # noqa: E402

E, K, CTX = 4, 3, 64
NAMES = ["text", "mask", "reference", "base"]


def build_layers(n_layers: int, ep: int, ep_rank: int, group, dev, D: int, FFN: int) -> list[CareMoE]:
    n_local = E // ep
    layers = []
    for li in range(n_layers):
        torch.manual_seed(1000 + li)  # the same frozen FFN on every rank
        proj_in, proj_out = nn.Linear(D, FFN, device=dev), nn.Linear(FFN, D, device=dev)
        experts = [
            FfnExpert(NAMES[e], D, CTX, proj_in, proj_out) for e in range(ep_rank * n_local, (ep_rank + 1) * n_local)
        ]
        layer = CareMoE(experts, E, ep, ep_rank, AllToAllDispatcher(ep, ep_rank)).to(dev, torch.bfloat16)
        layer.deepspeed_moe.ep_group = group
        layers.append(layer)
    return layers


def nccl_ms(prof) -> dict:
    out = {"alltoall_ms": 0.0, "allreduce_ms": 0.0}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        name = e.name.lower()
        if "nccl" in name and ("sendrecv" in name or "alltoall" in name):
            out["alltoall_ms"] += e.device_time / 1e3
        elif "nccl" in name and "allreduce" in name:
            out["allreduce_ms"] += e.device_time / 1e3
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--dim", type=int, default=3072)
    p.add_argument("--ffn", type=int, default=12288)
    args = p.parse_args()
    D = args.dim
    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # gloo: a CPU smoke run with small --dim/--ffn
    rank, world = dist.get_rank(), dist.get_world_size()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if cuda:
        torch.cuda.set_device(local)
    dev = torch.device("cuda", local) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    ep = args.ep
    if world % ep or E % ep:
        raise SystemExit(f"--ep {ep} must divide the world size {world} and the {E} experts")
    # DeepSpeed's layout: consecutive ranks form an expert-parallel group; equal ep ranks share experts
    ep_groups = [dist.new_group(list(range(s, s + ep))) for s in range(0, world, ep)]
    edp_groups = [dist.new_group(list(range(r, world, ep))) for r in range(ep)]
    ep_group, edp_group = ep_groups[rank // ep], edp_groups[rank % ep]
    ep_rank, edp_size = rank % ep, world // ep
    layers = build_layers(args.layers, ep, ep_rank, ep_group, dev, D, args.ffn)
    params = [p for layer in layers for p in layer.parameters()]

    g = torch.Generator(device=dev).manual_seed(rank)
    packed = [
        torch.randn(args.tokens, packed_width(D, CTX), device=dev, dtype=torch.bfloat16, generator=g) for _ in layers
    ]
    routes = [
        topk_routing(
            torch.randn(args.tokens, E, device=dev, generator=g),
            torch.ones(args.tokens, E, dtype=torch.bool, device=dev),
            K,
        )
        for _ in layers
    ]

    def step():
        loss = 0
        for layer, x, r in zip(layers, packed, routes):
            loss = loss + layer(x.requires_grad_(), r.index, r.weight).float().square().mean()
        loss.backward()
        if edp_size > 1:  # data-parallel copies of the experts agree on their gradient
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat, group=edp_group)
            flat.div_(edp_size)
        for p in params:
            p.grad = None

    for _ in range(3):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.iters):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        sync()
    comm = nccl_ms(prof)
    ms = torch.tensor([statistics.median(times)], device=dev)
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    rec = {
        "world": world,
        "ep_size": ep,
        "layers": args.layers,
        "tokens_per_gpu": args.tokens,
        "step_ms": round(float(ms), 3),
        "tokens_per_s_per_gpu": round(args.tokens / (float(ms) * 1e-3)),
        "expert_params_per_gpu": sum(p.numel() for p in params),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        **{k: round(v, 3) for k, v in comm.items()},
    }
    if rank == 0:
        emit({"env": environment(), **rec} if world == 1 and ep == 1 else rec)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
