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
the usual additions. What reviewers ask for today is here too: ROAD (Rong et al., ICML 2022:
remove-and-debias with noisy linear imputation, most- and least-relevant-first curves) and the
cascading model-parameter randomisation test (Adebayo et al., NeurIPS 2018) with Spearman rank
correlation and SSIM. Degenerate cases never give NaN: each docstring states the value an empty
map or an empty mask gets.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
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
    "pointing_accuracy",
    "class_mean",
    "ROAD_FRACTIONS",
    "RoadCurves",
    "noisy_linear_imputation",
    "road",
    "spearman_correlation",
    "ssim",
    "RandomisationResult",
    "model_randomisation",
    "randomisable_layers",
    "reinitialise",
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


def class_mean(values: Tensor, classes: Tensor | Sequence[int]) -> float:
    """Mean over classes of each class's sample mean: ``1/|C| * sum_c mean_{i: class_i = c} v_i``.

    Every class present in ``classes`` counts once however many samples it has (Zhang et al.
    2016 report the pointing game this way, so frequent classes do not dominate).

    Args:
        values: ``(N,)`` per-sample values (bool hits count as 0/1).
        classes: ``(N,)`` integer class of each sample.
    Returns:
        A float; an empty batch gives 0.
    """
    values = torch.as_tensor(values)
    classes = torch.as_tensor(classes, device=values.device)
    if values.ndim != 1 or classes.shape != values.shape:
        raise ValueError(f"values and classes must both be (N,), got {tuple(values.shape)} and {tuple(classes.shape)}")
    if classes.is_floating_point() or classes.dtype == torch.bool:
        raise TypeError("classes must be integer class indices")
    if values.numel() == 0:
        return 0.0
    labels, index = torch.unique(classes, return_inverse=True)
    sums = torch.zeros(labels.numel(), dtype=torch.float64, device=values.device).index_add_(0, index, values.double())
    counts = torch.bincount(index, minlength=labels.numel()).double()
    return float((sums / counts).mean())


def pointing_accuracy(hits: Tensor, classes: Tensor | Sequence[int] | None = None) -> float:
    """Pointing-game accuracy in percent from :func:`pointing_game`'s ``(N,)`` hits.

    ``classes=None`` gives the sample mean ``100 * hits.mean()``; with ``(N,)`` classes it is the
    class mean of Zhang et al. (2016): each class's ``hits / (hits + misses)``, averaged over the
    classes (:func:`class_mean`). An empty batch gives 0.
    """
    hits = torch.as_tensor(hits)
    if hits.ndim != 1:
        raise ValueError(f"hits must be (N,), got shape {tuple(hits.shape)}")
    if classes is None:
        return 100 * float(hits.double().mean()) if hits.numel() else 0.0
    return 100 * class_mean(hits, classes)


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


# -- ROAD: remove and debias (Rong et al., ICML 2022) -------------------------------------------

#: The removal fractions of the ROAD paper's curves (10% to 90% of the positions).
ROAD_FRACTIONS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
ROAD_ORDERS = ("morf", "lerf")


def _binomial_pass(x: Tensor, dim: int) -> Tensor:
    """``[1, 2, 1]`` along ``dim`` with zeros outside (one separable pass of the stencil)."""
    size = x.shape[dim]
    y = 2 * x
    if size > 1:
        y.narrow(dim, 1, size - 1).add_(x.narrow(dim, 0, size - 1))
        y.narrow(dim, 0, size - 1).add_(x.narrow(dim, 1, size - 1))
    return y


def _neighbour_mean(x: Tensor, spatial_ndim: int) -> Tensor:
    """Weighted sum of every position's ``3^d - 1`` neighbours over the last ``spatial_ndim`` axes.

    The weights are the separable binomial ``[1, 2, 1]^d`` without its centre, normalised to sum
    to 1: in 2D the ROAD paper's 1/6 for the four edge neighbours and 1/12 for the four diagonal
    ones, in 1D 1/2 each, in 3D 1/14 (faces), 1/28 (edges) and 1/56 (corners). Positions outside
    the array contribute nothing (their weight is dropped, not renormalised, here).
    """
    y = x
    for dim in range(x.ndim - spatial_ndim, x.ndim):
        y = _binomial_pass(y, dim)
    centre = 2**spatial_ndim
    return (y - centre * x) / (4**spatial_ndim - centre)


