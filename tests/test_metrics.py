"""Metrics on hand-made maps with known values, in 1, 2 and 3 spatial axes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from multiexplain import metrics


def square_mask(size: int = 8, lo: int = 2, hi: int = 6) -> torch.Tensor:
    mask = torch.zeros(1, size, size, dtype=torch.bool)
    mask[0, lo:hi, lo:hi] = True
    return mask


# -- confidence-based ----------------------------------------------------------------------

def test_drop_increase_and_win_on_known_values():
    full = torch.tensor([0.8, 0.5, 0.0, 0.4])
    explained = torch.tensor([0.4, 0.6, 0.3, 0.4])
    assert metrics.per_sample_drop(full, explained).tolist() == pytest.approx([50.0, 0.0, 0.0, 0.0])
    assert metrics.per_sample_drop(full, explained, clip=False).tolist() == pytest.approx([50.0, -20.0, 0.0, 0.0])
    assert metrics.average_drop(full, explained) == pytest.approx(12.5)
    assert metrics.increase_in_confidence(full, explained) == pytest.approx(50.0)

    a = torch.tensor([1.0, 2.0, 3.0, -1.0])
    b = torch.tensor([2.0, 2.0, 1.0, 0.0])
    assert metrics.win_percent(a, b) == pytest.approx(100 * (1 + 0.5 + 0 + 1) / 4)
    assert metrics.win_percent(a, b) + metrics.win_percent(b, a) == pytest.approx(100.0)
    assert metrics.win_percent(a, b, ties="loss") == pytest.approx(50.0)
    assert metrics.win_percent(a, b, ties="exclude") == pytest.approx(100 * 2 / 3)
    assert metrics.win_percent(torch.zeros(3), torch.zeros(3), ties="exclude") == 50.0
    with pytest.raises(ValueError, match="ties"):
        metrics.win_percent(a, b, ties="coin")
    with pytest.raises(ValueError, match=r"\(N,\)"):
        metrics.average_drop(full, explained[:2])
    assert metrics.average_drop(torch.zeros(0), torch.zeros(0)) == 0.0


def test_explanation_inputs_multiplies_the_map_into_every_channel():
    inputs = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    maps = torch.rand(2, 4, 5)
    expected = inputs * maps[:, None]
    torch.testing.assert_close(metrics.explanation_inputs(inputs, maps), expected)
    # General form E = B + L (I - B) with a constant baseline.
    torch.testing.assert_close(metrics.explanation_inputs(inputs, maps, baseline=1.0), 1 + maps[:, None] * (inputs - 1))
    with pytest.raises(ValueError, match="disagree"):
        metrics.explanation_inputs(inputs, torch.rand(2, 4, 4))


class LinearScorer(nn.Module):
    """logits = flatten(x) @ W, so confidences can be computed independently in float64."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight = nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.weight


def test_confidences_match_a_float64_reference():
    torch.manual_seed(0)
    weight = torch.randn(3 * 6 * 6, 4) * 0.1
    model = LinearScorer(weight)
    inputs = torch.rand(5, 3, 6, 6)
    maps = torch.rand(5, 6, 6)
    targets = torch.tensor([0, 1, 2, 3, 1])
    full, explained = metrics.confidences(model, inputs, maps, targets, batch_size=2)
    x = inputs.double().numpy().reshape(5, -1)
    e = (inputs * maps[:, None]).double().numpy().reshape(5, -1)
    w = weight.double().numpy()

    def softmax(z):
        z = z - z.max(axis=1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)

    rows = np.arange(5)
    np.testing.assert_allclose(full.numpy(), softmax(x @ w)[rows, targets.numpy()], rtol=1e-5)
    np.testing.assert_allclose(explained.numpy(), softmax(e @ w)[rows, targets.numpy()], rtol=1e-5)
    full_s, _ = metrics.confidences(model, inputs, maps, targets, score="sigmoid")
    np.testing.assert_allclose(full_s.numpy(), 1 / (1 + np.exp(-(x @ w)[rows, targets.numpy()])), rtol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        metrics.confidences(model, inputs, maps, torch.tensor([0, 1]))
    empty_full, empty_explained = metrics.confidences(model, inputs[:0], maps[:0], torch.zeros(0, dtype=torch.long))
    assert empty_full.shape == empty_explained.shape == (0,)


# -- localisation --------------------------------------------------------------------------

def test_localization_known_values_2d():
    mask = square_mask()  # 16 pixels
    exact = mask.float()
    assert metrics.localization(exact, mask, 0.0).item() == pytest.approx(1.0)
    spill = exact.clone()
    spill[0, 0, :4] = 1.0  # 4 pixels outside
    assert metrics.localization(spill, mask, 0.0).item() == pytest.approx(16 / (16 + 4))
    half = torch.zeros_like(exact)
    half[0, 2:4, 2:6] = 1.0  # 8 of the 16 pixels
    assert metrics.localization(half, mask, 0.0).item() == pytest.approx(0.5)
    # Faint energy outside counts at delta 0 but not above the threshold.
    faint = exact.clone()
    faint[0, 7, :] = 0.2
    assert metrics.localization(faint, mask, 0.0).item() == pytest.approx(16 / (16 + 8))
    assert metrics.localization(faint, mask, 0.25).item() == pytest.approx(1.0)
    # Min-max normalisation first: a map offset by a constant localises the same.
    assert metrics.localization(faint * 3 + 1, mask, 0.25).item() == pytest.approx(1.0)


def test_localization_matches_a_loop_reference_in_3d():
    generator = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 4, 5, 6, generator=generator) ** 3
    masks = torch.rand(3, 4, 5, 6, generator=generator) > 0.6
    for delta in (0.0, 0.25, 0.5):
        got = metrics.localization(maps, masks, delta)
        for i in range(3):
            m = maps[i].double().numpy()
            m = (m - m.min()) / (m.max() - m.min())
            inside = masks[i].numpy()
            lin = np.sum((m > delta) & inside)
            lout = np.sum((m > delta) & ~inside)
            assert got[i].item() == pytest.approx(lin / (inside.sum() + lout))


