"""How expert layers get their per-forward context: as arguments of the block call, never through
shared state. Two models' forwards in flight at once, or one inside the other, each see their own."""

from __future__ import annotations

import threading

import pytest
import torch

from moe.expert_layer import ExpertFeedForward
from moe.model import build_model
from tests.helpers.model_configs import make_batch, tiny_model_config


def _model(seed: int, **overrides):
    torch.manual_seed(seed)
    model = build_model(tiny_model_config(**{"experts.num_blocks": 3, **overrides}))
    with torch.no_grad():  # off the zero-initialised start, so the context reaches the prediction
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def _predict(model, batch):
    """Prediction and the expert layers' records for a fixed noisy latent and time."""
    cond = model.encode_conditions(batch)
    noisy = torch.randn(cond.base.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        pred, ctx = model.predict_velocity(noisy, torch.full((batch.batch_size,), 0.6), cond)
    return pred, ctx


def _two_models():
    """Two models whose forwards differ in every input the layers read: weights, batch, and the
    token layout (a reference span in the first, none in the second)."""
    a = (_model(0), make_batch(seed=1, has_ref=[True, False]))
    b = (_model(1, **{"router.top_k": 2}), make_batch(seed=2, has_ref=[False, False]))
    return a, b


def _assert_same(got, expected):
    pred, ctx = got
    pred_e, ctx_e = expected
    torch.testing.assert_close(pred, pred_e, rtol=1e-6, atol=1e-6)
    assert ctx.records.keys() == ctx_e.records.keys()
    for p in ctx.records:
        torch.testing.assert_close(ctx.records[p].routing.probs, ctx_e.records[p].routing.probs, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ctx.refined[p], ctx_e.refined[p], rtol=1e-6, atol=1e-6)


def test_forwards_in_two_threads_paused_inside_their_expert_layers_keep_their_own_context():
    """Each model's first expert layer waits, at its entry, until the other model is at the same point:
    both forwards are then inside an expert block at once. A context held in shared state would be
    the one bound last when the layers read it; passed as arguments, each layer reads its own."""
    (model_a, batch_a), (model_b, batch_b) = _two_models()
    expected = {"a": _predict(model_a, batch_a), "b": _predict(model_b, batch_b)}

    both_inside = threading.Barrier(2, timeout=60)
    for model in (model_a, model_b):
        first = model.expert_layers[0]
        waited = []

        def pause(module, args, waited=waited):
            if not waited:
                waited.append(True)
                both_inside.wait()

        first.register_forward_pre_hook(pause)

    results, errors = {}, []

    def run(name, model, batch):
        try:
            results[name] = _predict(model, batch)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            both_inside.abort()

    threads = [
        threading.Thread(target=run, args=("a", model_a, batch_a)),
        threading.Thread(target=run, args=("b", model_b, batch_b)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for name in ("a", "b"):
        _assert_same(results[name], expected[name])


def test_a_forward_nested_inside_another_models_expert_layer_leaves_both_intact():
    (model_a, batch_a), (model_b, batch_b) = _two_models()
    expected_a, expected_b = _predict(model_a, batch_a), _predict(model_b, batch_b)
    nested = []

    def run_b_inside(module, args):
        if not nested:
            nested.append(_predict(model_b, batch_b))

    model_a.expert_layers[1].register_forward_pre_hook(run_b_inside)
    _assert_same(_predict(model_a, batch_a), expected_a)
    _assert_same(nested[0], expected_b)


def test_expert_layer_without_a_context_raises():
    model = _model(0)
    layer = model.expert_layers[0]
    d = model.backbone.hidden_size
    with pytest.raises(RuntimeError, match="expert layer called without its context"):
        layer(torch.randn(2, 16, d))
    # the backbone run alone (no feed_forward_args) reaches the layer without one too
    bb = model.backbone
    img, txt, temb = torch.randn(2, 8, d), torch.randn(2, 3, d), torch.randn(2, d)
    with pytest.raises(RuntimeError, match="expert layer called without its context"):
        bb.run_blocks(img, txt, temb, torch.zeros(8, 3), torch.zeros(3, 3))
    assert isinstance(layer, ExpertFeedForward)
