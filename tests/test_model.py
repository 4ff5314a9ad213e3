"""The whole CARE-Edit model on a tiny random-init FLUX: behaviour the method promises."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError

from moe.backbone import FluxBackbone, pack_latents, unpack_latents
from moe.config import LoraConfig, ModelConfig
from moe.model import build_model
from moe.router import dense_weights
from tests.helpers.model_configs import make_batch, tiny_model_config


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_model_config(**overrides))


def _velocity(model, batch, seed=5):
    """Deterministic prediction: a fixed noisy latent per sample (seeded by its key) and time."""
    model.eval()
    cond = model.encode_conditions(batch)
    noisy = torch.stack(
        [
            torch.randn(cond.base.shape[1:], generator=torch.Generator().manual_seed(seed + int(k[1:])))
            for k in batch.keys
        ]
    )
    t = torch.full((batch.batch_size,), 0.7)
    return model.predict_velocity(noisy, t, cond)


def test_pack_unpack_roundtrip():
    x = torch.randn(2, 4, 6, 8)
    assert torch.equal(unpack_latents(pack_latents(x), 6, 8), x)
    assert pack_latents(x).shape == (2, 12, 16)


def test_every_routed_token_uses_exactly_k_experts_and_weights_sum_to_one():
    model = _model(**{"router.top_k": 3})
    _, ctx = _velocity(model, make_batch(has_ref=[True, True]))
    assert len(ctx.records) == 2
    for record in ctx.records.values():
        r = record.routing
        assert ((r.index >= 0).sum(dim=1) == 3).all()
        assert torch.allclose(r.weight.sum(dim=1), torch.ones(r.weight.shape[0]), atol=1e-6)


def test_backbone_is_frozen_and_trainable_parts_change_after_a_step():
    model = _model(**{"loss.tag_alignment": 0.1})
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = dict(model.trainable_named_parameters())
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    for _ in range(2):  # two steps: zero-initialised LoRA experts give the mixture gate no gradient at first
        opt.zero_grad()
        out = model(make_batch())
        out.loss.backward()
        for n, p in model.named_parameters():
            if not p.requires_grad:
                assert p.grad is None, n
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and not (changed & frozen)
    assert not any("lora" in n or ".moe." in n or "router" in n for n in frozen)
    # every trainable family moved: LoRA, experts, router, repaint, mixture, mask encoder, tag predictor
    for family in [
        "lora_B",
        ".moe.deepspeed_moe.experts.deepspeed_experts.",
        ".router.",
        ".repaint.",
        ".mixture.",
        "mask_encoder.",
        "tag_predictor.",
    ]:
        assert any(family in n for n in changed), family
    # the frozen encoders and backbone weights are really frozen
    assert any(n.startswith("backbone.transformer.transformer_blocks.0.attn.to_q.base_layer") for n in frozen)
    assert any(n.startswith("vae.") for n in frozen) and any(n.startswith("text_encoders.") for n in frozen)


def test_zero_initialised_lora_leaves_the_backbone_output_unchanged():
    cfg = tiny_model_config()
    torch.manual_seed(0)
    plain = FluxBackbone(cfg.backbone, LoraConfig(rank=0))
    lora = copy.deepcopy(plain)
    lora._add_lora(LoraConfig(rank=4))
    assert any("lora_A" in n for n, _ in lora.named_parameters())
    torch.manual_seed(1)
    d = plain.hidden_size
    img, txt, temb = torch.randn(2, 8, d), torch.randn(2, 3, d), torch.randn(2, d)
    ids = torch.zeros(8, 3)
    ids[:, 1] = torch.arange(8)
    args = (img, txt, temb, ids, torch.zeros(3, 3))
    torch.testing.assert_close(lora.run_blocks(*args), plain.run_blocks(*args), rtol=0, atol=0)
    for n, p in lora.named_parameters():
        if "lora_B" in n:
            p.data.normal_()
    assert (lora.run_blocks(*args) - plain.run_blocks(*args)).abs().max() > 1e-3


def test_layer_with_only_base_enabled_reproduces_the_base_path():
    model = _model(**{"experts.enabled": "[base]", "router.top_k": 1})
    layer = model.expert_layers[0]
    seen = {}
    layer.moe.register_forward_hook(lambda m, inp, out: seen.update(packed=inp[0], out=out))
    layer.register_forward_hook(lambda m, inp, out: seen.update(hidden=inp[0], layer_out=out))
    for p in layer.moe.parameters():  # make the Base expert non-trivial
        p.data.normal_(0, 0.1)
    _velocity(model, make_batch())
    base = layer.moe.deepspeed_moe.experts.deepspeed_experts[0]
    torch.testing.assert_close(seen["out"], base(seen["packed"]), rtol=1e-6, atol=1e-6)
    n = seen["packed"].shape[0] // 2
    expected = layer.frozen_ff(seen["hidden"])[:, :n] + base(seen["packed"]).view(2, n, -1)
    torch.testing.assert_close(seen["layer_out"][:, :n], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init_std", [0.0, 1e-3])
def test_ffn_experts_start_equal_to_the_frozen_path(init_std):
    """Identical copies (init_std 0) reproduce the frozen path; the default start, perturbed so the
    router can tell the experts apart, moves the prediction by O(init_std) only."""
    model = _model(**{"experts.kind": "ffn", "lora.rank": 0, "experts.init_std": init_std})
    batch = make_batch()
    with_experts, _ = _velocity(model, batch)
    for layer in model.expert_layers:  # put the original feed-forwards back
        model.backbone.set_feed_forward(model.expert_blocks[layer.position], layer.frozen_ff)
    without, _ = _velocity(model, batch)
    if init_std == 0:
        torch.testing.assert_close(with_experts, without, rtol=1e-4, atol=1e-5)
    else:
        diff = (with_experts - without).abs().max()
        assert 0 < diff < 10 * init_std * without.abs().max(), diff


def test_missing_reference_changes_only_what_it_should():
    model = _model()
    batch = make_batch(has_ref=[True, False])
    both, ctx = _velocity(model, batch)
    alone_without, _ = _velocity(model, batch.select([1]))
    alone_with, _ = _velocity(model, batch.select([0]))
    # the sample without a reference is computed as if alone (its zero reference tokens are masked out)
    torch.testing.assert_close(both[1:], alone_without, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(both[:1], alone_with, rtol=1e-4, atol=1e-5)
    # it still chooses K of all four experts: its Reference expert reads the learned "absent" context
    for record in ctx.records.values():
        idx = record.routing.index.view(2, -1, record.routing.index.shape[-1])
        assert ((idx[1] >= 0).sum(-1) == 3).all()
    # giving it a reference does change its prediction
    with_ref = copy.deepcopy(batch)
    with_ref.has_reference = torch.tensor([True, True])
    with_ref.reference[1] = with_ref.reference[0]
    changed, _ = _velocity(model, with_ref)
    assert (changed[1] - both[1]).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    batch = make_batch()
    results = []
    for ckpt in (False, True):
        model = _model(**{"backbone.gradient_checkpointing": ckpt, "router.noise_std": 0.1})
        model.train()
        torch.manual_seed(11)
        out = model(batch)
        out.loss.backward()
        results.append((out.loss.detach(), {n: p.grad.clone() for n, p in model.trainable_named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for n, g in results[0][1].items():
        torch.testing.assert_close(results[1][1][n], g, rtol=1e-5, atol=1e-7, msg=n)


def test_recomputation_reads_its_own_forwards_context():
    """Two forwards, then the first one's backward: the eager recomputation of the first forward's
    expert blocks must read that forward's refined masks (the prior chain), not the second's."""
    model = _model(**{"backbone.gradient_checkpointing": True, "experts.num_blocks": 3})
    model.train()
    with torch.no_grad():  # non-zero experts, so the prior chain reaches the loss
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    torch.manual_seed(11)
    alone = model(make_batch(seed=1))
    alone.loss.backward()
    expected = {n: p.grad.clone() for n, p in model.trainable_named_parameters()}
    model.zero_grad(set_to_none=True)
    torch.manual_seed(11)
    first = model(make_batch(seed=1))
    model(make_batch(seed=2, has_ref=[False, True]))  # a second forward before the first's backward
    first.loss.backward()
    for n, p in model.trainable_named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-7, msg=n)


def test_decoupled_repaint_keeps_the_mask_loss_out_of_the_editing_path():
    model = _model(**{"repaint.mode": "decoupled"})
    model.train()
    torch.manual_seed(3)
    out = model(make_batch())
    params = dict(model.trainable_named_parameters())
    mask_grads = torch.autograd.grad(
        out.terms["mask_boundary"], list(params.values()), allow_unused=True, retain_graph=True
    )
    for (n, _), g in zip(params.items(), mask_grads):
        if g is not None and g.abs().max() > 0:
            assert ".repaint." in n, n  # only the repaint heads learn from the mask loss
    diff_grads = torch.autograd.grad(out.terms["diffusion"], list(params.values()), allow_unused=True)
    for (n, _), g in zip(params.items(), diff_grads):
        if ".repaint." in n:
            assert g is None or g.abs().max() == 0, n
    # coupled: the mask loss reaches the editing path too
    coupled = _model()
    coupled.train()
    for layer in coupled.expert_layers:  # the zero-initialised output conv passes no gradient back at first
        torch.nn.init.normal_(layer.repaint.out.weight, std=0.1)
    out = coupled(make_batch())
    params = dict(coupled.trainable_named_parameters())
    grads = torch.autograd.grad(out.terms["mask_boundary"], list(params.values()), allow_unused=True)
    assert any(g is not None and g.abs().max() > 0 and ".repaint." not in n for (n, _), g in zip(params.items(), grads))


def test_coupled_teacher_forcing_edits_with_the_fine_mask_and_trains_shared_features():
    """coupled + use_gt_mask_in_training: in training the editing path reads the fine mask, so the edit
    does not depend on the last layer's refined mask, while the mask loss still reaches the features the
    head reads (decoupled, it would not)."""

    def build(teacher: bool):
        torch.manual_seed(0)
        m = _model(**{"repaint.use_gt_mask_in_training": teacher})
        m.train()
        for layer in m.expert_layers:  # the zero-initialised output conv passes no gradient back at first
            torch.nn.init.normal_(layer.repaint.out.weight, std=0.1)
        return m

    batch = make_batch()
    model = build(True)
    torch.manual_seed(3)
    out = model(batch)
    params = dict(model.trainable_named_parameters())
    grads = torch.autograd.grad(out.terms["mask_boundary"], list(params.values()), allow_unused=True, retain_graph=True)
    assert any(g is not None and g.abs().max() > 0 and ".repaint." not in n for (n, _), g in zip(params.items(), grads))
    last = {id(p) for p in model.expert_layers[-1].repaint.parameters()}
    diff = torch.autograd.grad(out.terms["diffusion"], list(params.values()), allow_unused=True)
    for (n, p), g in zip(params.items(), diff):
        if id(p) in last:  # no later layer reads it and the edit reads the fine mask
            assert g is None or g.abs().max() == 0, n

    def diffusion_after_perturbing_the_last_head(m) -> tuple[float, float]:
        torch.manual_seed(3)
        before = m(batch).terms["diffusion"].item()
        with torch.no_grad():
            m.expert_layers[-1].repaint.out.bias.add_(3.0)
        torch.manual_seed(3)
        return before, m(batch).terms["diffusion"].item()

    before, after = diffusion_after_perturbing_the_last_head(build(True))
    assert before == after  # the edit read the fine mask
    before, after = diffusion_after_perturbing_the_last_head(build(False))
    assert before != after  # coupled without teacher forcing reads the refined mask


@pytest.mark.parametrize(
    "overrides, present, absent",
    [
        ({}, {"diffusion", "load_balance", "mask_boundary", "mixture_smoothness"}, {"tag_alignment"}),
        ({"router.kind": "uniform"}, {"diffusion", "mask_boundary"}, {"load_balance", "mixture_smoothness"}),
        ({"router.kind": "static"}, {"diffusion"}, {"load_balance"}),
        ({"repaint.enabled": False}, {"diffusion", "load_balance"}, {"mask_boundary"}),
        ({"loss.load_balance": 0.0, "loss.tag_alignment": 0.5}, {"tag_alignment"}, {"load_balance"}),
    ],
)
def test_ablation_switches_change_the_computed_terms(overrides, present, absent):
    model = _model(**overrides)
    model.train()
    out = model(make_batch())
    assert present <= set(out.terms) and not (absent & set(out.terms))
    assert torch.isfinite(out.loss)
    total = sum(getattr(model.cfg.loss, k) * v for k, v in out.terms.items())
    torch.testing.assert_close(out.loss, total)


def test_top3_of_4_without_references_and_load_balance_has_a_gradient():
    """A batch without any reference still chooses 3 of the 4 experts per token (the Reference expert
    among them, reading the absent context), so K=3 and K=4 differ and the load-balance loss pulls on
    the router. (With absent experts removed before the top-K, K=3 of the 3 left and K=4 gave identical
    weights, and the load balance was a constant 4/3 without gradient: kept as the mask_absent ablation.)"""
    batch = make_batch(has_ref=[False, False])
    model = _model(**{"router.top_k": 3})
    model.train()
    torch.manual_seed(3)
    out = model(batch)
    ref_id = model.expert_names.index("reference")
    _, ctx = _velocity(model, batch)
    chosen_ref = 0
    for record in ctx.records.values():
        idx = record.routing.index
        assert ((idx >= 0).sum(1) == 3).all() and (idx.sort(1).values.diff(1) > 0).all()  # 3 distinct of 4
        chosen_ref += int((idx == ref_id).sum())
    assert chosen_ref > 0
    router_params = [p for n, p in model.trainable_named_parameters() if ".router.to_logits" in n]
    grads = torch.autograd.grad(out.terms["load_balance"], router_params)
    assert max(g.abs().max() for g in grads) > 1e-6
    k4 = _model(**{"router.top_k": 4})
    _, ctx4 = _velocity(k4, batch)
    w3 = dense_weights(ctx.records[0].routing.index, ctx.records[0].routing.weight, 4)
    w4 = dense_weights(ctx4.records[0].routing.index, ctx4.records[0].routing.weight, 4)
    assert (w3 - w4).abs().max() > 1e-3
    # the ablation that removes absent experts: 3 of the 3 left, a load balance without gradient
    old = _model(**{"router.top_k": 3, "router.mask_absent": True})
    old.train()
    torch.manual_seed(3)
    out_old = old(batch)
    _, ctx_old = _velocity(old, batch)
    assert not any((r.routing.index == ref_id).any() for r in ctx_old.records.values())
    torch.testing.assert_close(out_old.terms["load_balance"], torch.tensor(4 / 3))
    params_old = [p for n, p in old.trainable_named_parameters() if ".router.to_logits" in n]
    assert max(g.abs().max() for g in torch.autograd.grad(out_old.terms["load_balance"], params_old)) < 1e-6


def test_router_gets_a_diffusion_gradient_at_initialisation():
    """The experts start apart, so the diffusion loss alone tells the router which expert helps where
    from the first step (with identical experts its only gradient came from the regularisers)."""
    for init_std, expect in ((1e-3, True), (0.0, False)):
        model = _model(**{"experts.init_std": init_std, "router.noise_std": 0.0})
        model.train()
        torch.manual_seed(3)
        out = model(make_batch())
        params = [p for n, p in model.trainable_named_parameters() if ".router.to_logits" in n]
        g = max(t.abs().max() for t in torch.autograd.grad(out.terms["diffusion"], params))
        assert (g > 1e-9) == expect, (init_std, float(g))


def test_mixture_gate_varies_per_token():
    model = _model()
    for layer in model.expert_layers:
        torch.nn.init.normal_(layer.mixture.confidence.weight)
    _, ctx = _velocity(model, make_batch())
    for record in ctx.records.values():
        assert record.gate.shape == (2, 16)
        assert record.gate.std(dim=1).min() > 1e-4


def test_base_is_computed_once_per_token():
    """The Latent Mixture's Base share joins Base's routing slot when the router chose Base: counted in
    the per-expert loop, Base sees every token once, and all experts together see the distinct
    (token, expert) pairs only."""
    model = _model(**{"experts.kind": "ffn", "experts.dispatch": "alltoall", "experts.grouped_gemm": False})
    seen = {name: 0 for name in model.expert_names}
    for layer in model.expert_layers:
        for expert in layer.moe.deepspeed_moe.experts.deepspeed_experts:
            expert.register_forward_hook(lambda m, i, o: seen.__setitem__(m.name, seen[m.name] + i[0].shape[0]))
    _, ctx = _velocity(model, make_batch())
    tokens = sum(r.routing.index.shape[0] for r in ctx.records.values())
    assert seen["base"] == tokens
    pairs = sum(
        int((r.routing.index >= 0).sum()) + int((r.routing.index != 3).all(1).sum()) for r in ctx.records.values()
    )
    assert sum(seen.values()) == pairs < 4 * tokens


def _counted_dropout(model, steps=300, b=8):
    from moe.model import Conditions

    counts = torch.zeros(4)
    first = None
    for _ in range(steps):
        cond = Conditions(
            base=torch.ones(b, 4, 8, 8),
            reference=torch.ones(b, 4, 8, 8),
            has_ref=torch.ones(b, dtype=torch.bool),
            text=torch.ones(b, 16, 32),
            text_mask=torch.ones(b, 16, dtype=torch.bool),
            pooled=torch.ones(b, 32),
            coarse=torch.zeros(b, 1, 32, 32),
        )
        out = model.drop_conditions(cond)
        empty_text, _, _ = model._empty_prompt(16, torch.device("cpu"), torch.float32)
        dropped = torch.stack(
            [
                (out.text != 1).flatten(1).any(1),
                out.base.flatten(1).eq(0).all(1),
                ~out.has_ref,
                torch.zeros(b, dtype=torch.bool) if out.has_mask is None else ~out.has_mask,
            ],
            1,
        )
        # what a drop means: the empty prompt, zero base latents, no reference (zeroed), a whole-image box
        assert torch.equal(out.text[dropped[:, 0]], empty_text.expand(int(dropped[:, 0].sum()), -1, -1))
        assert out.reference[dropped[:, 2]].abs().sum() == 0 and out.coarse[dropped[:, 3]].eq(1).all()
        assert out.coarse[~dropped[:, 3]].eq(0).all() and out.base[~dropped[:, 1]].eq(1).all()
        counts += dropped.float().sum(0)
        first = dropped if first is None else first
    return counts / (steps * b), first


def test_condition_dropout_rates_are_honoured_and_seeded():
    rates = {"text": 0.1, "base": 0.25, "reference": 0.05, "mask": 0.5}
    model = _model(**{f"condition_dropout.{k}": v for k, v in rates.items()})
    torch.manual_seed(0)
    freq, first = _counted_dropout(model)
    n = 300 * 8
    for i, p in enumerate(rates.values()):  # 2400 draws each: within 4 binomial standard deviations
        assert abs(float(freq[i]) - p) < 4 * (p * (1 - p) / n) ** 0.5, (i, float(freq[i]), p)
    torch.manual_seed(0)
    _, again = _counted_dropout(model, steps=1)
    assert torch.equal(first, again)  # the torch RNG: a seeded run repeats
    off = _model(**{f"condition_dropout.{k}": 0.0 for k in rates})
    freq_off, _ = _counted_dropout(off, steps=20)
    assert freq_off.sum() == 0
    # training forwards drop, evaluation forwards do not
    always = _model(**{"condition_dropout.base": 1.0})
    seen = []

    class Seen(Exception):
        pass

    def record(noisy, t, cond, fine=None):
        seen.append(cond.base.abs().sum())
        raise Seen

    always.predict_velocity = record
    always.train()
    with pytest.raises(Seen):
        always(make_batch())
    always.eval()
    with pytest.raises(Seen):
        always(make_batch())
    assert seen[0] == 0 and seen[1] > 0


def test_routing_stats_and_collapse_warning():
    from moe.model import routing_collapse_warnings

    model = _model()
    model.train()
    out = model(make_batch())
    for block in model.expert_blocks:
        assert 0 <= float(out.stats[f"routing_entropy/block{block}"]) <= 1
        assert float(out.stats[f"routing_spread/block{block}"]) >= 0
        assert f"gate_spread/block{block}" in out.stats
    assert "router_z" in out.terms
    stats = {
        "routing_spread/block2": torch.tensor(1e-5),
        "routing_entropy/block2": torch.tensor(0.6),
        "routing_spread/block3": torch.tensor(0.2),
        "routing_entropy/block3": torch.tensor(0.001),
    }
    warnings = routing_collapse_warnings(stats)
    assert len(warnings) == 2 and "block2" in warnings[0] and "block3" in warnings[1]
    assert not _model(**{"router.kind": "static"}).routing_warnings(stats)


def test_lora_is_stripped_from_the_ffn_the_experts_replace():
    """A shared LoRA on the image-stream FFN an expert layer wraps would run beside the experts on every
    target token; the layer strips it, whatever lora.targets matches. Other blocks keep theirs."""
    model = _model(**{"lora.targets": "[to_q,ff.net.0.proj,ff.net.2]"})
    names = [n for n, _ in model.named_parameters()]
    experts_blocks = set(model.expert_blocks)
    for n in names:
        if ".ff." in n and "lora" in n:
            block = int(n.split("transformer_blocks.")[1].split(".")[0])
            assert block not in experts_blocks, n
    assert any(".ff.net.0.proj.lora_A" in n for n in names)  # blocks without experts keep theirs
    assert not any("ff_context" in n and "lora" in n for n in names)  # "ff.net.2" does not match ff_context


def test_static_fusion_and_mixture_off_weights():
    model = _model(**{"router.kind": "static", "mixture.enabled": False})
    _, ctx = _velocity(model, make_batch(has_ref=[True, True]))
    for record in ctx.records.values():
        assert record.gate is None
        assert torch.allclose(record.routing.weight, torch.full_like(record.routing.weight, 0.25))


def test_edit_is_deterministic_for_a_seed_and_returns_maps():
    model = _model()
    batch = make_batch()
    a = model.edit(batch, num_steps=2, generator=torch.Generator().manual_seed(0))
    b = model.edit(batch, num_steps=2, generator=torch.Generator().manual_seed(0))
    c = model.edit(batch, num_steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert a.images.shape == (2, 3, 32, 32) and a.routing_map.shape == (2, 3, 32, 32)
    assert a.refined_mask.shape == (2, 1, 32, 32) and 0 <= a.refined_mask.min() <= a.refined_mask.max() <= 1
    g = model.edit(
        batch, num_steps=2, text_guidance=2.0, image_guidance=1.5, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.equal(g.images, a.images)
    assert g.guidance == {"text": 2.0, "image": 1.5, "keep_outside_box": False}
    assert a.guidance == {"text": 1.0, "image": 1.0, "keep_outside_box": False}


def test_edit_guidance_defaults_to_the_recipes_sampling_config():
    """model.sampling is what edit() uses when the caller names no scale; a named scale wins."""
    batch = make_batch()
    guided = _model(**{"sampling.text_guidance": 2.0, "sampling.image_guidance": 1.5})
    plain = _model()  # same seed: the same weights
    by_cfg = guided.edit(batch, num_steps=2, generator=torch.Generator().manual_seed(0))
    named = plain.edit(
        batch, num_steps=2, text_guidance=2.0, image_guidance=1.5, generator=torch.Generator().manual_seed(0)
    )
    assert by_cfg.guidance == {"text": 2.0, "image": 1.5, "keep_outside_box": False}
    assert torch.equal(by_cfg.images, named.images)
    off = guided.edit(
        batch, num_steps=2, text_guidance=1.0, image_guidance=1.0, generator=torch.Generator().manual_seed(0)
    )
    assert off.guidance == {"text": 1.0, "image": 1.0, "keep_outside_box": False}
    assert torch.equal(off.images, plain.edit(batch, num_steps=2, generator=torch.Generator().manual_seed(0)).images)


def test_weights_load_from_a_local_folder(tmp_path):
    """The path a user's real weights take: from_pretrained on local folders, no hub."""
    model = _model()
    torch.manual_seed(0)
    plain = FluxBackbone(tiny_model_config().backbone, LoraConfig(rank=0))
    plain.transformer.save_pretrained(tmp_path / "transformer")
    model.vae.vae.save_pretrained(tmp_path / "vae")
    cfg = tiny_model_config(**{"backbone.path": str(tmp_path), "vae.path": str(tmp_path)})
    torch.manual_seed(0)
    loaded = build_model(cfg)
    sd = loaded.backbone.transformer.state_dict()
    for n, p in plain.transformer.state_dict().items():
        key = n if n in sd else n.replace(".weight", ".base_layer.weight").replace(".bias", ".base_layer.bias")
        if key not in sd:
            continue  # replaced feed-forwards live under .frozen_ff
        assert torch.equal(sd[key], p), n
    assert torch.equal(
        loaded.vae.vae.state_dict()["encoder.conv_in.weight"], model.vae.vae.state_dict()["encoder.conv_in.weight"]
    )


