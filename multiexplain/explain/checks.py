"""Cheap numeric checks of one explanation: what the explainer refuses, flags or warns about.

Every check reads tensors the explanation has already computed (the inputs, the captured layer
output, its gradients, the scores): no extra forward or backward pass, one reduction each.

* :func:`check_finite_inputs` -- NaN / inf in a floating-point input is the caller's data problem:
  a ``ValueError`` naming the input and the samples.
* :func:`non_finite_samples` -- NaN / inf that the *model* produced (in the layer's output, its
  gradient or the explained score) is flagged per sample and target; the explainer zeroes those
  maps and :func:`warn_non_finite` says which samples and where.
* :func:`warn_if_probabilities` -- scores read from an output that is already softmax
  probabilities (the explained score should be a pre-softmax logit).
* :func:`warn_if_alpha_unbounded` -- Grad-CAM++'s ``alpha = 1 / (2 + sum(A) g)`` assumes
  non-negative activations; at a layer with negative ones it can leave ``(0, 1]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["check_finite_inputs", "non_finite_samples", "warn_if_alpha_unbounded", "warn_if_probabilities",
           "warn_non_finite"]


def _samples(bad: Tensor, limit: int = 8) -> str:
    """``"0, 3 and 5"`` -style listing of the True rows of ``bad`` (N,), first ``limit`` of them."""
    rows = bad.nonzero().flatten().tolist()
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def _floating_inputs(inputs: Any) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` for every floating-point tensor the model is called with."""
    if isinstance(inputs, Tensor):
        return [("the input", inputs)] if inputs.is_floating_point() else []
    if isinstance(inputs, Mapping):
        items = [(f"input {key!r}", value) for key, value in inputs.items()]
    elif isinstance(inputs, (tuple, list)):
        items = [(f"input {i}", value) for i, value in enumerate(inputs)]
    else:
        return []
    return [(name, value) for name, value in items if isinstance(value, Tensor) and value.is_floating_point()]


def check_finite_inputs(inputs: Any, n: int) -> None:
    """Raise ``ValueError`` when a floating-point input holds NaN or inf, naming it and the samples."""
    for name, tensor in _floating_inputs(inputs):
        finite = torch.isfinite(tensor.detach())
        if bool(finite.all()):
            continue
        where = ""
        if tensor.ndim >= 1 and tensor.shape[0] == n:
            bad = ~finite.reshape(n, -1).all(dim=1)
            where = f" in sample(s) {_samples(bad)} of {n}"
        raise ValueError(
            f"{name} holds NaN or inf values{where}: the explanation of a non-finite input is meaningless "
            "(every map would be NaN); fix the preprocessing, or replace them (torch.nan_to_num) or drop those samples"
        )


def non_finite_samples(activation: Tensor, gradients: Tensor, scores: Tensor) -> tuple[Tensor, list[str]]:
    """``(flags (N, K) bool, what)``: True where the layer output ``(N, C, ...)`` of the sample, its
    gradient ``(N, K, C, ...)`` for the target or the score ``(N, K)`` is not finite; ``what`` names
    which of the three were."""
    n, k = scores.shape
    parts = {
        "the layer's output": (~torch.isfinite(activation.detach())).reshape(n, -1).any(dim=1, keepdim=True).expand(n, k),
        "its gradient": (~torch.isfinite(gradients.detach())).reshape(n, k, -1).any(dim=2),
        "the explained score": ~torch.isfinite(scores.detach()),
    }
    flags = torch.zeros(n, k, dtype=torch.bool, device=scores.device)
    what = []
    for name, part in parts.items():
        if bool(part.any()):
            flags |= part
            what.append(name)
    return flags, what


def warn_non_finite(flags: Tensor, what: Sequence[str], layer: str) -> None:
    """The warning for samples :func:`non_finite_samples` flagged (``flags`` ``(N, K)``)."""
    bad = flags.any(dim=1)
    warnings.warn(
        f"the model produced NaN or inf ({' and '.join(what)}) at layer {layer!r} for sample(s) {_samples(bad)} "
        f"of {flags.shape[0]}: their maps, raw maps and weights are set to zero and Explanation.non_finite marks "
        "them (a top-1 target there is -1, as no class can be ranked); check the model's weights and numerics "
        "(float16 overflow, a log of 0) or its input",
        RuntimeWarning, stacklevel=2,
    )


