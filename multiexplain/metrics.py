"""Quality metrics for class activation maps, for 1, 2 or 3 spatial axes alike.

Axis conventions (every function here):

* ``maps``: ``(N, *spatial)`` float, one map per sample, non-negative (the explainers return
  them min-max normalised to ``[0, 1]``); ``spatial`` is ``(L,)``, ``(H, W)`` or ``(T, H, W)``.
* ``masks``: ``(N, *spatial)`` bool, the ground-truth region of the explained class in each
  sample, the same spatial shape as the maps (2D boxes convert with :func:`boxes_to_masks`).
* ``inputs``: ``(N, C, *spatial)``, channels-first, the same spatial shape as the maps; a map
  value multiplies every channel of its pixel (or voxel).
* ``targets``: ``(N,)`` class indices, one per sample (flatten ``(N, K)`` targets to ``N * K``
  samples by repeating the inputs).

Faithfulness metrics follow Chattopadhyay et al., "Grad-CAM++" (WACV 2018), section 4 and
eq. 25-26 (see ``docs/GRADCAMPP.md``); pointing game (Zhang et al. 2016), energy-based pointing
game (Wang et al., Score-CAM 2020) and deletion / insertion AUC (Petsiuk et al., RISE 2018) are
the usual additions. Degenerate cases never give NaN: each docstring states the value an empty
map or an empty mask gets.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import core
from .explain.targets import call_model, model_logits

__all__ = [
    "per_sample_drop",
    "average_drop",
    "increase_in_confidence",
    "win_percent",
    "explanation_inputs",
    "class_probabilities",
    "confidences",
    "localization",
    "pointing_game",
    "energy_pointing_game",
    "multi_instance_coverage",
    "deletion_curve",
    "insertion_curve",
    "deletion_auc",
    "insertion_auc",
    "curve_auc",
    "boxes_to_masks",
    "box_blur",
    "map_correlation",
]

Score = Union[str, Callable[[Any], Tensor]]
Baseline = Union[str, float, Tensor]


# -- checks ---------------------------------------------------------------------------------

def _check_maps(maps: Tensor, name: str = "maps") -> None:
    if not isinstance(maps, Tensor):
        raise TypeError(f"{name} must be a tensor (N, *spatial), got {type(maps).__name__}")
    if maps.ndim not in (2, 3, 4):
        raise ValueError(f"{name} must be (N, *spatial) with 1 to 3 spatial axes, got shape {tuple(maps.shape)}")
    if not maps.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {maps.dtype}")
    if torch.isnan(maps).any():
        raise ValueError(f"{name} contain NaN")


def _check_pair(maps: Tensor, masks: Tensor) -> Tensor:
    """Validate ``maps`` / ``masks`` and return the masks as bool on the maps' device."""
    _check_maps(maps)
    if not isinstance(masks, Tensor):
        raise TypeError(f"masks must be a bool tensor (N, *spatial), got {type(masks).__name__}")
    if tuple(masks.shape) != tuple(maps.shape):
        raise ValueError(
            f"masks {tuple(masks.shape)} must have the maps' shape {tuple(maps.shape)} (N, *spatial); "
            "upsample the maps to the mask size (multiexplain.core.upsample_maps) or convert boxes with boxes_to_masks"
        )
    if masks.dtype != torch.bool:
        if masks.is_floating_point() and not ((masks == 0) | (masks == 1)).all():
            raise ValueError("masks must be boolean (or 0/1 valued)")
        masks = masks != 0
    return masks.to(maps.device)


def _check_inputs(inputs: Tensor, maps: Tensor) -> None:
    _check_maps(maps)
    if not isinstance(inputs, Tensor) or inputs.ndim != maps.ndim + 1:
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be (N, C, *spatial) for maps {tuple(maps.shape)}, got {shape}")
    if inputs.shape[0] != maps.shape[0] or tuple(inputs.shape[2:]) != tuple(maps.shape[1:]):
        raise ValueError(
            f"inputs {tuple(inputs.shape)} and maps {tuple(maps.shape)} disagree: expected inputs (N, C, *spatial) "
            "and maps (N, *spatial) with the same N and spatial size (Explanation.maps already are)"
        )


