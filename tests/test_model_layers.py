"""Router, experts, dispatchers, repaint and mixture against plain reference computations."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from moe.config import RouterConfig
from moe.dispatch import AllToAllDispatcher, DenseDispatcher, reference_combine
from moe.experts import FfnExpert, LoraExpert, build_expert, packed_width, reference_feed_forward
from moe.repaint import LatentMixture, MaskRepaint
from moe.router import ConditionRouter, dense_weights, routing_confidence, topk_routing

D, C = 16, 4


def _ff():
    from diffusers.models.attention import FeedForward

    torch.manual_seed(1)
    return FeedForward(dim=D, dim_out=D, activation_fn="gelu-approximate")


def _experts(kind: str):
    names = ["text", "mask", "reference", "base"]
    torch.manual_seed(2)
    experts = [build_expert(kind, n, D, C, rank=3, frozen_ff=_ff()) for n in names]
    for e in experts:  # move off the zero init so that every expert computes something different
        for p in e.parameters():
            p.data.add_(0.1 * torch.randn_like(p))
    return experts


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_topk_uses_exactly_k_experts_with_weights_summing_to_one(k):
    torch.manual_seed(0)
    logits = torch.randn(200, 4)
    available = torch.ones(200, 4, dtype=torch.bool)
    r = topk_routing(logits, available, k)
    assert ((r.index >= 0).sum(dim=1) == k).all()
    assert torch.allclose(r.weight.sum(dim=1), torch.ones(200), atol=1e-6)
    # the selected experts are the k most probable, with renormalised probabilities as weights
    probs = torch.softmax(logits, dim=-1)
    top_p, top_i = probs.topk(k, dim=-1)
    assert torch.equal(r.index, top_i)
    assert torch.allclose(r.weight, top_p / top_p.sum(-1, keepdim=True), atol=1e-6)
    assert len(set(r.index[0].tolist())) == k  # no expert twice


def test_unavailable_expert_is_never_selected_and_k_shrinks_only_when_needed():
    logits = torch.tensor([[0.0, 0.0, 10.0, 0.0]] * 3)
    available = torch.tensor([[True, True, False, True]] * 3)
    r3 = topk_routing(logits, available, 3)
    assert not (r3.index == 2).any() and ((r3.index >= 0).sum(1) == 3).all()
    r4 = topk_routing(logits, available, 4)
    assert ((r4.index >= 0).sum(1) == 3).all() and (r4.index[:, 3] == -1).all()
    assert torch.allclose(r4.weight.sum(1), torch.ones(3))
    assert r3.probs[:, 2].abs().max() == 0


def _router_inputs(b=2, n=6, kind="learned", k=2):
    torch.manual_seed(0)
    router = ConditionRouter(RouterConfig(kind=kind, top_k=k, ctx_dim=C, attn_dim=8, num_latents=2), D, 4, temb_dim=D)
    x, text, ref, masks = torch.randn(b, n, D), torch.randn(b, 5, D), torch.randn(b, n, D), torch.randn(b, n, D)
    base = torch.randn(b, n, D)
    has_ref = torch.tensor([True, False])
    ctxs = router.contexts(x, text, torch.ones(b, 5, dtype=torch.bool), ref, has_ref, masks, base)
    available = torch.ones(b, 4, dtype=torch.bool)
    available[1, 2] = False  # as the router.mask_absent ablation passes it
    return router, x, ctxs, available, has_ref


def test_router_reference_context_is_the_absent_vector_without_reference():
    router, _, (text_ctx, ref_ctx, _, _), _, _ = _router_inputs()
    torch.testing.assert_close(ref_ctx[1], router.absent_ref.expand(6, -1), rtol=0, atol=0)
    assert (ref_ctx[0] - router.absent_ref).abs().min() > 0  # the read-out where there is a reference
    assert text_ctx[1].abs().max() > 0  # text is present for both samples
    # a batch without any reference reads the absent vector too, and it is learned (gets a gradient)
    x, text = torch.randn(2, 6, D), torch.randn(2, 5, D)
    ctxs = router.contexts(
        x, text, None, None, torch.tensor([False, False]), torch.randn(2, 6, D), torch.randn(2, 6, D)
    )
    torch.testing.assert_close(ctxs[1], router.absent_ref.expand(2, 6, -1), rtol=0, atol=0)
    (ctxs[1] * torch.randn_like(ctxs[1])).sum().backward()
    assert router.absent_ref.grad.abs().max() > 0


def test_base_context_reads_the_base_token_at_the_same_grid_position():
    """The base read-out of target token i is a projection of base token i alone: preservation outside
    the mask is then a per-position copy the Base expert can learn."""
    router, x, _, _, _ = _router_inputs()
    text, masks, base = torch.randn(2, 5, D), torch.randn(2, 6, D), torch.randn(2, 6, D)
    args = (x, text, None, None, torch.tensor([False, False]), masks)
    before = router.contexts(*args, base)[3]
    changed = base.clone()
    changed[1, 4] += torch.randn(D)
    after = router.contexts(*args, changed)[3]
    delta = (after - before).abs().amax(-1)  # [B, N]
    assert delta[1, 4] > 0 and delta.sum() == delta[1, 4]
    plain = router.base_proj(torch.nn.functional.layer_norm(base, (D,), eps=1e-6))
    torch.testing.assert_close(before, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["learned", "uniform", "static"])
def test_router_kinds(kind):
    router, x, ctxs, available, _ = _router_inputs(kind=kind, k=2)
    r = router(x, ctxs, torch.rand(2, 6), torch.randn(2, D), torch.ones(2, 3), available)
    sel = (r.index >= 0).sum(1)
    assert torch.allclose(r.weight.sum(1), torch.ones(12), atol=1e-6)
    assert not (r.index[6:] == 2).any()  # sample 1 has no reference
    if kind == "static":  # all available experts, equal weights
        assert sel[:6].eq(4).all() and sel[6:].eq(3).all()
        assert torch.allclose(r.weight[:6], torch.full((6, 4), 0.25))
    else:
        assert sel.eq(2).all()
    if kind == "uniform":
        assert torch.allclose(r.weight[r.index >= 0], torch.tensor(0.5))


def test_router_depends_on_task_context_and_previous_mask():
    router, x, ctxs, available, _ = _router_inputs()
    nn.init.normal_(router.task[2].weight)
    base = router(x, ctxs, torch.zeros(2, 6), torch.zeros(2, D), torch.ones(2, 3), available).probs
    other_t = router(x, ctxs, torch.zeros(2, 6), torch.ones(2, D), torch.ones(2, 3), available).probs
    other_m = router(x, ctxs, torch.ones(2, 6), torch.zeros(2, D), torch.ones(2, 3), available).probs
    assert (base - other_t).abs().max() > 1e-4
    assert (base - other_m).abs().max() > 1e-4


def test_experts_start_apart_by_a_zero_mean_perturbation():
    """With init_std > 0 the experts differ at initialisation (so the diffusion loss can rank them),
    by init_std-sized, zero-mean-over-experts perturbations: the mean of the four FFN copies' outputs
    equals the frozen FFN to first order, and each LoRA expert is O(init_std)."""
    ff = _ff()
    torch.manual_seed(0)
    packed = torch.randn(10, packed_width(D, C))
    names = ["text", "mask", "reference", "base"]
    std = 1e-2
    ffn = [build_expert("ffn", n, D, C, 3, ff, std, e, 4, seed=11) for e, n in enumerate(names)]
    frozen = reference_feed_forward(ff, packed[:, :D])
    outs = torch.stack([e(packed) for e in ffn])  # [4, T, D]
    spread = (outs - frozen).abs().max()
    assert 0 < spread < 10 * std * frozen.abs().max()
    torch.testing.assert_close(outs.mean(0), frozen, rtol=0, atol=1e-6)  # linear in the perturbation
    again = build_expert("ffn", "mask", D, C, 3, ff, std, 1, 4, seed=11)  # any layout builds the same expert
    assert torch.equal(again.proj_out.weight, ffn[1].proj_out.weight)
    lora = [build_expert("lora", n, D, C, 3, ff, std, e, 4, seed=11) for e, n in enumerate(names)]
    ups = torch.stack([e.up.weight for e in lora])
    torch.testing.assert_close(ups.sum(0), torch.zeros(D, 3), rtol=0, atol=1e-7)
    y = torch.stack([e(packed) for e in lora])
    assert 0 < y.abs().max() < 10 * std and (y[0] - y[1]).abs().max() > 0


def test_ffn_experts_start_equal_to_the_frozen_ffn():
    ff = _ff()
    x = torch.randn(10, D)
    packed = torch.cat([x, torch.randn(10, packed_width(D, C) - D)], dim=1)
    for name in ["text", "mask", "reference", "base"]:
        expert = build_expert("ffn", name, D, C, rank=3, frozen_ff=ff)
        assert isinstance(expert, FfnExpert)
        torch.testing.assert_close(expert(packed), reference_feed_forward(ff, x), rtol=1e-6, atol=1e-6)
        assert all(p.requires_grad for p in expert.parameters())


def test_lora_experts_start_at_zero_and_read_their_own_condition():
    torch.manual_seed(0)
    packed = torch.randn(5, packed_width(D, C))
    expert = LoraExpert("reference", D, C, rank=3)
    assert expert(packed).abs().max() == 0
    nn.init.normal_(expert.up.weight)
    out = expert(packed)
    changed = packed.clone()
    changed[:, D + 2 * C :] += 1  # mask and base contexts and the mask: not the Reference expert's
    assert torch.allclose(out, expert(changed))
    changed = packed.clone()
    changed[:, D + C : D + 2 * C] += 1  # its own reference read-out
    assert not torch.allclose(out, expert(changed))


@pytest.mark.parametrize("kind", ["lora", "ffn"])
@pytest.mark.parametrize("dispatcher", [DenseDispatcher(), AllToAllDispatcher(1, 0)])
def test_dispatchers_match_the_per_token_reference(kind, dispatcher):
    experts = _experts(kind)
    torch.manual_seed(3)
    s = 24
    packed = torch.randn(s, packed_width(D, C), requires_grad=True)
    r = topk_routing(torch.randn(s, 4), torch.rand(s, 4) > 0.2, 3)
    gate = torch.rand(s)
    index, weight = LatentMixture.blend(r.index, r.weight, gate, base_id=3)
    assert ((index == 3).sum(1) == 1).all()  # Base once per token
    weight = weight.detach().requires_grad_(True)
    out = dispatcher(packed, index, weight, experts)
    ref = reference_combine(packed, index, weight, experts)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(out)
    grads = torch.autograd.grad((out * g).sum(), [packed, weight, *experts[0].parameters()])
    grads_ref = torch.autograd.grad((ref * g).sum(), [packed, weight, *experts[0].parameters()])
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grouped", [False, True])
def test_alltoall_dispatch_moves_rows_by_permutations_without_scatter_add(grouped):
    """Rows go to their experts and back by permutations: forward and backward have no scatter-add
    (atomic adds on a GPU, slow in bf16 and run-to-run nondeterministic). The per-expert loop neither
    computes nor counts unassigned slots (index -1); the grouped GEMM path (bf16) zeroes them."""
    experts = _experts("ffn")
    dtype = torch.bfloat16 if grouped else torch.float32
    if grouped:
        experts = [e.to(dtype) for e in experts]
    torch.manual_seed(4)
    s = 32
    packed = torch.randn(s, packed_width(D, C), dtype=dtype, requires_grad=True)
    r = topk_routing(torch.randn(s, 4), torch.rand(s, 4) > 0.3, 3)
    assert (r.index < 0).any()
    seen = []
    hooks = [e.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0])) for e in experts]
    with torch.profiler.profile() as prof:
        out = AllToAllDispatcher(1, 0, grouped_gemm=grouped)(packed, r.index, r.weight, experts)
        (out.float() * torch.randn(out.shape)).sum().backward()
    for h in hooks:
        h.remove()
    ops = {e.key for e in prof.key_averages()}
    atomic = {
        "aten::index_add",
        "aten::index_add_",
        "aten::scatter_add",
        "aten::scatter_add_",
        "aten::index_put_",
        "aten::_index_put_impl_",
        "aten::index_put",
    }
    assert not ops & atomic, ops & atomic
    assert sum(seen) == (0 if grouped else int((r.index >= 0).sum()))
    ref = reference_combine(packed.detach().float(), r.index, r.weight, [copy.deepcopy(e).float() for e in experts])
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("kind", ["lora", "ffn"])
@pytest.mark.parametrize("dispatcher", [DenseDispatcher(), AllToAllDispatcher(1, 0)])
def test_dispatchers_take_an_empty_batch(kind, dispatcher):
    experts = _experts(kind)
    packed = torch.randn(0, packed_width(D, C), requires_grad=True)
    index, weight = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3)
    out = dispatcher(packed, index, weight, experts)
    assert out.shape == (0, D)
    out.sum().backward()
    assert packed.grad.shape == packed.shape


def test_packed_rows_are_aligned_and_experts_read_only_their_condition():
    """Packed tokens are padded to 16-byte rows; each expert's full-width condition product equals its
    plain read of its columns (Base reads its base context and 1 - m) and ignores the padding."""
    assert packed_width(D, C) % 8 == 0 and packed_width(D, C) >= D + 4 * C + 1
    torch.manual_seed(5)
    packed = torch.randn(7, packed_width(D, C))
    m = packed[:, D + 4 * C : D + 4 * C + 1]
    spelled = {  # the layout [x | text | reference | mask ctx | base ctx | m], written out
        "text": packed[:, D : D + C],
        "reference": packed[:, D + C : D + 2 * C],
        "mask": torch.cat([packed[:, D + 2 * C : D + 3 * C], m], 1),
        "base": torch.cat([packed[:, D + 3 * C : D + 4 * C], 1 - m], 1),
    }
    for expert in _experts("lora"):
        torch.testing.assert_close(expert.condition(packed), spelled[expert.name], rtol=0, atol=0)
        plain = expert.cond(expert.condition(packed))
        torch.testing.assert_close(expert.condition_projection(packed), plain, rtol=1e-6, atol=1e-6)
        padded = packed.clone()
        padded[:, D + 4 * C + 1 :] = 9.0
        torch.testing.assert_close(expert.condition_projection(padded), plain, rtol=1e-6, atol=1e-6)


def test_latent_mixture_is_convex_and_gives_base_the_rest_in_one_slot():
    index = torch.tensor([[0, 1, -1], [3, 2, 1]])
    weight = torch.tensor([[0.6, 0.4, 0.0], [0.5, 0.3, 0.2]])
    gate = torch.tensor([0.25, 0.8])
    idx, w = LatentMixture.blend(index, weight, gate, base_id=3)
    dense = dense_weights(idx, w, 4)
    assert torch.allclose(dense.sum(1), torch.ones(2))
    assert torch.allclose(dense[0], torch.tensor([0.15, 0.1, 0.0, 0.75]))
    assert torch.allclose(dense[1], torch.tensor([0.0, 0.16, 0.24, 0.4 + 0.2]))
    # Base selected by the router (row 1): its share joins that slot and the extra slot stays empty
    assert idx.tolist() == [[0, 1, -1, 3], [3, 2, 1, -1]]
    torch.testing.assert_close(w[1], torch.tensor([0.6, 0.24, 0.16, 0.0]))


def test_latent_mixture_gate_is_per_token_from_time_and_routing_confidence():
    torch.manual_seed(0)
    mix = LatentMixture(D)
    probs = torch.softmax(3 * torch.randn(2 * 5, 4), -1)
    conf = routing_confidence(probs).view(2, 5, 2)
    # the confidence features: max probability and entropy / log E
    p = probs.view(2, 5, 4)
    torch.testing.assert_close(conf[..., 0], p.max(-1).values)
    torch.testing.assert_close(conf[..., 1], -(p * p.log()).sum(-1) / torch.log(torch.tensor(4.0)))
    temb = torch.randn(2, D)
    assert torch.equal(mix(temb, conf), torch.full((2, 5), 0.5))  # 0.5 at initialisation
    nn.init.normal_(mix.confidence.weight)
    nn.init.normal_(mix.gate.weight, std=0.1)
    g = mix(temb, conf)
    assert g.shape == (2, 5) and g.std(dim=1).min() > 1e-3  # varies over a sample's tokens
    expected = torch.sigmoid(mix.gate(temb)[:, None] + conf @ mix.confidence.weight.t())[..., 0]
    torch.testing.assert_close(g, expected)
    assert (mix(temb + 1, conf) - g).abs().max() > 1e-4  # and with the timestep embedding


def test_mask_repaint_starts_at_its_prior_and_sees_neighbours():
    torch.manual_seed(0)
    head = MaskRepaint(D, C, hidden=8)
    x, ref, base = torch.randn(2, 16, D), torch.randn(2, 16, C), torch.randn(2, 16, C)
    prior = torch.zeros(2, 16)
    prior[:, 5] = 1

    def logits_of(x, base):
        logits, detail = head(x, ref, base, prior, prior, (4, 4))
        assert detail is None  # subgrid 1: one value per token
        return logits

    torch.testing.assert_close(torch.sigmoid(logits_of(x, base)), prior.clamp(0.02, 0.98), rtol=1e-5, atol=1e-6)
    nn.init.normal_(head.out.weight)
    x2 = x.clone()
    x2[:, 0] += torch.randn(D)  # token (0, 0): affects its 3x3 conv neighbourhood (two convs: up to 2 tokens away)
    delta = (logits_of(x2, base) - logits_of(x, base)).abs().reshape(2, 4, 4)
    assert delta[:, 0, 0].min() > 0 and delta[:, 1, 1].min() > 0
    assert delta[:, 3, 3].max() == 0
    # it reads the base read-out too (the object's shape when there is no reference)
    base2 = base.clone()
    base2[:, 0] += 1.0
    assert (logits_of(x, base2) - logits_of(x, base)).abs().max() > 0


@pytest.mark.parametrize("masked", [False, True])
def test_flux_dual_block_computes_what_diffusers_block_computes(masked):
    """``FluxDualBlock`` owns the forward of diffusers' dual-stream block (so the feed-forward can take
    arguments): on the same submodules it gives the same outputs and gradients, bit for bit, and the
    parameters keep their names and order (checkpoints, optimizer groups)."""
    from diffusers.models.transformers.transformer_flux import FluxTransformerBlock

    from moe.backbone import FluxDualBlock

    torch.manual_seed(0)
    theirs = FluxTransformerBlock(dim=32, num_attention_heads=2, attention_head_dim=16)
    for p in theirs.parameters():  # diffusers zero-initialises nothing here, but be sure every path counts
        p.data.add_(0.05 * torch.randn_like(p))
    ours = FluxDualBlock(copy.deepcopy(theirs))
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    b, n, length = 2, 6, 3
    img, txt, temb = torch.randn(b, n, 32), torch.randn(b, length, 32), torch.randn(b, 32)
    angles = torch.randn(length + n, 8)
    rope = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
    kwargs = None
    if masked:
        keep = torch.ones(b, length + n, dtype=torch.bool)
        keep[1, -2:] = False
        kwargs = {"attention_mask": keep[:, None, None, :]}
    outs = []
    for block in (theirs, ours):
        x, c = img.clone().requires_grad_(True), txt.clone().requires_grad_(True)
        txt_out, img_out = block(
            hidden_states=x, encoder_hidden_states=c, temb=temb, image_rotary_emb=rope, joint_attention_kwargs=kwargs
        )
        (txt_out.square().sum() + img_out.square().sum()).backward()
        grads = [x.grad, c.grad] + [p.grad for p in block.parameters()]
        outs.append((txt_out, img_out, grads))
        block.zero_grad(set_to_none=True)
    for a, o in zip(outs[0][:2], outs[1][:2]):
        assert torch.equal(a, o)
    for a, o in zip(outs[0][2], outs[1][2]):
        assert torch.equal(a, o)


def test_backbone_state_keys_are_diffusers_own():
    """The dual blocks' forward is ours, their state is diffusers': same keys, same order."""
    from diffusers import FluxTransformer2DModel

    from moe.backbone import FluxBackbone, FluxDualBlock, flux_arch_kwargs
    from moe.config import LoraConfig
    from tests.helpers.model_configs import tiny_model_config

    cfg = tiny_model_config().backbone
    ours = FluxBackbone(cfg, LoraConfig(rank=0))
    assert all(isinstance(block, FluxDualBlock) for block in ours.transformer.transformer_blocks)
    assert list(ours.transformer.state_dict()) == list(
        FluxTransformer2DModel(**flux_arch_kwargs(cfg.arch)).state_dict()
    )