# Damped-Jacobi weights that smooth the stencil's high frequencies best (2/3, 1, 7/6 in 1D/2D/3D
# by its symbol), kept a little lower in 2D/3D so the smoother stays contractive next to holes.
_JACOBI_WEIGHT = {1: 2 / 3, 2: 0.9, 3: 1.0}
_COARSEST_SWEEPS = 16


@dataclass(frozen=True)
class _Grid:
    """One level of the multigrid hierarchy of a removal mask ``(M, *spatial)``."""

    removed: Tensor  # 1.0 where the position is an unknown of this level
    degree: Tensor  # (1, *spatial): sum of the weights of the neighbours inside the array
    step: Tensor  # damped Jacobi step: weight / degree on unknowns, 0 elsewhere
    blocks: tuple[int, ...]  # how many positions of this level one position of the next covers, per axis

    def apply(self, u: Tensor) -> Tensor:
        """The system matrix times ``u`` (``u`` is zero off the unknowns)."""
        return self.removed * (self.degree * u - _neighbour_mean(u, u.ndim - 1))


def _block_sum(x: Tensor, blocks: Sequence[int]) -> Tensor:
    """Sum ``(M, *spatial)`` over blocks of ``blocks`` positions (1 or 2 per axis; a block at an
    odd end sums what is there)."""
    if len(blocks) == 1:  # pooled as 2D with a trailing axis of one
        return _block_sum(x.unsqueeze(-1), (*blocks, 1)).squeeze(-1)
    pool = F.avg_pool2d if len(blocks) == 2 else F.avg_pool3d
    return pool(x.unsqueeze(1), tuple(blocks), tuple(blocks), ceil_mode=True, divisor_override=1).squeeze(1)


def _spread(x: Tensor, blocks: Sequence[int], spatial: Sequence[int]) -> Tensor:
    """The transpose of :func:`_block_sum`: copy each coarse value to the positions it covers."""
    for axis, block in enumerate(blocks, start=1):
        if block > 1:
            x = x.repeat_interleave(block, dim=axis)
    return x[(slice(None), *(slice(0, size) for size in spatial))]


def _grids(removed: Tensor, dtype: torch.dtype) -> list[_Grid]:
    """The hierarchy: each level halves every axis longer than 1; a coarse position is an unknown
    when every position it covers is, so every level keeps the kept positions' boundary values."""
    grids, current = [], removed.to(dtype)
    spatial_ndim = removed.ndim - 1
    while True:
        degree = _neighbour_mean(torch.ones_like(current[:1]), spatial_ndim)
        step = current * _JACOBI_WEIGHT[spatial_ndim] / torch.where(degree > 0, degree, torch.ones_like(degree))
        blocks = tuple(2 if size > 1 else 1 for size in current.shape[1:])
        grids.append(_Grid(current, degree, step, blocks))
        if all(block == 1 for block in blocks):
            break
        coarse = (_block_sum(current, blocks) >= _block_sum(torch.ones_like(current[:1]), blocks)).to(dtype)
        if not bool(coarse.any()):
            break
        current = coarse
    return grids


def _v_cycle(grids: Sequence[_Grid], residual: Tensor, level: int = 0) -> Tensor:
    """One symmetric V(1, 1) cycle from zero (damped Jacobi, block-sum restriction, copy
    prolongation): a symmetric positive definite preconditioner for conjugate gradients."""
    grid = grids[level]
    u = grid.step * residual
    if level == len(grids) - 1:
        for _ in range(_COARSEST_SWEEPS - 1):
            u = u + grid.step * (residual - grid.apply(u))
        return u
    coarse = grids[level + 1]
    # With the same stencil on the coarse grid, the Galerkin operator is 2^d / 4 times it.
    scale = 4.0 / math.prod(grid.blocks)
    correction = _v_cycle(grids, coarse.removed * _block_sum(residual - grid.apply(u), grid.blocks) * scale, level + 1)
    u = u + grid.removed * _spread(correction, grid.blocks, residual.shape[1:])
    return u + grid.step * (residual - grid.apply(u))