def _flat(tensor: Tensor) -> Tensor:
    return tensor.reshape(tensor.shape[0], -1)


def _minmax(maps: Tensor) -> Tensor:
    """Per-sample min-max normalisation of ``(N, *spatial)`` in at least float32; a constant map becomes all zeros."""
    return core.normalize_maps(maps.to(torch.promote_types(maps.dtype, torch.float32)), maps.ndim - 1)


# -- confidence-based metrics (paper section 4) ----------------------------------------------

def per_sample_drop(full: Tensor, explained: Tensor, clip: bool = True) -> Tensor:
    """Per-sample confidence drop in percent: ``100 * max(0, Y - O) / Y``.

    Args:
        full: ``Y``, ``(N,)`` confidence for the class on the full input.
        explained: ``O``, ``(N,)`` confidence on the explanation input ``E`` (eq. 25).
        clip: ``False`` gives the signed relative fall ``100 * (Y - O) / Y`` (negative where the
            confidence rose), which is what :func:`win_percent` should compare so that two methods
            that both raise the confidence are still ranked.
    Returns:
        ``(N,)`` float. A sample with ``Y <= 0`` gets 0 (there is no confidence to lose).
    """
    full, explained = torch.as_tensor(full), torch.as_tensor(explained)
    if full.shape != explained.shape or full.ndim != 1:
        raise ValueError(f"full and explained confidences must both be (N,), got {tuple(full.shape)} and {tuple(explained.shape)}")
    full, explained = full.double(), explained.double()
    fall = full - explained
    if clip:
        fall = fall.clamp(min=0)
    positive = full > 0
    return torch.where(positive, 100 * fall / torch.where(positive, full, torch.ones_like(full)), torch.zeros_like(full))


def average_drop(full: Tensor, explained: Tensor) -> float:
    """Average Drop % (paper section 4.1, lower is better): ``100/N * sum_i max(0, Y_i - O_i) / Y_i``.

    ``full`` and ``explained`` are ``(N,)`` confidences ``Y`` and ``O``; an empty batch gives 0.
    """
    drops = per_sample_drop(full, explained)
    return float(drops.mean()) if drops.numel() else 0.0


def increase_in_confidence(full: Tensor, explained: Tensor) -> float:
    """% Increase in Confidence (paper section 4.1, higher is better): ``100/N * sum_i [O_i > Y_i]``.

    ``full`` and ``explained`` are ``(N,)``; an empty batch gives 0.
    """
    full, explained = torch.as_tensor(full), torch.as_tensor(explained)
    if full.shape != explained.shape or full.ndim != 1:
        raise ValueError(f"full and explained confidences must both be (N,), got {tuple(full.shape)} and {tuple(explained.shape)}")
    return float(100 * (explained > full).double().mean()) if full.numel() else 0.0


def win_percent(drops_a: Tensor, drops_b: Tensor, ties: str = "half") -> float:
    """Win % of method A over method B (paper section 4.1): ``100/N * sum_i [drop_a_i < drop_b_i]``.

    Args:
        drops_a, drops_b: ``(N,)`` per-sample drops of the two methods on the same samples (use
            ``per_sample_drop(Y, O, clip=False)`` so that samples where both methods raise the
            confidence are still ranked; with clipped drops those are ties at 0).
        ties: how an exact tie counts: ``"half"`` (half a win to each, so ``win(A, B) + win(B, A)
            == 100`` as in the paper's tables), ``"loss"`` (nobody wins) or ``"exclude"`` (drop
            tied samples from the denominator; all tied gives 50).
    Returns:
        A percentage in ``[0, 100]``; an empty batch gives 0.
    """
    a, b = torch.as_tensor(drops_a).double(), torch.as_tensor(drops_b).double()
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"drops must both be (N,), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0
    wins, tied = (a < b).double(), (a == b)
    if ties == "half":
        return float(100 * (wins + 0.5 * tied.double()).mean())
    if ties == "loss":
        return float(100 * wins.mean())
    if ties == "exclude":
        decided = ~tied
        return float(100 * wins[decided].mean()) if decided.any() else 50.0
    raise ValueError(f"ties must be 'half', 'loss' or 'exclude', got {ties!r}")


