"""How a model is called, where its logits are, and which scores an explanation explains.

One rule each, used by every explainer, adapter and metric:

* :func:`call_model` -- a tensor is ``model(x)``, a tuple ``model(*inputs)``, a list ``model(inputs)``
  (pytorchvideo's SlowFast takes its pathways as one list), a mapping ``model(**inputs)``.
* :func:`primary_input` -- the tensor that gives the batch size and the spatial size of the maps.
* :func:`model_logits` -- the logits inside a model output.
* :func:`target_scores` -- targets (``None``, ints, ``(N, K)`` indices or a callable) -> scores ``(N, K)``.
* :class:`PositionScores` -- a callable target whose scores are sums of per-position scores of a
  position-wise output head (a language model's token head), which the explainer differentiates
  through that head once instead of once per target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import Tensor, nn

__all__ = ["Inputs", "PositionScores", "Targets", "call_model", "primary_input", "model_logits", "target_indices", "target_scores"]

Inputs = Union[Tensor, Sequence[Tensor], Mapping[str, Any]]
Targets = Union[None, int, Sequence[int], Sequence[Sequence[int]], Tensor, Callable[[Any], Tensor]]


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """Call ``model`` on ``inputs`` by the call convention above. A list is passed as a shallow
    copy: pytorchvideo's ``MultiPathWayWithFuse`` overwrites its input list in place, which would
    corrupt the caller's list and break a second forward."""
    if isinstance(inputs, Tensor):
        return model(inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    if isinstance(inputs, list):
        return model(list(inputs))
    if isinstance(inputs, Mapping):
        return model(**inputs)
    raise TypeError(f"inputs must be a tensor, a tuple/list of tensors or a dict, got {type(inputs).__name__}")


def primary_input(inputs: Inputs) -> Tensor:
    """The tensor itself, the first tensor of a tuple/list, or ``pixel_values`` (else the first
    floating-point tensor, else the first tensor) of a mapping."""
    if isinstance(inputs, Tensor):
        return inputs
    if isinstance(inputs, Mapping):
        if isinstance(inputs.get("pixel_values"), Tensor):
            return inputs["pixel_values"]
        candidates = [v for v in inputs.values() if isinstance(v, Tensor)]
        floats = [v for v in candidates if v.is_floating_point()]
        if floats or candidates:
            return (floats or candidates)[0]
    elif isinstance(inputs, (tuple, list)):
        for value in inputs:
            if isinstance(value, Tensor):
                return value
    raise TypeError("inputs hold no tensor")


def model_logits(output: Any) -> Tensor:
    """The logits in a model output: a tensor is the logits; a mapping (``dict``, Hugging Face
    ``ModelOutput``) gives its ``"logits"`` entry, else its first tensor value; a tuple or list its
    first element (searched by the same rule). Pass ``logits=`` to the explainer for anything else."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping):
        if "logits" in output and output["logits"] is not None:
            return model_logits(output["logits"])
        for value in output.values():
            if isinstance(value, Tensor):
                return value
    if isinstance(output, (tuple, list)) and output:
        return model_logits(output[0])
    raise TypeError(
        f"cannot find logits in a model output of type {type(output).__name__}; "
        "pass logits=callable(output) -> (N, classes) or targets=callable(output) -> scores"
    )


def target_indices(targets: Targets, logits: Tensor) -> tuple[Tensor, bool]:
    """Class indices ``(N, K)`` for ``targets`` and whether several targets per sample were asked for.

    ``None`` is each sample's top-1 class; an int is that class for every sample; ``N`` ints one
    per sample; an ``(N, K)`` nested list or tensor ``K`` per sample.
    """
    n, num_classes = logits.shape
    if targets is None:
        indices, multi = logits.argmax(dim=1, keepdim=True), False
    else:
        if isinstance(targets, bool) or (isinstance(targets, Tensor) and targets.is_floating_point()):
            raise TypeError(f"targets must be class indices (ints), got {targets!r}")
        try:
            indices = torch.as_tensor(targets, device=logits.device)
        except (TypeError, ValueError) as error:
            raise ValueError(f"targets must be an int, N ints or an (N, K) nested list of ints: {error}") from None
        if indices.numel() == 0:
            raise ValueError(
                f"targets {targets!r} hold no class index; give at least one per sample (an int, N ints, or an "
                "(N, K) nested list with K >= 1)"
            )
        if indices.is_floating_point() or indices.dtype == torch.bool:
            raise TypeError(f"targets must be integer class indices, got dtype {indices.dtype}")
        indices = indices.long()
        if indices.ndim == 0:
            indices, multi = indices.expand(n).unsqueeze(1), False
        elif indices.ndim == 1:
            if indices.numel() != n:
                raise ValueError(
                    f"got {indices.numel()} targets for a batch of {n} sample(s); give one per sample, "
                    "or an (N, K) nested list such as [[a, b, c]] for several targets per sample"
                )
            indices, multi = indices.unsqueeze(1), False
        elif indices.ndim == 2:
            if indices.shape[0] != n:
                raise ValueError(f"(N, K) targets have N={indices.shape[0]} rows for a batch of {n}")
            if indices.shape[1] == 0:
                raise ValueError("(N, K) targets with K = 0: give at least one target per sample")
            multi = True
        else:
            raise ValueError(f"targets must have at most 2 dims (N, K), got shape {tuple(indices.shape)}")
    bad = (indices < 0) | (indices >= num_classes)
    if bad.any():
        raise ValueError(
            f"target {indices[bad][0].item()} is out of range: the model outputs {num_classes} classes "
            f"(valid indices 0..{num_classes - 1})"
        )
    return indices, multi


def target_scores(
    output: Any, targets: Targets, n: int, logits: Callable[[Any], Tensor] = model_logits
) -> tuple[Tensor, Tensor | None, bool]:
    """``(scores (N, K), class indices (N, K) or None, several targets per sample?)``.

    A callable target returns the scores itself (``(N,)`` or ``(N, K)``); otherwise the scores are
    the logits of the target classes.
    """
    if callable(targets) and not isinstance(targets, Tensor):
        scores = targets(output)
        if not isinstance(scores, Tensor) or scores.ndim not in (1, 2) or scores.shape[0] != n:
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise ValueError(f"a target callable must return scores of shape (N,) or (N, K) with N={n}, got {shape}")
        if scores.ndim == 2 and scores.shape[1] == 0:
            raise ValueError(f"the target callable returned no scores (shape {tuple(scores.shape)}); return at least one "
                             "score per sample, (N,) or (N, K) with K >= 1")
        multi = scores.ndim == 2
        return (scores if multi else scores.unsqueeze(1)), None, multi
    found = logits(output)
    if not isinstance(found, Tensor) or found.ndim != 2 or found.shape[0] != n:
        shape = tuple(found.shape) if isinstance(found, Tensor) else type(found).__name__
        raise ValueError(f"expected logits of shape (N={n}, classes), got {shape}; pass logits= or a target callable")
    indices, multi = target_indices(targets, found)
    return found.gather(1, indices), indices, multi


@dataclass(frozen=True)
class PositionScores:
    """K target scores that are fixed weighted sums of per-position scores read off a position-wise
    output head: ``score[n, k] = sum_p weights[n, k, p] * position_scores[n, p]``, where position
    ``p``'s score depends on the head's input at position ``p`` only (a language model's token head:
    a linear layer, then a log-softmax or a logit per position).

    That structure lets the explainer cross the head ONCE: one backward pass from the sum of all
    position scores to the head's input gives every position's gradient there (each depends on its
    own position alone), the K targets' cotangents at the head's input are those gradients weighted
    by ``weights``, and only the rest of the model runs K-batched. The head is often the model's
    largest matrix (a 32k-257k vocabulary), so this saves K - 1 of its backward passes and the
    ``(K, N, P, vocabulary)`` cotangent. Called as a plain target it returns the ``(N, K)`` scores,
    so every other path (and a reference loop) gets the same numbers.

    Attributes:
        head: the module whose first input is the ``(N, P, D)`` sequence the position scores are read
            from; it must run once in the forward (else the explainer differentiates plainly).
        scores: ``model_output -> (position_scores (N, P), weights (N, K, P))``, ``P`` being the
            positions of the head's input.
    """

    head: nn.Module
    scores: Callable[[Any], tuple[Tensor, Tensor]]

    def __call__(self, output: Any) -> Tensor:
        return self.combine(*self.scores(output))

    @staticmethod
    def combine(position_scores: Tensor, weights: Tensor) -> Tensor:
        """The ``(N, K)`` scores: ``weights (N, K, P)`` applied to ``position_scores (N, P)``."""
        return torch.einsum("nkp,np->nk", weights.to(position_scores.dtype), position_scores)
