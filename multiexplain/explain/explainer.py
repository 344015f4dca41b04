"""Explainers: run a model once, capture one layer, turn scores into Grad-CAM / Grad-CAM++ maps.

``BaseCAM`` does everything that is not the choice of channel weights: the layer (through the one
resolver), the capture, targets, vector-Jacobian products, reshapes, upsampling and normalisation.
A method is a small subclass that supplies :meth:`BaseCAM.channel_weights` and registers itself
in :data:`METHODS` with :func:`register_method`; every adapter, the command line and
``explain_methods`` find methods there.

Task adapters describe one explanation as an :class:`ExplainRequest` (call inputs, scores, layer,
input size) and run it with :func:`explain_request`; every task's result is an
:class:`Explanation` (a task view adds its own fields on top).
"""

from __future__ import annotations

import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any, Callable, ClassVar, Literal, Sequence, TypeVar

import torch
from torch import Tensor, nn

from .. import core
from .capture import Element, InputCapture, LayerCapture, bypassed
from .checks import check_finite_inputs, non_finite_samples, warn_if_alpha_unbounded, warn_if_probabilities, warn_non_finite
from .families import final_activations, input_spatial_size
from .layers import (ChannelsLast, LayerChoice, LayerSpec, MergedPatches, Reshape, TileTokens, TokenReshape, _geometry_misfit,
                     read_layout, resolve_layer)
from .targets import Inputs, PositionScores, Targets, call_model, model_logits, primary_input, target_scores

__all__ = [
    "AUTO_CHUNK_BYTES",
    "BaseCAM",
    "ExplainRequest",
    "Explanation",
    "GradCAM",
    "GradCAMPlusPlus",
    "METHODS",
    "MaxBatch",
    "auto_chunk",
    "check_max_batch",
    "explain_request",
    "method_names",
    "register_method",
]


MaxBatch = int | Literal["auto"] | None
"""Targets per batched backward pass: a positive int, ``"auto"`` (:func:`auto_chunk`'s batches, or one
target per pass where that times faster) or ``None`` (all)."""

# Bytes per target times targets per batched backward pass under max_batch="auto" (auto_chunk), by
# device type ("cpu", "cuda", ...; "default" for the others). CPU: 1 MiB, 3-5 words of the decoder-only
# VLMs of benchmarks/speed_captioning.py (a 197-257 token tower at width 256). A modest gain, within the
# machine's noise run by run: over three runs on the development machine, all 16 words of a caption at
# once took on average ~7% longer than such chunks on GIT and ~4% on LLaVA, ~3% less on Qwen2-VL (the
# caches overflow on the longer sequences). Elsewhere a memory bound only: 256 MiB keeps a few hundred
# words on a 7B LLaVA (577 x 1024 CLIP-L features in half precision, ~1.2 MB a word) in one pass; not
# yet measured on a GPU. Where K leaves room, "auto" also times one such batch against single passes
# and runs the rest the faster way (_faster_batch): on a CPU a batch can cost more than its targets
# one by one (vmap's fallbacks), and which way wins varies by model (GIT, LLaVA: single; Qwen2-VL: batches).
AUTO_CHUNK_BYTES = {"cpu": 1 << 20, "default": 256 << 20}


@dataclass
class Explanation:
    """What one explanation returns; every task's result has these fields. Tensors live on the
    model's device.

    Attributes:
        maps: upsampled to the input's spatial size, min-max normalised to ``[0, 1]`` per map:
            ``(N, *input_spatial)``, or ``(N, K, *input_spatial)`` for ``K`` targets per sample.
        raw: layer-resolution maps before normalisation, ``(N, [K,] *layer_spatial)``.
        weights: channel weights ``(N, [K,] C[, *unpooled_spatial])``.
        scores: the explained scalar scores ``(N, [K])`` (pre-softmax logits for class targets).
        targets: class indices ``(N, [K])``, or ``None`` when a score callable was given.
        zero_gradient: ``(N, [K])`` bool, True where every gradient at the layer was zero (the map
            is then all zeros, never NaN).
        method: the method's registered name (``"gradcam++"``, ``"gradcam"``, ...).
        layer: dotted name of the explained layer.
        non_finite: ``(N, [K])`` bool, True where the model produced NaN or inf in the layer's output,
            its gradient or the explained score; the map, raw map and weights are all zero there, a
            top-1 target is ``-1`` and a ``RuntimeWarning`` named the samples. ``None`` for results
            not made by the explainer.
    """

    maps: Tensor
    raw: Tensor
    weights: Tensor
    scores: Tensor
    targets: Tensor | None
    zero_gradient: Tensor
    method: str
    layer: str
    non_finite: Tensor | None = None

    @property
    def multi_target(self) -> bool:
        return self.scores.ndim == 2


