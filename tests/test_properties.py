"""Property tests of the functional core (``multiexplain.core``) with Hypothesis, and autocast.

Inputs are drawn as ``(N, C, *spatial)`` with 1-3 spatial axes, gradients that are random, all zero,
all negative, sparse or constant, magnitudes from 1e-15 to 1e15 (activations and gradients scaled
separately) and float16 / bfloat16 / float32 / float64 dtypes (values are made representable in
the dtype first). The properties:

* never NaN or inf, in channel weights, raw maps or normalised maps; raw maps >= 0; normalised
  maps in [0, 1]; the compute dtype is at least float32 (float64 stays float64);
* the normalised Grad-CAM map is invariant to a positive scaling of the score (``g -> c g``);
  Grad-CAM++ is not (``alpha = 1 / (2 + sum(A) g)`` depends on the scale of ``g``), but it is
  invariant to re-scaling the layer (``A -> c A, g -> g / c``), which is what it promises;
* Grad-CAM++ equals Grad-CAM when alpha is uniform (every channel's activations sum to zero, so
  alpha = 1/2 everywhere, and positive gradients): weights differ by exactly ``P / 2``;
* all-zero or all-negative gradients give all-zero maps (not NaN), and the zero maps normalise to 0.

Explaining under ``torch.autocast("cpu", dtype=torch.bfloat16)`` matches float32 to within the
tolerance stated in :data:`AUTOCAST_TOLERANCE`.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from multiexplain import GradCAM, GradCAMPlusPlus, core

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
GRADIENT_KINDS = ["random", "zero", "negative", "positive", "sparse", "constant"]
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


pytestmark = pytest.mark.usefixtures("one_torch_thread")

@st.composite
def cam_inputs(draw, dtypes=DTYPES, kinds=GRADIENT_KINDS, exponent_range=(-15, 15)):
    """``(activations, gradients, spatial_ndim, kind)`` as described in the module docstring."""
    spatial_ndim = draw(st.integers(1, 3))
    shape = (
        draw(st.integers(1, 3)),
        draw(st.integers(1, 4)),
        *(draw(st.integers(1, 5)) for _ in range(spatial_ndim)),
    )
    dtype = draw(st.sampled_from(dtypes))
    kind = draw(st.sampled_from(kinds))
    seed = draw(st.integers(0, 2**31 - 1))
    low, high = exponent_range
    if dtype == torch.float16:  # float16 holds only about 6e-8 .. 6.5e4
        low, high = max(low, -3), min(high, 3)
    a_scale = 10.0 ** draw(st.integers(low, high))
    g_scale = 10.0 ** draw(st.integers(low, high))
    generator = torch.Generator().manual_seed(seed)
    activations = torch.randn(shape, generator=generator, dtype=torch.float64)
    if draw(st.booleans()):
        activations = activations.relu()  # post-ReLU layers: non-negative activations
    gradients = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "zero":
        gradients = torch.zeros_like(gradients)
    elif kind == "negative":
        gradients = -gradients.abs() - 0.1
    elif kind == "positive":
        gradients = gradients.abs() + 0.1
    elif kind == "sparse":
        gradients = gradients * (torch.rand(shape, generator=generator, dtype=torch.float64) < 0.2)
    elif kind == "constant":
        gradients = gradients.flatten(2)[..., :1].expand_as(gradients.flatten(2)).reshape(shape).clone()
    return (activations * a_scale).to(dtype), (gradients * g_scale).to(dtype), spatial_ndim, kind


def _all_finite(*tensors: torch.Tensor) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@SETTINGS
@given(cam_inputs(), st.sampled_from([core.grad_cam_weights, core.grad_cam_plus_plus_weights]))
def test_maps_are_finite_non_negative_and_normalise_to_unit_range(inputs, method):
    activations, gradients, spatial_ndim, kind = inputs
    weights, raw = core.class_activation_map(activations, gradients, method, spatial_ndim)
    maps = core.normalize_maps(raw, spatial_ndim)
    assert _all_finite(weights, raw, maps), f"non-finite output for {kind} gradients, {activations.dtype}"
    assert raw.dtype == (torch.float64 if activations.dtype == torch.float64 else torch.float32)
    assert raw.shape == activations.shape[:1] + activations.shape[2:]
    assert weights.shape == activations.shape[:2]
    assert bool((raw >= 0).all()) and bool((maps >= 0).all()) and bool((maps <= 1).all())
    if kind in ("zero", "negative") and method is core.grad_cam_plus_plus_weights:
        # ReLU(g) = 0 everywhere: no positive evidence, an all-zero map (Grad-CAM's mean of
        # all-negative gradients is negative too, so its map is zero as well).
        assert not raw.any() and not maps.any()
    if kind == "zero":
        assert not raw.any() and not maps.any()
    upsampled = core.upsample_maps(raw, [s + 2 for s in raw.shape[1:]])
    assert _all_finite(upsampled) and bool((upsampled >= 0).all())


@SETTINGS
@given(cam_inputs(dtypes=[torch.float32]), st.sampled_from([core.grad_cam_weights, core.grad_cam_plus_plus_weights]))
def test_float32_map_agrees_with_float64_at_every_magnitude(inputs, method):
    """Gradients of 1e-15 or 1e15 must not underflow or overflow into an empty or NaN map (alpha
    written as g^2 / (2 g^2 + sum(A) g^3) did both in float32)."""
    activations, gradients, spatial_ndim, _ = inputs
    _, single = core.class_activation_map(activations, gradients, method, spatial_ndim)
    _, double = core.class_activation_map(activations.double(), gradients.double(), method, spatial_ndim)
    scale = float(double.abs().max())
    assert _all_finite(single)
    # Relative to the map's own peak; cancellation in sum_c w_c A_c limits float32 to ~1e-4 of it.
    assert float((single.double() - double).abs().max()) <= 1e-3 * scale + 1e-300


@SETTINGS
@given(cam_inputs(dtypes=[torch.float32, torch.float64]), st.sampled_from([core.grad_cam_weights, core.grad_cam_plus_plus_weights]))
def test_alpha_is_finite_and_zero_where_undefined(inputs, method):
    activations, gradients, spatial_ndim, _ = inputs
    alpha = core.grad_cam_plus_plus_alpha(activations, gradients, spatial_ndim)
    assert _all_finite(alpha)
    assert not alpha[gradients == 0].any(), "alpha must be 0 where g == 0"


@SETTINGS
@given(cam_inputs(dtypes=[torch.float64], kinds=["random", "positive", "sparse"], exponent_range=(-6, 6)),
       st.floats(1e-3, 1e3))
def test_normalised_grad_cam_map_is_invariant_to_scaling_the_score(inputs, scale):
    activations, gradients, spatial_ndim, _ = inputs
    _, raw = core.class_activation_map(activations, gradients, core.grad_cam_weights, spatial_ndim)
    _, scaled = core.class_activation_map(activations, gradients * scale, core.grad_cam_weights, spatial_ndim)
    torch.testing.assert_close(
        core.normalize_maps(scaled, spatial_ndim), core.normalize_maps(raw, spatial_ndim), atol=1e-9, rtol=1e-7
    )


@SETTINGS
@given(cam_inputs(dtypes=[torch.float64], kinds=["random", "positive", "sparse"], exponent_range=(-6, 6)),
       st.floats(1e-3, 1e3), st.sampled_from([core.grad_cam_weights, core.grad_cam_plus_plus_weights]))
def test_normalised_map_is_invariant_to_rescaling_the_layer(inputs, scale, method):
    """A -> c A with g -> g / c (the same network, its layer output re-scaled): the same map."""
    activations, gradients, spatial_ndim, _ = inputs
    _, raw = core.class_activation_map(activations, gradients, method, spatial_ndim)
    _, rescaled = core.class_activation_map(activations * scale, gradients / scale, method, spatial_ndim)
    torch.testing.assert_close(rescaled, raw, atol=1e-9 * float(raw.abs().max() + 1e-300), rtol=1e-7)
    torch.testing.assert_close(
        core.normalize_maps(rescaled, spatial_ndim), core.normalize_maps(raw, spatial_ndim), atol=1e-9, rtol=1e-7
    )


def test_grad_cam_plus_plus_is_not_invariant_to_scaling_the_score():
    """Stated, not hidden: with Y = exp(S), alpha = 1 / (2 + sum(A) g) changes with the scale of S."""
    activations = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)  # (1, C=2, 3)
    gradients = torch.tensor([[[1.0, 1.0, 1.0], [3.0, 0.0, 0.0]]], dtype=torch.float64)
    maps = [core.normalize_maps(core.class_activation_map(activations, gradients * c)[1], 1) for c in (1e-3, 1e3)]
    assert (maps[0] - maps[1]).abs().max() > 0.1


@SETTINGS
@given(cam_inputs(dtypes=[torch.float64], kinds=["positive"], exponent_range=(-5, 5)))
def test_grad_cam_plus_plus_equals_grad_cam_when_alpha_is_uniform(inputs):
    activations, gradients, spatial_ndim, _ = inputs
    dims = tuple(range(2, activations.ndim))
    centred = activations - activations.mean(dim=dims, keepdim=True)  # sum_p A_c(p) = 0: alpha = 1/2
    alpha = core.grad_cam_plus_plus_alpha(centred, gradients, spatial_ndim)
    torch.testing.assert_close(alpha, torch.full_like(alpha, 0.5), atol=1e-3, rtol=1e-3)
    positions = math.prod(activations.shape[2:])
    plus_plus, map_pp = core.class_activation_map(centred, gradients, core.grad_cam_plus_plus_weights, spatial_ndim)
    plain, map_gc = core.class_activation_map(centred, gradients, core.grad_cam_weights, spatial_ndim)
    torch.testing.assert_close(plus_plus, plain * positions / 2, rtol=2e-3, atol=1e-30)
    torch.testing.assert_close(
        core.normalize_maps(map_pp, spatial_ndim), core.normalize_maps(map_gc, spatial_ndim), atol=2e-3, rtol=2e-3
    )


@SETTINGS
@given(cam_inputs(dtypes=[torch.float16, torch.bfloat16], kinds=["random", "positive"], exponent_range=(-2, 2)))
def test_low_precision_inputs_match_their_float64_values(inputs):
    """float16 / bfloat16 tensors are computed in float32, so they give the map of their exact values."""
    activations, gradients, spatial_ndim, _ = inputs
    _, low = core.class_activation_map(activations, gradients, core.grad_cam_plus_plus_weights, spatial_ndim)
    _, exact = core.class_activation_map(activations.double(), gradients.double(), core.grad_cam_plus_plus_weights, spatial_ndim)
    assert low.dtype == torch.float32
    scale = float(exact.abs().max()) + 1e-30
    assert float((low.double() - exact).abs().max()) <= 1e-4 * scale


# ---- autocast --------------------------------------------------------------------------------

# bfloat16 keeps 8 significant bits (~0.4% per value). On min-max normalised maps of this model,
# over 10 seeds, the largest differences measured were 0.005 (Grad-CAM++) and 0.018 (Grad-CAM) per
# pixel, and at most 0.0013 on average; the stated tolerance leaves about 3x room.
AUTOCAST_TOLERANCE = {"max_abs": 0.05, "mean_abs": 0.005}


class SmallCNN(nn.Module):
    def __init__(self, classes: int = 4):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@pytest.mark.parametrize("explainer_class", [GradCAMPlusPlus, GradCAM])
def test_autocast_bfloat16_matches_float32(explainer_class):
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(4, 3, 32, 32)
    reference = explainer_class(model, "features")(x, targets=[0, 1, 2, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = explainer_class(model, "features")(x, targets=[0, 1, 2, 3])
    assert mixed.scores.dtype == torch.bfloat16, "autocast must actually be in effect"
    assert mixed.maps.dtype == torch.float32 and _all_finite(mixed.maps, mixed.raw, mixed.weights)
    difference = (mixed.maps - reference.maps).abs()
    assert float(difference.max()) <= AUTOCAST_TOLERANCE["max_abs"]
    assert float(difference.mean()) <= AUTOCAST_TOLERANCE["mean_abs"]
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("magnitude", [1e-30, 1e-20, 1e15, 1e20, 1e30])
def test_extreme_gradient_magnitudes_regression(magnitude):
    """The float32 cases that once gave an empty map (1e15) or NaN (1e20, 1e30): channel 1 carries the
    only activation, every gradient is ``magnitude``; the map must be channel 1's pattern."""
    activations = torch.zeros(1, 2, 3, 3)
    activations[0, 1, 1:, :2] = 1.0
    gradients = torch.full((1, 2, 3, 3), magnitude)
    _, raw = core.class_activation_map(activations, gradients)
    assert _all_finite(raw)
    torch.testing.assert_close(core.normalize_maps(raw, 2), activations[:, 1])