def _harmonic_fill(values: Tensor, removed: Tensor, tol: float, max_iterations: int) -> Tensor:
    """Solve ROAD's linear system for the removed positions of ``values`` ``(M, *spatial)``.

    Every removed position equals the weighted mean of its neighbours inside the array (weights
    of :func:`_neighbour_mean`, renormalised over the neighbours that exist):
    ``D_i x_i - sum_{j removed} w_ij x_j = sum_{j kept} w_ij v_j``, ``D_i = sum_j w_ij``. The
    matrix is symmetric and positive definite whenever some position is kept, so all ``M``
    systems are solved at once by conjugate gradients preconditioned with a geometric multigrid
    V-cycle (about 10 steps whatever the size), in the dtype of ``values``, until each residual
    is below ``tol`` times its right-hand side.
    """
    grids = _grids(removed, values.dtype)
    fine = grids[0]
    rhs = fine.removed * _neighbour_mean(values * (1 - fine.removed), values.ndim - 1)
    dims = tuple(range(1, values.ndim))
    solution = torch.zeros_like(values)
    residual = rhs.clone()
    preconditioned = _v_cycle(grids, residual)
    direction = preconditioned
    rz = (residual * preconditioned).sum(dims, keepdim=True)
    limit = tol * rhs.flatten(1).norm(dim=1)
    converged = False
    for iteration in range(max_iterations + 1):
        converged = bool((residual.flatten(1).norm(dim=1) <= limit).all())
        if converged or iteration == max_iterations:
            break
        step = fine.apply(direction)
        curvature = (direction * step).sum(dims, keepdim=True)
        alpha = torch.where(curvature > 0, rz / torch.where(curvature > 0, curvature, torch.ones_like(curvature)),
                            torch.zeros_like(curvature))
        solution = solution + alpha * direction
        residual = residual - alpha * step
        preconditioned = _v_cycle(grids, residual)
        rz_next = (residual * preconditioned).sum(dims, keepdim=True)
        beta = torch.where(rz > 0, rz_next / torch.where(rz > 0, rz, torch.ones_like(rz)), torch.zeros_like(rz))
        direction = preconditioned + beta * direction
        rz = rz_next
    if not converged:
        worst = float((residual.flatten(1).norm(dim=1) / rhs.flatten(1).norm(dim=1).clamp_min(1e-30)).max())
        warnings.warn(f"noisy linear imputation stopped after {max_iterations} iterations with relative residual "
                      f"{worst:.2e} > tol={tol:g}; raise max_iterations", RuntimeWarning, stacklevel=3)
    return torch.where(removed, solution, values)


def noisy_linear_imputation(
    inputs: Tensor,
    removed: Tensor,
    noise: float | Sequence[float] = 0.01,
    *,
    generator: torch.Generator | None = None,
    tol: float = 1e-4,
    max_iterations: int | None = None,
) -> Tensor:
    """ROAD's noisy linear imputation (Rong et al., ICML 2022, section 4): fill removed positions
    from their neighbours, then add a little Gaussian noise so the fill does not reveal the mask.

    Each removed position takes the weighted mean of its neighbours (in 2D the paper's 8
    neighbours, 1/6 for edges and 1/12 for diagonals; see :func:`_neighbour_mean` for 1D/3D),
    solved jointly for all removed positions of a sample, so a removed region is the smooth
    (discrete harmonic) interpolation of the values around it. Neighbours outside the array are
    dropped and the weights renormalised. Then ``noise * N(0, 1)`` is added to the filled
    positions only (the paper: 0.01 on ``[0, 1]`` pixels). Every channel is filled the same way.

    Args:
        inputs: ``(N, C, *spatial)``, 1-3 spatial axes.
        removed: ``(N, *spatial)`` bool, ``True`` where a position is removed (all its channels).
            Each sample must keep at least one position.
        noise: standard deviation of the added noise, in the units of ``inputs``: one number or
            one per channel (for mean/std-normalised inputs the paper's noise is ``0.01 / std``).
        generator: the random source of the noise (``None``: torch's global one).
        tol: the solver's relative residual (the fill is accurate to far below ``noise`` at 1e-4;
            the tests use 1e-12 in float64 to match the paper's direct solve).
        max_iterations: conjugate-gradient steps at most (default 200; about 10 are needed at
            ``tol=1e-4``, 30 at 1e-12); a solve that has not converged by then warns.
    Returns:
        ``(N, C, *spatial)`` in ``inputs``' dtype (float32 at least); kept positions unchanged.
    """
    if not isinstance(inputs, Tensor) or inputs.ndim not in (3, 4, 5) or not inputs.is_floating_point():
        shape = tuple(inputs.shape) if isinstance(inputs, Tensor) else type(inputs).__name__
        raise ValueError(f"inputs must be a floating tensor (N, C, *spatial) with 1-3 spatial axes, got {shape}")
    if not isinstance(removed, Tensor) or tuple(removed.shape) != (inputs.shape[0], *inputs.shape[2:]):
        shape = tuple(removed.shape) if isinstance(removed, Tensor) else type(removed).__name__
        raise ValueError(f"removed must be (N, *spatial) = {(inputs.shape[0], *inputs.shape[2:])} bool, got {shape}")
    removed = removed.to(inputs.device).bool()
    if removed.flatten(1).all(dim=1).any():
        raise ValueError("a sample has every position removed: noisy linear imputation needs at least one kept position")
    n, channels, spatial = inputs.shape[0], inputs.shape[1], inputs.shape[2:]
    dtype = torch.promote_types(inputs.dtype, torch.float32)
    scale = torch.as_tensor(noise, dtype=dtype, device=inputs.device).reshape(-1)
    if scale.numel() not in (1, channels) or (scale < 0).any():
        raise ValueError(f"noise must be one non-negative number or one per channel ({channels}), got {noise!r}")
    steps = 200 if max_iterations is None else int(max_iterations)
    mask = removed.unsqueeze(1).expand(n, channels, *spatial)
    values = inputs.to(dtype).reshape(n * channels, *spatial)
    filled = _harmonic_fill(values, mask.reshape(n * channels, *spatial), tol, steps).reshape(n, channels, *spatial)
    if (scale > 0).any():
        draw = torch.randn(filled.shape, generator=generator, dtype=dtype, device=inputs.device if generator is None else generator.device)
        filled = filled + mask * scale.view(1, -1, *([1] * len(spatial))) * draw.to(inputs.device)
    return filled