#: Registered CAM methods by name (one registry; :func:`register_method` adds a user's subclass).
METHODS: dict[str, type["BaseCAM"]] = {}

CAM = TypeVar("CAM", bound=type["BaseCAM"])


def register_method(cls: CAM) -> CAM:
    """Class decorator: make a :class:`BaseCAM` subclass available by its ``method`` name to
    ``explain_methods``, every adapter's ``methods=`` and the command line's ``--method``."""
    name = getattr(cls, "method", "")
    if not (isinstance(cls, type) and issubclass(cls, BaseCAM)) or not name:
        raise TypeError("register_method takes a BaseCAM subclass with a non-empty `method` name")
    existing = METHODS.get(name)
    if existing is not None and existing is not cls:
        raise ValueError(f"a method named {name!r} is registered already ({existing.__name__}); choose another name")
    METHODS[name] = cls
    return cls


def method_names(method: str | None = None, methods: Sequence[str] | None = None) -> tuple[tuple[str, ...], bool]:
    """``(names, single)`` from an adapter's ``method=`` / ``methods=`` arguments, checked against
    :data:`METHODS`; ``single`` says the caller asked for one method (and gets one result back)."""
    if method is not None and methods is not None:
        raise ValueError("give method= (one result) or methods= (a dict of results), not both")
    names = (method or "gradcam++",) if methods is None else tuple(methods)
    if isinstance(methods, str):
        names = (methods,)
    if not names:
        raise ValueError("methods= is empty; name at least one method, e.g. ('gradcam++', 'gradcam')")
    unknown = [name for name in names if name not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}")
    return tuple(dict.fromkeys(names)), methods is None