def _baseline_tensor(inputs: Tensor, baseline: Baseline) -> Tensor:
    """The reference input ``(N, C, *spatial)`` that 'removed' pixels take."""
    if isinstance(baseline, Tensor):
        try:
            return torch.broadcast_to(baseline.to(inputs.device, inputs.dtype), inputs.shape)
        except RuntimeError:
            raise ValueError(f"baseline {tuple(baseline.shape)} does not broadcast to inputs {tuple(inputs.shape)}") from None
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return torch.full_like(inputs, float(baseline))
    if baseline == "zero":
        return torch.zeros_like(inputs)
    if baseline == "mean":
        # Each sample's per-channel mean colour.
        return _flat_spatial_mean(inputs).expand_as(inputs)
    if baseline == "blur":
        return box_blur(inputs)
    raise ValueError(f"baseline must be 'zero', 'mean', 'blur', a number or a tensor, got {baseline!r}")


def _flat_spatial_mean(inputs: Tensor) -> Tensor:
    dims = tuple(range(2, inputs.ndim))
    return inputs.mean(dim=dims, keepdim=True)


def box_blur(inputs: Tensor, radius: int | None = None, passes: int = 3) -> Tensor:
    """A strong blur of ``(N, C, *spatial)`` (1-3 spatial axes): ``passes`` box filters of width
    ``2 * radius + 1`` (three passes approximate a Gaussian). Default radius: 1/8 of the smallest
    spatial side. Edges average only the pixels inside (no dark border)."""
    spatial = inputs.shape[2:]
    radius = max(1, min(spatial) // 8) if radius is None else int(radius)
    pool = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(spatial)]
    blurred = inputs
    for _ in range(passes):
        blurred = pool(blurred, kernel_size=2 * radius + 1, stride=1, padding=radius, count_include_pad=False)
    return blurred


def explanation_inputs(inputs: Tensor, maps: Tensor, baseline: Baseline = "zero") -> Tensor:
    """The paper's explanation input (eq. 25): ``E = L * I``, the map multiplied into the input.

    Args:
        inputs: ``I``, ``(N, C, *spatial)``.
        maps: ``L``, ``(N, *spatial)`` in ``[0, 1]`` (same spatial size); broadcast over channels.
        baseline: what a map value of 0 leaves: ``"zero"`` (the paper: ``E = L * I``), a number,
            ``"mean"``, ``"blur"`` or a tensor; in general ``E = B + L * (I - B)``. Use the
            normalised zero of your preprocessing if inputs are mean/std normalised.
    Returns:
        ``(N, C, *spatial)``, same dtype as ``inputs``.
    """
    _check_inputs(inputs, maps)
    weights = maps.to(inputs.dtype).unsqueeze(1)
    if isinstance(baseline, str) and baseline == "zero":
        return inputs * weights
    reference = _baseline_tensor(inputs, baseline)
    return reference + weights * (inputs - reference)


def class_probabilities(output: Any, score: Score = "softmax") -> Tensor:
    """Model output -> per-class confidences ``(N, classes)``.

    ``score``: ``"softmax"`` (single-label), ``"sigmoid"`` (multi-label), ``"logits"`` (raw), or a
    callable ``model_output -> (N, classes)``.
    """
    if callable(score):
        probabilities = score(output)
    else:
        logits = model_logits(output)
        if score == "softmax":
            probabilities = logits.softmax(dim=-1)
        elif score == "sigmoid":
            probabilities = logits.sigmoid()
        elif score == "logits":
            probabilities = logits
        else:
            raise ValueError(f"score must be 'softmax', 'sigmoid', 'logits' or a callable, got {score!r}")
    if not isinstance(probabilities, Tensor) or probabilities.ndim != 2:
        raise ValueError("score must give a tensor (N, classes)")
    return probabilities


