"""The functional core against independent float64 references (1D, 2D and 3D spatial axes)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from multiexplain import core


def reference_gradcampp(activations: torch.Tensor, gradients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Paper eq. 19/20 written element by element in float64, for (N, C, *spatial)."""
    a = activations.double()
    g = gradients.double()
    n, c = a.shape[:2]
    positions = list(itertools.product(*(range(s) for s in a.shape[2:])))
    weights = torch.zeros(n, c, dtype=torch.float64)
    for i in range(n):
        for k in range(c):
            total = sum(a[i, k][p].item() for p in positions)
            w = 0.0
            for p in positions:
                gp = g[i, k][p].item()
                denominator = 2 * gp**2 + total * gp**3
                alpha = 0.0 if gp == 0 or denominator == 0 else gp**2 / denominator
                w += alpha * max(gp, 0.0)
            weights[i, k] = w
    cam = torch.zeros(n, *a.shape[2:], dtype=torch.float64)
    for i in range(n):
        for p in positions:
            cam[i][p] = max(0.0, sum(weights[i, k].item() * a[i, k][p].item() for k in range(c)))
    return weights, cam


def reference_gradcam(activations: torch.Tensor, gradients: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    a, g = activations.double(), gradients.double()
    weights = torch.stack([torch.stack([g[i, k].mean() for k in range(a.shape[1])]) for i in range(a.shape[0])])
    cam = torch.relu(torch.einsum("nc,nc...->n...", weights, a))
    return weights, cam


SPATIAL_SHAPES = [(7,), (4, 5), (3, 4, 5)]


@pytest.mark.parametrize("spatial", SPATIAL_SHAPES, ids=["1d", "2d", "3d"])
def test_gradcampp_matches_float64_reference(spatial):
    gen = torch.Generator().manual_seed(len(spatial))
    a = torch.rand(2, 3, *spatial, generator=gen, dtype=torch.float64) * 2
    g = torch.randn(2, 3, *spatial, generator=gen, dtype=torch.float64)
    g[0, 0] = 0  # a channel with no gradient at all
    g[1, 1].view(-1)[::2] = 0  # scattered zeros
    weights, cam = core.class_activation_map(a, g, core.grad_cam_plus_plus_weights)
    ref_weights, ref_cam = reference_gradcampp(a, g)
    assert weights.shape == (2, 3) and cam.shape == (2, *spatial)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cam, ref_cam, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("spatial", SPATIAL_SHAPES, ids=["1d", "2d", "3d"])
def test_gradcam_matches_float64_reference(spatial):
    gen = torch.Generator().manual_seed(10 + len(spatial))
    a = torch.rand(2, 4, *spatial, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 4, *spatial, generator=gen, dtype=torch.float64)
    weights, cam = core.class_activation_map(a, g, core.grad_cam_weights)
    ref_weights, ref_cam = reference_gradcam(a, g)
    torch.testing.assert_close(weights, ref_weights)
    torch.testing.assert_close(cam, ref_cam)


def test_zero_denominator_and_zero_gradient_give_zero_alpha_not_nan():
    # Activation sum s and gradient g with 2 g^2 + s g^3 = 0  <=>  s g = -2.
    a = torch.tensor([[[-1.0, -1.0]]], dtype=torch.float64)  # s = -2
    g = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)  # g=1 -> denominator 0; g=0 -> 0/0
    alpha = core.grad_cam_plus_plus_alpha(a, g)
    assert torch.equal(alpha, torch.zeros_like(alpha))
    weights, cam = core.class_activation_map(a, g)
    assert torch.isfinite(weights).all() and torch.isfinite(cam).all()
    zeros = torch.zeros(1, 2, 3, 3)
    weights, cam = core.class_activation_map(torch.rand(1, 2, 3, 3), zeros)
    assert torch.equal(cam, torch.zeros(1, 3, 3)) and torch.equal(weights, torch.zeros(1, 2))
    assert torch.equal(core.normalize_maps(cam, 2), torch.zeros(1, 3, 3))


def test_denominator_uses_spatial_sum_of_activations_times_g_cubed():
    """The paper's alpha uses (sum_q A(q)) * g(p)^3, not sum_q A(q) g(q)^3 (torchcam/M3d-CAM)."""
    a = torch.tensor([[[1.0, 3.0]]], dtype=torch.float64)
    g = torch.tensor([[[0.5, 2.0]]], dtype=torch.float64)
    alpha = core.grad_cam_plus_plus_alpha(a, g)
    expected = torch.tensor([[[0.25 / (0.5 + 4 * 0.125), 4.0 / (8.0 + 4 * 8.0)]]], dtype=torch.float64)
    torch.testing.assert_close(alpha, expected)