@pytest.mark.parametrize(
    "overrides, key",
    [
        ({"router.top_k": 5}, "router.top_k"),
        ({"experts.enabled": "[text,base]", "router.top_k": 3}, "router.top_k"),
        ({"experts.ep_size": 3}, "experts.ep_size"),
        ({"experts.kind": "moe"}, "experts.kind"),
        ({"experts.enabled": "[text,mask]", "router.top_k": 2}, "mixture.enabled"),
        ({"experts.blocks": "[7]"}, "experts.blocks"),
        ({"repaint.mode": "both"}, "repaint.mode"),
        ({"loss.mask_boundary": -1.0}, "loss.mask_boundary"),
        ({"loss.router_z": -1.0}, "loss.router_z"),
        ({"condition_dropout.text": 1.5}, "condition_dropout.text"),
        ({"experts.init_std": -0.1}, "experts.init_std"),
        ({"sampling.text_guidance": -1.0}, "sampling.text_guidance"),
        ({"sampling.image_guidance": float("nan")}, "sampling.image_guidance"),
    ],
)
def test_bad_configs_fail_before_anything_is_built(overrides, key, monkeypatch):
    import moe.model as model_module

    built = []
    monkeypatch.setattr(model_module, "FrozenVAE", lambda *a, **k: built.append(1))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        build_model(tiny_model_config(**overrides))
    assert not built