def _target_confidence(model: nn.Module, inputs: Tensor, targets: Tensor, score: Score, batch_size: int) -> Tensor:
    """Confidence ``(M,)`` of ``targets[i]`` on ``inputs[i]``, in chunks of ``batch_size``, no grad."""
    values = [torch.zeros(0, device=inputs.device)]  # an empty batch gives an empty (0,) result
    with torch.no_grad():
        for start in range(0, inputs.shape[0], batch_size):
            stop = start + batch_size
            probabilities = class_probabilities(call_model(model, inputs[start:stop]), score)
            chunk_targets = targets[start:stop].to(probabilities.device)
            if chunk_targets.max() >= probabilities.shape[1] or chunk_targets.min() < 0:
                raise ValueError(f"targets must lie in 0..{probabilities.shape[1] - 1}")
            values.append(probabilities.gather(1, chunk_targets.view(-1, 1)).squeeze(1))
    return torch.cat(values)


def _as_targets(targets: Tensor | Sequence[int] | int, n: int, device: torch.device) -> Tensor:
    targets = torch.as_tensor(targets, device=device)
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError("targets must be integer class indices")
    if targets.ndim == 0:
        targets = targets.expand(n)
    if targets.shape != (n,):
        raise ValueError(f"targets must be (N,) = ({n},) class indices, got shape {tuple(targets.shape)}")
    return targets.long()


def confidences(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    targets: Tensor | Sequence[int] | int,
    score: Score = "softmax",
    *,
    baseline: Baseline = "zero",
    batch_size: int = 64,
) -> tuple[Tensor, Tensor]:
    """Confidences ``Y`` (full input) and ``O`` (explanation input ``E``, eq. 25) for the targets.

    Args:
        model: the classifier; run under ``torch.no_grad()`` in the mode the caller left it.
        inputs: ``(N, C, *spatial)``; maps ``(N, *spatial)``; targets ``(N,)`` (or one int).
        score: ``"softmax"`` (the paper), ``"sigmoid"`` for multi-label models, or a callable.
        baseline: see :func:`explanation_inputs`.
    Returns:
        ``(Y, O)``, each ``(N,)``, on the model's output device. Feed them to
        :func:`average_drop`, :func:`increase_in_confidence` and :func:`per_sample_drop`.
    """
    _check_inputs(inputs, maps)
    targets = _as_targets(targets, inputs.shape[0], inputs.device)
    full = _target_confidence(model, inputs, targets, score, batch_size)
    explained = _target_confidence(model, explanation_inputs(inputs, maps, baseline), targets, score, batch_size)
    return full, explained


# -- localisation metrics --------------------------------------------------------------------

def localization(maps: Tensor, masks: Tensor, delta: float = 0.0) -> Tensor:
    """The paper's localisation metric (eq. 26): ``Loc(delta) = L_in / (|mask| + L_out)``.

    Each map is min-max normalised, then every position with value ``> delta`` counts 1:
    ``L_in`` = number of such positions inside the ground-truth region, ``L_out`` = outside,
    ``|mask|`` = region size (the paper's box area; pixels in 2D, voxels in 3D). 1 means the
    thresholded map is exactly the region; a map spilling outside or covering only part of it
    scores less. The paper reports it at ``delta`` = 0, 0.25 and 0.5.

    Args:
        maps: ``(N, *spatial)``; masks: ``(N, *spatial)`` bool; ``delta`` in ``[0, 1)``.
    Returns:
        ``(N,)`` float in ``[0, 1]``. An empty (constant) map has no position above ``delta``
        and gets 0; an empty mask gets 0 (nothing to localise).
    """
    masks = _check_pair(maps, masks)
    above = _flat(_minmax(maps) > delta)
    inside = _flat(masks)
    internal = (above & inside).sum(dim=1).double()
    external = (above & ~inside).sum(dim=1).double()
    denominator = inside.sum(dim=1).double() + external
    return torch.where(denominator > 0, internal / denominator.clamp(min=1), torch.zeros_like(internal))