def test_per_slice_weights_equal_independent_slices():
    """pool_axes=(1, 2) on (T, H, W) = explaining every time slice as its own 2D map."""
    gen = torch.Generator().manual_seed(3)
    a = torch.rand(2, 3, 4, 5, 6, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 4, 5, 6, generator=gen, dtype=torch.float64)
    weights, cam = core.class_activation_map(a, g, pool_axes=(1, 2))
    assert weights.shape == (2, 3, 4) and cam.shape == (2, 4, 5, 6)
    for t in range(4):
        w_t, cam_t = reference_gradcampp(a[:, :, t], g[:, :, t])
        torch.testing.assert_close(weights[:, :, t], w_t)
        torch.testing.assert_close(cam[:, t], cam_t)


def test_no_pooled_axis_weighs_every_position_by_its_own_gradient():
    """pool_axes=() pools nothing (torch reads dim=() as every dim, which once averaged the gradients
    over the batch and channels too): Grad-CAM's weights are the gradients themselves (HiResCAM), and
    Grad-CAM++'s alpha sums the activations over no position, 1 / (2 + A g) elementwise, against
    float64 loops; the maps are ReLU(sum_c w_c A_c) at every position."""
    gen = torch.Generator().manual_seed(5)
    a = torch.rand(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    g = torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64)
    weights, cam = core.class_activation_map(a, g, pool_axes=(), weight_fn=core.grad_cam_weights)
    assert weights.shape == (2, 3, 4, 5)
    torch.testing.assert_close(weights, g)
    torch.testing.assert_close(cam, torch.relu((a * g).sum(dim=1)))
    weights, cam = core.class_activation_map(a, g, pool_axes=())
    expected = torch.empty_like(g)
    for index in itertools.product(*map(range, g.shape)):
        gradient, activation = float(g[index]), float(a[index])
        alpha = gradient ** 2 / (2 * gradient ** 2 + activation * gradient ** 3)
        expected[index] = alpha * max(gradient, 0.0)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(cam, torch.relu((a * expected).sum(dim=1)))


def test_multi_target_broadcasting_equals_separate_calls():
    gen = torch.Generator().manual_seed(4)
    a = torch.rand(2, 3, 4, 4, generator=gen)
    g = torch.randn(2, 5, 3, 4, 4, generator=gen)
    weights, cam = core.class_activation_map(a.unsqueeze(1), g, spatial_ndim=2)
    assert weights.shape == (2, 5, 3) and cam.shape == (2, 5, 4, 4)
    for k in range(5):
        w_k, cam_k = core.class_activation_map(a, g[:, k])
        torch.testing.assert_close(weights[:, k], w_k)
        torch.testing.assert_close(cam[:, k], cam_k)