def _removal_masks(ranks: Tensor, fraction: float, order: str, spatial: Sequence[int]) -> Tensor:
    """Bool ``(N, *spatial)``: the ``floor(fraction * P)`` most (``morf``) or least (``lerf``)
    relevant positions, given each position's rank ``(N, P)`` (0 = most relevant)."""
    positions = ranks.shape[1]
    count = math.floor(fraction * positions + 1e-9)  # the paper's int(P * p), float error aside
    chosen = ranks < count if order == "morf" else ranks >= positions - count
    return chosen.reshape(ranks.shape[0], *spatial)


@dataclass(frozen=True)
class RoadCurves:
    """ROAD curves of ``N`` samples over ``F`` removal fractions (what :func:`road` returns).

    Attributes:
        fractions: the removed fractions of the positions, ``(F,)``.
        full: ``(N,)`` confidence in the target on the intact input.
        morf, lerf: ``(N, F)`` confidence after imputing the most / least relevant fraction
            (``None`` for an order that was not run). MoRF should fall fast for a faithful map
            (lower is better), LeRF stay high (higher is better).
        morf_top1, lerf_top1: ``(N, F)`` bool, whether the target is still the model's top class
            (the paper's accuracy when the targets are the labels or predictions).
    """

    fractions: tuple[float, ...]
    full: Tensor
    morf: Tensor | None
    lerf: Tensor | None
    morf_top1: Tensor | None
    lerf_top1: Tensor | None

    def _curve(self, order: str) -> Tensor:
        curve = getattr(self, order)
        if curve is None:
            raise ValueError(f"these ROAD curves were computed without the {order!r} order")
        return curve

    def morf_mean(self) -> Tensor:
        """``(N,)`` MoRF confidence averaged over the fractions (lower is better)."""
        return self._curve("morf").mean(dim=1)

    def lerf_mean(self) -> Tensor:
        """``(N,)`` LeRF confidence averaged over the fractions (higher is better)."""
        return self._curve("lerf").mean(dim=1)

    def combined(self) -> Tensor:
        """``(N,)`` ``(LeRF mean - MoRF mean) / 2`` (higher is better), pytorch-grad-cam's
        ``ROADCombined`` (its score changes relative to the intact input cancel in the difference)."""
        return (self.lerf_mean() - self.morf_mean()) / 2