def _ball(radius: float, ndim: int, device: torch.device) -> Tensor:
    reach = int(math.floor(radius))
    axes = [torch.arange(-reach, reach + 1, device=device, dtype=torch.float32)] * ndim
    grids = torch.meshgrid(*axes, indexing="ij")
    return (sum(g * g for g in grids) <= radius * radius).float()


def _dilate(masks: Tensor, radius: float) -> Tensor:
    """Dilate bool masks ``(N, *spatial)`` by a Euclidean ball of ``radius`` positions."""
    if radius <= 0:
        return masks
    ndim = masks.ndim - 1
    kernel = _ball(radius, ndim, masks.device)[None, None]
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[ndim]
    reach = kernel.shape[-1] // 2
    return conv(masks.float().unsqueeze(1), kernel, padding=reach).squeeze(1) > 0.5


def pointing_game(maps: Tensor, masks: Tensor, tolerance: float = 0.0) -> Tensor:
    """Pointing game (Zhang et al., 2016): does each map's maximum fall inside the region?

    The peak is the first position (row-major over ``*spatial``) holding the map's maximum. A hit
    also counts within ``tolerance`` positions of the region (Euclidean, over all spatial axes;
    Zhang et al. use 15 pixels at ImageNet scale).

    Args:
        maps: ``(N, *spatial)``; masks: ``(N, *spatial)`` bool.
    Returns:
        ``(N,)`` bool. A constant (empty) map points nowhere and is a miss; an empty mask is a miss.
    """
    masks = _check_pair(maps, masks)
    region = _flat(_dilate(masks, tolerance))
    flat = _flat(maps)
    peak = flat.argmax(dim=1, keepdim=True)
    has_peak = flat.amax(dim=1) > flat.amin(dim=1)
    return region.gather(1, peak).squeeze(1) & has_peak


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Energy-based pointing game (Wang et al., Score-CAM 2020): ``sum(L * M) / sum(L)``.

    The share of the map's total mass inside the ground-truth region (maps must be
    non-negative; they are used as given, not re-normalised). A map equal to the mask gives 1.

    Args:
        maps: ``(N, *spatial)`` ``>= 0``; masks: ``(N, *spatial)`` bool.
    Returns:
        ``(N,)`` float in ``[0, 1]``; an all-zero map gets 0.
    """
    masks = _check_pair(maps, masks)
    if (maps < 0).any():
        raise ValueError("energy_pointing_game needs non-negative maps (CAMs after the ReLU)")
    flat = _flat(maps).double()
    total = flat.sum(dim=1)
    inside = (flat * _flat(masks)).sum(dim=1)
    return torch.where(total > 0, inside / total.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(total))


def multi_instance_coverage(
    maps: Tensor, instance_masks: Tensor, fraction: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Share of a class's instances that the map covers.

    An instance counts as covered when the map reaches at least ``fraction`` of its global peak
    somewhere inside the instance's mask: ``max_{p in M_j} L(p) >= fraction * max_p L(p)``.

    Args:
        maps: ``(N, *spatial)``.
        instance_masks: ``(N, I, *spatial)`` bool, one mask per instance of the explained class;
            all-false masks are padding and are not counted.
    Returns:
        ``(coverage (N,), instances (N,))``: the covered share in ``[0, 1]`` and the number of
        (non-empty) instances. A sample with no instance, or an all-zero map, gets coverage 0.
    """
    _check_maps(maps)
    if not isinstance(instance_masks, Tensor) or instance_masks.ndim != maps.ndim + 1 or (
        instance_masks.shape[0] != maps.shape[0] or tuple(instance_masks.shape[2:]) != tuple(maps.shape[1:])
    ):
        shape = tuple(instance_masks.shape) if isinstance(instance_masks, Tensor) else type(instance_masks).__name__
        raise ValueError(f"instance_masks must be (N, I, *spatial) for maps {tuple(maps.shape)}, got {shape}")
    masks = instance_masks.to(maps.device).bool().flatten(2)
    flat = _flat(maps)
    peak = flat.amax(dim=1)
    inside_max = torch.where(masks, flat.unsqueeze(1), torch.full_like(flat.unsqueeze(1), -math.inf)).amax(dim=2)
    present = masks.any(dim=2)
    covered = present & (inside_max >= fraction * peak.unsqueeze(1)) & (peak > 0).unsqueeze(1)
    count = present.sum(dim=1)
    coverage = covered.sum(dim=1).double() / count.clamp(min=1).double()
    return coverage, count


