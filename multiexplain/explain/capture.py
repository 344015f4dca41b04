"""The one capture: a forward hook on one layer, attached for one forward pass.

A layer's output may be a tensor or a container of them (tuple, 1-tuple, named tuple, list, dict,
Hugging Face ``ModelOutput``). :func:`feature_element` says which element is the feature map;
:class:`LayerCapture` takes that tensor and hands the next module a container of exactly the type
the layer returned (a list stays a list: pytorchvideo's SlowFast assigns into it), with the
captured tensor replaced by a clone, so an in-place op after the layer cannot overwrite it.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any, Iterator, Union

import torch
from torch import Tensor, nn

__all__ = ["Element", "InputCapture", "LayerCapture", "bypassed", "feature_element", "replace_element"]

#: Which element of a layer's output is the feature map: ``None`` (the rule of
#: :func:`feature_element`), an index into a tuple/list, or a key of a mapping.
Element = Union[int, str, None]

# Hugging Face modules return these keys; the feature map of an encoder is its hidden states.
_PREFERRED_KEYS = ("last_hidden_state", "hidden_states", "logits")


def feature_element(output: Any, element: Element = None) -> tuple[Element, Tensor | None]:
    """``(where, tensor)``: the feature-map tensor inside ``output`` and its index or key.

    With ``element=None``: a tensor is itself (``where`` is ``None``); a tuple/list gives its first
    tensor element; a mapping its ``last_hidden_state`` (else its first tensor value). Returns
    ``(None, None)`` when nothing qualifies.
    """
    if isinstance(output, Tensor):
        if element not in (None, 0):
            raise ValueError(f"the layer returns a tensor; there is no element {element!r} to select")
        return None, output
    if isinstance(output, Mapping):
        if element is not None:
            value = output.get(element) if isinstance(element, str) else None
            if not isinstance(value, Tensor):
                raise ValueError(f"the layer's output has no tensor under {element!r}; its keys: {list(output.keys())}")
            return element, value
        for key in _PREFERRED_KEYS:
            if isinstance(output.get(key), Tensor):
                return key, output[key]
        for key, value in output.items():
            if isinstance(value, Tensor):
                return key, value
        return None, None
    if isinstance(output, (tuple, list)):
        if element is not None:
            if not isinstance(element, int) or not -len(output) <= element < len(output):
                raise ValueError(f"element {element!r} is out of range for a {type(output).__name__} of {len(output)}")
            value = output[element]
            if not isinstance(value, Tensor):
                raise ValueError(f"element {element} of the layer's output is a {type(value).__name__}, not a tensor")
            return element % len(output), value
        for index, value in enumerate(output):
            if isinstance(value, Tensor):
                return index, value
    return None, None


def replace_element(output: Any, where: Element, value: Tensor) -> Any:
    """A copy of ``output`` of the same type with the element at ``where`` replaced by ``value``."""
    if where is None:
        return value
    if isinstance(output, tuple):
        items = list(output)
        items[where] = value  # type: ignore[index]
        if hasattr(output, "_fields"):  # a named tuple
            return type(output)(*items)
        return tuple(items) if type(output) is tuple else type(output)(items)
    replaced = copy.copy(output)  # list, dict, ModelOutput: same type, same other entries
    replaced[where] = value
    return replaced


class LayerCapture:
    """A forward hook on ``layer`` that records its output for one forward pass.

    Args:
        layer, name: the module and its dotted name (for messages).
        call_index: which call to capture when the module runs several times in one forward;
            ``None`` means it must run once (a second call is an error that says what to pass).
        element: which element of the output is the feature map (see :func:`feature_element`).
        detach_below: cut the graph below the layer and switch grad mode on from here on, so that
            nothing before the layer records autograd state (the explainer's inference mode).
        observe: record the tensor and leave the forward untouched (feature capture for losses).

    Hooks are filtered by thread: another thread's forward through the same shared module is
    neither captured nor counted.
    """

    def __init__(
        self,
        layer: nn.Module,
        name: str,
        *,
        call_index: int | None = None,
        element: Element = None,
        detach_below: bool = False,
        observe: bool = False,
    ) -> None:
        self.layer, self.name = layer, name
        self.call_index, self.element = call_index, element
        self.detach_below, self.observe = detach_below, observe
        self.calls = 0
        self.activation: Tensor | None = None
        self.thread = threading.get_ident()

    def _hook(self, _module: nn.Module, _args: Any, output: Any) -> Any:
        if threading.get_ident() != self.thread:
            return None
        index, self.calls = self.calls, self.calls + 1
        if self.call_index is None and index >= 1:
            raise RuntimeError(
                f"layer {self.name!r} runs more than once in one forward pass; pass layer_call=i "
                "to say which call to explain (0 is the first)"
            )
        if index != (self.call_index or 0):
            return None
        where, tensor = feature_element(output, self.element)
        if tensor is None:
            raise TypeError(
                f"layer {self.name!r} returns {type(output).__name__} holding no tensor; choose another layer"
            )
        if self.observe:
            self.activation = tensor
            return None
        if self.detach_below or not tensor.requires_grad:
            activation = tensor.detach().requires_grad_(True)
            torch.set_grad_enabled(True)  # the caller restores grad mode after the forward
        else:
            activation = tensor
        self.activation = activation
        return replace_element(output, where, activation.clone())

    @contextmanager
    def attached(self) -> Iterator["LayerCapture"]:
        """Register the hook for the duration of the block (removed even when the forward raises)."""
        self.thread = threading.get_ident()
        self.calls, self.activation = 0, None
        # First among the layer's hooks: a hook that records outputs (transformers' hidden-state
        # capture, which LLaVA reads its features from) must record the tensor the graph continues from.
        handle = self.layer.register_forward_hook(self._hook, prepend=True)
        try:
            yield self
        finally:
            handle.remove()

    def require(self) -> Tensor:
        """The captured tensor, or a clear error when the layer did not run (or not that often)."""
        if self.activation is None:
            raise RuntimeError(
                f"layer {self.name!r} did not run in the forward pass" if self.calls == 0 else
                f"layer {self.name!r} ran {self.calls} time(s); layer_call={self.call_index} is out of range"
            )
        return self.activation


class InputCapture:
    """A forward pre-hook on ``module`` that records its first positional input (observe only: the
    forward is unchanged) and counts its calls, in this thread's forward passes only."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.calls = 0
        self.input: Tensor | None = None
        self.thread = threading.get_ident()

    def _hook(self, _module: nn.Module, args: Any) -> None:
        if threading.get_ident() != self.thread:
            return
        self.calls += 1
        self.input = args[0] if args and isinstance(args[0], Tensor) else None

    @contextmanager
    def attached(self) -> Iterator["InputCapture"]:
        """Register the pre-hook for the duration of the block (removed even when the forward raises)."""
        self.thread = threading.get_ident()
        self.calls, self.input = 0, None
        handle = self.module.register_forward_pre_hook(self._hook)
        try:
            yield self
        finally:
            handle.remove()

    def single_input(self) -> Tensor | None:
        """The input of the module's one call; ``None`` when it ran more than once or not at all."""
        return self.input if self.calls == 1 else None


@contextmanager
def bypassed(modules: list[nn.Module]) -> Iterator[None]:
    """During the block, each module in ``modules`` hands on its input instead of its output, in
    this thread's forward passes only (other threads see the model unchanged). Used to explain
    pre-softmax logits of heads that end in a softmax."""
    thread = threading.get_ident()

    def identity(_module: nn.Module, args: Any, output: Any) -> Any:
        if threading.get_ident() != thread or not args:
            return None
        return args[0]

    handles = [module.register_forward_hook(identity) for module in modules]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
