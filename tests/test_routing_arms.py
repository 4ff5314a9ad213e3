"""The arms of the routing grid (configs/ablations_routing.yaml) do what they say: the oracle router sends each
labelled token to its region's expert; a fixed Latent Mixture gate is one constant everywhere; one LoRA has
the trainable parameters of the four experts it stands for and reads every condition; the region labels
reach the tokens as a plain count of pixels says."""

from __future__ import annotations

import pytest
import torch

from moe import regions
from moe.experts import one_lora_rank_parameters
from moe.model import build_model
from moe.repaint import combine_weights
from moe.router import ORACLE_EXPERTS
from tests.helpers.model_configs import make_batch, tiny_model_config

SIZE = 64  # 8x8 tokens of 8 px in the tiny model


def with_regions(batch, boxes=(((3, 5, 27, 30), (36, 38, 61, 60)), ((0, 0, 16, 16), (41, 9, 60, 52)))):
    """The batch with region labels: per sample a text box and a reference box (x0, y0, x1, y1), most edges
    off the 8-px token grid, one on it."""
    labels = torch.zeros(batch.batch_size, 1, SIZE, SIZE, dtype=torch.long)
    for i, pair in enumerate(boxes[: batch.batch_size]):
        for lab, (x0, y0, x1, y1) in enumerate(pair, start=1):
            labels[i, 0, y0:y1, x0:x1] = lab
    batch.region_labels = labels
    batch.coarse_mask = (labels > 0).float()
    return batch


def _batch(**kw):
    return with_regions(make_batch(size=SIZE, has_ref=[True, True], **kw))