def warn_if_probabilities(logits: Tensor) -> None:
    """Warn when ``logits (N, classes)`` look like softmax probabilities: every entry in ``[0, 1]`` and
    every row summing to 1."""
    if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[1] < 2 or not logits.is_floating_point():
        return
    values = logits.detach().float()
    if not bool(((values >= 0) & (values <= 1)).all()):
        return
    if not bool(((values.sum(dim=1) - 1).abs() <= 1e-3).all()):
        return
    warnings.warn(
        "the model's output looks like softmax probabilities (every row is in [0, 1] and sums to 1), so the "
        "explained scores are probabilities, not logits: their gradients vanish as a probability nears 0 or 1 and "
        "mix in every other class, and the paper's Grad-CAM++ (Y = exp(S)) assumes a pre-softmax score S. Explain "
        "the model without its final softmax, pass logits=callable(output) that returns the logits, or give "
        "targets=callable returning log-probabilities (output.log())",
        RuntimeWarning, stacklevel=2,
    )


#: Warn when more than this share of a Grad-CAM++ weight vector's mass comes from out-of-range alpha.
ALPHA_MASS_LIMIT = 0.1


def warn_if_alpha_unbounded(activations: Tensor, gradients: Tensor, alpha: Tensor, weights: Tensor, layer: str | None) -> None:
    """Warn when Grad-CAM++'s alpha leaves ``(0, 1]`` where it matters.

    For activations ``A >= 0`` (after a ReLU) ``alpha = 1 / (2 + sum(A) g)`` lies in ``(0, 1/2]``
    wherever ``g > 0``; negative activations can make the denominator small or negative, so
    ``alpha`` explodes or flips sign. The warning fires when, for some sample and target, more than
    :data:`ALPHA_MASS_LIMIT` of ``sum_c sum_p |alpha relu(g)|`` (the mass of the channel weights)
    comes from positions where ``alpha`` is outside ``(0, 1]``. ``alpha`` is the explanation's own
    (``(N, K, C, *spatial)``, as :func:`~multiexplain.core.grad_cam_plus_plus_alpha` gives it), so
    the check adds no second alpha; it runs only when an activation is negative, and measures the
    mass only when some position with ``g > 0`` is out of range.
    """
    with torch.no_grad():
        if not bool((activations < 0).any()):
            return
        alpha, gradients = alpha.detach(), gradients.detach()
        outside = ((alpha <= 0) | (alpha > 1)) & (gradients > 0)
        if not bool(outside.any()):
            return
        positive = gradients.clamp(min=0).to(alpha.dtype)
        # An out-of-range position counts as at least alpha = 1 (a zero denominator leaves alpha = 0).
        mass = torch.where(outside, alpha.abs().clamp(min=1), alpha.abs()) * positive
        n, k = mass.shape[:2]
        total = mass.reshape(n, k, -1).sum(-1)
        share = (mass * outside).reshape(n, k, -1).sum(-1) / torch.where(total > 0, total, torch.ones_like(total))
        worst = float(share.max())
        if worst <= ALPHA_MASS_LIMIT:
            return
        largest = float(weights.detach().abs().max())
    warnings.warn(
        f"Grad-CAM++ at layer {layer or '?'!r}: its activations are negative in places (a LeakyReLU / GELU / SiLU, "
        "normalisation or pre-activation output), so alpha = 1 / (2 + sum(A) g) leaves (0, 1] where it carries "
        f"{100 * worst:.0f}% of a map's channel-weight mass: weights are negative or blown up (largest |w| = "
        f"{largest:.3g}) and can flip or swamp the map. The closed form assumes activations >= 0; explain a layer "
        "whose output is >= 0 (e.g. after its ReLU), or use Grad-CAM (method='gradcam'), which has no alpha",
        RuntimeWarning, stacklevel=2,
    )