def test_core_is_differentiable_and_leaves_inputs_untouched():
    a = torch.rand(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    g = torch.randn(1, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    a_before, g_before = a.detach().clone(), g.detach().clone()
    _, cam = core.class_activation_map(a, g)
    assert cam.requires_grad
    assert torch.autograd.gradcheck(lambda x, y: core.class_activation_map(x, y)[1], (a, g))
    assert torch.equal(a.detach(), a_before) and torch.equal(g.detach(), g_before)


def test_half_precision_inputs_are_computed_in_float32():
    a = torch.rand(1, 4, 5, 5).half() * 50
    g = (torch.randn(1, 4, 5, 5) * 100).half()  # g^3 overflows float16
    weights, cam = core.class_activation_map(a, g)
    assert weights.dtype == torch.float32 and torch.isfinite(cam).all()
    ref_w, ref_cam = reference_gradcampp(a.float(), g.float())
    torch.testing.assert_close(weights.double(), ref_w, rtol=1e-4, atol=1e-6)


def test_upsample_and_normalise():
    maps = torch.tensor([[[0.0, 2.0], [4.0, 6.0]]])
    up = core.upsample_maps(maps, (4, 4))
    assert up.shape == (1, 4, 4)
    norm = core.normalize_maps(up, 2)
    assert norm.min() == 0 and norm.max() == 1
    video = core.upsample_maps(torch.rand(2, 3, 2, 2), (6, 8, 8))
    assert video.shape == (2, 6, 8, 8)
    assert core.upsample_maps(torch.rand(2, 5), (9,)).shape == (2, 9)
    with pytest.raises(ValueError, match="spatial"):
        core.class_activation_map(torch.rand(2, 3), torch.rand(2, 3))
    with pytest.raises(TypeError, match="weight function"):
        core.class_activation_map(torch.rand(1, 2, 3), torch.rand(1, 2, 3), "gradcam++")


def test_closed_form_equals_general_formula_with_true_higher_derivatives():
    """Paper eq. 10 with autograd's true diagonal 2nd/3rd derivatives of Y = exp(S) equals the
    closed form (eq. 19) on a piecewise-linear head, with weights scaled by exactly exp(S)."""
    torch.manual_seed(0)
    c, h, w = 2, 3, 3
    head = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(c * h * w, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1)
    ).double()
    a = torch.rand(1, c, h, w, dtype=torch.float64, requires_grad=True)

    y = torch.exp(head(a).squeeze())
    (dy,) = torch.autograd.grad(y, a, create_graph=True)
    d2 = torch.zeros_like(a)
    d3 = torch.zeros_like(a)
    flat_dy = dy.reshape(-1)
    for i in range(flat_dy.numel()):
        (row,) = torch.autograd.grad(flat_dy[i], a, create_graph=True)
        second = row.reshape(-1)[i]
        d2.view(-1)[i] = second.detach()
        (third_row,) = torch.autograd.grad(second, a, retain_graph=True)
        d3.view(-1)[i] = third_row.reshape(-1)[i]
    total = a.detach().sum(dim=(2, 3), keepdim=True)
    alpha_general = d2 / (2 * d2 + total * d3)
    weights_general = (alpha_general * torch.relu(dy.detach())).sum(dim=(2, 3))

    s = head(a).squeeze()
    (g,) = torch.autograd.grad(s, a)
    weights_closed, cam_closed = core.class_activation_map(a.detach(), g)
    assert weights_closed.abs().max() > 0
    torch.testing.assert_close(weights_general, weights_closed * math.exp(s.item()), rtol=1e-9, atol=1e-12)
    cam_general = torch.relu((weights_general[..., None, None] * a.detach()).sum(1))
    torch.testing.assert_close(core.normalize_maps(cam_general, 2), core.normalize_maps(cam_closed, 2))


# -- precision and resampling, checked against bounds and references that do not come from measurements --

U32 = 2.0**-24  # unit roundoff of float32: every float32 +, *, / errs by at most this relative amount


def float32_error_bound(a: torch.Tensor, g: torch.Tensor, method: str) -> torch.Tensor:
    """A bound, per pixel, on ``|L_float32 - L_exact|`` for ``(N, C, *spatial)`` activations ``a >= 0``.

    Standard forward error analysis (Higham, *Accuracy and Stability of Numerical Algorithms*, ch. 3-4):
    a sum of ``n`` terms in any order errs by at most ``n u sum|terms|``, a product or quotient by ``u``.
    With ``a >= 0``, Grad-CAM++'s ``2 + s g`` (``s = sum_p a``) is a sum of non-negative terms wherever
    ``g > 0`` (the only positions ``ReLU(g)`` keeps), so alpha errs by at most ``(P + 3) u`` relatively
    and ``w_c = sum_p alpha ReLU(g)`` by ``(2P + 4) u w_c``; Grad-CAM's mean by ``(P + 1) u mean|g|``.
    The map ``ReLU(sum_c w_c a_c)`` then errs by ``sum_c |dw_c| a_c + (C + 1) u sum_c |w_c| a_c``. The
    factor 2 covers the second-order terms. Nothing here is fitted to measured errors.
    """
    a, g = a.double(), g.double()
    spatial = tuple(range(2, a.ndim))
    positions, channels = math.prod(a.shape[2:]), a.shape[1]
    if method == "gradcam++":
        alpha = core.grad_cam_plus_plus_alpha(a, g)
        w = (alpha * g.clamp(min=0)).sum(dim=spatial)
        dw = (2 * positions + 4) * U32 * w.abs()
    else:
        w = g.mean(dim=spatial)
        dw = (positions + 1) * U32 * g.abs().mean(dim=spatial)
    expand = (...,) + (None,) * len(spatial)
    bound = (dw[expand] * a).sum(1) + (channels + 1) * U32 * (w.abs()[expand] * a).sum(1)
    return 2 * bound


@pytest.mark.parametrize("method", ["gradcam++", "gradcam"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_tensors_are_computed_to_float32_precision(dtype, method):
    """bfloat16 / float16 activations and gradients (autocast's) must be computed in >= float32: their map
    equals the exact (float64) map of the same values to within the float32 bound above. Computing in
    bfloat16 (u = 2^-8) errs ~65,000 times more and fails it."""
    weight_fn = core.grad_cam_plus_plus_weights if method == "gradcam++" else core.grad_cam_weights
    reference = reference_gradcampp if method == "gradcam++" else reference_gradcam
    gen = torch.Generator().manual_seed(7)
    for spatial in SPATIAL_SHAPES:
        a = (torch.rand(3, 6, *spatial, generator=gen) * 4).relu().to(dtype)  # post-ReLU, exactly representable
        g = (torch.randn(3, 6, *spatial, generator=gen) * 0.3).to(dtype)
        _, low = core.class_activation_map(a, g, weight_fn)
        _, exact = reference(a, g)  # independent of core: a core computing in bfloat16 cannot move it
        error = (low.double() - exact).abs()
        bound = float32_error_bound(a, g, method)
        assert (error <= bound).all(), f"{spatial}: error {error.max():.3g} exceeds the float32 bound {bound.max():.3g}"
        assert exact.amax() > 0 and bound.amax() < 1e-4 * exact.amax()  # the bound is tight enough to mean something


def reference_resize(values: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Linear interpolation with half-pixel centres, one axis at a time, written out in float64: output
    pixel ``j`` of ``n_out`` samples the input at ``x = (j + 0.5) n_in / n_out - 0.5``, clamped to
    ``[0, n_in - 1]`` (the image-resize convention, ``align_corners=False``)."""
    result = values.double()
    for axis, n_out in enumerate(size):
        dim = result.ndim - len(size) + axis
        n_in = result.shape[dim]
        slices = []
        for j in range(n_out):
            x = min(max((j + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
            low = int(math.floor(x))
            high = min(low + 1, n_in - 1)
            t = x - low
            slices.append((1 - t) * result.select(dim, low) + t * result.select(dim, high))
        result = torch.stack(slices, dim=dim)
    return result


@pytest.mark.parametrize("shape, size", [((2, 3), (8,)), ((2, 2, 3), (5, 7)), ((1, 3, 4), (12, 16)),
                                          ((2, 2, 3, 2), (4, 7, 5))], ids=["1d", "2d", "2d-x4", "3d"])
def test_upsampled_values_equal_half_pixel_linear_interpolation(shape, size):
    """The values of the upsampled maps, in 1-D, 2-D and 3-D (``align_corners=True`` stretches the grid
    so the corners coincide instead, which moves every interior value)."""
    maps = torch.rand(*shape, generator=torch.Generator().manual_seed(len(size)), dtype=torch.float64)
    up = core.upsample_maps(maps, size)
    assert up.shape == (shape[0], *size)
    torch.testing.assert_close(up, reference_resize(maps, size), rtol=1e-12, atol=1e-12)
    # By hand, 2 -> 4 cells: [a, 0.75 a + 0.25 b, 0.25 a + 0.75 b, b].
    torch.testing.assert_close(core.upsample_maps(torch.tensor([[0.0, 4.0]], dtype=torch.float64), (4,)),
                               torch.tensor([[0.0, 1.0, 3.0, 4.0]], dtype=torch.float64))


@pytest.mark.parametrize("method", ["gradcam++", "gradcam"])
def test_autocast_explanations_are_computed_to_float32_precision(method):
    """Under ``torch.autocast("cpu", bfloat16)`` the layer's output and gradient are bfloat16; the explainer's
    raw map must be the exact map of exactly those values to within the float32 bound (the comparison with a
    float32 model in test_properties.py mixes in the bfloat16 forward's own error, which no bound covers)."""
    from multiexplain import GradCAM, GradCAMPlusPlus

    torch.manual_seed(0)
    features = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU())
    head = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(8, 4))
    model = torch.nn.Sequential(features, head).eval()
    x = torch.randn(3, 3, 12, 12)
    targets = [0, 2, 3]
    captured = {}
    handle = features.register_forward_hook(lambda _m, _a, out: captured.__setitem__("a", out.detach()))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            explanation = (GradCAMPlusPlus if method == "gradcam++" else GradCAM)(model, "0")(x, targets)
            a = captured["a"].requires_grad_(True)
            (g,) = torch.autograd.grad(head(a)[torch.arange(3), targets].sum(), a)
    finally:
        handle.remove()
    assert a.dtype == g.dtype == torch.bfloat16, "autocast must be in effect at the layer"
    _, exact = (reference_gradcampp if method == "gradcam++" else reference_gradcam)(a.detach(), g)  # float64, not core
    error = (explanation.raw.double() - exact).abs()
    bound = float32_error_bound(a.detach(), g, method)
    assert (error <= bound).all(), f"error {error.max():.3g} exceeds the float32 bound {bound.max():.3g}"
    assert exact.amax() > 0