class BaseCAM:
    """Shared machinery of gradient-weighted class activation maps.

    Args:
        model: any ``nn.Module``; it is explained in the train/eval mode the caller left it in.
        target_layer: an ``nn.Module`` of the model, its dotted name (``"layer4"``, ``"blocks.-1"``),
            or ``"auto"`` (see :func:`multiexplain.explain.layers.resolve_layer`), resolved on the
            first call.
        reshape: turns the layer's output into channels-first ``(N, C, *spatial)``, e.g.
            :class:`~multiexplain.TokenReshape` for ViT tokens or :class:`~multiexplain.ChannelsLast`;
            for a named layer without one, tokens and channels-last outputs are read from their shape.
        layer_call: which call to explain when the layer runs several times in one forward.
        element: which element of a tuple / list / dict output is the feature map.
        branch: which pathway of a multi-pathway model (SlowFast: 0 slow, 1 fast) "auto" picks.
        logits: callable ``model_output -> (N, classes)``; default :func:`model_logits`.
        pool_axes: spatial axes the channel weights are pooled over (default all; ``(1, 2)`` on
            ``T, H, W`` gives per-time-slice weights).
        create_graph: differentiable mode (maps carry gradients to the model's parameters).
        max_batch: at most this many of the ``K`` targets' vector-Jacobian products run as one
            batched backward pass (``None``: all ``K`` at once). A batched backward holds one
            set of intermediate gradients per target, so for ``K`` targets on a large model
            (every word of a long answer) memory grows ``K``-fold; ``max_batch`` bounds it.
            ``"auto"`` sizes the chunks by the bytes of a target's gradients and the device, see
            :func:`auto_chunk`. The maps are the same whatever the chunking.

    Scores are pre-softmax logits: a head that ends in a softmax (pytorchvideo's, see
    :data:`~multiexplain.explain.families.SOFTMAX_HEADS`) is explained before its activation, in
    this thread's forward only. Gradients are taken with ``torch.autograd.grad`` w.r.t. the captured activation only: no
    ``.backward()``, no parameter ``.grad`` written. Scores of different samples must not interact
    (a batch-norm layer in train mode *after* the explained layer couples them).
    """

    method: ClassVar[str] = ""

    def __init__(
        self,
        model: nn.Module,
        target_layer: LayerSpec = "auto",
        *,
        reshape: Reshape | None = None,
        layer_call: int | None = None,
        element: Element = None,
        branch: int | None = None,
        logits: Callable[[Any], Tensor] | None = None,
        pool_axes: Sequence[int] | None = None,
        create_graph: bool = False,
        max_batch: MaxBatch = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.max_batch = check_max_batch(max_batch)
        self.model = model
        self.target_layer = target_layer
        self._options = {"reshape": reshape, "layer_call": layer_call, "element": element, "branch": branch}
        self.logits = logits or model_logits
        self.pool_axes = tuple(pool_axes) if pool_axes is not None else None
        self.create_graph = create_graph
        self._lock = threading.Lock()
        self.choice: LayerChoice | None = None
        if not (isinstance(target_layer, str) and target_layer == "auto"):
            self.choice = resolve_layer(model, target_layer, **self._options)

    # -- the one thing a method supplies -------------------------------------------------------
    def channel_weights(self, activations: Tensor, gradients: Tensor, spatial_ndim: int) -> Tensor:
        """Channel weights ``(N, K, C[, *unpooled])`` from activations ``(N, 1, C, *spatial)`` and
        gradients ``(N, K, C, *spatial)``."""
        raise NotImplementedError

    # -- context-manager use: no hooks outlive a call -------------------------------------------
    def __enter__(self) -> "BaseCAM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Nothing to release: hooks never outlive a call."""

    # -- the layer ----------------------------------------------------------------------------
    @property
    def layer(self) -> nn.Module | None:
        return None if self.choice is None else self.choice.module

    @property
    def layer_name(self) -> str | None:
        return None if self.choice is None else self.choice.name

    @property
    def reshape(self) -> Reshape | None:
        return self._options["reshape"] if self.choice is None else self.choice.reshape

    @property
    def auto(self) -> LayerChoice | None:
        """What ``"auto"`` chose (``None`` for a named layer, or before the first call)."""
        return self.choice if self.target_layer == "auto" else None

    def resolve(self, inputs: Inputs, targets: Targets = None, input_size: Sequence[int] | None = None,
                batch_size: int | None = None) -> LayerChoice:
        """The layer choice, made on the first call (a probe runs only for models that declare no
        layer and match no family rule; its result is cached per model and input shape)."""
        if self.choice is None:
            with self._lock:
                if self.choice is None:
                    reference = primary_input(inputs)
                    n = batch_size or reference.shape[0]
                    spatial = tuple(input_size) if input_size is not None else input_spatial_size(self.model, reference)
                    self.choice = resolve_layer(
                        self.model, "auto", **self._options,
                        call=lambda module: call_model(module, inputs),
                        input_shape=(n, 0, *spatial),
                        score=lambda output: target_scores(output, targets, n, self.logits)[0],
                    )
        return self.choice

    # -- explaining ---------------------------------------------------------------------------
    def __call__(self, inputs: Inputs, targets: Targets = None, *, input_size: Sequence[int] | None = None,
                 create_graph: bool | None = None, batch_size: int | None = None) -> Explanation:
        """Explain ``inputs`` for ``targets``.

        Args:
            inputs: a tensor ``(N, C, *spatial)``, a tuple/list of tensors, or a dict of keyword
                inputs (see :func:`~multiexplain.explain.targets.call_model`).
            targets: ``None`` (each sample's top-1 class), an int, ``N`` ints, an ``(N, K)``
                nested list or tensor of class indices (``K`` maps per sample from one forward),
                or a callable ``model_output -> scores (N,) or (N, K)``.
            input_size: spatial size to upsample maps to; default the primary input's ``shape[2:]``
                (``(T, H, W)`` for a frames-first video model's ``(N, T, C, H, W)`` pixel values).
            create_graph: override the differentiable mode for this call.
            batch_size: the number of samples, when the primary input's first axis is not it
                (Qwen2-VL takes every image's patches flattened into one ``(patches, dim)`` tensor).
        """
        return self.explain(inputs, targets, input_size=input_size, create_graph=create_graph, batch_size=batch_size)

    def explain(self, inputs: Inputs, targets: Targets = None, *, input_size: Sequence[int] | None = None,
                create_graph: bool | None = None, batch_size: int | None = None) -> Explanation:
        """Same as calling the explainer."""
        explained = self.explain_methods(inputs, targets, methods=(self.method,), input_size=input_size,
                                         create_graph=create_graph, batch_size=batch_size)
        return explained[self.method]

    def explain_methods(
        self,
        inputs: Inputs,
        targets: Targets = None,
        *,
        methods: Sequence[str],
        input_size: Sequence[int] | None = None,
        create_graph: bool | None = None,
        batch_size: int | None = None,
        upsample: bool = True,
    ) -> dict[str, Explanation]:
        """Maps of several methods (names in :data:`METHODS`, e.g. ``("gradcam++", "gradcam")``)
        from ONE forward pass and one set of gradients: methods differ only in their channel
        weights. Returns ``{method: Explanation}`` in the order given (arguments as for ``__call__``).
        ``upsample=False`` leaves ``maps`` on the layer's grid (normalised like the upsampled ones),
        for callers that resample ``raw`` themselves (e.g. onto the original image of a processor)."""
        unknown = [name for name in methods if name != self.method and name not in METHODS]
        if unknown or not methods:
            raise ValueError(f"unknown method(s) {unknown}; choose from {sorted(METHODS)}" if unknown else "no methods given")
        differentiable = self.create_graph if create_graph is None else create_graph
        if torch.is_inference_mode_enabled():
            raise RuntimeError(
                "cannot explain inside torch.inference_mode(): maps need gradients at the layer and "
                "inference tensors record none; call the explainer outside it (torch.no_grad() is fine)"
            )
        reference = primary_input(inputs)
        if input_size is None and reference.ndim < 3:
            raise ValueError(
                f"expected a batched channels-first input (N, C, *spatial), got shape {tuple(reference.shape)}; "
                "add the batch axis (x.unsqueeze(0)) or pass input_size="
            )
        n = batch_size or reference.shape[0]
        check_finite_inputs(inputs, n)
        choice = self.resolve(inputs, targets, input_size, batch_size)
        capture = LayerCapture(choice.module, choice.name, call_index=choice.layer_call, element=choice.element,
                               detach_below=not differentiable)
        head = InputCapture(targets.head) if isinstance(targets, PositionScores) else None
        grad_mode = torch.is_grad_enabled()
        try:
            # Inference mode: nothing below the layer records a graph; the capture turns grad on.
            torch.set_grad_enabled(differentiable)
            with capture.attached(), bypassed(final_activations(self.model)), head.attached() if head else nullcontext():
                output = call_model(self.model, inputs)
            activation = capture.require()
            if head is not None:
                position_scores, weights = targets.scores(output)
                scores, indices, multi = target_scores(output, lambda _: PositionScores.combine(position_scores, weights), n)
                gradients = _head_factored_gradients(position_scores, weights, head.single_input(), scores, activation,
                                                     differentiable, self.max_batch)
            else:
                scores, indices, multi = target_scores(output, targets, n, self.logits)
                if not callable(targets) or isinstance(targets, Tensor):
                    warn_if_probabilities(self.logits(output))
                gradients = _gradients(scores, activation, differentiable, self.max_batch)
        finally:
            torch.set_grad_enabled(grad_mode)
        size = tuple(input_size) if input_size is not None else input_spatial_size(self.model, reference)
        reshape = choice.reshape if choice.reshape is not None else _read_named_layer(activation, size)
        bind = getattr(reshape, "bind", None)
        if callable(bind):  # a reading that depends on the call's inputs (Qwen2-VL's image_grid_thw)
            reshape = bind(inputs)
        activation, gradients = _channels_first(activation, gradients, reshape, choice.name)
        non_finite, indices = _flag_non_finite(activation, gradients, scores, indices, targets is None, choice.name)
        if self.choice is not None and self.choice.grid is None:
            layout = {type(None): "channels_first", TokenReshape: "tokens", TileTokens: "tokens", MergedPatches: "tokens",
                      ChannelsLast: "channels_last"}.get(type(reshape), "custom")
            self.choice = replace(self.choice, layout=self.choice.layout or layout, grid=tuple(activation.shape[2:]))
        explanations = {}
        for name in methods:
            method = self if name == self.method else METHODS[name](
                self.model, choice.module, reshape=reshape, layer_call=choice.layer_call, element=choice.element,
                logits=self.logits, pool_axes=self.pool_axes, create_graph=self.create_graph, max_batch=self.max_batch,
            )
            explanations[name] = method._maps(choice.name, activation, gradients, scores, indices, multi, size,
                                              differentiable, non_finite, upsample)
        return explanations

    def _maps(self, layer: str, activation: Tensor, gradients: Tensor, scores: Tensor, indices: Tensor | None,
              multi: bool, size: tuple[int, ...], differentiable: bool, non_finite: Tensor,
              upsample: bool = True) -> Explanation:
        spatial_ndim = activation.ndim - 2
        if not differentiable:
            activation, gradients = activation.detach(), gradients.detach()
        zero_gradient = (gradients == 0).flatten(2).all(dim=2)
        if bool(non_finite.any()):
            # Zeros in place of the non-finite values: those maps, raw maps and weights come out all zero.
            activation, gradients = _zero_flagged(activation, gradients, non_finite)
        weights = self.channel_weights(activation.unsqueeze(1), gradients, spatial_ndim)
        raw = core.weighted_activation_map(activation.unsqueeze(1), weights, spatial_ndim, self.pool_axes)
        if len(size) != spatial_ndim:
            raise ValueError(
                f"the map of layer {layer!r} has {spatial_ndim} spatial axes {tuple(raw.shape[2:])} but the "
                f"input's spatial size {size} has {len(size)}; pass a batched channels-first input or input_size="
            )
        maps = core.normalize_maps(core.upsample_maps(raw, size) if upsample else raw, spatial_ndim)
        if not multi:
            maps, raw, weights, scores, zero_gradient, non_finite = (
                t.squeeze(1) for t in (maps, raw, weights, scores, zero_gradient, non_finite))
            indices = indices.squeeze(1) if indices is not None else None
        if not differentiable:
            scores = scores.detach()
        return Explanation(maps, raw, weights, scores, indices, zero_gradient, self.method, layer, non_finite)


def _flag_non_finite(activation: Tensor, gradients: Tensor, scores: Tensor, indices: Tensor | None, top1: bool,
                     layer: str) -> tuple[Tensor, Tensor | None]:
    """``(flags (N, K), indices)``: which samples and targets hold NaN/inf the model produced (warned
    about); a top-1 target of a flagged sample becomes -1, as no class can be ranked from its logits."""
    flags, what = non_finite_samples(activation, gradients, scores)
    if what:
        warn_non_finite(flags, what, layer)
        if top1 and indices is not None:
            indices = torch.where(flags, torch.full_like(indices, -1), indices)
    return flags, indices


def _zero_flagged(activation: Tensor, gradients: Tensor, flags: Tensor) -> tuple[Tensor, Tensor]:
    """Activations ``(N, C, ...)`` and gradients ``(N, K, C, ...)`` with every value of a flagged
    ``(sample, target)`` (``flags (N, K)``) and every non-finite value replaced by 0 (``torch.where``,
    so a differentiable map keeps a NaN-free graph)."""
    extra = gradients.ndim - 2
    keep = ~flags.view(*flags.shape, *([1] * extra))
    gradients = torch.where(keep & torch.isfinite(gradients), gradients, torch.zeros_like(gradients))
    activation = torch.where(torch.isfinite(activation), activation, torch.zeros_like(activation))
    return activation, gradients


def _read_named_layer(activation: Tensor, size: tuple[int, ...]) -> Reshape | None:
    """For a layer named without ``reshape=``: channels-first when that reading fits the input,
    else tokens or channels-last when the output's shape says so (``None``: read channels-first)."""
    if activation.ndim == len(size) + 2 and _geometry_misfit(tuple(activation.shape[2:]), size) is not None:
        return None
    reading = read_layout(activation, activation.shape[0], size)
    return reading.reshape if reading is not None else None


def _channels_first(activation: Tensor, gradients: Tensor, reshape: Reshape | None, layer: str) -> tuple[Tensor, Tensor]:
    """Activations ``(N, C, *spatial)`` and gradients ``(N, K, C, *spatial)`` from the captured
    activation and its target-first gradients ``(K, *activation.shape)`` through ``reshape``.

    Each target's gradient goes through ``reshape`` on its own, exactly as the activation does, so
    a reshape may also read an output without a batch axis (Qwen2-VL's flattened patches)."""
    if reshape is not None:
        activation = reshape(activation)
        gradients = torch.stack([reshape(gradient) for gradient in gradients])
    if activation.ndim < 3:
        raise ValueError(
            f"layer {layer!r} outputs shape {tuple(activation.shape)}, which has no spatial axes; "
            "choose a convolutional layer, or give reshape= (TokenReshape for (N, L, D) tokens)"
        )
    return activation, gradients.transpose(0, 1)


def _gradients(scores: Tensor, activation: Tensor, create_graph: bool, max_batch: MaxBatch = None) -> Tensor:
    """``dS[:, k] / dA`` for every target, target first: ``(K, *activation.shape)``."""
    _require_graph(scores)
    n, k = scores.shape
    one_hot = torch.eye(k, dtype=scores.dtype, device=scores.device).unsqueeze(1).expand(k, n, k)
    return _batched_vjp(scores, activation, one_hot, create_graph, max_batch)


def _head_factored_gradients(position_scores: Tensor, weights: Tensor, head_input: Tensor | None, scores: Tensor,
                             activation: Tensor, create_graph: bool, max_batch: MaxBatch = None) -> Tensor:
    """``dS[:, k] / dA`` for :class:`PositionScores` targets, target first ``(K, *activation.shape)``,
    crossing the position-wise head once (see :class:`PositionScores`).

    Position ``p``'s score reads only the head's input at ``p``, so ONE backward pass of the sum of
    all position scores gives ``g[n, p] = d position_scores[n, p] / d head_input[n, p]``; target
    ``k``'s cotangent at the head's input is then ``weights[n, k, p] * g[n, p]`` (the chain rule,
    exactly), and only the model below the head runs K-batched. When the head's input cannot carry
    that (the head ran more or less than once, or its input does not line up with the positions),
    the scores are differentiated plainly: the same numbers, the slower way.
    """
    _require_graph(scores)
    n, p = position_scores.shape
    factorable = (isinstance(head_input, Tensor) and head_input.requires_grad and head_input.ndim >= 2
                  and tuple(head_input.shape[:2]) == (n, p) and tuple(weights.shape) == (n, scores.shape[1], p))
    if not factorable:
        return _gradients(scores, activation, create_graph, max_batch)
    (per_position,) = torch.autograd.grad(position_scores.sum(), head_input, retain_graph=True, create_graph=create_graph,
                                          allow_unused=True)
    if per_position is None:  # no position score reads the head (all masked): every gradient is zero
        per_position = torch.zeros_like(head_input)
    extra = [1] * (head_input.ndim - 2)
    cotangents = weights.to(per_position.dtype).transpose(0, 1).reshape(weights.shape[1], n, p, *extra) * per_position
    return _batched_vjp(head_input, activation, cotangents, create_graph, max_batch)


def _require_graph(scores: Tensor) -> None:
    if not scores.requires_grad:
        raise RuntimeError(
            "the explained scores do not depend on the layer (they carry no gradient); "
            "check the target callable and the layer"
        )


def check_max_batch(max_batch: Any) -> MaxBatch:
    """``max_batch`` as given, or a ``ValueError`` naming what it may be."""
    if max_batch is None or max_batch == "auto":
        return max_batch
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
        raise ValueError(f"max_batch must be a positive int (targets per batched backward pass), 'auto' or None (all at once), "
                         f"got {max_batch!r}")
    return max_batch


def auto_chunk(cotangents: Tensor, inputs: Tensor) -> int:
    """How many of the ``(K, *outputs.shape)`` cotangents one batched backward pass from ``outputs``
    to ``inputs`` takes under ``max_batch="auto"``: as many as fit in :data:`AUTO_CHUNK_BYTES` for
    their device type (at least one), counting per target the larger of a cotangent and a gradient at
    ``inputs``.

    A batched backward holds every intermediate gradient once per target, and between the scores
    and the layer those are about as large as the larger end (a proxy: the widest layer between
    them may hold more). It is the default for decoder-only vision-language models' words, whose
    gradients cross every image and text position of a language model; the other tasks' K
    targets batch whole (``None``), as their speed benchmarks measure.
    """
    k = cotangents.shape[0]
    per_target = max(cotangents[0].numel() * cotangents.element_size(), inputs.numel() * inputs.element_size(), 1)
    budget = AUTO_CHUNK_BYTES.get(cotangents.device.type, AUTO_CHUNK_BYTES["default"])
    return max(1, min(k, budget // per_target))


def _batched_vjp(outputs: Tensor, inputs: Tensor, cotangents: Tensor, create_graph: bool, max_batch: MaxBatch) -> Tensor:
    """The vector-Jacobian products of ``outputs`` w.r.t. ``inputs`` for ``K`` cotangents
    ``(K, *outputs.shape)``: ``(K, *inputs.shape)``.

    They run as batched backward passes (``is_grads_batched``) of at most ``max_batch`` cotangents
    each (all at once for ``None``; for ``"auto"``, :func:`auto_chunk`'s batches or one cotangent
    per pass, whichever :func:`_faster_batch` times as faster); one pass per cotangent is also the
    fallback for ops that vmap cannot batch.

    ``is_grads_batched`` runs autograd under vmap, which has no batching rule for some backward ops
    (on a CPU: ``scaled_dot_product_attention``'s, SiLU's, GELU's and ``masked_scatter``'s, as of
    torch 2.14) and runs those once per cotangent, stacking the results. The matrix products batch,
    so a batched pass beats K passes where they dominate (a GPU, wide layers), while through a small
    language model on one CPU thread it can cost more than the K passes, by the stacking (the
    decoder-only rows of ``benchmarks/speed_captioning.py``).
    """
    def vjp(rows: Tensor) -> Tensor:
        return _vjp_rows(outputs, inputs, rows, create_graph)

    k = cotangents.shape[0]
    chunk = k if max_batch is None else auto_chunk(cotangents, inputs) if max_batch == "auto" else max_batch
    parts, start = [], 0
    if max_batch == "auto" and 1 < chunk and k >= chunk + 3:  # room to time both ways and use the faster
        chunk, parts = _faster_batch(vjp, cotangents, chunk)
        start = sum(part.shape[0] for part in parts)
    for begin in range(start, k, chunk):
        parts.append(vjp(cotangents[begin : begin + chunk]))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _vjp_rows(outputs: Tensor, inputs: Tensor, rows: Tensor, create_graph: bool) -> Tensor:
    """``(B, *inputs.shape)`` products for ``B`` cotangents ``rows``: one batched backward pass, or
    a plain one for a single row (or, where vmap cannot batch the backward, one per row)."""
    def vjp(grad_outputs: Tensor, batched: bool) -> Tensor:
        (grad,) = torch.autograd.grad(
            outputs, inputs, grad_outputs, retain_graph=True, create_graph=create_graph,
            allow_unused=True, is_grads_batched=batched,
        )
        if grad is None:  # the outputs do not depend on this layer at all
            shape = (grad_outputs.shape[0], *inputs.shape) if batched else inputs.shape
            grad = torch.zeros(shape, dtype=inputs.dtype, device=inputs.device)
        return grad

    if rows.shape[0] == 1:
        return vjp(rows[0], False).unsqueeze(0)
    try:
        return vjp(rows, True)
    except RuntimeError as error:
        warnings.warn(f"batched gradients failed ({error}); falling back to one pass per target", RuntimeWarning)
        return torch.stack([vjp(row, False) for row in rows])


def _faster_batch(vjp: Callable[[Tensor], Tensor], cotangents: Tensor, chunk: int) -> tuple[int, list[Tensor]]:
    """``(batch size for the remaining cotangents, the products computed while timing)``.

    Times the first cotangent alone, the next ``chunk`` in one batched pass and the one after alone
    (all of them work the caller needs), and keeps ``chunk`` unless a batched pass took longer per
    cotangent than the faster single pass, then 1. Which one wins depends on the device, the model
    and the sizes (a batched pass pays for vmap's per-cotangent fallbacks and their stacking, and
    gains where matrix products dominate), so ``"auto"`` measures rather than guesses. The
    products do not depend on the choice beyond float rounding (a batched and a single pass sum in
    different orders, ~1e-7 apart in float32), so two calls may differ by that much; the time is what
    the choice changes.
    """
    device = cotangents.device
    parts, seconds = [], []
    for rows in (cotangents[:1], cotangents[1 : 1 + chunk], cotangents[1 + chunk : 2 + chunk]):
        began = _clock(device)
        parts.append(vjp(rows))
        seconds.append(_clock(device) - began)
    batched_per_row = seconds[1] / chunk
    return (chunk if batched_per_row <= min(seconds[0], seconds[2]) else 1), parts


def _clock(device: torch.device) -> float:
    """Seconds, after the device has finished the work queued on it (a CUDA device runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@register_method
class GradCAM(BaseCAM):
    """Grad-CAM (Selvaraju et al. 2017): channel weights are the spatial mean of the gradients."""

    method = "gradcam"

    def channel_weights(self, activations: Tensor, gradients: Tensor, spatial_ndim: int) -> Tensor:
        return core.grad_cam_weights(activations, gradients, spatial_ndim, self.pool_axes)


@register_method
class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018), eq. 19/20 exactly, over every spatial axis."""

    method = "gradcam++"

    def channel_weights(self, activations: Tensor, gradients: Tensor, spatial_ndim: int) -> Tensor:
        # One alpha serves the weights and the range check.
        alpha = core.grad_cam_plus_plus_alpha(activations, gradients, spatial_ndim, self.pool_axes)
        weights = core.grad_cam_plus_plus_weights(activations, gradients, spatial_ndim, self.pool_axes, alpha=alpha)
        warn_if_alpha_unbounded(activations, gradients, alpha, weights, self.layer_name)
        return weights


# -- the adapter protocol ----------------------------------------------------------------------------

@dataclass
class ExplainRequest:
    """What a task adapter hands to the shared explainer for one explanation.

    Attributes:
        inputs: the model's call inputs (tensor, tuple, list or dict; see ``call_model``).
        targets: class indices or a score callable ``model_output -> (N,) | (N, K)``.
        layer, reshape, layer_call, element, branch: the layer (``"auto"``: the one resolver).
        input_size: spatial size the maps are upsampled to (default the primary input's).
        upsample: ``False`` keeps ``maps`` on the layer's grid (the caller resamples ``raw`` itself).
        pool_axes, logits, create_graph, max_batch: as for :class:`BaseCAM`.
        batch_size: the number of samples when the primary input's first axis is not it.
    """

    inputs: Inputs
    targets: Targets = None
    layer: LayerSpec = "auto"
    reshape: Reshape | None = None
    layer_call: int | None = None
    element: Element = None
    branch: int | None = None
    input_size: Sequence[int] | None = None
    pool_axes: Sequence[int] | None = None
    logits: Callable[[Any], Tensor] | None = None
    create_graph: bool = False
    max_batch: MaxBatch = None
    batch_size: int | None = None
    upsample: bool = True


def explain_request(model: nn.Module, request: ExplainRequest, methods: Sequence[str] = ("gradcam++",)) -> dict[str, Explanation]:
    """Run ``request`` on ``model``: ``{method: Explanation}`` from one forward and one set of gradients."""
    names, _ = method_names(methods=methods)
    explainer = METHODS[names[0]](
        model, request.layer, reshape=request.reshape, layer_call=request.layer_call, element=request.element,
        branch=request.branch, logits=request.logits, pool_axes=request.pool_axes, create_graph=request.create_graph,
        max_batch=request.max_batch,
    )
    return explainer.explain_methods(request.inputs, request.targets, methods=names, input_size=request.input_size,
                                     batch_size=request.batch_size, upsample=request.upsample)