def test_empty_maps_and_masks_give_zero_not_nan():
    mask = square_mask()
    empty_map = torch.zeros(1, 8, 8)
    empty_mask = torch.zeros(1, 8, 8, dtype=torch.bool)
    assert metrics.localization(empty_map, mask).item() == 0.0
    assert metrics.localization(mask.float(), empty_mask).item() == 0.0
    assert metrics.localization(empty_map, empty_mask).item() == 0.0
    assert metrics.energy_pointing_game(empty_map, mask).item() == 0.0
    assert metrics.energy_pointing_game(mask.float(), empty_mask).item() == 0.0
    assert not metrics.pointing_game(empty_map, mask).item()
    assert not metrics.pointing_game(mask.float(), empty_mask).item()
    coverage, count = metrics.multi_instance_coverage(empty_map, mask[:, None])
    assert coverage.item() == 0.0 and count.item() == 1


def test_pointing_game_with_tolerance_in_1d_2d_3d():
    mask = square_mask()
    peak_inside = torch.zeros(1, 8, 8)
    peak_inside[0, 3, 3] = 1.0
    assert metrics.pointing_game(peak_inside, mask).item()
    peak_outside = torch.zeros(1, 8, 8)
    peak_outside[0, 3, 0] = 1.0  # two columns left of the square
    assert not metrics.pointing_game(peak_outside, mask).item()
    assert not metrics.pointing_game(peak_outside, mask, tolerance=1).item()
    assert metrics.pointing_game(peak_outside, mask, tolerance=2).item()
    # Diagonal distance (0,0) -> (2,2) is 2.83: Euclidean, not a square neighbourhood.
    corner = torch.zeros(1, 8, 8)
    corner[0, 0, 0] = 1.0
    assert not metrics.pointing_game(corner, mask, tolerance=2).item()
    assert metrics.pointing_game(corner, mask, tolerance=2.9).item()

    line_mask = torch.zeros(2, 10, dtype=torch.bool)
    line_mask[:, 4:6] = True
    line_maps = torch.zeros(2, 10)
    line_maps[0, 5], line_maps[1, 9] = 1.0, 1.0
    assert metrics.pointing_game(line_maps, line_mask).tolist() == [True, False]

    video_mask = torch.zeros(1, 3, 4, 4, dtype=torch.bool)
    video_mask[0, 1, 1:3, 1:3] = True
    video_map = torch.zeros(1, 3, 4, 4)
    video_map[0, 1, 2, 2] = 0.7
    assert metrics.pointing_game(video_map, video_mask).item()
    video_map[0, 2, 2, 2] = 0.9  # next frame: outside the region
    assert not metrics.pointing_game(video_map, video_mask).item()
    assert metrics.pointing_game(video_map, video_mask, tolerance=1).item()


def test_energy_pointing_game_known_values():
    mask = square_mask()
    assert metrics.energy_pointing_game(mask.float(), mask).item() == pytest.approx(1.0)
    half = 0.5 * mask.float()
    half[0, 0, :] = 0.5
    half[0, 7, :] = 0.5  # 16 outside pixels at the same value as the 16 inside
    assert metrics.energy_pointing_game(half, mask).item() == pytest.approx(0.5)
    video = torch.zeros(2, 2, 3, 3)
    video_mask = torch.zeros(2, 2, 3, 3, dtype=torch.bool)
    video_mask[:, 0] = True
    video[0, 0], video[0, 1] = 3.0, 1.0
    video[1, 1] = 1.0
    assert metrics.energy_pointing_game(video, video_mask).tolist() == pytest.approx([0.75, 0.0])
    with pytest.raises(ValueError, match="non-negative"):
        metrics.energy_pointing_game(-mask.float(), mask)
    with pytest.raises(ValueError, match="shape"):
        metrics.energy_pointing_game(mask.float(), mask[:, :4])


