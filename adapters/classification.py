"""Image classification (``multiexplain.adapters.classification``): explain a batch of images
for one class, the top-k classes, or every positive label of a multi-label model.

:func:`explain_images` turns a classifier and images into one :class:`~multiexplain.ExplainRequest`
(the images as call inputs, the target classes as scores, the layer) and returns the shared
:class:`~multiexplain.Explanation`; the layer, capture and CAM math are the shared explainer's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from multiexplain.explain import ExplainRequest, Explanation, Targets, explain_request, method_names, model_logits
from multiexplain.explain.capture import Element
from multiexplain.explain.layers import LayerSpec, Reshape

__all__ = ["explain_images", "positive_labels"]


def positive_labels(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """``(N, classes)`` bool: the labels a sigmoid multi-label model predicts (``sigmoid >= threshold``)."""
    return logits.detach().sigmoid() >= threshold


def _multi_label_targets(logits: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Indices ``(N, K)`` of every positive label, highest first, ``K`` = the most positives of
    any sample (at least 1), and the validity mask ``(N, K)``; padding repeats the sample's top class."""
    detached = logits.detach()
    positive = positive_labels(detached, threshold)
    k = max(1, int(positive.sum(dim=1).max().item()))
    # Positives first (ordered by logit), then the rest: the first K columns hold every positive.
    ranking = torch.where(positive, detached, detached - detached.abs().max() * 4 - 1)
    order = ranking.argsort(dim=1, descending=True)[:, :k]
    valid = positive.gather(1, order)
    return torch.where(valid, order, order[:, :1]), valid


def explain_images(
    model: nn.Module,
    images: Tensor | Mapping[str, Tensor],
    *,
    method: str | None = None,
    methods: Sequence[str] | None = None,
    targets: Targets = None,
    topk: int | None = None,
    multi_label: bool = False,
    threshold: float = 0.5,
    layer: LayerSpec = "auto",
    reshape: Reshape | None = None,
    layer_call: int | None = None,
    element: Element = None,
    input_size: Sequence[int] | None = None,
    create_graph: bool = False,
) -> Explanation | dict[str, Explanation]:
    """Explain a batch of images for one or several classes each.

    Args:
        model: a classifier returning logits ``(N, classes)`` or a ``ModelOutput`` with ``.logits``.
        images: ``(N, 3, H, W)`` preprocessed as the model expects (or a dict of keyword inputs with
            ``pixel_values``).
        method: one method (default ``"gradcam++"``) -> one :class:`~multiexplain.Explanation`;
            ``methods=("gradcam++", "gradcam")`` -> ``{method: Explanation}`` from one forward pass.
        targets: ``None`` (top-1), an int, ``N`` ints, or ``(N, K)`` class indices.
        topk: explain each image's ``topk`` highest-scoring classes (``K = topk`` maps per image).
        multi_label: explain every label with ``sigmoid(logit) >= threshold``; ``K`` is the largest
            number of positives in the batch, and shorter rows are padded: padded entries have
            ``targets == -1`` and all-zero maps, raw maps, weights and scores.
        layer, reshape, layer_call, element: the layer (``"auto"``: see
            :func:`multiexplain.resolve_layer`), as for the explainers.
    Returns:
        maps ``(N, H, W)`` for top-1 / given single targets, ``(N, K, H, W)`` for ``(N, K)`` targets,
        ``topk`` or ``multi_label`` (always 4-D then, even for ``K = 1``); ``.targets`` holds the classes.
    """
    names, single = method_names(method, methods)
    chosen = sum([targets is not None, topk is not None, bool(multi_label)])
    if chosen > 1:
        raise ValueError("give at most one of targets=, topk= and multi_label=True")
    if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    picked: dict[str, Tensor] = {}

    def chosen_scores(output: Any) -> Tensor:
        logits = model_logits(output)
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise ValueError(f"expected logits (N, classes) from the model, got {getattr(logits, 'shape', type(logits))}")
        if topk is not None:
            if topk > logits.shape[1]:
                raise ValueError(f"topk={topk} but the model has only {logits.shape[1]} classes")
            picked["indices"] = logits.detach().topk(topk, dim=1).indices
            picked["valid"] = torch.ones_like(picked["indices"], dtype=torch.bool)
        else:
            picked["indices"], picked["valid"] = _multi_label_targets(logits, threshold)
        return logits.gather(1, picked["indices"])

    scores = chosen_scores if topk is not None or multi_label else targets
    request = ExplainRequest(images, scores, layer, reshape, layer_call, element, input_size=input_size,
                             create_graph=create_graph)
    explained = explain_request(model, request, names)
    if picked:
        explained = {name: _with_targets(e, picked["indices"], picked["valid"]) for name, e in explained.items()}
    return explained[names[0]] if single else explained


def _with_targets(explanation: Explanation, indices: Tensor, valid: Tensor) -> Explanation:
    """The chosen classes as ``targets``; padded entries of a multi-label batch zeroed and marked ``-1``."""
    if bool(valid.all()):
        return dataclasses.replace(explanation, targets=indices)

    def blank(tensor: Tensor) -> Tensor:
        keep = valid.view(*valid.shape, *([1] * (tensor.ndim - 2)))
        return torch.where(keep, tensor, torch.zeros_like(tensor))

    return dataclasses.replace(
        explanation,
        maps=blank(explanation.maps), raw=blank(explanation.raw), weights=blank(explanation.weights),
        scores=blank(explanation.scores), targets=torch.where(valid, indices, torch.full_like(indices, -1)),
        zero_gradient=explanation.zero_gradient | ~valid,
    )
