"""Finding the layer to explain, and turning its output into ``(N, C, *spatial)`` activations."""

from __future__ import annotations

import difflib
import math
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["resolve_layer", "find_auto_layer", "auto_layer", "AutoLayer", "TokenReshape", "ChannelsLast", "layer_name"]

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


_PREFIX_TOKEN_COUNTS = (0, 1, 2)  # none, a class token, class + distillation tokens (DeiT)


@dataclass(frozen=True)
class AutoLayer:
    """What :func:`auto_layer` found.

    Attributes:
        module: the layer to explain.
        name: its dotted name inside the model.
        layout: ``"channels_first"`` for ``(N, C, *spatial)``, ``"channels_last"`` for
            ``(N, *spatial, C)`` (Swin stages), ``"tokens"`` for ``(N, prefix + prod(grid), D)``
            (ViT, MViT).
        reshape: the rule that turns the layer's output into ``(N, C, *spatial)``: ``None`` for
            channels-first, :class:`ChannelsLast` or :class:`TokenReshape` otherwise.
        grid: the layer-resolution spatial shape the map will have.
        call_index: which call of ``module`` in one forward pass was chosen (0 unless the module
            runs several times).
        probed: True when the pick was confirmed by a non-zero gradient of the scores on the grid.
    """

    module: nn.Module
    name: str
    layout: str
    reshape: Callable[[Tensor], Tensor] | None
    grid: tuple[int, ...]
    call_index: int = 0
    probed: bool = False


def _first_tensor(output: Any) -> Tensor | None:
    """The tensor a layer "returns": itself, or the first element of a tuple/list (MViT blocks
    return ``(tokens, thw)``, attention modules ``(output, weights)``)."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        return output[0]
    return None


def _grid_in_output(output: Any, spatial_ndim: int) -> tuple[int, ...] | None:
    """A grid shape carried next to the tensor, as MViT's ``(tokens, (T, H, W))`` outputs do."""
    if isinstance(output, (tuple, list)) and len(output) >= 2 and isinstance(output[0], Tensor):
        for extra in output[1:]:
            if (
                isinstance(extra, (tuple, list))
                and len(extra) == spatial_ndim
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in extra)
            ):
                return tuple(extra)
    return None


def _geometry_misfit(grid: Sequence[int], input_spatial: Sequence[int]) -> float | None:
    """How far ``grid`` is from being a feature grid of an input of spatial size ``input_spatial``:
    ``None`` when it cannot be one, else the relative aspect-ratio error (0 for an exact fit).

    Every axis must be at most the input's size, and the last two axes (``H, W``) must keep the
    input's aspect ratio to within rounding (one stride for both; the temporal axis of video may be
    strided differently). This is what tells ``(N, C, h, w)`` from ``(N, h, w, C)``: read the wrong
    way round, a 768-channel Swin stage would be a 7 x 768 "grid" of a square image.
    """
    if len(grid) != len(input_spatial) or any(g < 1 or g > s for g, s in zip(grid, input_spatial)):
        return None
    if len(grid) < 2:
        return 0.0
    (h, w), (height, width) = grid[-2:], input_spatial[-2:]
    expected_h = w * height / width
    error = abs(h - expected_h)
    if error > max(1.0, 0.15 * max(h, expected_h)):
        return None
    return error / max(h, expected_h)


