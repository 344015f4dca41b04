"""Explainers: run a model, capture one layer, and turn scores into Grad-CAM / Grad-CAM++ maps.

``BaseCAM`` does everything that is not the choice of channel weights: layer lookup, hooks,
target handling, vector-Jacobian products, reshaping tokens, upsampling and normalisation. A
method is a small subclass that supplies :meth:`BaseCAM.channel_weights` from :mod:`multiexplain.core`.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterator, Union

import torch
from torch import Tensor, nn

from . import core
from .layers import AutoLayer, auto_layer, layer_name, resolve_layer

__all__ = ["Explanation", "BaseCAM", "GradCAM", "GradCAMPlusPlus", "model_logits", "Inputs", "Targets"]

Inputs = Union[Tensor, Sequence[Tensor], Mapping[str, Any]]
Targets = Union[None, int, Sequence[int], Sequence[Sequence[int]], Tensor, Callable[[Any], Tensor]]


@dataclass
class Explanation:
    """What one explainer call returns. All tensors live on the model's device.

    Attributes:
        maps: maps upsampled to the input's spatial size and min-max normalised to ``[0, 1]`` per
            map: ``(N, *input_spatial)``, or ``(N, K, *input_spatial)`` for ``K`` targets per sample.
        raw: layer-resolution maps before normalisation, ``(N, [K,] *layer_spatial)``.
        weights: channel weights ``(N, [K,] C[, *unpooled_spatial])``.
        scores: the explained scalar scores ``(N, [K])`` (pre-softmax logits for class targets).
        targets: class indices ``(N, [K])``, or ``None`` when a score callable was given.
        zero_gradient: ``(N, [K])`` bool, True where every gradient at the layer was zero (the map
            is then all zeros, never NaN).
        method: ``"gradcam++"`` or ``"gradcam"``.
        layer: dotted name of the explained layer.
    """

    maps: Tensor
    raw: Tensor
    weights: Tensor
    scores: Tensor
    targets: Tensor | None
    zero_gradient: Tensor
    method: str
    layer: str

    @property
    def multi_target(self) -> bool:
        return self.scores.ndim == 2


def model_logits(output: Any) -> Tensor:
    """Find the logits in a model's output.

    The rule: a tensor is the logits; a mapping (``dict``, Hugging Face ``ModelOutput``) gives
    its ``"logits"`` entry, else its first tensor value; a tuple or list gives its first element
    (searched by the same rule). Pass ``logits=`` to the explainer for anything else.
    """
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


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """Call convention: a tensor -> ``model(x)``; a tuple -> ``model(*inputs)``; a list ->
    ``model(inputs)`` (pytorchvideo's SlowFast takes its pathways as one list); a mapping ->
    ``model(**inputs)`` (Hugging Face keyword inputs). A list is passed as a shallow copy:
    pytorchvideo's ``MultiPathWayWithFuse`` overwrites its input list in place, which would
    corrupt the caller's list and break the second forward ("auto" layer search, then explain)."""
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
    """The tensor whose shape gives the batch size and the spatial size maps are upsampled to:
    the tensor itself, the first tensor of a tuple/list, or ``pixel_values`` (else the first
    floating-point tensor) of a mapping."""
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


def _target_indices(targets: Targets, logits: Tensor) -> tuple[Tensor, bool]:
    """Class indices ``(N, K)`` and whether the caller asked for several targets per sample."""
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


class _LayerCapture:
    """Forward hook on the explained layer, registered for one forward pass only.

    With ``detach_below=True`` (inference mode) the layer's output is cut from the graph below it
    and grad mode is switched on from the layer onwards, so nothing before the layer records
    autograd state. The module after the layer receives a clone: an in-place op there
    (``ReLU(inplace=True)``) cannot overwrite the captured activations.
    """

    def __init__(self, layer: nn.Module, name: str, detach_below: bool, call_index: int | None):
        self.layer, self.name = layer, name
        self.detach_below, self.call_index = detach_below, call_index
        self.calls = 0
        self.raw_output: Tensor | None = None
        self.activation: Tensor | None = None
        self.thread = threading.get_ident()  # the thread whose forward pass is captured

    def _hook(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        if threading.get_ident() != self.thread:
            # Hooks live on the shared module: another thread's forward (another explainer, or
            # plain inference) must neither be captured nor counted as a second call.
            return None
        index, self.calls = self.calls, self.calls + 1
        if self.call_index is None and index >= 1:
            raise RuntimeError(
                f"layer {self.name!r} runs more than once in one forward pass; pass layer_call=i "
                "to say which call to explain (0 is the first)"
            )
        if index != (self.call_index or 0):
            return None
        rest: tuple = ()
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            output, rest = output[0], tuple(output[1:])
        if not isinstance(output, Tensor):
            raise TypeError(f"layer {self.name!r} returns {type(output).__name__}, not a tensor; choose another layer")
        if self.detach_below or not output.requires_grad:
            activation = output.detach().requires_grad_(True)
            torch.set_grad_enabled(True)  # restored by the explainer's finally block
        else:
            activation = output
        self.activation = activation
        replacement = activation.clone()
        return (replacement, *rest) if rest else replacement

    @contextmanager
    def attached(self) -> Iterator["_LayerCapture"]:
        self.thread = threading.get_ident()
        handle = self.layer.register_forward_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()


class BaseCAM:
    """Shared machinery of gradient-weighted class activation maps.

    Args:
        model: any ``nn.Module``; it is explained in the train/eval mode the caller left it in.
        target_layer: an ``nn.Module`` of the model, its dotted name (``"layer4"``,
            ``"features.28"``, ``"blocks.4"``), or ``"auto"``: the last module whose output has
            spatial axes, found by one traced forward on the first inputs.
        reshape: callable turning the layer's output into channels-first ``(N, C, *spatial)``,
            e.g. :class:`~multiexplain.layers.TokenReshape` for ViT tokens ``(N, L, D)`` or
            :class:`~multiexplain.layers.ChannelsLast` for Swin's ``(N, H, W, C)``.
        layer_call: which call to explain when the layer runs several times in one forward.
        logits: callable ``model_output -> (N, classes)``; default :func:`model_logits`.
        pool_axes: spatial axes the channel weights are pooled over (default all; ``(1, 2)`` on
            ``T, H, W`` gives per-time-slice weights).
        create_graph: differentiable mode (maps carry gradients to the model's parameters).

    Gradients are taken with ``torch.autograd.grad`` with respect to the captured activation
    only: no ``.backward()``, no parameter ``.grad`` written. Scores of different samples must
    not interact (a batch-norm layer in train mode *after* the explained layer couples them).
    """

    method: ClassVar[str] = ""

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | str = "auto",
        *,
        reshape: Callable[[Tensor], Tensor] | None = None,
        layer_call: int | None = None,
        logits: Callable[[Any], Tensor] | None = None,
        pool_axes: Sequence[int] | None = None,
        create_graph: bool = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.layer: nn.Module | None = None if target_layer == "auto" else resolve_layer(model, target_layer)
        self.auto: AutoLayer | None = None  # what the "auto" pick found, once it ran
        self.reshape = reshape
        self.layer_call = layer_call
        self.logits = logits or model_logits
        self.pool_axes = tuple(pool_axes) if pool_axes is not None else None
        self.create_graph = create_graph

    # -- the one thing a method supplies -------------------------------------------------------
    def channel_weights(self, activations: Tensor, gradients: Tensor, spatial_ndim: int) -> Tensor:
        """Channel weights ``(N, K, C[, *unpooled])`` from activations ``(N, 1, C, *spatial)`` and
        gradients ``(N, K, C, *spatial)``."""
        raise NotImplementedError

    # -- context-manager use: no hooks outlive a call, close() is for symmetry and safety -------
    def __enter__(self) -> "BaseCAM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the model reference. Hooks never outlive a call, so there is nothing else."""

    @property
    def layer_name(self) -> str | None:
        return None if self.layer is None else layer_name(self.model, self.layer)

    def resolve_auto_layer(
        self, inputs: Inputs, targets: Targets = None, input_size: Sequence[int] | None = None
    ) -> nn.Module:
        """Pick (once) the ``"auto"`` layer with one traced forward on ``inputs``.

        The pick is the last layer whose output is a feature map (channels-first, channels-last or
        tokens on a patch grid) on which the scores of ``targets`` have a non-zero gradient, see
        :func:`multiexplain.layers.auto_layer`. A token or channels-last layout also sets
        ``self.reshape`` (unless one was given), so ViT / MViT / Swin-style outputs need no options.
        """
        if self.layer is None:
            reference = primary_input(inputs)
            n = reference.shape[0]
            spatial = tuple(input_size) if input_size is not None else tuple(reference.shape[2:])
            found = auto_layer(
                self.model,
                lambda: call_model(self.model, inputs),
                (n, 0, *spatial),  # (N, channels unused, *spatial)
                score=lambda output: self._scores(output, targets, n)[0],
            )
            self.layer = found.module
            self.auto = found
            if self.reshape is None:
                self.reshape = found.reshape
            if self.layer_call is None and found.call_index > 0:
                self.layer_call = found.call_index
        return self.layer

    def __call__(
        self,
        inputs: Inputs,
        targets: Targets = None,
        *,
        input_size: Sequence[int] | None = None,
        create_graph: bool | None = None,
    ) -> Explanation:
        """Explain ``inputs`` for ``targets``.

        Args:
            inputs: a tensor ``(N, C, *spatial)``, a tuple/list of tensors, or a dict of keyword
                inputs (see :func:`call_model`).
            targets: ``None`` (each sample's top-1 class), an int, ``N`` ints, an ``(N, K)``
                nested list or tensor of class indices (``K`` maps per sample from one forward),
                or a callable ``model_output -> scores (N,) or (N, K)``.
            input_size: spatial size to upsample maps to; default the primary input's ``shape[2:]``.
            create_graph: override the differentiable mode for this call.
        """
        return self.explain(inputs, targets, input_size=input_size, create_graph=create_graph)

    def explain(
        self,
        inputs: Inputs,
        targets: Targets = None,
        *,
        input_size: Sequence[int] | None = None,
        create_graph: bool | None = None,
    ) -> Explanation:
        """Same as calling the explainer."""
        return self.explain_methods(inputs, targets, methods=(self.method,), input_size=input_size, create_graph=create_graph)[self.method]

    def explain_methods(
        self,
        inputs: Inputs,
        targets: Targets = None,
        *,
        methods: Sequence[str],
        input_size: Sequence[int] | None = None,
        create_graph: bool | None = None,
    ) -> dict[str, Explanation]:
        """Maps of several methods (names of :data:`METHODS`, e.g. ``("gradcam++", "gradcam")``)
        from ONE forward pass and one set of gradients: the methods differ only in their channel
        weights. The others use this explainer's layer, reshape, layer call and pooling; this
        explainer's own ``method`` name (a subclass's too) is always accepted.
        Returns ``{method: Explanation}`` in the order given."""
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
        layer = self.resolve_auto_layer(inputs, targets, input_size)
        capture = _LayerCapture(layer, layer_name(self.model, layer), not differentiable, self.layer_call)
        grad_mode = torch.is_grad_enabled()
        try:
            # Inference mode: nothing below the layer records a graph; the hook turns grad on.
            torch.set_grad_enabled(differentiable)
            with capture.attached():
                output = call_model(self.model, inputs)
            if capture.activation is None:
                ran = capture.calls
                raise RuntimeError(
                    f"layer {capture.name!r} did not run in the forward pass" if ran == 0 else
                    f"layer {capture.name!r} ran {ran} time(s); layer_call={self.layer_call} is out of range"
                )
            scores, indices, multi = self._scores(output, targets, reference.shape[0])
            gradients = self._gradients(scores, capture.activation, differentiable)
        finally:
            torch.set_grad_enabled(grad_mode)
        explanations = {}
        for name in methods:
            explainer = self if name == self.method else METHODS[name](
                self.model, layer, reshape=self.reshape, layer_call=self.layer_call, logits=self.logits,
                pool_axes=self.pool_axes, create_graph=self.create_graph,
            )
            explanations[name] = explainer._maps(capture, scores, indices, multi, gradients, reference, input_size, differentiable)
        return explanations

    # -- steps -----------------------------------------------------------------------------
    def _scores(self, output: Any, targets: Targets, n: int) -> tuple[Tensor, Tensor | None, bool]:
        if callable(targets) and not isinstance(targets, Tensor):
            scores = targets(output)
            if not isinstance(scores, Tensor) or scores.ndim not in (1, 2) or scores.shape[0] != n:
                shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
                raise ValueError(f"a target callable must return scores of shape (N,) or (N, K) with N={n}, got {shape}")
            multi = scores.ndim == 2
            return (scores if multi else scores.unsqueeze(1)), None, multi
        logits = self.logits(output)
        if not isinstance(logits, Tensor) or logits.ndim != 2 or logits.shape[0] != n:
            shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ValueError(
                f"expected logits of shape (N={n}, classes), got {shape}; pass logits= or a target callable"
            )
        indices, multi = _target_indices(targets, logits)
        return logits.gather(1, indices), indices, multi

    @staticmethod
    def _gradients(scores: Tensor, activation: Tensor, create_graph: bool) -> Tensor:
        """``dS[:, k] / dA`` for every target: ``(N, K, *activation.shape[1:])``.

        One vector-Jacobian product per target column, batched with ``is_grads_batched``; the
        per-target loop is only the fallback for ops that vmap cannot batch.
        """
        if not scores.requires_grad:
            raise RuntimeError(
                "the explained scores do not depend on the layer (they carry no gradient); "
                "check the target callable and the layer"
            )
        n, k = scores.shape

        def vjp(grad_outputs: Tensor, batched: bool) -> Tensor:
            (grad,) = torch.autograd.grad(
                scores, activation, grad_outputs, retain_graph=True, create_graph=create_graph,
                allow_unused=True, is_grads_batched=batched,
            )
            if grad is None:  # the scores do not depend on this layer at all
                shape = (k, *activation.shape) if batched else activation.shape
                grad = torch.zeros(shape, dtype=activation.dtype, device=activation.device)
            return grad

        eye = torch.eye(k, dtype=scores.dtype, device=scores.device)
        if k == 1:
            return vjp(torch.ones_like(scores), False).unsqueeze(1)
        try:
            batched = vjp(eye.unsqueeze(1).expand(k, n, k), True)
        except RuntimeError as error:
            warnings.warn(f"batched gradients failed ({error}); falling back to one pass per target", RuntimeWarning)
            batched = torch.stack([vjp(eye[j].expand(n, k), False) for j in range(k)])
        return batched.transpose(0, 1)

    def _maps(
        self,
        capture: _LayerCapture,
        scores: Tensor,
        indices: Tensor | None,
        multi: bool,
        gradients: Tensor,
        reference: Tensor,
        input_size: Sequence[int] | None,
        differentiable: bool,
    ) -> Explanation:
        activation = capture.activation
        assert activation is not None
        n, k = scores.shape
        if self.reshape is not None:
            activation = self.reshape(activation)
            gradients = self.reshape(gradients.flatten(0, 1)).unflatten(0, (n, k))
        spatial_ndim = activation.ndim - 2
        if spatial_ndim < 1:
            raise ValueError(
                f"layer {capture.name!r} outputs shape {tuple(activation.shape)}, which has no spatial axes; "
                "choose a convolutional layer, or give reshape= (TokenReshape for (N, L, D) tokens)"
            )
        if not differentiable:
            activation, gradients = activation.detach(), gradients.detach()
        weights = self.channel_weights(activation.unsqueeze(1), gradients, spatial_ndim)
        raw = core.weighted_activation_map(activation.unsqueeze(1), weights, spatial_ndim, self.pool_axes)
        zero_gradient = (gradients == 0).flatten(2).all(dim=2)
        size = tuple(input_size) if input_size is not None else tuple(reference.shape[2:])
        if len(size) != spatial_ndim:
            raise ValueError(
                f"the map of layer {capture.name!r} has {spatial_ndim} spatial axes {tuple(raw.shape[2:])} but the "
                f"input's spatial size {size} has {len(size)}; pass a batched channels-first input or input_size="
            )
        maps = core.normalize_maps(core.upsample_maps(raw, size), spatial_ndim)
        if not multi:
            maps, raw, weights, scores, zero_gradient = (t.squeeze(1) for t in (maps, raw, weights, scores, zero_gradient))
            indices = indices.squeeze(1) if indices is not None else None
        if not differentiable:
            scores = scores.detach()
        return Explanation(maps, raw, weights, scores, indices, zero_gradient, self.method, capture.name)


class GradCAM(BaseCAM):
    """Grad-CAM (Selvaraju et al. 2017): channel weights are the spatial mean of the gradients."""

    method = "gradcam"

    def channel_weights(self, activations: Tensor, gradients: Tensor, spatial_ndim: int) -> Tensor:
        return core.grad_cam_weights(activations, gradients, spatial_ndim, self.pool_axes)


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++ (Chattopadhyay et al. 2018), eq. 19/20 exactly, over every spatial axis."""

    method = "gradcam++"

    def channel_weights(self, activations: Tensor, gradients: Tensor, spatial_ndim: int) -> Tensor:
        return core.grad_cam_plus_plus_weights(activations, gradients, spatial_ndim, self.pool_axes)


METHODS: dict[str, type[BaseCAM]] = {"gradcam++": GradCAMPlusPlus, "gradcam": GradCAM}
