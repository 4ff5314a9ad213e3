"""bench/colour_probe.py: the instruction rewrite and the pixel classification it counts with."""

import torch

from bench.colour_probe import palette_shares, with_colour


def test_with_colour_replaces_the_requested_colour_word_only():
    assert with_colour("make the red circle blue", "recolor", "green") == "make the red circle green"
    assert with_colour("add a blue square", "add", "cyan") == "add a cyan square"


def test_palette_shares_counts_region_pixels_by_nearest_colour_within_the_radius():
    palette = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    img = torch.zeros(1, 3, 2, 2)
    img[0, :, 0, 0] = torch.tensor([0.95, 0.05, 0.0])  # red, within the radius
    img[0, :, 0, 1] = torch.tensor([0.0, 0.1, 0.9])  # blue
    img[0, :, 1, 0] = torch.tensor([0.5, 0.0, 0.5])  # between the two: none
    img[0, :, 1, 1] = torch.tensor([1.0, 0.0, 0.0])  # red, but outside the region
    region = torch.tensor([[[[True, True], [True, False]]]])
    assert palette_shares(img, region, palette, radius=0.15).tolist() == [1.0, 1.0, 1.0]