def _token_grid(
    length: int, input_spatial: Sequence[int], known_grids: Sequence[tuple[int, ...]]
) -> tuple[tuple[int, ...], int] | None:
    """``(grid, prefix)`` for ``length`` tokens: a grid seen earlier in the forward pass (the patch
    embedding's output, MViT's ``thw``), most recent first, with 0, 1 or 2 leading special tokens;
    else, for images, the patch grid of a unique square-ish stride."""
    for grid in reversed(known_grids):
        for prefix in _PREFIX_TOKEN_COUNTS:
            if math.prod(grid) == length - prefix:
                return grid, prefix
    if len(input_spatial) == 2:
        height, width = input_spatial
        found = {
            ((height // stride, width // stride), prefix)
            for stride in range(1, min(height, width) + 1)
            for prefix in _PREFIX_TOKEN_COUNTS
            if (height // stride) * (width // stride) == length - prefix and length - prefix > 1
        }
        if len(found) == 1:
            return found.pop()
    return None


def _layout_of(
    output: Tensor, batch_size: int, input_spatial: Sequence[int] | None, known_grids: Sequence[tuple[int, ...]]
) -> tuple[str, Callable[[Tensor], Tensor] | None, tuple[int, ...]] | None:
    """``(layout, reshape, grid)`` of one layer output, or ``None`` when it is not a feature map."""
    if not output.is_floating_point() or output.ndim < 3 or output.shape[0] != batch_size:
        return None
    shape = tuple(output.shape)
    if not input_spatial:  # no spatial input to compare with: accept any channels-first tensor
        return ("channels_first", None, shape[2:]) if math.prod(shape[2:]) > 1 else None
    spatial_ndim = len(input_spatial)
    if output.ndim == spatial_ndim + 2:
        readings = []
        options = [("channels_first", None, shape[2:])]
        if spatial_ndim >= 2:  # with one spatial axis, (N, C, L) and (N, L, C) cannot be told apart
            options.append(("channels_last", ChannelsLast(), shape[1:-1]))
        for rank, (layout, reshape, grid) in enumerate(options):
            misfit = _geometry_misfit(grid, input_spatial)
            if misfit is not None:
                # Prefer a grid seen earlier in the pass, then the better aspect fit, then
                # channels-first (PyTorch's convention).
                readings.append(((grid not in known_grids, misfit, rank), (layout, reshape, grid)))
        if not readings:
            return None
        layout = min(readings, key=lambda reading: reading[0])[1]
        return layout if math.prod(layout[2]) > 1 else None
    if output.ndim == 3 and spatial_ndim >= 2:
        found = _token_grid(shape[1], input_spatial, known_grids)
        if found is None or math.prod(found[0]) <= 1:
            return None
        grid, prefix = found
        return "tokens", TokenReshape(grid=grid, num_prefix_tokens=prefix), grid
    return None


def _grid_view(tensor: Tensor, reshape: Callable[[Tensor], Tensor] | None) -> Tensor:
    """``tensor`` as ``(N, C, *grid)``: what the map will be computed on (prefix tokens dropped)."""
    return tensor if reshape is None else reshape(tensor)


def auto_layer(
    model: nn.Module,
    run_forward: Callable[[], Any],
    input_shape: Sequence[int],
    score: Callable[[Any], Tensor] | None = None,
    probe_chunk: int = 16,
) -> AutoLayer:
    """Find the layer to explain and how to read its output, with one traced forward pass.

    A candidate is a module (not the model itself, not a head, global pool, dropout or
    ``nn.Linear``) whose output, compared with the input's spatial size, is one of:

    * channels-first ``(N, C, *spatial)`` (CNNs, torchvision's Swin after its ``permute``),
    * channels-last ``(N, *spatial, C)`` (Swin / Swin3D stages, ConvNeXt block internals),
    * tokens ``(N, prefix + prod(grid), D)`` (ViT, MViT), with the grid taken from an earlier
      output of the same pass (the patch embedding, MViT's ``thw``) and 0-2 leading special tokens
      dropped; for images, a unique patch stride of the input also gives the grid,

    with more than one spatial position. When ``score`` is given (``model_output -> scores``), the
    pick is the last candidate in execution order on whose grid the scores' gradient is non-zero:
    a ViT's final tokens only reach the head through the class token, so their patch gradients are
    exactly zero and the last block's ``ln_1`` is chosen instead. Without ``score`` (or when every
    gradient is zero) it is the last candidate. When a block and its last child return the same
    tensor, the outer block wins (``layer4`` rather than ``layer4.2.relu``).

    The pass runs in eval mode (no batch-norm statistics move), with grad enabled only from the
    first module's output on and only for the probe; every module's ``training`` flag and the grad mode are restored, hooks are removed
    even when the forward raises, and nothing is written to parameters' ``.grad``.

    Args:
        model: the model.
        run_forward: calls the model on the inputs and returns its output.
        input_shape: shape of the primary input ``(N, C, *spatial)``; ``(N,)`` or ``(N, L)`` when
            the input has no spatial axes (then any channels-first output counts).
        score: optional ``model_output -> scores`` tensor used for the gradient probe.
        probe_chunk: candidates per backward pass of the probe (the last ones are tried first).
    """
    batch_size = int(input_shape[0])
    input_spatial = tuple(int(s) for s in input_shape[2:])
    names = {module: name for name, module in model.named_modules()}
    finished: list[tuple[nn.Module, int, Tensor | None, str, Callable[[Tensor], Tensor] | None, tuple[int, ...]]] = []
    known_grids: list[tuple[int, ...]] = []
    calls: dict[nn.Module, int] = {}
    # (module, candidates finished before it, shape) of (N, L, D) outputs with no grid to put them on.
    unplaced: list[tuple[nn.Module, int, tuple[int, ...]]] = []
    handles = []
    modes = {module: module.training for module in model.modules()}
    probing = score is not None
    thread = threading.get_ident()

    def record(module: nn.Module, _args: Any, output: Any) -> Any:
        if threading.get_ident() != thread:
            return None  # another thread's forward through the same modules
        call_index = calls.get(module, 0)
        calls[module] = call_index + 1
        replacement = None
        tensor = _first_tensor(output)
        if tensor is None:
            return None
        if probing and tensor.is_floating_point() and not tensor.requires_grad and type(output) in (Tensor, tuple, list):
            # The forward starts without grad; the graph starts at the first module output (and
            # restarts after a frozen stretch), so nothing below records autograd state: inputs
            # made under torch.inference_mode() cannot be saved for backward.
            leaf = tensor.detach().requires_grad_(True)
            torch.set_grad_enabled(True)  # restored in the finally block below
            downstream = leaf.clone()  # an in-place op after the module must not write into a leaf
            replacement = downstream if isinstance(output, Tensor) else type(output)((downstream, *output[1:]))
            tensor = leaf
        carried = _grid_in_output(output, len(input_spatial)) if input_spatial else None
        layout = _layout_of(tensor, batch_size, input_spatial, known_grids)
        if layout is not None and layout[0] != "tokens":
            known_grids.append(layout[2])
        if carried is not None:
            known_grids.append(carried)
        if module is model or isinstance(module, _NOT_A_FEATURE_LAYER):
            return replacement
        if layout is not None:
            # Keep the output only for the gradient probe: holding every candidate's feature map
            # otherwise keeps the whole forward's activations alive (r3d_18, 4 clips: +220 MiB).
            finished.append((module, call_index, tensor if probing else None, *layout))
        elif (
            len(input_spatial) >= 2 and tensor.ndim == 3 and tensor.is_floating_point()
            and tensor.shape[0] == batch_size and tensor.shape[1] > 1
        ):
            unplaced.append((module, len(finished), tuple(tensor.shape)))
        return replacement

    grad_mode = torch.is_grad_enabled()
    chosen = None
    probed = False
    try:
        for module in model.modules():
            handles.append(module.register_forward_hook(record))
        model.eval()
        torch.set_grad_enabled(False)
        output = run_forward()
        for handle in handles:
            handle.remove()
        handles = []
        if probing and finished:
            scores = score(output)
            total = scores.sum() if isinstance(scores, Tensor) else None
            if total is not None and total.requires_grad:
                chosen, probed = _last_with_gradient(total, finished, probe_chunk)
    finally:
        torch.set_grad_enabled(grad_mode)
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
    if not finished:
        where = f"an input of spatial size {input_spatial}" if input_spatial else "the input"
        raise ValueError(
            f"could not pick a layer automatically: no module of {type(model).__name__} returns, for {where}, "
            "a channels-first (N, C, *spatial) or channels-last (N, *spatial, C) feature map with more than one "
            "position, or (N, tokens, D) tokens whose count matches a patch grid seen earlier in the forward "
            "pass (plus 0-2 class tokens); name the layer, and for tokens give reshape=TokenReshape(grid=...)"
        )
    if chosen is None:
        if probing:
            warnings.warn(
                f"auto layer: the scores have zero gradient on every candidate layer of {type(model).__name__}; "
                "taking the last one",
                RuntimeWarning,
            )
        chosen = finished[-1]
    module, call_index, _tensor, layout, reshape, grid = chosen
    chosen_position = next(i for i, entry in enumerate(finished) if entry is chosen)
    later_tokens = [entry for entry in unplaced if entry[1] > chosen_position]
    if later_tokens:
        token_module, _, shape = later_tokens[-1]
        warnings.warn(
            f"auto layer: {names[token_module]!r} (after the pick) outputs tokens of shape {shape} whose grid "
            f"could not be inferred from the input's spatial size {input_spatial} or an earlier output, so "
            f"{names[module]!r} was chosen instead; to explain the tokens, pass that layer with "
            "reshape=TokenReshape(grid=(h, w), num_prefix_tokens=...)",
            RuntimeWarning,
        )
    return AutoLayer(module, names[module], layout, reshape, grid, call_index, probed)


def _last_with_gradient(total: Tensor, finished: list, chunk: int) -> tuple[Any, bool]:
    """The last candidate whose grid gets a non-zero gradient of ``total``, trying the candidates
    nearest the output first so that the backward passes stay short."""
    for stop in range(len(finished), 0, -chunk):
        group = [entry for entry in finished[max(0, stop - chunk) : stop] if entry[2].requires_grad]
        if not group:
            continue
        gradients = torch.autograd.grad(
            total, [entry[2] for entry in group], retain_graph=True, allow_unused=True
        )
        for entry, gradient in zip(reversed(group), reversed(gradients)):
            if gradient is not None and bool((_grid_view(gradient, entry[4]) != 0).any()):
                return entry, True
    return None, False


def find_auto_layer(
    model: nn.Module,
    run_forward: Callable[[], Any],
    batch_size: int,
    *,
    input_shape: Sequence[int] | None = None,
    score: Callable[[Any], Tensor] | None = None,
) -> nn.Module:
    """The module :func:`auto_layer` picks (see there); ``input_shape`` defaults to ``(batch_size,)``,
    i.e. no spatial input to compare against, where any channels-first output counts."""
    return auto_layer(model, run_forward, input_shape if input_shape is not None else (batch_size,), score).module


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
