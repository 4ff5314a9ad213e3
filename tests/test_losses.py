"""Each loss term is zero (or at its minimum) on its ideal input and larger otherwise."""

from __future__ import annotations

import torch

from moe.losses import (
    boundary_band,
    flow_matching_loss,
    load_balance_loss,
    mask_boundary_loss,
    mixture_smoothness_loss,
    region_weight,
    router_z_loss,
    routing_entropy,
    routing_spread,
    tag_alignment_loss,
)


def test_flow_matching_zero_at_target_and_region_weighting():
    target = torch.randn(2, 6, 4)
    assert flow_matching_loss(target, target) == 0
    pred = target.clone()
    pred[0, 0] += 1.0  # error of 1 on every channel of one token
    assert torch.isclose(flow_matching_loss(pred, target), torch.tensor(1.0 / 12))
    mask = torch.zeros(2, 6)
    mask[0, 0] = 1  # the wrong token is inside the edit region: weight 1 + 2 = 3 of a total of 12 + 2
    w = region_weight(mask, alpha=2.0)
    assert torch.isclose(flow_matching_loss(pred, target, w), torch.tensor(3.0 / 14))


def test_load_balance_is_one_when_uniform_and_grows_with_collapse():
    s, e = 400, 4
    probs = torch.full((s, e), 0.25)
    index = torch.arange(s * 3).remainder(e).view(s, 3)
    assert torch.isclose(load_balance_loss(probs, index, e), torch.tensor(1.0))
    collapsed_p = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).expand(s, e)
    collapsed_i = torch.tensor([[0, 1, 2]]).expand(s, 3)
    # 4 * (0.7 + 0.1 + 0.1) / 3: the over-used, over-confident expert raises it above 1
    assert torch.isclose(load_balance_loss(collapsed_p, collapsed_i, e), torch.tensor(1.2))
    # empty slots (-1) are ignored
    with_empty = torch.cat([index[:, :2], torch.full((s, 1), -1)], dim=1)
    assert torch.isfinite(load_balance_loss(probs, with_empty, e))


def test_load_balance_gradient_pulls_towards_the_under_used_experts():
    """Top-3 of 4: the load balance has a gradient through the soft probabilities that lowers the
    over-used expert's logit, and none once the assignments are balanced."""
    s, e = 64, 4
    logits = torch.zeros(s, e)
    logits[:, 0] = 2.0
    logits.requires_grad_(True)
    probs = torch.softmax(logits, -1)
    index = probs.topk(3, -1).indices  # expert 0 always in, 1-3 by tie order
    (g,) = torch.autograd.grad(load_balance_loss(probs, index, e), logits)
    assert g[:, 0].min() > 0  # descent lowers the favourite
    balanced = torch.arange(s * 3).remainder(e).view(s, 3)  # each expert 1/4 of the assignments
    uniform = torch.zeros(s, e, requires_grad=True)
    (g0,) = torch.autograd.grad(load_balance_loss(torch.softmax(uniform, -1), balanced, e), uniform)
    assert g0.abs().max() < 1e-7


def test_router_z_loss_is_logsumexp_squared():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, 4.0]])
    expected = (torch.log(torch.tensor(4.0)) ** 2 + torch.logsumexp(logits[1], 0) ** 2) / 2
    torch.testing.assert_close(router_z_loss(logits), expected)
    assert router_z_loss(logits / 10) < router_z_loss(logits)  # flatter logits, smaller loss


def test_routing_spread_and_entropy_tell_collapse_from_token_wise_routing():
    b, n, e = 2, 16, 4
    constant = torch.tensor([0.7, 0.3, 0.0, 0.0]).expand(b, n, e)  # every token alike: a collapsed router
    assert routing_spread(constant) == 0
    tokenwise = torch.zeros(b, n, e)
    tokenwise[:, : n // 2, 0] = 1.0
    tokenwise[:, n // 2 :, 1] = 1.0
    # experts 0 and 1: std over tokens of a half-ones column; experts 2, 3: 0
    half = torch.tensor([1.0] * (n // 2) + [0.0] * (n // 2)).std()
    torch.testing.assert_close(routing_spread(tokenwise), half / 2)
    assert torch.isclose(routing_entropy(torch.full((5, e), 0.25)), torch.tensor(1.0))
    assert routing_entropy(torch.tensor([[1.0, 0.0, 0.0, 0.0]])) < 1e-6


def test_mask_boundary_zero_at_the_fine_mask_and_band_weighting():
    fine = torch.zeros(2, 8, 8)
    fine[:, 2:6, 3:7] = 1
    perfect = (fine * 2 - 1) * 30.0  # logits saturating to the binary mask
    assert mask_boundary_loss(perfect, fine) < 1e-6
    wrong = -perfect
    assert mask_boundary_loss(wrong, fine) > 1.0
    # an error on the boundary costs more than the same error far inside
    band = boundary_band(fine, 1)
    assert band[0, 2, 3] == 1 and band[0, 0, 0] == 0 and band[0, 4, 4] == 0
    on_edge, far = perfect.clone(), perfect.clone()
    on_edge[:, 1, 3] = 30.0  # a background token next to the box marked as edit
    far[:, 7, 0] = 30.0  # a background token far from the box marked as edit
    assert mask_boundary_loss(on_edge, fine) > mask_boundary_loss(far, fine) > 0


def test_mask_boundary_with_soft_targets_is_minimal_at_the_target():
    # a box whose boundary tokens are partly covered (area fractions), as the token grid sees a fine mask
    g = torch.Generator().manual_seed(0)
    soft = torch.zeros(1, 8, 8)
    soft[:, 2:6, 2:6] = 1.0
    ring = torch.zeros(1, 8, 8, dtype=torch.bool)
    ring[:, 1:7, 1:7] = True
    ring[:, 2:6, 2:6] = False
    soft[ring] = 0.1 + 0.8 * torch.rand(int(ring.sum()), generator=g)
    logits = torch.logit(soft.clamp(1e-4, 1 - 1e-4))
    at = mask_boundary_loss(logits, soft)
    for shift in (-0.5, 0.5):
        assert mask_boundary_loss(logits + shift, soft) > at


def test_mixture_smoothness_zero_for_constant_routing():
    constant = torch.tensor([0.5, 0.3, 0.2, 0.0]).expand(2, 4, 4, 4)
    assert mixture_smoothness_loss(constant) == 0
    noisy = torch.rand(2, 4, 4, 4)
    assert mixture_smoothness_loss(noisy) > 0
    step = constant.clone()
    step[:, 2:] = torch.tensor([0.0, 0.0, 0.0, 1.0])  # one horizontal edge: a TV of 2 on 1 of 3 row pairs
    torch.testing.assert_close(mixture_smoothness_loss(step), torch.tensor(2.0 / 3))


def test_tag_alignment_zero_when_aligned():
    task = torch.randn(3, 8)
    assert tag_alignment_loss(task * 2.5, task) < 1e-6
    assert torch.isclose(tag_alignment_loss(-task, task), torch.tensor(2.0))
