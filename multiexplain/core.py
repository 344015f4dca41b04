"""The one place where class-activation-map math lives.

Every function here works on tensors of shape ``(*batch, C, *spatial)``: any number of leading
batch axes (samples ``N``, or samples and targets ``N, K``), one channel axis ``C`` (the paper's
``k`` index) and ``spatial_ndim`` spatial axes (1 for sequences, 2 for images ``H, W``, 3 for
video ``T, H, W``). Nothing detaches, leaves torch or writes into its inputs, so the maps are
differentiable whenever the activations and gradients carry a graph (double backpropagation).

The formulas are those of Chattopadhyay et al., "Grad-CAM++", WACV 2018 (eq. 19, 5, 20), see
``docs/GRADCAMPP.md``. The paper's ``Y = exp(S)`` cancels inside alpha and only rescales every
channel weight by one positive factor, so it is left out.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "grad_cam_weights",
    "grad_cam_plus_plus_alpha",
    "grad_cam_plus_plus_weights",
    "weighted_activation_map",
    "class_activation_map",
    "normalize_maps",
    "upsample_maps",
    "scale_maps",
    "MAP_SCALINGS",
]


def _spatial_layout(
    activations: Tensor, spatial_ndim: int | None, pool_axes: Sequence[int] | None
) -> tuple[int, tuple[int, ...], tuple[int, ...]]:
    """Resolve ``(spatial_ndim, pooled axes among the spatial ones, their absolute dims)``."""
    if spatial_ndim is None:
        spatial_ndim = activations.ndim - 2
    if spatial_ndim < 1 or activations.ndim < spatial_ndim + 2:
        raise ValueError(
            f"activations of shape {tuple(activations.shape)} have no spatial axes "
            f"(expected (*batch, C, *spatial) with spatial_ndim={spatial_ndim} >= 1)"
        )
    axes = range(spatial_ndim) if pool_axes is None else pool_axes
    pooled = []
    for axis in axes:
        if not -spatial_ndim <= axis < spatial_ndim:
            raise ValueError(f"pool axis {axis} is out of range for {spatial_ndim} spatial axes")
        pooled.append(axis % spatial_ndim)
    pooled = tuple(sorted(set(pooled)))
    # Negative dims, so that the same dims address tensors with extra leading (target) axes.
    return spatial_ndim, pooled, tuple(axis - spatial_ndim for axis in pooled)


def _pooled_dims(activations: Tensor, spatial_ndim: int | None, pool_axes: Sequence[int] | None) -> tuple[int, ...]:
    """Negative tensor dims of the spatial axes the channel weights are pooled over."""
    return _spatial_layout(activations, spatial_ndim, pool_axes)[2]


def _sum_over(tensor: Tensor, dims: tuple[int, ...], keepdim: bool = False) -> Tensor:
    # torch reads dim=() as "every dim": with no pooled axis (pool_axes=()) nothing is summed.
    return tensor.sum(dim=dims, keepdim=keepdim) if dims else tensor


def _compute_dtype(tensor: Tensor) -> torch.dtype:
    # g**3 overflows float16 and bfloat16 loses the alpha denominator: compute in >= float32.
    return torch.promote_types(tensor.dtype, torch.float32)


def grad_cam_weights(
    activations: Tensor,
    gradients: Tensor,
    spatial_ndim: int | None = None,
    pool_axes: Sequence[int] | None = None,
) -> Tensor:
    """Grad-CAM channel weights ``w_c = mean_p g_c(p)``.

    Args:
        activations: ``(*batch, C, *spatial)``; only its shape is used (kept for a uniform signature).
        gradients: ``dS/dA``, broadcastable to ``activations``.
        spatial_ndim: number of trailing spatial axes (default ``activations.ndim - 2``).
        pool_axes: spatial axes (0-based among the spatial ones) to average over; default all.
            ``pool_axes=(1, 2)`` on ``T, H, W`` gives one weight per channel and time slice.

    Returns:
        ``(*batch, C, *unpooled_spatial)``; ``(N, C)`` for the default call on ``(N, C, *spatial)``.
    """
    dims = _pooled_dims(activations, spatial_ndim, pool_axes)
    gradients = gradients.to(_compute_dtype(gradients))
    gradients = torch.broadcast_to(gradients, torch.broadcast_shapes(gradients.shape, activations.shape))
    return gradients.mean(dim=dims) if dims else gradients  # dim=() would average every dim


def grad_cam_plus_plus_alpha(
    activations: Tensor,
    gradients: Tensor,
    spatial_ndim: int | None = None,
    pool_axes: Sequence[int] | None = None,
) -> Tensor:
    """Grad-CAM++ pixel coefficients (paper eq. 19 with ``Y = exp(S)``).

    ``alpha_c(p) = g_c(p)^2 / (2 g_c(p)^2 + (sum_q A_c(q)) g_c(p)^3)``, where the sum of the
    activations runs over the pooled spatial axes (all of them by default: ``H, W`` for images,
    ``T, H, W`` for video) and is multiplied by ``g^3`` afterwards. ``alpha`` is 0 where ``g == 0``
    or where the denominator is 0, never NaN or inf. Shape: that of ``gradients`` broadcast with
    ``activations``, in at least float32.
    """
    dims = _pooled_dims(activations, spatial_ndim, pool_axes)
    dtype = torch.promote_types(_compute_dtype(activations), _compute_dtype(gradients))
    activations = activations.to(dtype)
    gradients = gradients.to(dtype)
    activation_sums = _sum_over(activations, dims, keepdim=True)
    # Wherever g != 0, g^2 / (2 g^2 + sum(A) g^3) = 1 / (2 + sum(A) g): the same alpha without
    # forming g^2 and g^3, which underflow to 0 (|g| < ~1e-19) or overflow to inf (|g| > ~1e12)
    # in float32 and turned alpha into 0 (a silently empty map) or NaN. The undefined set is the
    # same: g == 0, or 2 + sum(A) g == 0.
    denominator = activation_sums * gradients + 2
    undefined = (gradients == 0) | (denominator == 0)
    # A safe denominator instead of dividing by zero and masking afterwards: a NaN or inf in the
    # masked-out values still leaks NaN into the backward pass (double backprop).
    safe_denominator = denominator.masked_fill(undefined, 1.0)
    return safe_denominator.reciprocal().masked_fill(undefined, 0.0)


def grad_cam_plus_plus_weights(
    activations: Tensor,
    gradients: Tensor,
    spatial_ndim: int | None = None,
    pool_axes: Sequence[int] | None = None,
    alpha: Tensor | None = None,
) -> Tensor:
    """Grad-CAM++ channel weights ``w_c = sum_p alpha_c(p) ReLU(g_c(p))`` (paper eq. 5/20).

    Args and return shape as :func:`grad_cam_weights`; ``alpha``: the coefficients of
    :func:`grad_cam_plus_plus_alpha` for these inputs when the caller already has them.
    """
    dims = _pooled_dims(activations, spatial_ndim, pool_axes)
    if alpha is None:
        alpha = grad_cam_plus_plus_alpha(activations, gradients, spatial_ndim, pool_axes)
    return _sum_over(alpha * torch.relu(gradients.to(alpha.dtype)), dims)


def weighted_activation_map(
    activations: Tensor,
    weights: Tensor,
    spatial_ndim: int | None = None,
    pool_axes: Sequence[int] | None = None,
) -> Tensor:
    """``L = ReLU(sum_c w_c A_c)``.

    Args:
        activations: ``(*batch, C, *spatial)``.
        weights: ``(*batch', C, *unpooled_spatial)`` as returned by the weight functions, with the
            same ``spatial_ndim`` / ``pool_axes``; batch axes broadcast (e.g. ``A.unsqueeze(1)``
            against the weights of ``K`` targets per sample).
    Returns:
        ``(*broadcast batch, *spatial)``: the map at layer resolution, non-negative.
    """
    spatial_ndim, pooled, _ = _spatial_layout(activations, spatial_ndim, pool_axes)
    spatial_shape = activations.shape[activations.ndim - spatial_ndim:]
    unpooled = [axis for axis in range(spatial_ndim) if axis not in pooled]
    if not unpooled:
        # One weight per channel: a product (*batch, 1, C) @ (*batch, C, positions), one pass over
        # the activations instead of forming the (*batch, C, *spatial) weighted copy and summing it.
        flat = activations.to(weights.dtype).flatten(-spatial_ndim)
        with _without_autocast(flat.device):  # autocast would run the product in bfloat16 / float16
            combined = torch.matmul(weights.unsqueeze(-2), flat).squeeze(-2)
        return torch.relu(combined.unflatten(-1, spatial_shape))
    lead = weights.shape[: weights.ndim - 1 - len(unpooled)]
    channels = weights.shape[weights.ndim - 1 - len(unpooled)]
    # Re-insert the pooled axes as size-1 axes so the weights broadcast over them.
    weights = weights.reshape(
        *lead, channels, *(spatial_shape[axis] if axis not in pooled else 1 for axis in range(spatial_ndim))
    )
    combined = (weights * activations.to(weights.dtype)).sum(dim=-(spatial_ndim + 1))
    return torch.relu(combined)


def _without_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    try:
        enabled = torch.is_autocast_enabled(device.type)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        enabled = False
    return torch.autocast(device.type, enabled=False) if enabled else contextlib.nullcontext()


WeightFunction = Callable[[Tensor, Tensor, "int | None", "Sequence[int] | None"], Tensor]


def class_activation_map(
    activations: Tensor,
    gradients: Tensor,
    weight_fn: WeightFunction = grad_cam_plus_plus_weights,
    spatial_ndim: int | None = None,
    pool_axes: Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Channel weights and layer-resolution map in one call.

    Args:
        activations: ``(*batch, C, *spatial)``, e.g. ``(N, C, H, W)``.
        gradients: ``dS/dA``, broadcastable with ``activations``: e.g. ``(N, K, C, H, W)`` for
            ``K`` targets per sample against activations ``(N, 1, C, H, W)``.
        weight_fn: :func:`grad_cam_plus_plus_weights` (default) or :func:`grad_cam_weights`.
    Returns:
        ``(weights, map)``: weights ``(*batch, C, *unpooled_spatial)`` (``(N, C)`` by default) and
        the non-negative map ``(*batch, *spatial)``.
    """
    if not callable(weight_fn):
        raise TypeError(f"weight_fn must be a weight function such as grad_cam_weights, got {weight_fn!r}")
    weights = weight_fn(activations, gradients, spatial_ndim, pool_axes)
    return weights, weighted_activation_map(activations, weights, spatial_ndim, pool_axes)


def normalize_maps(maps: Tensor, spatial_ndim: int) -> Tensor:
    """Min-max normalise every map to ``[0, 1]`` over its last ``spatial_ndim`` axes.

    A constant map (all zero after the ReLU, say) becomes all zeros, never NaN.
    """
    dims = tuple(range(maps.ndim - spatial_ndim, maps.ndim))
    low = maps.amin(dim=dims, keepdim=True)
    span = maps.amax(dim=dims, keepdim=True) - low
    flat = span <= 0
    return torch.where(flat, torch.zeros_like(maps), (maps - low) / torch.where(flat, torch.ones_like(span), span))


#: How :func:`scale_maps` can scale a map before two maps are compared (a distillation loss, a metric).
MAP_SCALINGS = ("none", "minmax", "l2", "max")


def scale_maps(maps: Tensor, spatial_ndim: int, scaling: str = "minmax") -> Tensor:
    """Scale every map ``(*batch, *spatial)`` over its last ``spatial_ndim`` axes.

    ``"minmax"``: to ``[0, 1]`` (:func:`normalize_maps`); ``"l2"``: unit L2 norm (as attention
    transfer does); ``"max"``: divided by its maximum; ``"none"``: unchanged. An all-zero map stays
    all zero under every scaling, never NaN.
    """
    if scaling == "none":
        return maps
    if scaling == "minmax":
        return normalize_maps(maps, spatial_ndim)
    flat = maps.flatten(-spatial_ndim)
    if scaling == "l2":
        size = flat.norm(dim=-1, keepdim=True)
    elif scaling == "max":
        size = flat.amax(dim=-1, keepdim=True)
    else:
        raise ValueError(f"unknown map scaling {scaling!r}; choose one of {MAP_SCALINGS}")
    # Divide where the size is positive; a safe divisor keeps the backward pass NaN-free too.
    positive = size > 0
    scaled = torch.where(positive, flat / torch.where(positive, size, torch.ones_like(size)), torch.zeros_like(flat))
    return scaled.view_as(maps)


_INTERPOLATION = {1: "linear", 2: "bilinear", 3: "trilinear"}


def upsample_maps(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Resize maps ``(*batch, *spatial)`` to ``size`` (linear / bilinear / trilinear).

    ``len(size)`` is the number of spatial axes. ``align_corners=False`` as in the usual
    image resize, so the map's cells stay centred on the input pixels they cover.
    """
    size = tuple(int(s) for s in size)
    spatial_ndim = len(size)
    if spatial_ndim not in _INTERPOLATION:
        raise ValueError(f"can only upsample 1 to 3 spatial axes, got size {size}")
    if tuple(maps.shape[-spatial_ndim:]) == size:
        return maps
    lead = maps.shape[:-spatial_ndim]
    flat = maps.reshape(-1, 1, *maps.shape[-spatial_ndim:])
    resized = F.interpolate(flat, size=size, mode=_INTERPOLATION[spatial_ndim], align_corners=False)
    return resized.reshape(*lead, *size)