def road(
    model: nn.Module,
    inputs: Tensor,
    maps: Tensor,
    targets: Tensor | Sequence[int] | int,
    *,
    fractions: Sequence[float] = ROAD_FRACTIONS,
    orders: Sequence[str] = ROAD_ORDERS,
    noise: float | Sequence[float] = 0.01,
    tie_noise: float = 1e-4,
    seed: int = 0,
    score: Score = "softmax",
    batch_size: int = 64,
    tol: float = 1e-4,
) -> RoadCurves:
    """ROAD, remove and debias (Rong, Leemann et al., ICML 2022), without retraining.

    For every fraction ``f``, the ``floor(f * P)`` positions (pixels or voxels, all channels)
    the map ranks most relevant (MoRF) or least relevant (LeRF) are removed and filled by
    :func:`noisy_linear_imputation`, and the model's confidence in the target is recorded.
    Filling from the neighbours with a little noise, instead of a constant, keeps the shape of
    the removed region from telling the model the class (the paper's "class information leakage").

    Ranking follows the paper: each map is min-max normalised and ``tie_noise * N(0, 1)`` is added
    so that equal values (a CAM's zero region) are removed in random rather than row-major order;
    ``tie_noise=0`` ranks ties in row-major order. Both draws come from one generator seeded with
    ``seed``, so a call is reproducible (for a given ``batch_size``).

    Args:
        model: the classifier, run under ``torch.no_grad()`` in the mode it is in.
        inputs: ``(N, C, *spatial)``; maps ``(N, *spatial)`` at the input's size; targets ``(N,)``.
        fractions: removed fractions in ``[0, 1)`` (default 0.1 ... 0.9 as in the paper).
        orders: ``"morf"``, ``"lerf"`` or both.
        noise: the imputation noise in the units of ``inputs`` (see :func:`noisy_linear_imputation`).
        score: ``"softmax"`` (the paper), ``"sigmoid"``, ``"logits"`` or a callable.
    Returns:
        :class:`RoadCurves`.
    """
    _check_inputs(inputs, maps)
    fractions = tuple(float(f) for f in fractions)
    if not fractions or any(not 0.0 <= f < 1.0 for f in fractions):
        raise ValueError(f"fractions must lie in [0, 1) (removing every position leaves nothing to impute from), got {fractions}")
    orders = tuple(orders)
    if not orders or any(o not in ROAD_ORDERS for o in orders):
        raise ValueError(f"orders must be 'morf' and/or 'lerf', got {orders!r}")
    n, spatial = inputs.shape[0], tuple(inputs.shape[2:])
    targets = _as_targets(targets, n, inputs.device)
    generator = torch.Generator(device=inputs.device).manual_seed(int(seed))
    ranking = _minmax(maps).flatten(1)
    if tie_noise > 0:
        ranking = ranking + tie_noise * torch.randn(ranking.shape, generator=generator, device=inputs.device, dtype=ranking.dtype)
    order = torch.sort(ranking, dim=1, descending=True, stable=True).indices
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(ranking.shape[1], device=order.device).expand(n, -1))
    full = _target_confidence(model, inputs, targets, score, batch_size)
    curves: dict[str, Tensor] = {o: torch.empty(n, len(fractions), dtype=torch.float64, device=full.device) for o in orders}
    top1: dict[str, Tensor] = {o: torch.empty(n, len(fractions), dtype=torch.bool, device=full.device) for o in orders}
    for start in range(0, n, max(1, batch_size)):
        chunk = slice(start, min(n, start + max(1, batch_size)))
        for o in orders:
            for column, fraction in enumerate(fractions):
                removed = _removal_masks(ranks[chunk], fraction, o, spatial)
                imputed = noisy_linear_imputation(inputs[chunk], removed, noise, generator=generator, tol=tol)
                confidence, best = _confidence_and_top1(model, imputed.to(inputs.dtype), targets[chunk], score)
                curves[o][chunk, column] = confidence.double()
                top1[o][chunk, column] = best
    return RoadCurves(fractions, full, curves.get("morf"), curves.get("lerf"), top1.get("morf"), top1.get("lerf"))


def _confidence_and_top1(model: nn.Module, inputs: Tensor, targets: Tensor, score: Score) -> tuple[Tensor, Tensor]:
    """``(M,)`` confidence in each target and whether it is the top-scoring class, no grad."""
    with torch.no_grad():
        probabilities = class_probabilities(call_model(model, inputs), score)
    targets = targets.to(probabilities.device)
    if targets.numel() and (targets.max() >= probabilities.shape[1] or targets.min() < 0):
        raise ValueError(f"targets must lie in 0..{probabilities.shape[1] - 1}")
    return probabilities.gather(1, targets.view(-1, 1)).squeeze(1), probabilities.argmax(dim=1) == targets


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


# -- map similarity ---------------------------------------------------------------------------

def _average_ranks(values: Tensor) -> Tensor:
    """Ranks ``1..P`` of every row of ``(N, P)``, ties given the mean of their ranks (as scipy)."""
    n, positions = values.shape
    ordered, order = torch.sort(values, dim=1, stable=True)
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    group = starts.long().cumsum(dim=1) - 1
    place = torch.arange(1, positions + 1, dtype=torch.float64, device=values.device).expand(n, -1)
    sums = torch.zeros(n, positions, dtype=torch.float64, device=values.device).scatter_add_(1, group, place)
    counts = torch.zeros_like(sums).scatter_add_(1, group, torch.ones_like(place))
    mean_rank = (sums / counts.clamp(min=1)).gather(1, group)
    return torch.empty_like(mean_rank).scatter_(1, order, mean_rank)


