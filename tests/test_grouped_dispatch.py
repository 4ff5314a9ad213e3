"""The grouped dispatcher (``moe.grouped_ffn.fused_grouped_ffn``: FFN experts as grouped GEMMs with the
permutation, biases, routing weights and combine fused around them) computes what its reference, the
all-to-all dispatcher's grouped-GEMM path, computes: the output, the packed rows' gradient, the routing
weights' gradient and every parameter's gradient.

Tolerance: both paths run in bf16 and round in different places, so they are compared by relative L2
error, ``|fused - reference| / |reference|`` <= 1.5e-2 (measured up to 8e-3). Each is also held to the
float64 per-token loop (``reference_combine``) at 2e-2, as in tests/test_grouped_experts.py: a path
that agreed with the other but not with the definition would fail there.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from moe.config import ModelConfig, validate_model_config
from moe.dispatch import AllToAllDispatcher, GroupedDispatcher, build_dispatcher, reference_combine
from moe.experts import FfnExpert, packed_width
from tests.helpers.model_configs import data_dependent_nodes

D, HIDDEN, CTX, NAMES = 32, 64, 8, ["text", "mask", "reference", "base"]
PATH_TOL = 1.5e-2  # fused against the reference path, both bf16
DEF_TOL = 2e-2  # either against the float64 definition


def _experts(seed: int = 0) -> list[FfnExpert]:
    torch.manual_seed(seed)
    proj_in, proj_out = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)
    experts = [FfnExpert(n, D, CTX, proj_in, proj_out) for n in NAMES]
    with torch.no_grad():  # distinct experts, non-zero condition weights and biases
        for e in experts:
            for p in e.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return experts


def _routing(tokens: int, k: int, seed: int, never: tuple[int, ...] = (), empty_share: float = 0.0):
    """index/weight [tokens, k]: k distinct experts per token, none from ``never`` (their groups stay
    empty), a share ``empty_share`` of the slots empty (-1, weight 0), positive weights."""
    g = torch.Generator().manual_seed(seed)
    allowed = [e for e in range(len(NAMES)) if e not in never]
    assert k <= len(allowed)
    index = torch.stack([torch.tensor(allowed)[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(tokens)])
    empty = torch.rand(tokens, k, generator=g) < empty_share
    index = torch.where(empty, -1, index)
    weight = torch.rand(tokens, k, generator=g) * 0.9 + 0.1
    weight = torch.where(empty, 0.0, weight / weight.sum(1, keepdim=True))
    packed = torch.randn(tokens, packed_width(D, CTX), generator=g)
    packed[:, -1] = 0  # the padding column
    packed[:, D + 4 * CTX] = torch.rand(tokens, generator=g)  # the refined mask column lies in [0, 1]
    return packed, index, weight


def _rel(a: Tensor, b: Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _run(dispatcher, experts, packed: Tensor, index: Tensor, weight: Tensor, dtype=torch.bfloat16):
    """Output, packed-row gradient, routing-weight gradient and parameter gradients of sum(out^2)."""
    experts = [copy.deepcopy(e).to(dtype) for e in experts]
    x = packed.to(dtype).clone().requires_grad_()
    w = weight.to(dtype).clone().requires_grad_()
    out = dispatcher(x, index, w, experts)
    out.float().square().sum().backward()
    grads = {f"{e.name}.{n}": p.grad for e in experts for n, p in e.named_parameters()}
    return out.detach(), x.grad, w.grad, grads


def _definition(experts, packed, index, weight):
    experts = [copy.deepcopy(e).double() for e in experts]
    x = packed.double().requires_grad_()
    w = weight.double().requires_grad_()
    out = reference_combine(x, index, w, experts)
    out.square().sum().backward()
    return out.detach(), x.grad, w.grad, {f"{e.name}.{n}": p.grad for e in experts for n, p in e.named_parameters()}


CASES = {
    "top1": dict(k=1),
    "top2": dict(k=2),
    "top3": dict(k=3),
    "top3_empty_slots": dict(k=3, empty_share=0.3),  # Latent-Mixture-like empty slots, in the last group
    "top2_middle_expert_unused": dict(k=2, never=(1,)),  # an empty group between two others
    "top2_first_and_last_unused": dict(k=2, never=(0, 3), empty_share=0.2),  # the last group: empty slots only
    "top1_one_expert": dict(k=1, never=(0, 1, 2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_fused_grouped_path_equals_the_reference_path(case):
    experts = _experts()
    packed, index, weight = _routing(40, seed=len(case), **CASES[case])
    fused = _run(GroupedDispatcher(), experts, packed, index, weight)
    ref = _run(AllToAllDispatcher(1, 0, grouped_gemm=True), experts, packed, index, weight)
    definition = _definition(experts, packed, index, weight)
    for name, a, b, d in [
        ("out", fused[0], ref[0], definition[0]),
        ("packed grad", fused[1], ref[1], definition[1]),
        ("weight grad", fused[2], ref[2], definition[2]),
    ]:
        assert _rel(a, b) < PATH_TOL, (name, _rel(a, b))
        assert _rel(a, d) < DEF_TOL, (name, _rel(a, d))
    assert fused[3].keys() == ref[3].keys()
    unused = {NAMES[e] for e in CASES[case].get("never", ())}
    for name, g in fused[3].items():
        if name.split(".")[0] in unused:  # an expert that received no rows gets a zero gradient
            assert g is not None and not g.any(), name
            continue
        assert _rel(g, ref[3][name]) < PATH_TOL, (name, _rel(g, ref[3][name]))
        assert _rel(g, definition[3][name]) < DEF_TOL, (name, _rel(g, definition[3][name]))
    # the weights of empty slots get no gradient: they do not enter the function
    assert not fused[2][index < 0].any()


def test_fused_grouped_path_traces_whole_without_data_dependent_sizes():
    """A size read from the data would be a host synchronisation on CUDA and split the CUDA graphs."""
    data_dependent = []

    def backend(gm: torch.fx.GraphModule, example_inputs):
        data_dependent.extend(data_dependent_nodes(gm))
        return gm.forward

    experts = [copy.deepcopy(e).to(torch.bfloat16) for e in _experts()]
    packed, index, weight = _routing(48, k=3, seed=2, empty_share=0.2)
    x = packed.to(torch.bfloat16)
    dispatcher = GroupedDispatcher()
    assert dispatcher.host_sync_free(experts)
    compiled = torch.compile(lambda p, i, w: dispatcher(p, i, w, experts), backend=backend, fullgraph=True)
    out = compiled(x, index, weight)
    assert not data_dependent, data_dependent
    assert torch.equal(out, dispatcher(x, index, weight, experts))


def test_grouped_dispatcher_falls_back_to_the_loop_where_grouped_gemms_do_not_run():
    experts = _experts()
    packed, index, weight = _routing(24, k=2, seed=3, empty_share=0.2)
    assert not GroupedDispatcher().host_sync_free([copy.deepcopy(e).float() for e in experts])  # float32
    out, dx, dw, grads = _run(GroupedDispatcher(), experts, packed, index, weight, dtype=torch.float32)
    ref = _definition(experts, packed, index, weight)
    assert _rel(out, ref[0]) < 1e-5 and _rel(dx, ref[1]) < 1e-5 and _rel(dw, ref[2]) < 1e-5


def test_auto_dispatch_takes_the_grouped_dispatcher_for_ffn_experts_on_one_rank():
    assert isinstance(build_dispatcher("auto", "ffn", 1, 0, grouped_gemm=True), GroupedDispatcher)
    reference = build_dispatcher("alltoall", "ffn", 1, 0, grouped_gemm=True)
    assert type(reference) is AllToAllDispatcher and reference.grouped_gemm
    assert type(build_dispatcher("auto", "ffn", 1, 0, grouped_gemm=False)) is AllToAllDispatcher
    assert type(build_dispatcher("auto", "ffn", 2, 1, grouped_gemm=True)) is AllToAllDispatcher


@pytest.mark.parametrize(
    "experts, match",
    [
        (dict(kind="ffn", ep_size=2, dispatch="grouped"), "ep_size 1"),
        (dict(kind="lora", dispatch="grouped"), "experts.kind=ffn"),
        (dict(kind="ffn", dispatch="grouped", grouped_gemm=False), "grouped_gemm is false"),
    ],
)
def test_grouped_dispatch_config_fails_naming_the_key(experts, match):
    cfg = ModelConfig()
    for key, value in experts.items():
        setattr(cfg.experts, key, value)
    with pytest.raises(ValueError, match=rf"model\.experts\.dispatch: .*{match}"):
        validate_model_config(cfg)
