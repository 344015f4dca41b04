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


# -- pointing game: 15 px and class means ------------------------------------------------------

def test_pointing_game_at_zhang_et_al_15_px():
    mask = torch.zeros(1, 100, 100, dtype=torch.bool)
    mask[0, 40:60, 40:60] = True
    peak = torch.zeros(2, 100, 100)
    peak[0, 50, 74] = 1.0  # 15 px right of the region's last column (59)
    peak[1, 71, 71] = 1.0  # diagonal: (12, 12) from the corner (59, 59) is 16.97 px
    hits = metrics.pointing_game(peak, mask.expand(2, -1, -1), tolerance=15)
    assert hits.tolist() == [True, False]
    assert metrics.pointing_game(peak[:1], mask, tolerance=14.9).tolist() == [False]


def test_pointing_accuracy_class_mean_by_hand():
    hits = torch.tensor([True, False, True, True, False])
    classes = torch.tensor([0, 0, 1, 2, 2])
    assert metrics.pointing_accuracy(hits) == pytest.approx(60.0)
    # per class: 1/2, 1/1, 1/2 -> mean 2/3 (the sample mean weights class 0 and 2 twice)
    assert metrics.pointing_accuracy(hits, classes) == pytest.approx(100 * 2 / 3)
    assert metrics.class_mean(torch.tensor([1.0, 3.0, 10.0]), [5, 5, 7]) == pytest.approx((2.0 + 10.0) / 2)
    assert metrics.pointing_accuracy(torch.zeros(0, dtype=torch.bool), torch.zeros(0, dtype=torch.long)) == 0.0
    with pytest.raises(ValueError, match=r"\(N,\)"):
        metrics.pointing_accuracy(hits, classes[:3])
    with pytest.raises(TypeError, match="integer"):
        metrics.class_mean(hits, classes.float())