def spearman_correlation(first: Tensor, second: Tensor) -> Tensor:
    """Spearman rank correlation of two batches of maps ``(N, *spatial)`` -> ``(N,)``.

    The Pearson correlation of the positions' ranks, ties ranked by their mean rank (scipy's
    ``spearmanr``). A constant map has no ranking and gets 0 (scipy gives NaN).
    """
    _check_maps(first, "first")
    _check_maps(second, "second")
    if first.shape != second.shape:
        raise ValueError(f"maps to compare must have one shape, got {tuple(first.shape)} and {tuple(second.shape)}")
    return map_correlation(_average_ranks(_flat(first)), _average_ranks(_flat(second).to(first.device)))


def _gaussian_window(sigma: float, device: torch.device) -> Tensor:
    radius = int(3.5 * sigma + 0.5)  # scipy.ndimage.gaussian_filter's truncate=3.5 (11 taps at sigma 1.5)
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float64, device=device)
    window = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return window / window.sum()


def _local_mean(x: Tensor, window: Tensor) -> Tensor:
    """Separable Gaussian mean of ``(N, *spatial)`` over every spatial axis, valid positions only."""
    for axis in range(1, x.ndim):
        moved = x.movedim(axis, -1)
        shape = moved.shape
        filtered = F.conv1d(moved.reshape(-1, 1, shape[-1]), window.view(1, 1, -1))
        x = filtered.reshape(*shape[:-1], filtered.shape[-1]).movedim(-1, axis)
    return x


def ssim(first: Tensor, second: Tensor, *, data_range: float = 1.0, sigma: float = 1.5) -> Tensor:
    """Structural similarity (Wang et al., IEEE TIP 2004) of two batches of maps ``(N, *spatial)`` -> ``(N,)``.

    The paper's form: local means, variances and covariance under a Gaussian window of
    ``sigma`` (1.5: 11 taps per axis, over 1-3 spatial axes), ``C1 = (0.01 L)^2``,
    ``C2 = (0.03 L)^2`` with ``L = data_range`` (1 for maps in ``[0, 1]``), averaged over the
    positions whose window lies inside the map -- scikit-image's ``structural_similarity`` with
    ``gaussian_weights=True, use_sample_covariance=False``. Two all-zero maps give 1.
    """
    _check_maps(first, "first")
    _check_maps(second, "second")
    if first.shape != second.shape:
        raise ValueError(f"maps to compare must have one shape, got {tuple(first.shape)} and {tuple(second.shape)}")
    window = _gaussian_window(sigma, first.device)
    if min(first.shape[1:]) < window.numel():
        raise ValueError(f"ssim needs maps at least {window.numel()} positions along every axis (sigma={sigma}), got "
                         f"{tuple(first.shape[1:])}: compare upsampled maps (Explanation.maps), or a smaller sigma")
    x, y = first.double(), second.to(first.device).double()
    mu_x, mu_y = _local_mean(x, window), _local_mean(y, window)
    var_x = _local_mean(x * x, window) - mu_x**2
    var_y = _local_mean(y * y, window) - mu_y**2
    cov = _local_mean(x * y, window) - mu_x * mu_y
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    index = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1)


# -- model-parameter randomisation (Adebayo et al., NeurIPS 2018) ------------------------------

Explain = Callable[[nn.Module], Any]
Randomise = Callable[[nn.Module], None]


def reinitialise(module: nn.Module) -> None:
    """Re-draw a module's own parameters: its ``reset_parameters()`` (the layer type's default
    initialisation, as Quantus does) when it has one, else each parameter it owns directly from
    a normal distribution with that parameter's trained mean and standard deviation (0.02 for a
    constant or single-element parameter, timm's usual token initialisation)."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return
    with torch.no_grad():
        for parameter in module.parameters(recurse=False):
            spread = float(parameter.float().std()) if parameter.numel() > 1 else 0.0
            parameter.normal_(float(parameter.float().mean()), spread if spread > 0 else 0.02)


def _owns_parameters(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


@contextmanager
def _first_calls(model: nn.Module) -> Iterator[dict[nn.Module, int]]:
    """Record the order in which ``model``'s modules are first called; hooks removed on exit."""
    seen: dict[nn.Module, int] = {}

    def hook(module: nn.Module, _args: Any) -> None:
        seen.setdefault(module, len(seen))

    handles = [module.register_forward_pre_hook(hook) for module in model.modules()]
    try:
        yield seen
    finally:
        for handle in handles:
            handle.remove()


