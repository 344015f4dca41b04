"""Finding the layer to explain, and turning its output into ``(N, C, *spatial)`` activations."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["resolve_layer", "find_auto_layer", "TokenReshape", "ChannelsLast", "layer_name"]

# Modules whose output is never "the last block": global pools, heads and shape-only modules.
# An auto pick stops at the block before them (VGG's ``features``, not its adaptive pool).
_NOT_A_FEATURE_LAYER: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Identity,
    nn.Flatten,
    nn.Unflatten,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Softmax,
    nn.LogSoftmax,
    nn.Sigmoid,
)


def layer_name(model: nn.Module, layer: nn.Module) -> str:
    """The dotted name of ``layer`` inside ``model`` (``""`` for the model itself)."""
    for name, module in model.named_modules():
        if module is layer:
            return name
    raise ValueError(f"{type(layer).__name__} is not a submodule of {type(model).__name__}")


def resolve_layer(model: nn.Module, target_layer: nn.Module | str) -> nn.Module:
    """A module given as itself or by dotted name (``"layer4"``, ``"features.28"``, ``"blocks.4"``)."""
    if isinstance(target_layer, nn.Module):
        layer_name(model, target_layer)  # raises if it is not part of the model
        return target_layer
    if not isinstance(target_layer, str):
        raise TypeError(f"target_layer must be an nn.Module, a dotted name or 'auto', got {type(target_layer).__name__}")
    names = dict(model.named_modules())
    if target_layer in names:
        return names[target_layer]
    close = difflib.get_close_matches(target_layer, [n for n in names if n], n=5, cutoff=0.5)
    hint = f"; close names: {', '.join(close)}" if close else ""
    raise ValueError(f"{type(model).__name__} has no layer named {target_layer!r}{hint}")


def _spatial_positions(output: Any, batch_size: int) -> int:
    """Number of spatial positions of a channels-first ``(N, C, *spatial)`` output, else 0."""
    if not isinstance(output, Tensor) or not output.is_floating_point() or output.ndim < 3:
        return 0
    if output.shape[0] != batch_size:
        return 0
    return math.prod(output.shape[2:])


def find_auto_layer(model: nn.Module, run_forward: Callable[[], Any], batch_size: int) -> nn.Module:
    """The last module (in execution order) whose output has spatial axes with more than one position.

    Runs ``run_forward`` once with hooks on every module, under ``torch.no_grad()`` and in eval
    mode (so no batch-norm statistics move); every module's ``training`` flag is restored after.
    When a block and its last child return the same tensor, the outer block wins (``layer4``
    rather than ``layer4.2.relu``). Heads, global pools, dropout and activations are skipped.
    """
    finished: list[tuple[nn.Module, int]] = []
    handles = []
    modes = {module: module.training for module in model.modules()}

    def record(module: nn.Module, _args: Any, output: Any) -> None:
        positions = _spatial_positions(output, batch_size)
        if positions > 1 and not isinstance(module, _NOT_A_FEATURE_LAYER) and module is not model:
            finished.append((module, positions))

    try:
        for module in model.modules():
            handles.append(module.register_forward_hook(record))
        model.eval()
        with torch.no_grad():
            run_forward()
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    if not finished:
        raise ValueError(
            f"could not pick a layer automatically: no module of {type(model).__name__} returns a "
            "channels-first (N, C, *spatial) tensor with more than one spatial position; "
            "name the layer and, for token or channels-last outputs, give a reshape rule"
        )
    return finished[-1][0]


@dataclass(frozen=True)
class TokenReshape:
    """Turn transformer tokens ``(N, L, D)`` into channels-first ``(N, D, *grid)`` activations.

    Args:
        grid: the patch grid, e.g. ``(14, 14)`` for a ViT-B/16 at 224x224, or ``(8, 14, 14)``
            for video tokens. ``None`` infers a square grid from the number of patch tokens.
        num_prefix_tokens: leading special tokens to drop (1 for a CLS token, 2 for DeiT's
            CLS + distillation tokens, 0 for none). Trailing ``L - prefix - prod(grid)`` tokens
            are an error, not silently dropped.

    The ops are a slice, a transpose and a reshape, so gradients map onto the grid the same way
    as activations do and Grad-CAM++ sees exactly the patch tokens.
    """

    grid: Sequence[int] | None = None
    num_prefix_tokens: int = 1

    def __call__(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 3:
            raise ValueError(f"TokenReshape expects (N, L, D) tokens, got shape {tuple(tokens.shape)}")
        n, length, dim = tokens.shape
        patches = length - self.num_prefix_tokens
        grid = tuple(self.grid) if self.grid is not None else None
        if grid is None:
            side = math.isqrt(max(patches, 0))
            if side * side != patches or side == 0:
                raise ValueError(
                    f"cannot infer a square patch grid from {length} tokens with "
                    f"{self.num_prefix_tokens} prefix token(s): give TokenReshape(grid=(h, w))"
                )
            grid = (side, side)
        if math.prod(grid) != patches:
            raise ValueError(
                f"{length} tokens minus {self.num_prefix_tokens} prefix token(s) = {patches} patches, "
                f"which does not fill the grid {grid} ({math.prod(grid)} cells)"
            )
        return tokens[:, self.num_prefix_tokens :, :].transpose(1, 2).reshape(n, dim, *grid)


@dataclass(frozen=True)
class ChannelsLast:
    """Turn a channels-last output ``(N, *spatial, C)`` (Swin, ConvNeXt blocks) into ``(N, C, *spatial)``."""

    def __call__(self, output: Tensor) -> Tensor:
        if output.ndim < 3:
            raise ValueError(f"ChannelsLast expects (N, *spatial, C), got shape {tuple(output.shape)}")
        return output.movedim(-1, 1)
