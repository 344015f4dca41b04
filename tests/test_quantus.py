"""Our metrics against independent implementations: Quantus 0.6 (PointingGame,
RelevanceMassAccuracy, AttributionLocalisation, PixelFlipping, ROAD, MPRT and its noisy linear imputation) and
pytorch-grad-cam 1.5 (ROAD MoRF / LeRF, its copy of the ROAD authors' imputer), on the same maps,
masks and models. Each test's docstring states where the definitions differ; the rest is tested
exactly. Quantus' RandomLogit (Sixt et al.) has no counterpart here; nor does our Loc(delta)
(eq. 26 of the Grad-CAM++ paper) in Quantus, so neither is compared.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from multiexplain import GradCAMPlusPlus, metrics

quantus = pytest.importorskip("quantus")  # in the test extra; the import takes a few seconds


@pytest.fixture(autouse=True)
def _quiet(one_torch_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _maps_and_masks(n: int = 12, size: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, size, size, generator=generator, dtype=torch.float64)  # continuous: one maximum each
    masks = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        top, left = torch.randint(0, size - 5, (2,), generator=generator).tolist()
        masks[i, top : top + 5, left : left + 5] = True
    masks[0] |= maps[0] == maps[0].max()  # make sure some peaks are inside
    return maps, masks


def test_pointing_game_equals_quantus_where_the_maximum_is_unique():
    """Differences: Quantus counts a hit when ANY position holding the maximum is in the mask,
    ours takes the first one in row-major order (they agree when the maximum is unique); a
    constant map is refused by Quantus (an assertion) and a miss for us (it points nowhere); an
    empty mask is NaN for Quantus and a miss for us. Quantus has no pixel
    tolerance and no class mean (those are checked by hand in test_metrics.py)."""
    maps, masks = _maps_and_masks()
    theirs = quantus.PointingGame(disable_warnings=True)(
        model=None, x_batch=maps[:, None].numpy(), y_batch=np.zeros(len(maps), dtype=int),
        a_batch=maps[:, None].numpy(), s_batch=masks[:, None].numpy().astype(float))
    ours = metrics.pointing_game(maps, masks)
    assert ours.tolist() == [bool(v) for v in theirs]
    assert 0 < sum(ours.tolist()) < len(ours)  # both outcomes occur
    # The documented differences, shown on the two cases.
    tied = torch.zeros(1, 16, 16, dtype=torch.float64)
    tied[0, 0, 0] = tied[0, 10, 10] = 1.0
    mask = torch.zeros(1, 16, 16, dtype=torch.bool)
    mask[0, 8:12, 8:12] = True
    theirs = quantus.PointingGame(disable_warnings=True, normalise=False)(
        model=None, x_batch=tied[:, None].numpy(), y_batch=np.zeros(1, dtype=int),
        a_batch=tied[:, None].numpy(), s_batch=mask[:, None].numpy().astype(float))
    assert bool(theirs[0]) and not metrics.pointing_game(tied, mask).item()
    flat = torch.ones(1, 16, 16, dtype=torch.float64)
    with pytest.raises(AssertionError, match="all equal to one"):  # Quantus refuses a constant map
        quantus.PointingGame(disable_warnings=True, normalise=False)(
            model=None, x_batch=flat[:, None].numpy(), y_batch=np.zeros(1, dtype=int),
            a_batch=flat[:, None].numpy(), s_batch=mask[:, None].numpy().astype(float))
    assert not metrics.pointing_game(flat, mask).item()


def test_energy_pointing_game_equals_relevance_mass_accuracy_and_attribution_localisation():
    """The same ratio sum(L * M) / sum(L). Differences: Quantus gives NaN for an empty mask (ours
    0); AttributionLocalisation adds 1e-9 to the denominator (hence rtol 1e-8) and takes |L|
    first (our maps are non-negative, so it changes nothing); Quantus' default max-normalisation
    cancels in the ratio."""
    maps, masks = _maps_and_masks(seed=1)
    ours = metrics.energy_pointing_game(maps, masks).numpy()
    common = dict(model=None, x_batch=maps[:, None].numpy(), y_batch=np.zeros(len(maps), dtype=int),
                  a_batch=maps[:, None].numpy(), s_batch=masks[:, None].numpy().astype(float))
    mass = quantus.RelevanceMassAccuracy(disable_warnings=True)(**common)
    np.testing.assert_allclose(ours, mass, rtol=1e-12)
    located = quantus.AttributionLocalisation(disable_warnings=True)(**common)
    np.testing.assert_allclose(ours, located, rtol=1e-8)


def test_noisy_linear_imputation_equals_the_road_authors_and_quantus():
    """pytorch-grad-cam ships the ROAD authors' imputer (scipy sparse direct solve, float32) and
    Quantus its port; with the noise off, the fills must agree (ours iterates to 1e-13). Both
    take the kept-pixel mask (1 = kept) or removed indices; ours the removed mask."""
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from quantus.functions.perturb_func import noisy_linear_imputation

    generator = torch.Generator().manual_seed(2)
    image = torch.rand(3, 14, 11, generator=generator, dtype=torch.float64)
    removed = torch.rand(14, 11, generator=generator) < 0.7
    ours = metrics.noisy_linear_imputation(image[None], removed[None], noise=0.0, tol=1e-13)[0]
    authors = NoisyLinearImputer(noise=0.0)(image.float(), (~removed).float())
    np.testing.assert_allclose(ours.numpy(), authors.numpy(), rtol=0, atol=2e-6)
    ported = noisy_linear_imputation(image.numpy(), np.flatnonzero(removed.numpy().ravel()), noise=0.0)
    np.testing.assert_allclose(ours.numpy(), ported, rtol=0, atol=1e-11)
    assert (ours - image).abs()[:, removed].max() > 0.05  # the fill really changed the removed pixels


def _conv_classifier(channels: int) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(channels, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 4)).eval()
    with torch.no_grad():
        model[-1].weight.mul_(40)  # confident, so that removing pixels moves the softmax
    return model


def test_road_curves_equal_pytorch_grad_cam_morf_and_lerf():
    """pytorch-grad-cam's ``ROADMostRelevantFirst(percentile=q)`` removes the pixels at or above
    the map's q-th percentile (numpy's linear interpolation), i.e. the top (100 - q)%; its LeRF
    with q keeps the top q% -- our fraction 1 - q/100 in both orders. With P a multiple of 100
    (20 x 20) the counts equal our floor(f * P). It returns the score change after - before (the
    target callable's softmax here), we the score itself; its ROADCombined is (LeRF - MoRF) / 2
    of the means, our ``combined()``. Its imputer's noise comes from torch's global generator,
    so noise is off on both sides (our noise is tested in test_metrics.py)."""
    from pytorch_grad_cam.metrics.perturbation_confidence import (
        PerturbationConfidenceMetric, RemoveLeastRelevantFirst, RemoveMostRelevantFirst)
    from pytorch_grad_cam.metrics.road import NoisyLinearImputer
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputSoftmaxTarget

    model = _conv_classifier(3)
    generator = torch.Generator().manual_seed(3)
    inputs, maps = torch.rand(5, 3, 20, 20, generator=generator), torch.rand(5, 20, 20, generator=generator)
    targets = [0, 1, 2, 3, 1]
    ours = metrics.road(model, inputs, maps, targets, noise=0.0, tie_noise=0.0, tol=1e-8)
    callables = [ClassifierOutputSoftmaxTarget(t) for t in targets]
    changes = {"morf": [], "lerf": []}
    for fraction in metrics.ROAD_FRACTIONS:
        q = round(100 * (1 - fraction))
        for order, removal in (("morf", RemoveMostRelevantFirst), ("lerf", RemoveLeastRelevantFirst)):
            metric = PerturbationConfidenceMetric(removal(q, NoisyLinearImputer(noise=0.0)))
            changes[order].append(metric(inputs, maps.numpy(), callables, model))
    for order in ("morf", "lerf"):
        theirs = np.stack(changes[order], axis=1)  # (N, F)
        expected = getattr(ours, order).numpy() - ours.full.double().numpy()[:, None]
        np.testing.assert_allclose(expected, theirs, rtol=0, atol=2e-6)
    combined = (np.stack(changes["lerf"]).mean(0) - np.stack(changes["morf"]).mean(0)) / 2
    np.testing.assert_allclose(ours.combined().numpy(), combined, rtol=0, atol=2e-6)
    assert np.ptp(np.stack(changes["morf"])) > 0.01  # the curves move


def test_road_accuracy_equals_quantus_road():
    """Quantus' ROAD records, per percentage p, whether the prediction on the MoRF-imputed input
    still equals the label (our ``morf_top1``), removing int(P * p / 100) positions ranked by
    ``argsort(-map)``. Differences: Quantus has no LeRF and no confidence curve; it ranks the
    map broadcast over the input's channels, so it works for single-channel inputs only (with 3
    channels it indexes past H * W and fails, shown below); its noise comes from numpy's global
    generator, so noise is off on both sides."""
    model = _conv_classifier(1)
    generator = torch.Generator().manual_seed(4)
    inputs = torch.rand(24, 1, 10, 10, generator=generator)
    with torch.no_grad():
        labels = model(inputs).argmax(1)
    maps = torch.rand(24, 10, 10, generator=generator)
    percentages = [10, 30, 50, 70, 90]
    ours = metrics.road(model, inputs, maps, labels, fractions=[p / 100 for p in percentages], orders=("morf",),
                        noise=0.0, tie_noise=0.0, tol=1e-8)
    theirs = quantus.ROAD(percentages=percentages, noise=0.0, disable_warnings=True)(
        model=model, x_batch=inputs.numpy(), y_batch=labels.numpy(), a_batch=maps[:, None].numpy(),
        device="cpu", channel_first=True)
    np.testing.assert_allclose(ours.morf_top1.double().mean(0).numpy(), [theirs[p] for p in percentages], atol=1e-12)
    assert len(set(np.round(ours.morf_top1.double().mean(0).numpy(), 6))) > 1  # accuracy changes along the curve
    with pytest.raises(IndexError):
        quantus.ROAD(percentages=[50], noise=0.0, disable_warnings=True)(
            model=_conv_classifier(3), x_batch=torch.rand(2, 3, 10, 10).numpy(), y_batch=np.zeros(2, dtype=int),
            a_batch=torch.rand(2, 1, 10, 10).numpy(), device="cpu", channel_first=True)


def test_deletion_curve_equals_quantus_pixel_flipping():
    """Quantus' PixelFlipping (Bach et al. 2015) is our deletion curve: it replaces the
    ``features_in_step`` next most relevant features by a baseline and records the target's
    score after each step. Differences: it ranks features of the map broadcast over the input's
    channels (one channel here, so features are positions), with an unstable argsort (continuous
    maps, so no ties); its curve lacks our column 0 (the intact input); its AUC is the trapezoid
    with dx = 1 over the steps, ours over [0, 1] with the intact point (Quantus 0.6 computes it
    with ``np.trapz``, gone in NumPy 2, so only the curves are compared). Baseline 0 on both sides
    (Quantus' "black" is the input's minimum)."""
    model = _conv_classifier(1)
    generator = torch.Generator().manual_seed(6)
    inputs, maps = torch.rand(6, 1, 12, 12, generator=generator), torch.rand(6, 12, 12, generator=generator)
    with torch.no_grad():
        labels = model(inputs).argmax(1)
    steps = 16  # 144 positions: 9 a step
    ours = metrics.deletion_curve(model, inputs, maps, labels, steps=steps, baseline="zero", score="softmax")
    common = dict(model=model, x_batch=inputs.numpy(), y_batch=labels.numpy(), a_batch=maps[:, None].numpy(),
                  device="cpu", channel_first=True, softmax=True)
    theirs = quantus.PixelFlipping(features_in_step=144 // steps, perturb_baseline=0.0, disable_warnings=True)(**common)
    np.testing.assert_allclose(ours[:, 1:].numpy(), np.asarray(theirs), rtol=0, atol=1e-6)
    assert np.ptp(np.asarray(theirs)) > 0.05  # the curve moves


@pytest.mark.parametrize("order, theirs_order", [("cascading", "top_down"), ("independent", "independent")])
def test_model_randomisation_equals_quantus_mprt(order, theirs_order):
    """Quantus' MPRT randomises every module with a ``reset_parameters`` in reverse registration
    order, each under ``torch.manual_seed(seed + 1)``, on a deep copy; ours runs in place (and
    restores), orders by execution (the same here) and seeds step s with ``seed + s``. With a
    ``randomise`` callable that seeds like Quantus the weights are identical, so the per-layer
    Spearman correlations of the Grad-CAM++ maps must be equal. Quantus max-normalises and takes
    |L| first; Spearman is invariant to both on our non-negative maps. Quantus' SSIM uses
    scikit-image's 7 x 7 uniform window with the sample covariance and a data range from the two
    maps, ours the paper's Gaussian window (checked against scikit-image in test_metrics.py)."""
    model = _conv_classifier(1)
    inputs = torch.rand(6, 1, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        labels = model(inputs).argmax(1)

    def explain_func(model, inputs, targets, **kwargs):
        return GradCAMPlusPlus(model, "2")(torch.as_tensor(inputs), torch.as_tensor(targets).tolist()).maps[:, None].numpy()

    def like_quantus(module):
        torch.manual_seed(43)
        module.reset_parameters()

    theirs = quantus.MPRT(layer_order=theirs_order, seed=42, disable_warnings=True)(
        model=model, x_batch=inputs.numpy(), y_batch=labels.numpy(),
        a_batch=explain_func(model, inputs.numpy(), labels.numpy()), explain_func=explain_func, device="cpu",
        channel_first=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ours = metrics.model_randomisation(model, lambda m: GradCAMPlusPlus(m, "2")(inputs, labels.tolist()).maps,
                                       order=order, randomise=like_quantus)
    assert ours.layers == ("6", "2", "0")
    for step, layer in enumerate(ours.layers):
        np.testing.assert_allclose(ours.spearman[step].numpy(), theirs[layer], rtol=0, atol=1e-10)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert ours.spearman.mean() < 0.9  # the randomised maps do change
