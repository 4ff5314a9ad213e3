"""Expert parallelism: ep_size=2 (4) under 2 (4) gloo processes computes what ep_size=1 computes.

Every sample routes top-3 of all four experts (also without a reference), and the Latent Mixture's
Base share joins Base's slot: the all-to-all moves exactly the slots in use."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _perturb_experts(model, ep_rank: int, n_local: int) -> None:
    """Move every expert off its initialisation, identically for the same global expert id."""
    for layer in model.expert_layers:
        for j, expert in enumerate(layer.moe.deepspeed_moe.experts.deepspeed_experts):
            g = torch.Generator().manual_seed(100 * layer.position + ep_rank * n_local + j)
            for p in expert.parameters():
                p.data.add_(0.05 * torch.randn(p.shape, generator=g))


def _worker(rank: int, world: int, port: int, kind: str) -> None:
    """ep_size = world: each rank holds 4 / world experts of every expert layer."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.moe.layer import MoE

    from moe.model import build_model
    from tests.helpers.model_configs import make_batch, tiny_model_config

    deepspeed.init_distributed(dist_backend="gloo")
    overrides = {"experts.kind": kind, "experts.dispatch": "alltoall", "router.noise_std": 0.0}
    torch.manual_seed(0)
    n_local = 4 // world
    ep2 = build_model(tiny_model_config(**overrides, **{"experts.ep_size": world}))
    for module in ep2.modules():
        if isinstance(module, MoE):
            module.set_deepspeed_parallelism()
    torch.manual_seed(0)
    ep1 = build_model(tiny_model_config(**overrides), ep_rank=0)
    _perturb_experts(ep2, rank, n_local)
    _perturb_experts(ep1, 0, 4)

    batch = make_batch(seed=rank, has_ref=[rank == 0, True])  # ranks see different data
    outs = []
    for model in (ep2, ep1):
        model.train()
        torch.manual_seed(7 + rank)
        out = model(batch)
        out.loss.backward()
        outs.append(out)
    torch.testing.assert_close(outs[0].loss, outs[1].loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0].prediction, outs[1].prediction, rtol=1e-5, atol=1e-6)

    g1 = {n: p.grad.clone() for n, p in ep1.trainable_named_parameters()}
    for name in sorted(g1):  # an expert's gradient collects the tokens of every rank that routed to it
        if ".deepspeed_experts." in name:
            dist.all_reduce(g1[name])
    checked_experts = 0
    for name, p in ep2.trainable_named_parameters():
        marker = ".deepspeed_experts."
        if marker not in name:  # replicated parameters: gradient of this rank's data alone
            torch.testing.assert_close(p.grad, g1[name], rtol=1e-4, atol=1e-6, msg=name)
            continue
        head, tail = name.split(marker)
        local, rest = tail.split(".", 1)
        global_name = f"{head}{marker}{rank * n_local + int(local)}.{rest}"
        torch.testing.assert_close(p.grad, g1[global_name], rtol=1e-4, atol=1e-6, msg=name)
        checked_experts += 1
    assert checked_experts > 0
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["ffn", "lora"])
def test_expert_parallel_matches_single_rank(kind):
    mp.spawn(_worker, args=(2, _free_port(), kind), nprocs=2, join=True)


def test_expert_parallel_4_matches_single_rank():
    """ep_size 4: one expert per rank, 4 processes (12.5 s on 2 cores)."""
    mp.spawn(_worker, args=(4, _free_port(), "ffn"), nprocs=4, join=True)