# -- deletion / insertion (RISE) -------------------------------------------------------------

def _ordering_curve(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    targets: Tensor | Sequence[int] | int,
    *,
    insert: bool,
    steps: int,
    baseline: Baseline,
    score: Score,
    batch_size: int,
) -> Tensor:
    _check_inputs(inputs, maps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    n = inputs.shape[0]
    targets = _as_targets(targets, n, inputs.device)
    reference = _baseline_tensor(inputs, baseline)
    positions = math.prod(inputs.shape[2:])
    # Rank of every position, most salient first; ties broken by position (stable sort), so
    # a constant map deletes in row-major order instead of at random.
    order = torch.sort(_flat(maps), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(positions, device=order.device).expand(n, -1))
    counts = [round(positions * step / steps) for step in range(steps + 1)]
    curve = torch.empty(n, steps + 1, dtype=torch.float64, device=inputs.device)
    # One step's images for all samples at a time keeps memory at batch_size images.
    per_chunk = max(1, batch_size)
    for start in range(0, n, per_chunk):
        stop = min(n, start + per_chunk)
        chunk_rank = rank[start:stop]
        for step, count in enumerate(counts):
            changed = (chunk_rank < count).reshape(stop - start, 1, *inputs.shape[2:])
            # Deletion: the top `count` positions take the baseline; insertion: only they keep the input.
            if insert:
                image = torch.where(changed, inputs[start:stop], reference[start:stop])
            else:
                image = torch.where(changed, reference[start:stop], inputs[start:stop])
            curve[start:stop, step] = _target_confidence(model, image, targets[start:stop], score, per_chunk).double()
    return curve


def deletion_curve(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    targets: Tensor | Sequence[int] | int,
    *,
    steps: int = 32,
    baseline: Baseline = "zero",
    score: Score = "softmax",
    batch_size: int = 64,
) -> Tensor:
    """Confidence ``(N, steps + 1)`` while the most salient positions are replaced by ``baseline``.

    Column ``s`` has the top ``round(s / steps * P)`` of the ``P`` spatial positions (pixels or
    voxels; all channels of a position together) deleted, ranked by the map, ties in row-major order.
    """
    return _ordering_curve(model, inputs, maps, targets, insert=False, steps=steps, baseline=baseline, score=score, batch_size=batch_size)


def insertion_curve(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    targets: Tensor | Sequence[int] | int,
    *,
    steps: int = 32,
    baseline: Baseline = "blur",
    score: Score = "softmax",
    batch_size: int = 64,
) -> Tensor:
    """Confidence ``(N, steps + 1)`` while the most salient positions are copied from the input
    onto ``baseline`` (RISE starts from a blurred image). Column 0 is the baseline alone."""
    return _ordering_curve(model, inputs, maps, targets, insert=True, steps=steps, baseline=baseline, score=score, batch_size=batch_size)


def curve_auc(curve: Tensor) -> Tensor:
    """Area under ``(N, S + 1)`` curves sampled evenly on ``[0, 1]`` (trapezoid rule) -> ``(N,)``."""
    if curve.ndim != 2 or curve.shape[1] < 2:
        raise ValueError(f"curve must be (N, steps + 1) with steps >= 1, got {tuple(curve.shape)}")
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)


