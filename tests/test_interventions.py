"""Routing interventions (model.router.intervention, moe/intervention.py) change the routing and nothing else.

Checked against plain references: with the same weights and inputs, an intervened forward equals, bit for bit,
the model's own forward with only the dispatched routing weights replaced by the intervened ones; an
intervention that leaves the routing as it was gives the model's output bit for bit; at the first expert
layer (whose input no intervention can change) each intervention's weights are what its definition says,
computed here by loops over tokens."""

from __future__ import annotations

import pytest
import torch

from moe import regions
from moe.intervention import RoutingIntervention
from moe.model import build_model
from moe.router import dense_weights
from tests.helpers.model_configs import make_batch, tiny_model_config
from tests.test_routing_arms import SIZE, with_regions

INTERVENTIONS = ["swap_regions", "region_mean", "static", "off_text", "off_reference", "off_mask", "off_base"]


def _batch():
    return with_regions(make_batch(size=SIZE, has_ref=[True, True]))


def _model(**overrides):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(**overrides)).eval()
    with torch.no_grad():  # experts and router away from their start, so routing moves the output a lot
        for name, p in model.trainable_named_parameters():
            if ".moe." in name or ".router.to_logits" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def _forward(model, batch, intervention=None):
    torch.manual_seed(11)
    cond = model.encode_conditions(batch)
    noisy = torch.randn(cond.base.shape, generator=torch.Generator().manual_seed(3))
    iv = RoutingIntervention(intervention) if intervention else None
    with torch.no_grad():
        return model.predict_velocity(noisy, torch.full((batch.batch_size,), 0.6), cond, intervention=iv)


def _dispatch_hook(model, replace=None):
    """Record each expert layer's dispatched (index, weight); with ``replace``, dispatch those instead."""
    seen = []
    for pos, layer in enumerate(model.expert_layers):
        moe, call = layer.moe, type(layer.moe).forward

        def forward(packed, index, weight, moe=moe, call=call, pos=pos):
            if replace is not None:
                index, weight = replace[pos]
            seen.append((index.clone(), weight.clone()))
            return call(moe, packed, index, weight)

        moe.forward = forward
    return seen


def _unhook(model):
    for layer in model.expert_layers:
        del layer.moe.forward


def test_the_config_switch_is_validated_naming_the_key():
    for bad in ("swap", "off_nobody", "off_"):
        with pytest.raises(ValueError, match="model.router.intervention"):
            tiny_model_config(**{"router.intervention": bad})
    with pytest.raises(ValueError, match="model.router.intervention"):
        tiny_model_config(**{"router.intervention": "off_text", "experts.enabled": "[mask,reference,base]"})
    with pytest.raises(ValueError, match="model.router.intervention"):
        tiny_model_config(
            **{"router.intervention": "static", "experts.kind": "one_lora", "router.kind": "static"},
            **{"mixture.enabled": False},
        )
    for good in INTERVENTIONS:
        assert tiny_model_config(**{"router.intervention": good}).router.intervention == good