def randomisable_layers(model: nn.Module, called: dict[nn.Module, int] | None = None) -> list[str]:
    """Dotted names of the modules that own parameters, from the output down.

    ``called`` (module -> index of its first call in a forward pass) orders them by when they
    run, last first; a module that never ran (its parent uses its weights directly, as
    ``nn.MultiheadAttention`` does with ``out_proj``) goes just before its nearest parent that
    ran. Without ``called`` it is the reverse of the registration order (what Quantus uses).
    """
    names = {module: name for name, module in model.named_modules()}
    owners = [(position, name, module) for position, (name, module) in enumerate(model.named_modules())
              if _owns_parameters(module)]
    if called is None:
        return [name or "(model)" for _, name, _ in reversed(owners)]

    def key(position: int, name: str, module: nn.Module) -> tuple[float, int]:
        if module in called:
            return float(called[module]), position
        parts = name.split(".")
        for cut in range(len(parts) - 1, -1, -1):  # the nearest ancestor that ran
            ancestor = model.get_submodule(".".join(parts[:cut])) if cut else model
            if ancestor in called:
                return called[ancestor] + 0.5, position
        return -1.0, position

    ordered = sorted(owners, key=lambda item: key(*item), reverse=True)
    return [names[module] or "(model)" for _, _, module in ordered]


def _layer_groups(model: nn.Module, layers: Sequence[str] | int | None, called: dict[nn.Module, int]) -> list[tuple[str, list[nn.Module]]]:
    """``(name, modules)`` per randomisation step, top first."""
    if layers is None:
        names = randomisable_layers(model, called)
        return [(name, [model.get_submodule("" if name == "(model)" else name)]) for name in names]
    if isinstance(layers, int) and not isinstance(layers, bool):
        return _blocks_at_depth(model, layers, called)
    if isinstance(layers, str):
        raise TypeError("layers must be a sequence of dotted names (a list), an int depth or None")
    groups = []
    known = [name for name, _ in model.named_modules() if name]
    for name in layers:
        try:
            module = model if name in ("", "(model)") else model.get_submodule(name)
        except AttributeError:
            import difflib

            close = difflib.get_close_matches(name, known, n=3)
            raise ValueError(f"model has no layer {name!r}" + (f"; did you mean {', '.join(close)}?" if close else "")) from None
        owners = [m for m in module.modules() if _owns_parameters(m)]
        if not owners:
            raise ValueError(f"layer {name!r} has no parameters to randomise")
        groups.append((name, owners))
    if not groups:
        raise ValueError("layers must name at least one layer")
    return groups


def _blocks_at_depth(model: nn.Module, depth: int, called: dict[nn.Module, int]) -> list[tuple[str, list[nn.Module]]]:
    """One step per module ``depth`` levels down (everything inside it), plus one per shallower
    module that owns parameters itself (a class token); ordered by the last first call inside."""
    if depth < 1:
        raise ValueError(f"a layer depth must be >= 1, got {depth}")
    groups = []
    for name, module in model.named_modules():
        level = name.count(".") + 1 if name else 0
        if level == depth:
            owners = [m for m in module.modules() if _owns_parameters(m)]
        elif level < depth and _owns_parameters(module):
            owners = [module]
        else:
            continue
        if owners:
            last = max((called.get(m, -1) for m in module.modules()), default=-1)
            groups.append((last, len(groups), name or "(model)", owners))
    if not groups:
        raise ValueError("the model has no parameters to randomise")
    return [(name, owners) for _, _, name, owners in sorted(groups, key=lambda g: (g[0], g[1]), reverse=True)]


def _snapshot(model: nn.Module) -> list[tuple[dict, str, Tensor | None, Tensor | None]]:
    """Every parameter and buffer slot of every module: the object in it and a copy of its value."""
    saved = []
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for name, tensor in slots.items():
                saved.append((slots, name, tensor, None if tensor is None else tensor.detach().clone()))
    return saved


def _restore(saved: list[tuple[dict, str, Tensor | None, Tensor | None]]) -> None:
    """Put the original objects back in their slots with their original values."""
    with torch.no_grad():
        for slots, name, tensor, value in saved:
            slots[name] = tensor
            if tensor is not None and value is not None:
                tensor.copy_(value)