def test_unknown_config_keys_are_rejected():
    with pytest.raises(ConfigKeyError):
        OmegaConf.merge(OmegaConf.structured(ModelConfig), {"router": {"topk": 2}})


@pytest.mark.parametrize("kind", ["lora", "ffn"])
def test_bf16_forward_and_backward(kind):
    """GPU training runs in bf16: every module must accept the dtypes the others hand it."""
    model = _model(**{"experts.kind": kind, "loss.tag_alignment": 0.1}).to(torch.bfloat16)
    model.train()
    dtypes = []
    for layer in model.expert_layers:
        layer.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    out = model(make_batch())
    assert dtypes == [torch.bfloat16] * len(model.expert_layers)  # float32 routing weights must not leak
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.prediction.dtype == torch.bfloat16
    assert all(p.grad is not None for n, p in model.trainable_named_parameters() if "lora_A" in n)


def test_pixel_unshuffle_codec_is_lossless_and_trains():
    model = _model(
        **{
            "vae.kind": "pixel_unshuffle",
            "vae.pixel_factor": 4,
            "vae.latent_channels": 48,
            "backbone.arch.in_channels": 192,
        }
    )
    batch = make_batch()
    z = model.vae.encode(batch.source)
    assert z.shape == (2, 48, 8, 8)
    torch.testing.assert_close(model.vae.decode(z), batch.source)
    out = model(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    with pytest.raises(ValueError, match=r"vae\.latent_channels"):
        build_model(tiny_model_config(**{"vae.kind": "pixel_unshuffle", "vae.latent_channels": 4}))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"experts.kind": "ffn"},
        {"repaint.mode": "decoupled", "loss.tag_alignment": 0.1},
    ],
)
def test_every_trainable_parameter_gets_a_gradient_from_any_batch(overrides):
    """ZeRO-2 reduces gradient buckets that must hold the same parameters on every rank: a batch
    without any reference (on one rank) must still give every trainable parameter a gradient, zero
    where the batch cannot reach it (tests/test_train_real_model.py runs 2 ranks under ZeRO 2)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config(**overrides))
    model.train()
    for has_ref in ([False, False], [True, False]):
        model.zero_grad(set_to_none=True)
        model(make_batch(seed=1, has_ref=has_ref)).loss.backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, (has_ref, missing)


def test_frozen_encoders_stay_in_eval_mode():
    """``model.train()`` must not switch on the frozen T5's dropout (nor anything else in the frozen
    VAE and text encoders); the trainable parts do switch."""
    model = build_model(tiny_model_config())
    model.train()
    frozen = list(model.vae.modules()) + list(model.text_encoders.modules())
    assert frozen and not any(m.training for m in frozen)
    assert model.mask_encoder.training and model.expert_layers[0].router.training
    model.eval()
    model.train()
    assert not any(m.training for m in frozen)


def test_expert_perturbation_ignores_the_default_device():
    """Models are built under a CUDA default device on GPUs (``with torch.device("cuda")``): the experts'
    start perturbation must still come from its CPU generator, the same numbers on any device. (Under a
    default device, ``torch.randn(generator=cpu_generator)`` raises.) The meta device stands in for CUDA."""
    from moe.experts import zero_mean_perturbation

    plain = zero_mean_perturbation((6, 4), 1, 4, seed=3)
    with torch.device("meta"):
        under = zero_mean_perturbation((6, 4), 1, 4, seed=3)
    assert under.device.type == "cpu"
    torch.testing.assert_close(under, plain, rtol=0, atol=0)
    assert zero_mean_perturbation((6, 4), 0, 4, seed=3).add(plain).abs().sum() > 0  # experts differ


def test_subgrid_logits_place_each_patch_under_its_token():
    from moe.repaint import subgrid_logits

    logits = torch.tensor([[0.0, 10.0, 20.0, 30.0, 40.0, 50.0]])  # one sample, a 2x3 token grid
    detail = torch.arange(6 * 4, dtype=torch.float32).reshape(1, 6, 4)  # 2x2 patch offsets per token
    fine = subgrid_logits(logits, detail, (2, 3))
    assert fine.shape == (1, 4, 6)
    for i in range(2):
        for j in range(3):
            n = i * 3 + j
            for u in range(2):
                for v in range(2):  # token (i, j)'s offset (u, v) at (2i + u, 2j + v)
                    assert fine[0, 2 * i + u, 2 * j + v] == logits[0, n] + detail[0, n, 2 * u + v]


def test_repaint_subgrid_starts_as_the_token_mask_and_learns_below_the_token():
    torch.manual_seed(0)
    coarse_model = _model(**{"repaint.subgrid": 1})
    torch.manual_seed(0)
    fine_model = _model(**{"repaint.subgrid": 4})
    batch = make_batch()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = coarse_model.edit(batch, num_steps=2, generator=g())
    b = fine_model.edit(batch, num_steps=2, generator=g())
    # zero-initialised offsets: the same edit and the same mask as one value per token
    torch.testing.assert_close(a.images, b.images)
    torch.testing.assert_close(a.refined_mask, b.refined_mask)
    # the mask loss is taken on the fine grid and reaches the patch head
    fine_model.train()
    out = fine_model(batch)
    params = dict(fine_model.trainable_named_parameters())
    names = [n for n in params if ".repaint.detail." in n]
    assert names
    grads = torch.autograd.grad(out.terms["mask_boundary"], [params[n] for n in names])
    assert all(gr.abs().max() > 0 for gr in grads)
    # with offsets the refined mask varies inside a token cell (4x4 patches on an 8x8-pixel cell)
    for layer in fine_model.expert_layers:
        torch.nn.init.normal_(layer.repaint.detail.weight, std=1.0)
    fine_model.eval()
    m = fine_model.edit(batch, num_steps=2, generator=g()).refined_mask
    cells = m.unfold(2, 8, 8).unfold(3, 8, 8)  # [B, 1, gh, gw, 8, 8]
    assert (cells.amax(dim=(-1, -2)) - cells.amin(dim=(-1, -2))).max() > 0.05


def test_cells_of_grid_inverts_the_subgrid_placement():
    from moe.repaint import cells_of_grid, subgrid_logits

    detail = torch.randn(2, 6, 4)
    fine = subgrid_logits(torch.zeros(2, 6), detail, (2, 3))  # 2x2 cells under a 2x3 token grid
    torch.testing.assert_close(cells_of_grid(fine, 2), detail, rtol=0, atol=0)


@pytest.mark.parametrize("subgrid", [1, 4])
def test_repaint_within_coarse_is_zero_outside_the_box_and_unchanged_inside(subgrid):
    """``repaint.within_coarse``: the refined mask is exactly 0 on every token (subgrid 1) or subgrid cell
    the coarse box does not touch, the head's logits are unchanged where it does, and the mask loss still
    trains the head."""
    from moe.encoders import mask_to_grid
    from moe.repaint import cells_of_grid

    def build(within: bool):
        model = _model(**{"repaint.subgrid": subgrid, "repaint.within_coarse": within})
        torch.manual_seed(1)
        for layer in model.expert_layers:  # heads that paint everywhere, outside the box too
            torch.nn.init.normal_(layer.repaint.out.weight, std=1.0)
            torch.nn.init.constant_(layer.repaint.out.bias, 4.0)
            if layer.repaint.detail is not None:
                torch.nn.init.normal_(layer.repaint.detail.weight, std=1.0)
        return model

    batch = make_batch()
    free, confined = build(False), build(True)
    gh, gw = 4, 4  # the tiny model's token grid at 32 px
    touched = mask_to_grid(batch.coarse_mask, (gh * subgrid, gw * subgrid)) > 0  # cells the box reaches
    outside = ~torch.nn.functional.interpolate(touched[:, None].float(), size=(32, 32), mode="nearest").bool()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    free_mask = free.edit(batch, num_steps=2, generator=g()).refined_mask
    confined_mask = confined.edit(batch, num_steps=2, generator=g()).refined_mask
    assert outside.any() and free_mask[outside].max() > 0.5  # without it, the head paints outside the box
    assert confined_mask[outside].max() == 0
    # the first expert layer reads the same inputs in both: where the box reaches, the same logits
    _, free_ctx = _velocity(free, batch)
    _, ctx = _velocity(confined, batch)
    a, b = free_ctx.records[0], ctx.records[0]
    inside = mask_to_grid(batch.coarse_mask, (gh, gw)).reshape(2, -1) > 0
    torch.testing.assert_close(b.refined_logits[inside], a.refined_logits[inside], rtol=0, atol=0)
    assert (b.refined_logits[~inside] <= -1e3).all()
    if subgrid > 1:
        cells = cells_of_grid(touched.float(), subgrid) > 0
        torch.testing.assert_close(b.refined_detail[cells], a.refined_detail[cells], rtol=0, atol=0)
    confined.train()
    out = confined(batch)
    heads = [p for n, p in confined.trainable_named_parameters() if ".repaint." in n]
    grads = torch.autograd.grad(out.terms["mask_boundary"], heads, allow_unused=True)
    assert torch.isfinite(out.terms["mask_boundary"]) and any(gr is not None and gr.abs().max() > 0 for gr in grads)


def test_repaint_subgrid_is_validated():
    with pytest.raises(ValueError, match="repaint.subgrid"):
        tiny_model_config(**{"repaint.subgrid": 0})