def test_localisation_table_class_mean_within_a_tolerance_by_hand():
    """``evaluation.localisation_metrics``'s pointing rows (what ``multiexplain evaluate`` prints)."""
    from multiexplain.evaluation import localisation_metrics

    masks = square_mask(size=16, lo=4, hi=8).expand(4, -1, -1)  # rows and columns 4..7
    maps = torch.zeros(4, 16, 16)
    maps[0, 5, 5] = 1.0  # inside
    maps[1, 5, 9] = 1.0  # 2 px right of column 7
    maps[2, 5, 12] = 1.0  # 5 px right
    maps[3, 9, 9] = 1.0  # diagonal from the corner (7, 7): 2.83 px
    classes = torch.tensor([0, 0, 0, 1])
    row = localisation_metrics({"m": maps}, masks, classes, tolerance=2)["m"]
    assert row["Pointing game % (higher is better)"] == pytest.approx(25.0)
    assert row["Pointing game %, class mean (higher is better)"] == pytest.approx(100 * (1 / 3 + 0) / 2)
    assert row["Pointing game %, class mean, within 2 px (higher is better)"] == pytest.approx(100 * (2 / 3 + 0) / 2)
    wide = localisation_metrics({"m": maps}, masks, classes, tolerance=3)["m"]
    assert wide["Pointing game %, class mean, within 3 px (higher is better)"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    plain = localisation_metrics({"m": maps}, masks, classes)["m"]  # no tolerance: no such row
    assert not any("within" in name for name in plain)
    assert "Pointing game %, class mean (higher is better)" not in localisation_metrics({"m": maps}, masks)["m"]
    with pytest.raises(ValueError, match="tolerance must be >= 0"):
        localisation_metrics({"m": maps}, masks, classes, tolerance=-1)


# -- ROAD: noisy linear imputation ---------------------------------------------------------------

def _fill(inputs, removed, **kwargs):
    return metrics.noisy_linear_imputation(inputs, removed, noise=0.0, tol=1e-13, **kwargs)


def test_imputation_in_1d_is_linear_interpolation_and_constant_at_the_ends():
    signal = torch.tensor([[[0.0, 9.0, 9.0, 9.0, 4.0, 5.0, 9.0, 9.0]]], dtype=torch.float64)
    removed = torch.tensor([[False, True, True, True, False, False, True, True]])
    filled = _fill(signal, removed)
    # between 0 and 4: the straight line; after the last kept value 5: 5 (one neighbour each side)
    assert filled[0, 0].tolist() == pytest.approx([0, 1, 2, 3, 4, 5, 5, 5], abs=1e-10)


def test_imputation_of_one_pixel_is_the_papers_weighted_mean():
    image = torch.arange(1.0, 26.0, dtype=torch.float64).reshape(1, 1, 5, 5) ** 1.5
    removed = torch.zeros(1, 5, 5, dtype=torch.bool)
    removed[0, 2, 2] = removed[0, 0, 0] = True
    filled = _fill(image, removed)[0, 0]
    v = image[0, 0]
    edges = v[1, 2] + v[3, 2] + v[2, 1] + v[2, 3]
    diagonals = v[1, 1] + v[1, 3] + v[3, 1] + v[3, 3]
    assert filled[2, 2].item() == pytest.approx((edges / 6 + diagonals / 12).item(), rel=1e-12)
    # A corner has two edge neighbours and one diagonal one: the weights renormalised over 5/12.
    corner = (v[0, 1] / 6 + v[1, 0] / 6 + v[1, 1] / 12) / (5 / 12)
    assert filled[0, 0].item() == pytest.approx(corner.item(), rel=1e-12)
    kept = ~removed[0]
    assert torch.equal(filled[kept], v[kept])


def test_imputation_of_one_voxel_uses_the_documented_3d_weights():
    """Face 1/14, edge 1/28, corner 1/56 (docs/GRADCAMPP.md): a symmetric stencil would pass the
    ramp test below with any weights, this pins them, in float64 by hand."""
    volume = torch.rand(1, 2, 5, 5, 5, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    removed = torch.zeros(1, 5, 5, 5, dtype=torch.bool)
    removed[0, 2, 2, 2] = True
    expected = torch.zeros(2, dtype=torch.float64)
    for dt in (-1, 0, 1):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                away = abs(dt) + abs(dy) + abs(dx)
                if away:
                    expected += {1: 1 / 14, 2: 1 / 28, 3: 1 / 56}[away] * volume[0, :, 2 + dt, 2 + dy, 2 + dx]
    filled = _fill(volume, removed)
    torch.testing.assert_close(filled[0, :, 2, 2, 2], expected, rtol=1e-12, atol=0)
    assert torch.equal(filled[~removed.unsqueeze(1).expand_as(volume)], volume[~removed.unsqueeze(1).expand_as(volume)])


@pytest.mark.parametrize("spatial", [(9, 11), (7, 8, 9)])
def test_imputation_reproduces_a_linear_ramp_in_interior_holes(spatial):
    grids = torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in spatial], indexing="ij")
    ramp = sum((0.5 + axis) * g for axis, g in enumerate(grids)) - 3.0
    inputs = torch.stack([ramp, -2 * ramp]).unsqueeze(0)  # two channels, filled alike
    removed = torch.zeros(1, *spatial, dtype=torch.bool)
    removed[(0, *[slice(2, s - 2) for s in spatial])] = True  # one hole touching no border
    torch.testing.assert_close(_fill(inputs, removed), inputs, rtol=0, atol=1e-9)


def test_imputation_noise_lands_only_on_removed_positions_with_its_scale():
    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(2, 3, 40, 40, generator=generator, dtype=torch.float64)
    removed = torch.rand(2, 40, 40, generator=generator) < 0.5
    clean = _fill(inputs, removed)
    noisy = metrics.noisy_linear_imputation(inputs, removed, noise=(0.1, 0.2, 0.0), tol=1e-13,
                                            generator=torch.Generator().manual_seed(1))
    again = metrics.noisy_linear_imputation(inputs, removed, noise=(0.1, 0.2, 0.0), tol=1e-13,
                                            generator=torch.Generator().manual_seed(1))
    assert torch.equal(noisy, again)
    kept = ~removed.unsqueeze(1).expand_as(inputs)
    assert torch.equal(noisy[kept], inputs[kept]) and torch.equal(clean[kept], inputs[kept])
    spread = (noisy - clean).permute(1, 0, 2, 3)[:, removed]  # (C, removed positions)
    assert spread.std(dim=1).tolist() == pytest.approx([0.1, 0.2, 0.0], abs=0.01)
    assert spread.shape[1] > 1200