def test_multi_instance_coverage_counts_instances_above_half_the_peak():
    maps = torch.zeros(1, 8, 8)
    instances = torch.zeros(1, 3, 8, 8, dtype=torch.bool)
    instances[0, 0, 0:2, 0:2] = True
    instances[0, 1, 5:7, 5:7] = True  # instance 2 (index 2) is padding: all false
    maps[0, 1, 1] = 1.0
    maps[0, 6, 6] = 0.6
    coverage, count = metrics.multi_instance_coverage(maps, instances)
    assert count.item() == 2 and coverage.item() == pytest.approx(1.0)
    maps[0, 6, 6] = 0.4
    coverage, _ = metrics.multi_instance_coverage(maps, instances)
    assert coverage.item() == pytest.approx(0.5)


# -- deletion / insertion --------------------------------------------------------------------

def test_deletion_and_insertion_curves_on_a_linear_score():
    # Score = sum of the pixel values (a logit), so every curve point is known by hand.
    model = LinearScorer(torch.ones(4, 1))
    inputs = torch.tensor([[[4.0, 3.0, 2.0, 1.0]]])
    maps = torch.tensor([[1.0, 0.5, 0.2, 0.0]])
    deletion = metrics.deletion_curve(model, inputs, maps, 0, steps=4, score="logits")
    insertion = metrics.insertion_curve(model, inputs, maps, 0, steps=4, score="logits", baseline="zero")
    assert deletion[0].tolist() == pytest.approx([10, 6, 3, 1, 0])
    assert insertion[0].tolist() == pytest.approx([0, 4, 7, 9, 10])
    assert metrics.deletion_auc(model, inputs, maps, 0, steps=4, score="logits").item() == pytest.approx(0.25 * 15)
    assert metrics.insertion_auc(model, inputs, maps, 0, steps=4, score="logits", baseline="zero").item() == pytest.approx(0.25 * 25)
    # The reversed map deletes the small pixels first: a worse (higher) deletion AUC.
    reversed_auc = metrics.deletion_auc(model, inputs, maps.flip(-1), 0, steps=4, score="logits")
    assert reversed_auc.item() == pytest.approx(0.25 * (5 + 9 + 7 + 4 + 0))


def test_deletion_auc_in_3d_prefers_the_map_on_the_evidence():
    # The class score is the mean of channel 0 in one voxel block; a map on that block deletes it first.
    class BlockScorer(nn.Module):
        def forward(self, x):
            block = x[:, 0, 1, 1:3, 1:3].mean(dim=(1, 2))
            return torch.stack([block, torch.zeros_like(block)], dim=1)

    inputs = torch.rand(2, 2, 3, 4, 4) + 0.5
    good = torch.zeros(2, 3, 4, 4)
    good[:, 1, 1:3, 1:3] = 1.0
    bad = 1.0 - good
    good_auc = metrics.deletion_auc(BlockScorer(), inputs, good, 0, steps=12, score="logits")
    bad_auc = metrics.deletion_auc(BlockScorer(), inputs, bad, 0, steps=12, score="logits")
    assert (good_auc < bad_auc).all()
    good_insertion = metrics.insertion_auc(BlockScorer(), inputs, good, 0, steps=12, score="logits", baseline="zero")
    bad_insertion = metrics.insertion_auc(BlockScorer(), inputs, bad, 0, steps=12, score="logits", baseline="zero")
    assert (good_insertion > bad_insertion).all()


def test_box_blur_keeps_constants_and_shapes():
    constant = torch.full((1, 2, 5, 6, 7), 0.3)
    torch.testing.assert_close(metrics.box_blur(constant), constant)
    assert metrics.box_blur(torch.rand(2, 3, 16)).shape == (2, 3, 16)


# -- boxes -----------------------------------------------------------------------------------

def test_boxes_to_masks_pixel_convention_and_unions():
    masks = metrics.boxes_to_masks(torch.tensor([[2.0, 3.0, 5.0, 7.0], [0.0, 0.0, 8.0, 8.0]]), (8, 8))
    assert masks.shape == (2, 8, 8) and masks.dtype == torch.bool
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[3:7, 2:5] = True  # rows 3-6, columns 2-4
    assert torch.equal(masks[0], expected)
    assert masks[1].all()
    union = metrics.boxes_to_masks([[[0, 0, 2, 2], [6, 6, 8, 8]], []], (8, 8))
    assert union[0].sum().item() == 8 and union[1].sum().item() == 0
    with pytest.raises(ValueError, match="x1 >= x0"):
        metrics.boxes_to_masks([[[5, 0, 2, 2]]], (8, 8))


def test_bad_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match="spatial"):
        metrics.localization(torch.rand(8), torch.ones(8, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        metrics.localization(torch.full((1, 4, 4), float("nan")), torch.ones(1, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="instance_masks"):
        metrics.multi_instance_coverage(torch.rand(2, 4, 4), torch.ones(2, 4, 4, dtype=torch.bool))