@pytest.mark.parametrize("name", INTERVENTIONS)
def test_an_intervention_changes_the_dispatched_routing_and_nothing_else(name):
    model = _model()
    batch = _batch()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain, _ = _forward(model, batch)
    seen = _dispatch_hook(model)
    moved, ctx = _forward(model, batch, name)
    _unhook(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # no weight touched
    assert not torch.allclose(moved, plain, atol=1e-4)  # it did change the output
    # the reference: the model's own forward with the intervened routing weights dispatched in every layer
    _dispatch_hook(model, replace=seen)
    replayed, _ = _forward(model, batch)
    _unhook(model)
    assert torch.equal(replayed, moved)


def test_the_config_switch_and_the_argument_give_the_same_forward():
    batch = _batch()
    by_arg, _ = _forward(_model(), batch, "swap_regions")
    by_config, _ = _forward(_model(**{"router.intervention": "swap_regions"}), batch)
    assert torch.equal(by_arg, by_config)
    unset, _ = _forward(_model(), batch)
    assert not torch.equal(unset, by_config)


@pytest.mark.parametrize("name", ["static", "swap_regions", "region_mean"])
def test_an_intervention_that_leaves_the_routing_as_it_was_is_bit_identical(name):
    """Static fusion already routes every token equally: none of these changes its weights."""
    model = _model(**{"router.kind": "static"})
    batch = _batch()
    plain, _ = _forward(model, batch)
    same, _ = _forward(model, batch, name)
    assert torch.equal(plain, same)


def _first_layer_weights(model, batch, name=None):
    """The first expert layer's routed weights before the mixture [B, N, E] (from its record) and its
    dispatched weights [B, N, E] (mixture included)."""
    seen = _dispatch_hook(model)
    _, ctx = _forward(model, batch, name)
    _unhook(model)
    e, b = len(model.expert_names), batch.batch_size
    rec = ctx.records[0].routing
    routed = dense_weights(rec.index, rec.weight, e).reshape(b, -1, e)
    dispatched = dense_weights(*seen[0], e).reshape(b, -1, e)
    return routed, dispatched


def test_each_intervention_does_what_it_says_at_the_first_layer():
    model = _model()
    batch = _batch()
    names = model.expert_names
    labels = regions.token_regions(batch.region_labels, (8, 8))
    routed, dispatched = _first_layer_weights(model, batch)
    b, n, e = routed.shape

    def region_mean(i, code):
        rows = [routed[i, t] for t in range(n) if labels[i, t] == code]
        return torch.stack(rows).mean(0)

    swap, _ = _first_layer_weights(model, batch, "swap_regions")
    same, _ = _first_layer_weights(model, batch, "region_mean")
    for i in range(b):
        for t in range(n):
            code = int(labels[i, t])
            other = {regions.TEXT: regions.REFERENCE, regions.REFERENCE: regions.TEXT}.get(code)
            want_swap = region_mean(i, other) if other is not None else routed[i, t]
            want_same = region_mean(i, code) if other is not None else routed[i, t]
            torch.testing.assert_close(swap[i, t], want_swap, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(same[i, t], want_same, rtol=1e-5, atol=1e-6)
    static, _ = _first_layer_weights(model, batch, "static")
    assert torch.equal(static, torch.full_like(static, 1 / e))
    for k, expert in enumerate(names):
        _, off = _first_layer_weights(model, batch, f"off_{expert}")
        assert torch.equal(off[..., k], torch.zeros_like(off[..., k]))
        others = dispatched.sum(-1) - dispatched[..., k]
        kept = others > 0  # a token left with no other expert gets the frozen path alone
        torch.testing.assert_close(off.sum(-1)[kept], dispatched.sum(-1)[kept], rtol=1e-5, atol=1e-6)
        scale = (dispatched.sum(-1) / others.clamp_min(1e-20))[..., None]
        want = torch.where(kept[..., None], dispatched * scale, torch.zeros_like(dispatched))
        want[..., k] = 0
        torch.testing.assert_close(off, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "arch",
    [{"experts.kind": "ffn"}, {"experts.kind": "ffn", "experts.dispatch": "grouped"}, {"experts.dispatch": "alltoall"}],
)
def test_every_dispatcher_takes_the_intervened_routing(arch):
    """The intervened routing has as many slots as experts, not top_k: every dispatcher takes it as it is."""
    model = _model(**arch)
    batch = _batch()
    plain, _ = _forward(model, batch)
    seen = _dispatch_hook(model)
    moved, _ = _forward(model, batch, "swap_regions")
    _unhook(model)
    assert seen[0][0].shape[1] > model.cfg.router.top_k and not torch.equal(moved, plain)
    _dispatch_hook(model, replace=seen)
    replayed, _ = _forward(model, batch)
    _unhook(model)
    assert torch.equal(replayed, moved)