def test_imputation_errors():
    inputs = torch.rand(2, 3, 6, 6)
    with pytest.raises(ValueError, match="at least one kept position"):
        metrics.noisy_linear_imputation(inputs, torch.ones(2, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"removed must be \(N, \*spatial\)"):
        metrics.noisy_linear_imputation(inputs, torch.ones(2, 6, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="one per channel"):
        metrics.noisy_linear_imputation(inputs, torch.zeros(2, 6, 6, dtype=torch.bool), noise=(0.1, 0.1))
    with pytest.raises(ValueError, match="1-3 spatial axes"):
        metrics.noisy_linear_imputation(torch.rand(2, 3), torch.zeros(2, dtype=torch.bool))
    with pytest.warns(RuntimeWarning, match="stopped after 1 iterations"):
        metrics.noisy_linear_imputation(inputs.double(), torch.rand(2, 6, 6) < 0.7, tol=1e-14, max_iterations=1)


# -- ROAD on a model whose answer is known ------------------------------------------------------

class RegionScorer(nn.Module):
    """Two logits: ``gain * mean of channel 0 over a region`` and 0, so the softmax confidence of
    class 0 is 1/2 exactly when the region holds the background value 0."""

    def __init__(self, region: torch.Tensor, gain: float = 4.0):
        super().__init__()
        self.register_buffer("region", region.float())
        self.gain = gain

    def forward(self, x):
        inside = (x[:, 0] * self.region).flatten(1).sum(1) / self.region.sum()
        return torch.stack([self.gain * inside, torch.zeros_like(inside)], dim=1)


@pytest.mark.parametrize("spatial", [(20, 20), (6, 12, 12)])
def test_road_on_a_region_scorer_gives_the_known_curves(spatial):
    region = torch.zeros(spatial, dtype=torch.bool)
    region[tuple(slice(s // 4, s // 4 + max(1, s // 4)) for s in spatial)] = True  # 1/64 (2D: 25 of 400)
    model = RegionScorer(region)
    inputs = region.float().expand(3, 2, *spatial).clone()  # object 1 on background 0, two channels
    good, bad = region.float().expand(3, *spatial), (~region).float().expand(3, *spatial)
    full = torch.softmax(torch.tensor([4.0, 0.0]), 0)[0].item()
    fractions = (0.1, 0.5, 0.9)
    on_object = metrics.road(model, inputs, good, 0, fractions=fractions, noise=0.0, batch_size=2)
    half, kept = torch.full((3, 3), 0.5, dtype=torch.float64), torch.full((3, 3), full, dtype=torch.float64)
    # MoRF removes the whole object first: it is imputed from the background, the score falls to 1/2;
    # LeRF removes background only (at most 90% of it): the object stays, the score stays.
    torch.testing.assert_close(on_object.morf, half, rtol=0, atol=1e-5)
    torch.testing.assert_close(on_object.lerf, kept, rtol=0, atol=1e-6)
    torch.testing.assert_close(on_object.full, torch.full((3,), full), rtol=0, atol=1e-6)
    torch.testing.assert_close(on_object.combined(), torch.full((3,), (full - 0.5) / 2, dtype=torch.float64), rtol=0, atol=1e-5)
    assert on_object.lerf_top1.all()
    # The reversed map ranks the object last: its curves swap.
    off_object = metrics.road(model, inputs, bad, 0, fractions=fractions, noise=0.0)
    torch.testing.assert_close(off_object.morf, kept, rtol=0, atol=1e-6)
    torch.testing.assert_close(off_object.lerf, half, rtol=0, atol=1e-5)
    assert (off_object.combined() < 0).all()


def test_road_is_reproducible_and_its_noise_matters():
    torch.manual_seed(0)
    model = LinearScorer(torch.randn(3 * 10 * 10, 4))
    inputs, maps = torch.rand(4, 3, 10, 10), torch.rand(4, 10, 10)
    first = metrics.road(model, inputs, maps, [0, 1, 2, 3], noise=0.05, seed=3, score="logits")
    second = metrics.road(model, inputs, maps, [0, 1, 2, 3], noise=0.05, seed=3, score="logits")
    other = metrics.road(model, inputs, maps, [0, 1, 2, 3], noise=0.05, seed=4, score="logits")
    assert torch.equal(first.morf, second.morf) and torch.equal(first.lerf, second.lerf)
    assert not torch.equal(first.morf, other.morf)
    assert first.morf.shape == first.lerf.shape == (4, 9) and first.fractions == metrics.ROAD_FRACTIONS
    # A linear score of the imputed input: the noise-free curve by hand, position by position.
    clean = metrics.road(model, inputs, maps, [0, 1, 2, 3], fractions=(0.3,), orders=("morf",), noise=0.0,
                         tie_noise=0.0, score="logits")
    ranks = maps.flatten(1).argsort(dim=1, descending=True).argsort(dim=1)
    removed = (ranks < 30).reshape(4, 10, 10)
    expected = model(_fill(inputs.double(), removed).float()).gather(1, torch.arange(4).view(-1, 1))
    torch.testing.assert_close(clean.morf, expected.double(), rtol=1e-5, atol=1e-5)
    assert clean.lerf is None
    with pytest.raises(ValueError, match="'lerf' order"):
        clean.lerf_mean()


def test_road_errors():
    model = LinearScorer(torch.ones(3 * 4 * 4, 2))
    inputs, maps = torch.rand(2, 3, 4, 4), torch.rand(2, 4, 4)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        metrics.road(model, inputs, maps, 0, fractions=(0.5, 1.0))
    with pytest.raises(ValueError, match="morf"):
        metrics.road(model, inputs, maps, 0, orders=("most",))
    with pytest.raises(ValueError, match="disagree"):
        metrics.road(model, inputs, maps[:, :3], 0)


# -- map similarity --------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(3, 40), (3, 12, 15), (2, 4, 6, 5)])
def test_spearman_matches_scipy_including_ties(shape):
    from scipy.stats import spearmanr

    generator = torch.Generator().manual_seed(1)
    first = torch.rand(shape, generator=generator, dtype=torch.float64)
    second = (first + torch.rand(shape, generator=generator, dtype=torch.float64)).mul(3).round()  # many ties
    second[0] = second[0].clamp(max=2.0)
    got = metrics.spearman_correlation(first.clamp(min=0.5), second)
    expected = [spearmanr(first[i].clamp(min=0.5).flatten(), second[i].flatten())[0] for i in range(shape[0])]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    assert metrics.spearman_correlation(torch.zeros(1, 5, 5), torch.rand(1, 5, 5)).item() == 0.0


@pytest.mark.parametrize("shape", [(2, 16, 20), (2, 12, 13, 14)])
def test_ssim_matches_scikit_image_with_the_papers_gaussian_window(shape):
    from skimage.metrics import structural_similarity

    generator = torch.Generator().manual_seed(2)
    first = torch.rand(shape, generator=generator, dtype=torch.float64)
    second = (0.7 * first + 0.3 * torch.rand(shape, generator=generator, dtype=torch.float64)) ** 2
    got = metrics.ssim(first, second)
    expected = [structural_similarity(first[i].numpy(), second[i].numpy(), data_range=1.0, gaussian_weights=True,
                                      sigma=1.5, use_sample_covariance=False) for i in range(shape[0])]
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=1e-12)
    assert metrics.ssim(first, first).tolist() == pytest.approx([1.0, 1.0])
    assert metrics.ssim(torch.zeros(1, 11, 11), torch.zeros(1, 11, 11)).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least 11 positions"):
        metrics.ssim(torch.rand(1, 7, 7), torch.rand(1, 7, 7))


# -- model-parameter randomisation -------------------------------------------------------------------

class TinyCNN(nn.Module):
    """The head is registered before the body, so registration and execution order differ."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 3)
        self.body = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                  nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def _input_gradient(inputs, target):
    def explain(model):
        x = inputs.clone().requires_grad_(True)
        model(x)[:, target].sum().backward()
        return x.grad.abs().sum(dim=1)

    return explain


def test_randomisation_of_a_linear_model_matches_the_redrawn_weights():
    torch.manual_seed(0)
    linear = nn.Linear(16 * 16, 3)
    net = nn.Sequential(nn.Flatten(), linear)

    def explain(m):  # the input gradient of class 1 is that class's weight row
        return m[1].weight[1].detach().reshape(1, 16, 16).clone()

    result = metrics.model_randomisation(net, explain, seed=7)
    torch.manual_seed(7)
    redrawn = nn.Linear(16 * 16, 3)  # the same draws as reset_parameters() under the same seed
    from scipy.stats import spearmanr

    expected = spearmanr(linear.weight[1].detach().numpy(), redrawn.weight[1].detach().numpy())[0]
    assert result.layers == ("1",)
    assert result.spearman.shape == (1, 1)
    assert result.spearman.item() == pytest.approx(expected, abs=1e-12)
    assert result.original.shape == (1, 16, 16) and result.maps is None


def test_randomisation_restores_every_tensor_object_and_value_and_the_random_state():
    torch.manual_seed(0)
    model = TinyCNN()
    model.body[1].running_mean.add_(0.5)
    model.train()
    params = {name: p for name, p in model.named_parameters()}
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    explain = _input_gradient(torch.rand(2, 2, 12, 12), 0)
    rng = torch.get_rng_state()
    result = metrics.model_randomisation(model, explain, keep_maps=True, with_ssim=True)
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training and all(p is params[n] for n, p in model.named_parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.maps.shape == (len(result.layers), 2, 12, 12) and result.ssim.shape == (len(result.layers), 2)

    calls = []

    def failing(m):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("explainer broke")
        return explain(m)

    with pytest.raises(RuntimeError, match="explainer broke"):
        metrics.model_randomisation(model, failing)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p is params[n] for n, p in model.named_parameters())


def test_randomisation_goes_from_the_output_down_in_execution_order():
    torch.manual_seed(1)  # not the randomisation's seed 0, which would redraw the initial weights
    model = TinyCNN().eval()
    with torch.no_grad():  # as if trained: a batch norm off its initial scale 1 and shift 0
        model.body[1].weight.uniform_(0.5, 1.5)
        model.body[1].bias.normal_()
    explain = _input_gradient(torch.rand(2, 2, 12, 12), 1)
    # registration order is head, body.0, body.1, body.3; execution runs the head last
    assert metrics.randomisable_layers(model) == ["body.3", "body.1", "body.0", "head"]
    seen = []

    def record(module):
        seen.append(next(n for n, m in model.named_modules() if m is module))
        metrics.reinitialise(module)

    result = metrics.model_randomisation(model, explain, randomise=record)
    assert result.layers == ("head", "body.3", "body.1", "body.0") and seen == list(result.layers)
    assert result.order == "cascading" and len(result.mean()["spearman"]) == 4

    # independent: at each step only that layer differs from the trained weights
    trained = {n: p.detach().clone() for n, p in model.named_parameters()}
    changed = []

    def explain_and_diff(m):
        changed.append(sorted({n.rsplit(".", 1)[0] for n, p in m.named_parameters() if not torch.equal(p, trained[n])}))
        return explain(m)

    metrics.model_randomisation(model, explain_and_diff, order="independent")
    assert changed == [[], ["head"], ["body.3"], ["body.1"], ["body.0"]]
    changed.clear()
    metrics.model_randomisation(model, explain_and_diff, layers=["head", "body"])
    assert changed == [[], ["head"], ["body.0", "body.1", "body.3", "head"]]


def test_a_map_that_ignores_the_model_fails_the_sanity_check():
    torch.manual_seed(0)
    model = TinyCNN().eval()
    image = torch.rand(2, 2, 12, 12)
    result = metrics.model_randomisation(model, lambda m: image.mean(dim=1))
    torch.testing.assert_close(result.spearman, torch.ones(4, 2, dtype=torch.float64))
    torch.testing.assert_close(result.ssim, torch.ones(4, 2, dtype=torch.float64))


def test_randomisation_errors():
    model = TinyCNN()
    explain = _input_gradient(torch.rand(1, 2, 12, 12), 0)
    with pytest.raises(ValueError, match="order"):
        metrics.model_randomisation(model, explain, order="bottom_up")
    with pytest.raises(ValueError, match="did you mean body"):
        metrics.model_randomisation(model, explain, layers=["bdy"])
    with pytest.raises(ValueError, match="no parameters"):
        metrics.model_randomisation(model, explain, layers=["body.2"])
    with pytest.raises(TypeError, match="must return maps"):
        metrics.model_randomisation(model, lambda m: [1, 2])
    with pytest.raises(ValueError, match="at least 11"):
        metrics.model_randomisation(model, lambda m: torch.rand(1, 5, 5))
    assert metrics.model_randomisation(model, lambda m: torch.rand(1, 5, 5), with_ssim=False).ssim is None


def test_randomisation_by_blocks_at_a_depth():
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=3).eval()
    inputs = torch.rand(1, 3, 32, 32)
    groups = []

    def record(module):
        groups[-1].append(module)
        metrics.reinitialise(module)

    def explain(m):
        groups.append([])
        return _input_gradient(inputs, 0)(m)

    result = metrics.model_randomisation(model, explain, layers=1, randomise=record, with_ssim=False)
    assert result.layers == ("fc", "layer4", "layer3", "layer2", "layer1", "bn1", "conv1")
    # step 1 randomised every conv and batch norm of layer4 and nothing else (groups[k]: step k)
    assert len(groups[1]) == sum(1 for m in model.layer4.modules() if next(m.parameters(recurse=False), None) is not None)
    assert all(any(m is n for n in model.layer4.modules()) for m in groups[1])
    with pytest.raises(ValueError, match="depth"):
        metrics.model_randomisation(model, explain, layers=0)