def deletion_auc(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    targets: Tensor | Sequence[int] | int,
    *,
    steps: int = 32,
    baseline: Baseline = "zero",
    score: Score = "softmax",
    batch_size: int = 64,
) -> Tensor:
    """Deletion AUC (RISE, lower is better): area under :func:`deletion_curve` over the deleted
    fraction ``[0, 1]``. Returns ``(N,)``; a constant map deletes in row-major order."""
    return curve_auc(deletion_curve(model, inputs, maps, targets, steps=steps, baseline=baseline, score=score, batch_size=batch_size))


def insertion_auc(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    targets: Tensor | Sequence[int] | int,
    *,
    steps: int = 32,
    baseline: Baseline = "blur",
    score: Score = "softmax",
    batch_size: int = 64,
) -> Tensor:
    """Insertion AUC (RISE, higher is better): area under :func:`insertion_curve` over the
    inserted fraction ``[0, 1]``. Returns ``(N,)``."""
    return curve_auc(insertion_curve(model, inputs, maps, targets, steps=steps, baseline=baseline, score=score, batch_size=batch_size))


# -- boxes ----------------------------------------------------------------------------------

def boxes_to_masks(
    boxes: Tensor | Sequence[Sequence[float]] | Sequence[Sequence[Sequence[float]]],
    size: Sequence[int],
    device: torch.device | str | None = None,
) -> Tensor:
    """2D boxes -> bool masks ``(N, H, W)``.

    Args:
        boxes: ``(N, 4)`` (one box per sample) or a length-``N`` list of ``(B_i, 4)`` boxes
            (their union; ``B_i`` may be 0). Each box is ``(x0, y0, x1, y1)`` in pixel
            coordinates, ``x`` along the width: pixel ``(row, col)`` is inside when its centre
            ``(col + 0.5, row + 0.5)`` lies in ``[x0, x1] x [y0, y1]``, so ``(0, 0, W, H)`` is
            the whole image and a box ``(2, 3, 5, 7)`` covers columns 2-4 and rows 3-6.
        size: ``(H, W)``.
    """
    height, width = (int(s) for s in size)
    if isinstance(boxes, Tensor) and boxes.ndim == 2:
        per_sample = [boxes[i : i + 1] for i in range(boxes.shape[0])]
    else:
        per_sample = [torch.as_tensor(b, dtype=torch.float32).reshape(-1, 4) for b in boxes]
    ys = torch.arange(height, dtype=torch.float32, device=device).view(1, -1, 1) + 0.5
    xs = torch.arange(width, dtype=torch.float32, device=device).view(1, 1, -1) + 0.5
    masks = torch.zeros(len(per_sample), height, width, dtype=torch.bool, device=device)
    for i, sample_boxes in enumerate(per_sample):
        b = torch.as_tensor(sample_boxes, dtype=torch.float32, device=device).reshape(-1, 4)
        if b.numel() == 0:
            continue
        if (b[:, 2] < b[:, 0]).any() or (b[:, 3] < b[:, 1]).any():
            raise ValueError(f"boxes must be (x0, y0, x1, y1) with x1 >= x0 and y1 >= y0, got {b.tolist()}")
        x0, y0, x1, y1 = (b[:, j].view(-1, 1, 1) for j in range(4))
        inside = (xs >= x0) & (xs <= x1) & (ys >= y0) & (ys <= y1)
        masks[i] = inside.any(dim=0)
    return masks


def map_correlation(first: Tensor, second: Tensor) -> Tensor:
    """Pearson correlation of two batches of maps ``(N, *spatial)`` -> ``(N,)``; 0 where a map is constant."""
    a = first.flatten(1).double()
    b = second.flatten(1).double()
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denominator > 0, (a * b).sum(dim=1) / denominator.clamp_min(1e-300), torch.zeros_like(denominator))
