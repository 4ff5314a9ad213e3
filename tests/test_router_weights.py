"""The router trains at K = 1: with Switch's weighting (the selected expert's probability as its weight)
the diffusion loss reaches the router's logits; renormalised, a single weight is exactly 1 and it does not."""

from __future__ import annotations

import pytest
import torch

from moe.model import build_model
from moe.router import topk_routing
from tests.helpers.model_configs import make_batch, tiny_model_config


def _router_diffusion_gradient(**overrides) -> float:
    torch.manual_seed(0)
    model = build_model(tiny_model_config(**{"router.noise_std": 0.0, **overrides}))
    model.train()
    torch.manual_seed(3)
    out = model(make_batch())
    params = [p for n, p in model.trainable_named_parameters() if ".router.to_logits" in n]
    return float(max(g.abs().max() for g in torch.autograd.grad(out.terms["diffusion"], params)))


@pytest.mark.parametrize(
    "top_k, weights, trains",
    [(1, "auto", True), (1, "probability", True), (1, "renormalized", False), (3, "auto", True)],
)
def test_the_diffusion_loss_reaches_the_router(top_k, weights, trains):
    g = _router_diffusion_gradient(**{"router.top_k": top_k, "router.weights": weights})
    assert (g > 1e-9) == trains, (top_k, weights, g)  # renormalised at K = 1: rounding error only (~1e-13)


def test_probability_weights_are_the_softmax_of_the_selected_experts():
    logits, available = torch.randn(50, 4), torch.rand(50, 4) > 0.2
    available[:, 0] = True
    for k in (1, 2, 3):
        kept, renormed = topk_routing(logits, available, k, renormalize=False), topk_routing(logits, available, k)
        assert torch.equal(kept.index, renormed.index)
        probs = torch.softmax(logits.masked_fill(~available, float("-inf")), dim=-1)
        picked = probs.gather(1, kept.index.clamp(min=0)) * (kept.index >= 0)
        torch.testing.assert_close(kept.weight, picked)
        torch.testing.assert_close(renormed.weight.sum(1), torch.ones(50))


def test_router_weights_are_validated():
    with pytest.raises(ValueError, match="router.weights"):
        tiny_model_config(**{"router.weights": "sum"})


def test_combine_weights_give_base_its_mixture_share():
    from moe.repaint import combine_weights
    from moe.router import dense_weights

    g = torch.Generator().manual_seed(0)
    routing = topk_routing(torch.randn(40, 4, generator=g), torch.ones(40, 4, dtype=torch.bool), 2)
    gate = torch.rand(40, generator=g)
    base = 3
    got = combine_weights(routing.index, routing.weight, gate, 4, base)
    routed = dense_weights(routing.index, routing.weight, 4)
    expect = routed * gate[:, None]
    expect[:, base] += 1 - gate
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(got.sum(1), torch.ones(40))  # every token's output is fully accounted for
    torch.testing.assert_close(combine_weights(routing.index, routing.weight, None, 4, base), routed)
