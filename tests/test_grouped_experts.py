"""The grouped-GEMM path for FFN experts (``moe.experts.grouped_ffn_forward``) computes what the
per-token reference computes: outputs and every gradient, bf16 against float64 (relative error of a
bf16 computation: ~1e-2 bound, measured ~6e-3), at ep_size 1 and at ep_size 2 under 2 gloo processes."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from moe.dispatch import AllToAllDispatcher, reference_combine
from moe.experts import FfnExpert, grouped_ffn_supported, packed_width
from moe.router import topk_routing
from tests.helpers.model_configs import data_dependent_nodes

D, HIDDEN, CTX, NAMES = 32, 64, 8, ["text", "mask", "reference", "base"]
BF16_TOL = 2e-2


def _experts(seed: int = 0) -> list[FfnExpert]:
    torch.manual_seed(seed)
    proj_in, proj_out = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)
    experts = [FfnExpert(n, D, CTX, proj_in, proj_out) for n in NAMES]
    with torch.no_grad():  # distinct experts, non-zero condition weights
        for e in experts:
            for p in e.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return experts


def _routing(tokens: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    available = torch.ones(tokens, 4, dtype=torch.bool)
    available[: tokens // 3, 2] = False  # some tokens cannot use the Reference expert
    available[: tokens // 6, 1] = False  # ... nor the Mask expert: a top-3 slot stays unassigned (-1)
    packed = torch.randn(tokens, packed_width(D, CTX), generator=g)
    packed[:, -1] = torch.rand(tokens, generator=g)  # the refined mask column lies in [0, 1]
    return packed, topk_routing(torch.randn(tokens, 4, generator=g), available, 3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _reference(experts, packed, routing):
    """float64 outputs and gradients of sum(out^2) through the per-token loop."""
    ref_experts = [copy.deepcopy(e).double() for e in experts]
    x = packed.double().requires_grad_()
    out = reference_combine(x, routing.index, routing.weight.double(), ref_experts)
    out.square().sum().backward()
    return out.detach(), x.grad, ref_experts


def test_grouped_ffn_matches_reference_at_ep1():
    experts = _experts()
    packed, routing = _routing(48, seed=1)
    fast = [copy.deepcopy(e).to(torch.bfloat16) for e in experts]
    x = packed.to(torch.bfloat16).requires_grad_()
    assert grouped_ffn_supported(fast, x.dtype, x.device)
    out = AllToAllDispatcher(grouped_gemm=True)(x, routing.index, routing.weight, fast)
    out.float().square().sum().backward()
    ref_out, ref_dx, ref_experts = _reference(experts, packed, routing)
    assert _rel(out, ref_out) < BF16_TOL
    assert _rel(x.grad, ref_dx) < BF16_TOL
    for a, b in zip(fast, ref_experts):
        for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert _rel(pa.grad, pb.grad) < BF16_TOL, (a.name, name)
    # a wrong condition slice would show: the Base expert's condition gradient is not zero
    assert fast[3].cond.weight.grad.abs().sum() > 0


def test_grouped_ffn_dispatch_has_no_data_dependent_sizes():
    """At ep_size 1 the grouped path must trace whole with every size known before the data: a size
    read from the data (``torch.bincount`` counting the groups did) is a device-to-host synchronisation
    on CUDA in every expert layer, and CUDA graphs split around it (docs/history/perf-log.md, 22:17 entry)."""
    data_dependent = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        data_dependent.extend(data_dependent_nodes(gm))
        return gm.forward

    experts = [copy.deepcopy(e).to(torch.bfloat16) for e in _experts()]
    packed, routing = _routing(48, seed=2)
    x = packed.to(torch.bfloat16)
    dispatcher = AllToAllDispatcher(grouped_gemm=True)
    assert dispatcher.host_sync_free(experts)
    compiled = torch.compile(lambda p, i, w: dispatcher(p, i, w, experts), backend=backend, fullgraph=True)
    out = compiled(x, routing.index, routing.weight)
    assert not data_dependent, data_dependent
    assert torch.equal(out, dispatcher(x, routing.index, routing.weight, experts))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo")
    experts = _experts()
    packed, routing = _routing(40, seed=10 + rank)  # each rank routes its own tokens
    local = [copy.deepcopy(e).to(torch.bfloat16) for e in experts[2 * rank : 2 * rank + 2]]
    x = packed.to(torch.bfloat16).requires_grad_()
    out = AllToAllDispatcher(ep_size=2, ep_rank=rank, grouped_gemm=True)(
        x, routing.index, routing.weight, local, dist.group.WORLD
    )
    out.float().square().sum().backward()
    ref_out, ref_dx, ref_experts = _reference(experts, packed, routing)
    assert _rel(out, ref_out) < BF16_TOL
    assert _rel(x.grad, ref_dx) < BF16_TOL
    for expert in ref_experts:  # an expert's gradient gathers the tokens of both ranks
        for p in expert.parameters():
            dist.all_reduce(p.grad)
    for j, fast in enumerate(local):
        for (name, pa), (_, pb) in zip(fast.named_parameters(), ref_experts[2 * rank + j].named_parameters()):
            assert _rel(pa.grad, pb.grad) < BF16_TOL, (fast.name, name)
    dist.destroy_process_group()


@pytest.mark.multiprocess
def test_grouped_ffn_matches_reference_at_ep2():
    mp.spawn(_worker, args=(_free_port(),), nprocs=2, join=True)