def _reference_token_labels(labels: torch.Tensor, token: int = 8) -> torch.Tensor:
    """The rule of moe/regions.py by counting pixels, one token at a time."""
    b, _, h, w = labels.shape
    out = torch.zeros(b, (h // token) * (w // token), dtype=torch.long)
    for i in range(b):
        for r in range(h // token):
            for c in range(w // token):
                cell = labels[i, 0, r * token : (r + 1) * token, c * token : (c + 1) * token]
                text, ref = (cell == 1).float().mean().item(), (cell == 2).float().mean().item()
                code = regions.TEXT if text >= 0.5 else regions.REFERENCE if ref >= 0.5 else None
                if code is None:
                    code = regions.BORDER if text + ref > 0 else regions.OUTSIDE
                out[i, r * (w // token) + c] = code
    return out


def _forward(model, batch, t=0.7, seed=5):
    model.eval()
    cond = model.encode_conditions(batch)
    noisy = torch.randn(cond.base.shape, generator=torch.Generator().manual_seed(seed))
    return model.predict_velocity(noisy, torch.full((batch.batch_size,), t), cond)


def test_token_labels_follow_the_pixel_count():
    batch = _batch()
    expect = _reference_token_labels(batch.region_labels)
    assert torch.equal(regions.token_regions(batch.region_labels, (8, 8)), expect)
    assert set(expect.unique().tolist()) == {regions.OUTSIDE, regions.TEXT, regions.REFERENCE, regions.BORDER}


def test_the_oracle_router_sends_each_labelled_token_to_its_expert():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(**{"router.kind": "oracle", "router.top_k": 1}))
    batch = _batch()
    _, ctx = _forward(model, batch)
    names = model.expert_names
    expect = torch.tensor(
        [names.index(ORACLE_EXPERTS[c]) for c in _reference_token_labels(batch.region_labels).flatten().tolist()]
    )
    assert {names[i] for i in expect.tolist()} == {"text", "reference", "mask", "base"}
    base = names.index("base")
    for record in ctx.records.values():
        r = record.routing
        assert torch.equal(r.index[:, 0], expect) and torch.equal(r.weight, torch.ones_like(r.weight))
        assert torch.equal(r.probs.argmax(1), expect) and torch.equal(r.probs.max(1).values, torch.ones(len(expect)))
        # what each token's output is made of: its expert's weight g and Base's 1 - g, nothing else
        w = combine_weights(r.index, r.weight, record.gate, len(names), base)
        g = record.gate.reshape(-1)
        chosen = w.gather(1, expect[:, None])[:, 0]
        torch.testing.assert_close(chosen, torch.where(expect == base, torch.ones_like(g), g))
        assert ((w > 0).sum(1) <= 2).all()


def test_the_oracle_needs_region_labels_and_its_own_settings():
    torch.manual_seed(0)
    model = build_model(tiny_model_config(**{"router.kind": "oracle", "router.top_k": 1}))
    with pytest.raises(ValueError, match="region label"):
        _forward(model, make_batch(size=SIZE))
    with pytest.raises(ValueError, match="router.top_k"):
        tiny_model_config(**{"router.kind": "oracle"})
    with pytest.raises(ValueError, match="experts.enabled"):
        tiny_model_config(**{"router.kind": "oracle", "router.top_k": 1, "experts.enabled": "[text,mask,base]"})


def test_the_oracle_and_the_learned_router_train_on_compositional_batches():
    for overrides in ({"router.kind": "oracle", "router.top_k": 1}, {}):
        torch.manual_seed(0)
        model = build_model(tiny_model_config(**overrides)).train()
        out = model(_batch())
        out.loss.backward()
        assert torch.isfinite(out.loss)
        lora = [p.grad for n, p in model.named_parameters() if ".moe." in n and p.grad is not None]
        assert lora and max(float(g.abs().max()) for g in lora) > 0


@pytest.mark.parametrize("value", [0.5, 0.3])
def test_a_fixed_gate_is_one_constant_with_no_parameters(value):
    torch.manual_seed(0)
    model = build_model(tiny_model_config(**{"router.kind": "static", "mixture.fixed_gate": value}))
    assert all(not list(layer.mixture.parameters()) for layer in model.expert_layers)
    gates = []
    for t, seed in ((0.2, 1), (0.9, 2)):
        _, ctx = _forward(model, make_batch(size=SIZE, seed=seed), t=t)
        gates += [rec.gate for rec in ctx.records.values()]
    assert all(torch.equal(g, torch.full_like(g, value)) for g in gates)
    # the learned gate of the same arm varies with the time once its weights are not zero
    torch.manual_seed(0)
    learned = build_model(tiny_model_config(**{"router.kind": "static"}))
    for layer in learned.expert_layers:
        torch.nn.init.normal_(layer.mixture.gate.weight)
    _, early = _forward(learned, make_batch(size=SIZE), t=0.2)
    _, late = _forward(learned, make_batch(size=SIZE), t=0.9)
    assert not torch.allclose(early.records[0].gate, late.records[0].gate)
    with pytest.raises(ValueError, match="mixture.fixed_gate"):
        tiny_model_config(**{"mixture.fixed_gate": 1.5})


def test_a_fixed_gate_leaves_the_rest_of_the_model_initialised_as_before():
    torch.manual_seed(0)
    fixed = build_model(tiny_model_config(**{"router.kind": "static", "mixture.fixed_gate": 0.5}))
    torch.manual_seed(0)
    learned = build_model(tiny_model_config(**{"router.kind": "static"}))
    theirs = dict(learned.trainable_named_parameters())
    for name, p in fixed.trainable_named_parameters():
        assert torch.equal(p, theirs[name]), name
    assert {n for n in theirs if ".mixture." not in n} == {n for n, _ in fixed.trainable_named_parameters()}


def _params(model, inside: str = "") -> int:
    return sum(p.numel() for n, p in model.trainable_named_parameters() if inside in n)


@pytest.mark.parametrize("arch", [{}, {"experts.rank": 64, "router.ctx_dim": 128}])
def test_one_lora_has_the_parameters_of_the_four_experts(arch):
    torch.manual_seed(0)
    four = build_model(tiny_model_config(**{"router.kind": "static", "mixture.fixed_gate": 0.5, **arch}))
    torch.manual_seed(0)
    one = build_model(
        tiny_model_config(**{"router.kind": "static", "experts.kind": "one_lora", "mixture.enabled": False, **arch})
    )
    assert one.expert_names == ["all"] and all(
        len(layer.moe.deepspeed_moe.experts.deepspeed_experts) == 1 for layer in one.expert_layers
    )
    # counted on the built modules, against LoraExpert's own layers: the nearest integer rank leaves at most
    # half of one rank's parameters per layer between them, and under 1% at the recipes' rank 64
    experts_four, experts_one = _params(four, ".moe."), _params(one, ".moe.")
    cfg = one.cfg
    dim = one.expert_layers[0].moe.deepspeed_moe.experts.deepspeed_experts[0].dim
    quantum = one_lora_rank_parameters(dim, cfg.router.ctx_dim) * len(one.expert_layers)
    assert abs(experts_one - experts_four) <= quantum / 2, (experts_one, experts_four, quantum)
    if cfg.experts.rank == 64:
        assert abs(experts_one - experts_four) <= 0.01 * experts_four, (experts_one, experts_four)
    # nothing else differs: the rest of the trainable model is the same size
    assert _params(one) - experts_one == _params(four) - experts_four


def test_one_lora_reads_every_condition_column():
    torch.manual_seed(0)
    model = build_model(
        tiny_model_config(**{"router.kind": "static", "experts.kind": "one_lora", "mixture.enabled": False})
    )
    expert = model.expert_layers[0].moe.deepspeed_moe.experts.deepspeed_experts[0]
    torch.nn.init.normal_(expert.up.weight)
    torch.nn.init.normal_(expert.cond.weight)
    d, width = expert.dim, model.expert_layers[0].packed_width
    packed = torch.randn(5, width, requires_grad=True)
    expert(packed).sum().backward()
    cond_cols = packed.grad[:, d : d + expert.cond_width]
    assert expert.cond_width == 4 * model.cfg.router.ctx_dim + 1
    assert (cond_cols.abs().sum(0) > 0).all()  # every context column and m reach the output


def test_one_lora_needs_a_static_router_and_no_mixture():
    with pytest.raises(ValueError, match="router.kind"):
        tiny_model_config(**{"experts.kind": "one_lora", "mixture.enabled": False})
    with pytest.raises(ValueError, match="mixture.enabled"):
        tiny_model_config(**{"experts.kind": "one_lora", "router.kind": "static"})


ROUTING_PARAMETERS = (".router.task.", ".router.latents", ".router.token_query.", ".router.latent_value.",
                      ".router.to_logits.", ".mixture.")  # fmt: skip


def _routing_gradients(model) -> dict[str, float]:
    """The largest |gradient| of every parameter that decides routing (the learned router's scoring and the
    Latent Mixture's gate), after one training loss's backward."""
    model.train()
    torch.manual_seed(3)
    model(_batch()).loss.backward()
    return {
        n: (0.0 if p.grad is None else float(p.grad.abs().max()))
        for n, p in model.named_parameters()
        if any(k in n for k in ROUTING_PARAMETERS)
    }


def test_static_fusion_with_a_fixed_gate_has_no_learned_routing_reaching_the_output():
    """Static fusion as it was keeps the mixture gate, whose gradient is not zero: the test can fail."""
    torch.manual_seed(0)
    fixed = build_model(tiny_model_config(**{"router.kind": "static", "mixture.fixed_gate": 0.5}))
    grads = _routing_gradients(fixed)
    assert all(g == 0.0 for g in grads.values()), grads  # none exists, or none gets a gradient
    lora = [float(p.grad.abs().max()) for n, p in fixed.named_parameters() if ".moe." in n and p.grad is not None]
    assert lora and max(lora) > 0  # the experts still learn
    torch.manual_seed(0)
    learned_gate = build_model(tiny_model_config(**{"router.kind": "static"}))
    grads = _routing_gradients(learned_gate)
    assert any(".mixture." in n and g > 0 for n, g in grads.items()), grads
