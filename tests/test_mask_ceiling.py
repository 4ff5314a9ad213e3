"""bench/mask_ceiling.py: the IoU a perfect token-level mask can reach, checked on masks drawn by hand."""

from __future__ import annotations

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))

import mask_ceiling  # noqa: E402


def test_a_mask_on_token_boundaries_is_reached_exactly():
    fine = torch.zeros(1, 1, 16, 16)
    fine[..., 4:12, 0:8] = 1  # tokens of 4x4 pixels on a 4x4 grid: exactly 2x2 tokens
    out = mask_ceiling.ceilings(fine, fine.clone(), grid=4)
    assert out["coarse_box"] == 1.0 and out["token_mask_nearest"] == 1.0


def test_a_mask_smaller_than_a_token_is_lost_on_the_grid():
    fine = torch.zeros(1, 1, 16, 16)
    fine[..., 0:3, 0:3] = 1  # 9 of a token's 16 pixels: the token averages 0.5625 >= 0.5, so all 16 are kept
    box = torch.zeros_like(fine)
    box[..., 0:4, 0:4] = 1
    out = mask_ceiling.ceilings(fine, box, grid=4)
    assert out["token_mask_nearest"] == pytest.approx(9 / 16, abs=1e-4)
    fine[..., 0:3, 0:2] = 0  # 3 of 16 pixels: the token rounds to empty, IoU 0
    assert mask_ceiling.ceilings(fine, box, grid=4)["token_mask_nearest"] == 0.0