def _maps_of(result: Any) -> Tensor:
    maps = getattr(result, "maps", result)
    if not isinstance(maps, Tensor):
        raise TypeError(f"explain(model) must return maps (N, *spatial) or an Explanation, got {type(result).__name__}")
    _check_maps(maps)
    return maps.detach()


@dataclass(frozen=True)
class RandomisationResult:
    """The maps' similarity to the trained model's after each randomisation step.

    Attributes:
        layers: the name randomised at each step, top (output) first.
        order: ``"cascading"`` (step ``s`` has layers ``0..s`` randomised) or ``"independent"``.
        spearman: ``(S, N)`` Spearman rank correlation with the trained model's maps.
        ssim: ``(S, N)`` SSIM with them (``None`` when not computed).
        original: ``(N, *spatial)`` the trained model's maps.
        maps: ``(S, N, *spatial)`` the maps after each step (``keep_maps=True``), else ``None``.
    A method that passes the sanity check has low similarities once the top layers are random.
    """

    layers: tuple[str, ...]
    order: str
    spearman: Tensor
    ssim: Tensor | None
    original: Tensor
    maps: Tensor | None = None

    def mean(self) -> dict[str, list[float]]:
        """Per step, the mean over samples: ``{"spearman": [...], "ssim": [...]}``."""
        out = {"spearman": self.spearman.mean(dim=1).tolist()}
        if self.ssim is not None:
            out["ssim"] = self.ssim.mean(dim=1).tolist()
        return out


def model_randomisation(
    model: nn.Module,
    explain: Explain,
    *,
    layers: Sequence[str] | int | None = None,
    order: str = "cascading",
    seed: int = 0,
    randomise: Randomise = reinitialise,
    with_ssim: bool = True,
    keep_maps: bool = False,
) -> RandomisationResult:
    """The model-parameter randomisation test (Adebayo et al., "Sanity checks for saliency maps",
    NeurIPS 2018): randomise the layers from the output down and compare each new map with the
    trained model's (Spearman rank correlation, SSIM). The model is restored afterwards, also
    when ``explain`` fails: the same parameter and buffer objects, with their trained values.

    Args:
        model: the trained model; randomised in place step by step, restored at the end.
        explain: ``model -> maps (N, *spatial)`` (or an ``Explanation``): the explanation to test,
            for fixed inputs and targets, e.g. ``lambda m: explain_images(m, x, targets=t).maps``.
            It is called once on the trained model and once per step.
        layers: dotted names, top first; each step randomises every parameter inside one of them.
            ``None``: every module that owns parameters, ordered by when it first runs during the
            trained model's explanation, last first. An int ``d``: one step per module ``d``
            levels down (``1``: the model's children, e.g. ``fc, layer4, ..., conv1`` of a ResNet),
            for large models where a step per layer would be slow.
        order: ``"cascading"`` (the paper: randomisation accumulates) or ``"independent"`` (one
            layer at a time, the others trained).
        seed: step ``s`` draws its weights under ``torch.manual_seed(seed + s)``; torch's global
            random state is saved and restored around it.
        randomise: ``module -> None`` re-draws one module's own weights (default
            :func:`reinitialise`); it runs under the seeded random state above.
        with_ssim: also compute :func:`ssim` (it needs maps of at least 11 positions a side).
        keep_maps: keep every step's maps in the result.
    Returns:
        :class:`RandomisationResult`.
    """
    if order not in ("cascading", "independent"):
        raise ValueError(f"order must be 'cascading' or 'independent', got {order!r}")
    saved = _snapshot(model)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with _first_calls(model) as called:
            original = _maps_of(explain(model))
        groups = _layer_groups(model, layers, called)
        rhos, indices, kept = [], [], []
        for step, (_, modules) in enumerate(groups):
            if order == "independent" and step:
                _restore(saved)
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed + step)
                for module in modules:
                    randomise(module)
            maps = _maps_of(explain(model))
            if maps.shape != original.shape:
                raise ValueError(f"explain gave maps {tuple(maps.shape)} after randomising, {tuple(original.shape)} before")
            rhos.append(spearman_correlation(original, maps))
            if with_ssim:
                indices.append(ssim(original, maps))
            if keep_maps:
                kept.append(maps)
    finally:
        _restore(saved)
    return RandomisationResult(
        layers=tuple(name or "(model)" for name, _ in groups), order=order, spearman=torch.stack(rhos),
        ssim=torch.stack(indices) if indices else None, original=original,
        maps=torch.stack(kept) if keep_maps else None,
    )
