"""The one layer resolver: which layer of a model to explain and how to read its output.

:func:`resolve_layer` is the only place a layer is chosen; the explainers, every task adapter,
the model zoo, the command line and the distillation loss all call it. For ``"auto"`` it asks,
in this order:

1. the model itself: a model with an ``explain_layer`` attribute (a dotted name; optionally
   ``explain_reshape``) declares its layer (the shipped models do);
2. the family rules of :mod:`multiexplain.explain.families`: per-family knowledge kept as data
   (torchvision ViT / Swin / video nets, pytorchvideo nets and their pathways, Hugging Face
   ViT-style, Swin, BLIP and VisionEncoderDecoder models, timm ViTs);
3. a probe: one forward without autograd lists every module output that is a feature map,
   then a second forward records autograd state only from the last few candidates on and picks
   the last one on whose grid the explained scores have a non-zero gradient.

A feature map is channels-first ``(N, C, *spatial)``, channels-last ``(N, *spatial, C)`` or
tokens ``(N, prefix + prod(grid), D)`` with the same number of spatial axes as the input, more
than one position, and every axis the input has kept (X3D's head pool collapses time to one slice:
every frame would get the same map, so it is not a feature map).

The probe runs on a *shadow* of the model: new module objects that share the parameters and
buffers, put in eval mode and hooked there, so the shared model's ``training`` flags never change
and other threads never see the probe's hooks. Its result is cached per model and input shape.
"""

from __future__ import annotations

import copy
import difflib
import math
import threading
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Sequence, Union

import torch
from torch import Tensor, nn

from .capture import Element, feature_element, replace_element

__all__ = [
    "ChannelsLast",
    "LayerChoice",
    "MergedPatches",
    "Reshape",
    "TileTokens",
    "TokenReshape",
    "VideoTokens",
    "find_module",
    "layer_name",
    "read_layout",
    "resolve_layer",
]

#: Turns a layer's output into channels-first ``(N, C, *spatial)``. A reshape that needs the call's
#: inputs (Qwen2-VL's patch grids) also has ``bind(inputs) -> Reshape``; the explainer binds it
#: before reading the layer.
Reshape = Callable[[Tensor], Tensor]
LayerSpec = Union[nn.Module, str]


# -- reading a layer's output ------------------------------------------------------------------

_PREFIX_TOKEN_COUNTS = (0, 1, 2)  # none, a class token, class + distillation tokens (DeiT)


@dataclass(frozen=True)
class TokenReshape:
    """Transformer tokens ``(N, L, D)`` -> channels-first ``(N, D, *grid)``.

    Args:
        grid: the patch grid (``(14, 14)`` for ViT-B/16 at 224x224, ``(8, 7, 7)`` for video tokens).
            ``None`` infers a square grid from the token count.
        num_prefix_tokens: leading special tokens to drop (1 for a class token, 2 for DeiT's class +
            distillation tokens, 0 for none). ``None`` with ``grid=None`` infers it: a square grid
            plus 0, 1 or 2 tokens is unambiguous. Tokens left over after the grid are an error.

    A slice, a transpose and a reshape, so gradients map onto the grid as activations do.
    """

    grid: Sequence[int] | None = None
    num_prefix_tokens: int | None = 1

    def __call__(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 3:
            raise ValueError(f"TokenReshape expects (N, L, D) tokens, got shape {tuple(tokens.shape)}")
        n, length, dim = tokens.shape
        grid, prefix = self.layout(length)
        return tokens[:, prefix:, :].transpose(1, 2).reshape(n, dim, *grid)

    def layout(self, length: int) -> tuple[tuple[int, ...], int]:
        """``(grid, prefix)`` for ``length`` tokens, or a clear error."""
        prefixes = _PREFIX_TOKEN_COUNTS if self.num_prefix_tokens is None else (self.num_prefix_tokens,)
        if self.grid is not None:
            grid = tuple(int(g) for g in self.grid)
            for prefix in prefixes:
                if math.prod(grid) == length - prefix:
                    return grid, prefix
            raise ValueError(
                f"{length} tokens do not fill the grid {grid} ({math.prod(grid)} cells) after "
                f"{'0-2' if self.num_prefix_tokens is None else self.num_prefix_tokens} prefix token(s); "
                "give TokenReshape(grid=..., num_prefix_tokens=...) that match the layer"
            )
        for prefix in prefixes:
            side = math.isqrt(max(length - prefix, 0))
            if side > 0 and side * side == length - prefix:
                return (side, side), prefix
        raise ValueError(
            f"cannot infer a square patch grid from {length} tokens with "
            f"{'0-2' if self.num_prefix_tokens is None else self.num_prefix_tokens} prefix token(s): "
            "give TokenReshape(grid=(h, w), num_prefix_tokens=...)"
        )


def _tokens_of(inputs: Any, key: str) -> Any:
    """``inputs[key]`` from a mapping of call inputs (``None`` when absent)."""
    return inputs.get(key) if hasattr(inputs, "get") else None


def _batch_of(inputs: Any) -> int | None:
    """The number of sequences in a vision-language model's call inputs (their ``input_ids``)."""
    ids = _tokens_of(inputs, "input_ids")
    return int(ids.shape[0]) if isinstance(ids, Tensor) and ids.ndim == 2 else None


@dataclass(frozen=True)
class TileTokens:
    """Tokens of image tiles batched along the first axis, ``(N * P, L, D)`` -> ``(N, D, P, h, w)``.

    Vision-language models that split an image into tiles (LLaVA-NeXT's base image + high-resolution
    crops, Idefics3 / SmolVLM's crops + global image) run their vision tower on every tile of every
    image as one batch. The tile axis ``P`` becomes a spatial axis in front of each tile's square
    patch grid, so channel weights pool over all of an image's tiles, as over one feature map.

    Args:
        num_prefix_tokens: leading special tokens of each tile (``None``: inferred, 0-2).
        images: ``N``; :meth:`bind` reads it from the call's ``input_ids`` (1 when unknown).
    """

    num_prefix_tokens: int | None = None
    images: int | None = None

    def bind(self, inputs: Any) -> "TileTokens":
        """This reading for one call: ``images`` from the call's ``input_ids``."""
        return replace(self, images=_batch_of(inputs) or self.images)

    def __call__(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 3:
            raise ValueError(f"TileTokens expects (tiles, L, D) tokens, got shape {tuple(tokens.shape)}")
        images = self.images or 1
        tiles, length, dim = tokens.shape
        if tiles % images:
            raise ValueError(
                f"{tiles} tiles cannot be split evenly among {images} images (the images were cut into different "
                "numbers of tiles); explain one image at a time"
            )
        grid, prefix = TokenReshape(None, self.num_prefix_tokens).layout(length)
        cells = tokens[:, prefix:, :].transpose(1, 2).reshape(images, tiles // images, dim, *grid)
        return cells.transpose(1, 2)


@dataclass(frozen=True)
class MergedPatches:
    """Qwen2-VL's merged patch tokens -> ``(N, D, h, w)``.

    Qwen2-VL's vision tower takes every image at its own resolution and returns the tokens of all
    images concatenated, without a batch axis: ``(sum_i t_i * h_i * w_i / merge**2, D)``, each
    image's tokens in raster order of its merged grid ``(h_i / merge, w_i / merge)`` (non-square).
    :meth:`bind` reads the patch grids from the call's ``image_grid_thw``.

    Args:
        merge: the spatial merge size (``config.vision_config.spatial_merge_size``).
        grids: ``(t, h, w)`` patch grid of each image (before merging).
    """

    merge: int = 2
    grids: tuple[tuple[int, int, int], ...] | None = None

    def bind(self, inputs: Any) -> "MergedPatches":
        grids = _tokens_of(inputs, "image_grid_thw")
        if not isinstance(grids, Tensor):
            return self
        return replace(self, grids=tuple(tuple(int(v) for v in row) for row in grids.tolist()))

    def __call__(self, tokens: Tensor) -> Tensor:
        if self.grids is None:
            raise ValueError("MergedPatches needs the images' patch grids: call with image_grid_thw in the inputs, "
                             "or give MergedPatches(merge, grids=((t, h, w), ...))")
        if tokens.ndim != 2:
            raise ValueError(f"MergedPatches expects (tokens, D) merged patches, got shape {tuple(tokens.shape)}")
        merged = [(t, h // self.merge, w // self.merge) for t, h, w in self.grids]
        counts = [math.prod(grid) for grid in merged]
        if sum(counts) != tokens.shape[0]:
            raise ValueError(f"{tokens.shape[0]} merged patches do not fill the grids {merged} ({sum(counts)} cells)")
        if any(t != 1 for t, _, _ in merged) or len({grid for grid in merged}) > 1:
            raise ValueError(f"merged patch grids {merged} are not one image each of one size; explain one image at a time")
        _, h, w = merged[0]
        return tokens.reshape(len(merged), h, w, tokens.shape[1]).permute(0, 3, 1, 2)


@dataclass(frozen=True)
class VideoTokens:
    """Video transformer tokens -> channels-first ``(N, D, T', H', W')``.

    Args:
        grid: one frame's patch grid ``(H', W')``; ``T'`` follows from the token count.
        num_prefix_tokens: leading special tokens to drop (1 for a class token).
        order: how the patch tokens are laid out: ``"thw"`` (time slowest: VideoMAE's and ViViT's
            tubelets) or ``"hwt"`` (time fastest: TimeSformer's joint space-time sequence).
        frames: for tokens that carry the frames in the batch axis, ``(N * T', prefix + H' * W', D)``
            (TimeSformer's divided space-time blocks), ``T'``; ``None`` otherwise.

    Slices, reshapes and a permute, so gradients map onto the grid as activations do.
    """

    grid: tuple[int, int]
    num_prefix_tokens: int = 0
    order: str = "thw"
    frames: int | None = None

    def __call__(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 3:
            raise ValueError(f"VideoTokens expects (N, L, D) tokens, got shape {tuple(tokens.shape)}")
        (h, w), prefix = self.grid, self.num_prefix_tokens
        batch, length, dim = tokens.shape
        patches = tokens[:, prefix:, :]
        if self.frames is not None:
            if batch % self.frames or length - prefix != h * w:
                raise ValueError(
                    f"tokens of shape {tuple(tokens.shape)} are not {self.frames} frames per sample of {prefix} + "
                    f"{h}x{w} tokens; the clip must have the model's frame count and frame size"
                )
            return patches.reshape(batch // self.frames, self.frames, h, w, dim).permute(0, 4, 1, 2, 3)
        if (length - prefix) % (h * w) or length - prefix < h * w:
            raise ValueError(f"{length} tokens are not {prefix} + T' x {h} x {w}; the clip must have the model's frame size")
        frames = (length - prefix) // (h * w)
        if self.order == "thw":
            return patches.reshape(batch, frames, h, w, dim).permute(0, 4, 1, 2, 3)
        if self.order == "hwt":
            return patches.reshape(batch, h, w, frames, dim).permute(0, 4, 3, 1, 2)
        raise ValueError(f"order must be 'thw' or 'hwt', got {self.order!r}")


@dataclass(frozen=True)
class ChannelsLast:
    """A channels-last output ``(N, *spatial, C)`` (Swin stages, ConvNeXt blocks) -> ``(N, C, *spatial)``."""

    def __call__(self, output: Tensor) -> Tensor:
        if output.ndim < 3:
            raise ValueError(f"ChannelsLast expects (N, *spatial, C), got shape {tuple(output.shape)}")
        return output.movedim(-1, 1)


def _geometry_misfit(grid: Sequence[int], input_spatial: Sequence[int]) -> float | None:
    """``None`` when ``grid`` cannot be a feature grid of an input of spatial size ``input_spatial``,
    else the relative aspect-ratio error (0 for an exact fit).

    Every axis must be at most the input's size and keep more than one position where the input
    has more than one; the last two axes (``H, W``) must keep the input's aspect ratio to within
    rounding (the temporal axis of video may be strided differently). This is what tells
    ``(N, C, h, w)`` from ``(N, h, w, C)``: read the wrong way round, a 768-channel Swin stage
    would be a 7 x 768 "grid" of a square image.
    """
    if len(grid) != len(input_spatial) or any(g < 1 or g > s for g, s in zip(grid, input_spatial)):
        return None
    if any(g == 1 and s > 1 for g, s in zip(grid, input_spatial)):
        return None  # an axis of the input collapsed to one position
    if len(grid) < 2:
        return 0.0
    (h, w), (height, width) = grid[-2:], input_spatial[-2:]
    expected_h = w * height / width
    error = abs(h - expected_h)
    if error > max(1.0, 0.15 * max(h, expected_h)):
        return None
    return error / max(h, expected_h)


def _token_grid(length: int, input_spatial: Sequence[int], known_grids: Sequence[tuple[int, ...]]) -> tuple[tuple[int, ...], int] | None:
    """``(grid, prefix)`` for ``length`` tokens: a grid seen earlier in the forward pass (the patch
    embedding's output, MViT's ``thw``), most recent first, with 0-2 leading special tokens; else,
    for images, the patch grid of a unique stride of the input."""
    for grid in reversed(known_grids):
        if _geometry_misfit(grid, input_spatial) is None:
            continue
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
        found = {entry for entry in found if _geometry_misfit(entry[0], input_spatial) is not None}
        if len(found) == 1:
            return found.pop()
    return None


@dataclass(frozen=True)
class Reading:
    """How to read one layer output: ``layout`` is ``channels_first``, ``channels_last`` or
    ``tokens``; ``reshape`` turns it into ``(N, C, *grid)`` (``None`` for channels-first)."""

    layout: str
    reshape: Reshape | None
    grid: tuple[int, ...]


def read_layout(
    output: Tensor, batch_size: int, input_spatial: Sequence[int], known_grids: Sequence[tuple[int, ...]] = ()
) -> Reading | None:
    """The :class:`Reading` of a layer output as a feature map of the input, or ``None`` when it is not one."""
    if not output.is_floating_point() or output.ndim < 3 or output.shape[0] != batch_size:
        return None
    shape = tuple(output.shape)
    if not input_spatial:  # nothing to compare with: any channels-first tensor with > 1 position
        return Reading("channels_first", None, shape[2:]) if math.prod(shape[2:]) > 1 else None
    spatial_ndim = len(input_spatial)
    if output.ndim == spatial_ndim + 2:
        options = [Reading("channels_first", None, shape[2:])]
        if spatial_ndim >= 2:  # with one spatial axis (N, C, L) and (N, L, C) cannot be told apart
            options.append(Reading("channels_last", ChannelsLast(), shape[1:-1]))
        ranked = []
        for rank, reading in enumerate(options):
            misfit = _geometry_misfit(reading.grid, input_spatial)
            if misfit is not None:
                # A grid seen earlier in the pass first, then the better aspect fit, then channels-first.
                ranked.append(((reading.grid not in known_grids, misfit, rank), reading))
        if not ranked:
            return None
        reading = min(ranked, key=lambda entry: entry[0])[1]
        return reading if math.prod(reading.grid) > 1 else None
    if output.ndim == 3 and spatial_ndim >= 2:
        found = _token_grid(shape[1], input_spatial, known_grids)
        if found is None or math.prod(found[0]) <= 1:
            return None
        grid, prefix = found
        return Reading("tokens", TokenReshape(grid=grid, num_prefix_tokens=prefix), grid)
    return None


# -- naming layers -------------------------------------------------------------------------------

def layer_name(model: nn.Module, layer: nn.Module) -> str:
    """The dotted name of ``layer`` inside ``model`` (``""`` for the model itself)."""
    for name, module in model.named_modules():
        if module is layer:
            return name
    raise ValueError(f"{type(layer).__name__} is not a submodule of {type(model).__name__}")


def find_module(model: nn.Module, path: str) -> nn.Module | None:
    """The submodule at a dotted ``path`` in which an integer may be negative (``"blocks.-1.norm1"``
    counts from the end of a ``ModuleList`` / ``Sequential``); ``None`` when there is none."""
    module = model
    for part in path.split(".") if path else []:
        children = list(module.named_children())
        if part.lstrip("-").isdigit() and part.startswith("-"):
            index = int(part)
            if not -len(children) <= index < 0:
                return None
            module = children[index][1]
            continue
        module = dict(children).get(part)
        if module is None:
            return None
    return module


def _named(model: nn.Module, target: LayerSpec) -> nn.Module:
    if isinstance(target, nn.Module):
        layer_name(model, target)  # raises if it is not part of the model
        return target
    if not isinstance(target, str):
        raise TypeError(f"a layer is an nn.Module, a dotted name or 'auto', got {type(target).__name__}")
    names = dict(model.named_modules())
    if target in names:
        return names[target]
    found = find_module(model, target)
    if found is not None:
        return found
    close = difflib.get_close_matches(target, [n for n in names if n], n=5, cutoff=0.5)
    if close:
        hint = f"; close names: {', '.join(close)}"
    else:
        children = list(model.named_children())
        top = [name for name, _ in children]
        shown = ", ".join(top[:12]) + (f" and {len(top) - 12} more" if len(top) > 12 else "")
        nested = [f"{name}.{next(iter(child._modules))}" for name, child in children if child._modules]
        example = f", e.g. '{nested[-1]}'" if nested else ""
        hint = (f"; its top-level modules are {shown or 'none'} (dotted names reach inside them{example}; "
                "all of them: [n for n, _ in model.named_modules()])")
    raise ValueError(f"{type(model).__name__} has no layer named {target!r}{hint}")


# -- the resolver ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class LayerChoice:
    """Which layer to explain and how to read it.

    Attributes:
        module, name: the layer and its dotted name.
        reshape: turns the captured output into ``(N, C, *spatial)`` (``None``: channels-first,
            or read from the output's shape when the layer was named).
        layer_call: which call of a module that runs several times per forward (``None``: once).
        element: which element of a container output is the feature map (``None``: the first tensor).
        layout: ``channels_first``, ``channels_last``, ``tokens`` or ``None`` (not known before a forward).
        grid: the layer-resolution spatial shape, when the probe saw it.
        source: ``"given"``, ``"declared"`` (the model's ``explain_layer``), ``"family: <name>"`` or ``"probe"``.
        probed: the probe confirmed a non-zero gradient of the scores on the grid.
    """

    module: nn.Module = field(repr=False)
    name: str
    reshape: Reshape | None = None
    layer_call: int | None = None
    element: Element = None
    layout: str | None = None
    grid: tuple[int, ...] | None = None
    source: str = "given"
    probed: bool = False


def resolve_layer(
    model: nn.Module,
    layer: LayerSpec = "auto",
    *,
    reshape: Reshape | None = None,
    layer_call: int | None = None,
    element: Element = None,
    branch: int | None = None,
    call: Callable[[nn.Module], Any] | None = None,
    input_shape: Sequence[int] | None = None,
    score: Callable[[Any], Tensor] | None = None,
) -> LayerChoice:
    """Choose the layer of ``model`` to explain.

    Args:
        layer: a module of ``model``, its dotted name (negative indices count from the end:
            ``"blocks.-1"``), or ``"auto"`` (the declared layer, a family rule, else the probe).
        reshape, layer_call, element: given by the caller; they override what a rule says.
        branch: for models with parallel pathways (SlowFast), which one (0 slow, 1 fast; default the
            family's).
        call: ``module -> output``: runs a model (the shared one or its shadow) on the inputs;
            needed only by the probe.
        input_shape: ``(N, C, *spatial)`` of the primary input (``(N,)`` when it has no spatial axes).
        score: ``model_output -> scores`` for the probe's gradient test (optional).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not (isinstance(layer, str) and layer == "auto"):
        module = _named(model, layer)
        return LayerChoice(module, layer_name(model, module), reshape, layer_call, element)
    chosen = _declared(model) or _family_choice(model, branch)
    if chosen is None:
        if call is None or input_shape is None:
            raise ValueError(
                f"{type(model).__name__} declares no layer and matches no family rule, so 'auto' needs one forward "
                "on example inputs; call the explainer with inputs, or name the layer"
            )
        chosen = _cached_probe(model, call, input_shape, score)
    overrides = {k: v for k, v in (("reshape", reshape), ("layer_call", layer_call), ("element", element)) if v is not None}
    return replace(chosen, **overrides) if overrides else chosen


def _declared(model: nn.Module) -> LayerChoice | None:
    declared = getattr(model, "explain_layer", None)
    if not isinstance(declared, str):
        return None
    module = _named(model, declared)
    return LayerChoice(module, layer_name(model, module), getattr(model, "explain_reshape", None), source="declared")


def _family_choice(model: nn.Module, branch: int | None) -> LayerChoice | None:
    from .families import FAMILY_RULES

    for rule in FAMILY_RULES:
        if rule.recognise(model):
            found = rule.locate(model, branch)
            if found is None:
                continue
            module, reshape, layer_call, element = found
            return LayerChoice(module, layer_name(model, module), reshape, layer_call, element, source=f"family: {rule.family}")
    return None


# -- the probe ----------------------------------------------------------------------------------

# Modules whose output is never "the last feature map": heads, global pools, shape-only modules.
_NOT_A_FEATURE_LAYER: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Identity, nn.Flatten, nn.Unflatten,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
    nn.Softmax, nn.LogSoftmax, nn.Sigmoid,
)
# Shape-only modules by class name: torchvision's ``Permute`` reorders the axes of the layer
# before it, which is the feature map to name.
_SHAPE_ONLY_NAMES = ("Permute",)

_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[Any, LayerChoice]]" = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def _cached_probe(model: nn.Module, call: Callable[[nn.Module], Any], input_shape: Sequence[int], score: Callable[[Any], Tensor] | None) -> LayerChoice:
    key = (tuple(int(s) for s in input_shape[1:]), score is not None)
    with _CACHE_LOCK:
        found = _CACHE.get(model, {}).get(key)
    if found is not None and any(m is found.module for m in model.modules()):
        return found
    found = probe_layer(model, call, input_shape, score)
    with _CACHE_LOCK:
        _CACHE.setdefault(model, {})[key] = found
    return found


def _shadow(model: nn.Module) -> nn.Module | None:
    """New module objects sharing ``model``'s parameters and buffers, in eval mode, with their own
    hook tables; ``None`` for a model that cannot be shadowed (scripted, or with an instance-level
    ``forward`` patch whose bound module would be the original)."""
    memo: dict[int, nn.Module] = {}

    def clone(module: nn.Module) -> nn.Module:
        if id(module) in memo:
            return memo[id(module)]
        if isinstance(module, torch.jit.ScriptModule) or "forward" in module.__dict__:
            raise TypeError("cannot shadow")
        copied = copy.copy(module)
        memo[id(module)] = copied
        for key, value in list(copied.__dict__.items()):
            if key.startswith("_") and isinstance(value, (dict, set)):
                copied.__dict__[key] = copy.copy(value)  # parameter, buffer, module and hook tables
        copied._modules = OrderedDict(
            (name, clone(child) if child is not None else None) for name, child in module._modules.items()
        )
        copied.training = False
        return copied

    try:
        return clone(model)
    except Exception:  # noqa: BLE001 - any copy failure means: probe the model itself
        return None


@dataclass(eq=False)
class _Candidate:
    name: str
    call_index: int
    reading: Reading
    tensor: Tensor | None = None


def probe_layer(
    model: nn.Module,
    call: Callable[[nn.Module], Any],
    input_shape: Sequence[int],
    score: Callable[[Any], Tensor] | None = None,
    chunk: int = 16,
) -> LayerChoice:
    """The probe (see the module docstring): the last feature-map layer whose grid gets a non-zero
    gradient of ``score``, trying the ``chunk`` candidates nearest the output first.

    Memory: the listing pass records no autograd state; a gradient pass records it only from the
    first candidate of its chunk on, so the probe costs about what a plain no-grad forward costs.
    When the block and its last child return the same tensor, the outer block wins
    (``layer4`` rather than ``layer4.1.relu``). Without ``score`` it is the last candidate.
    """
    batch_size = int(input_shape[0])
    input_spatial = tuple(int(s) for s in input_shape[2:])
    shadow = _shadow(model)
    runner = shadow if shadow is not None else model
    names = {module: name for name, module in runner.named_modules()}
    candidates, unplaced, call_counts = _list_candidates(runner, names, call, batch_size, input_spatial)
    _release_freed_memory()
    if not candidates:
        where = f"an input of spatial size {input_spatial}" if input_spatial else "the input"
        raise ValueError(
            f"could not pick a layer automatically: no module of {type(model).__name__} returns, for {where}, "
            "a channels-first (N, C, *spatial) or channels-last (N, *spatial, C) feature map with more than one "
            "position on every input axis, or (N, tokens, D) tokens whose count matches a patch grid seen earlier "
            "in the forward pass (plus 0-2 class tokens); name the layer, and for tokens give "
            "reshape=TokenReshape(grid=...)"
        )
    chosen, probed = None, False
    if score is not None:
        for stop in range(len(candidates), 0, -chunk):
            chosen = _with_gradient(runner, names, call, score, candidates[max(0, stop - chunk) : stop])
            _release_freed_memory()
            if chosen is not None:
                probed = True
                break
        if chosen is None:
            warnings.warn(
                f"auto layer: the scores have zero gradient on every candidate layer of {type(model).__name__}; "
                "taking the last one", RuntimeWarning,
            )
    if chosen is None:
        chosen = candidates[-1]
    position = candidates.index(chosen)
    later_tokens = [entry for entry in unplaced if entry[1] > position]
    if later_tokens:
        token_name, _, shape = later_tokens[-1]
        warnings.warn(
            f"auto layer: {token_name!r} (after the pick) outputs tokens of shape {shape} whose grid could not be "
            f"inferred from the input's spatial size {input_spatial} or an earlier output, so {chosen.name!r} was "
            "chosen instead; to explain the tokens, pass that layer with reshape=TokenReshape(grid=(h, w), "
            "num_prefix_tokens=...)", RuntimeWarning,
        )
    module = dict(model.named_modules())[chosen.name]
    # A module that runs several times per forward (BLIP's post_layernorm: all tokens, then the
    # pooled one) is explained at the call that gave the feature map.
    layer_call = chosen.call_index if call_counts.get(chosen.name, 1) > 1 else None
    # The candidate was read with feature_element's default rule, so element=None finds it again.
    return LayerChoice(module, chosen.name, chosen.reading.reshape, layer_call, None, chosen.reading.layout,
                       chosen.reading.grid, "probe", probed)


def _release_freed_memory() -> None:
    """Hand the memory a probe pass freed back to the operating system (glibc's ``malloc_trim``).

    glibc keeps freed blocks of a forward pass in its heap, so without this the next pass (and the
    explanation after the probe) would stack on top of the last one's high-water mark: two
    consecutive no-grad forwards of resnet18 on a 1024x1024 image peak at 1.27x one forward's RSS.
    A no-op where there is no glibc."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        try:
            import ctypes

            _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM: Any = None


def _is_shape_only(module: nn.Module) -> bool:
    return isinstance(module, _NOT_A_FEATURE_LAYER) or type(module).__name__ in _SHAPE_ONLY_NAMES


def _grid_in_output(output: Any, spatial_ndim: int) -> tuple[int, ...] | None:
    """A grid shape carried next to the tensor, as MViT's ``(tokens, (T, H, W))`` outputs do."""
    if isinstance(output, (tuple, list)) and len(output) >= 2 and isinstance(output[0], Tensor):
        for extra in output[1:]:
            if (
                isinstance(extra, (tuple, list)) and len(extra) == spatial_ndim
                and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in extra)
            ):
                return tuple(extra)
    return None


def _list_candidates(runner: nn.Module, names: dict, call: Callable, batch_size: int, input_spatial: tuple[int, ...]):
    """Pass 1, without autograd: every module output that reads as a feature map, in the order the
    modules finish, the ``(N, L, D)`` outputs that found no grid (for a warning) and how often each
    module ran."""
    candidates: list[_Candidate] = []
    unplaced: list[tuple[str, int, tuple[int, ...]]] = []
    known_grids: list[tuple[int, ...]] = []
    calls: dict[nn.Module, int] = {}

    def record(module: nn.Module, _args: Any, output: Any) -> None:
        index = calls.get(module, 0)
        calls[module] = index + 1
        where, tensor = feature_element(output)
        if tensor is None:
            return
        carried = _grid_in_output(output, len(input_spatial)) if input_spatial else None
        reading = read_layout(tensor, batch_size, input_spatial, known_grids)
        if reading is not None and reading.layout != "tokens":
            known_grids.append(reading.grid)
        if carried is not None:
            known_grids.append(carried)
        if module is runner or _is_shape_only(module):
            return
        if reading is not None:
            candidates.append(_Candidate(names[module], index, reading))
        elif (len(input_spatial) >= 2 and tensor.ndim == 3 and tensor.is_floating_point()
              and tensor.shape[0] == batch_size and tensor.shape[1] > 1):
            unplaced.append((names[module], len(candidates), tuple(tensor.shape)))

    handles = [module.register_forward_hook(record) for module in runner.modules()]
    try:
        with torch.no_grad():
            call(runner)
    finally:
        for handle in handles:
            handle.remove()
    return candidates, unplaced, {names[module]: count for module, count in calls.items()}


def _with_gradient(runner: nn.Module, names: dict, call: Callable, score: Callable, group: list[_Candidate]) -> _Candidate | None:
    """Pass 2 for one chunk: autograd on from the chunk's first candidate, then the last candidate
    of the chunk whose grid gets a non-zero gradient of ``score``."""
    wanted = {(c.name, c.call_index): c for c in group}
    calls: dict[nn.Module, int] = {}
    grad_mode = torch.is_grad_enabled()

    def record(module: nn.Module, _args: Any, output: Any) -> Any:
        index = calls.get(module, 0)
        calls[module] = index + 1
        entry = wanted.get((names.get(module), index))
        if entry is None:
            return None
        where, tensor = feature_element(output)
        if tensor is None or not tensor.is_floating_point():
            return None
        if tensor.requires_grad:
            entry.tensor = tensor
            return None
        # The graph starts here (and restarts after a stretch that records none, e.g. frozen
        # weights): nothing before the chunk records autograd state.
        leaf = tensor.detach().requires_grad_(True)
        torch.set_grad_enabled(True)
        entry.tensor = leaf
        return replace_element(output, where, leaf.clone())  # an in-place op after it must not hit the leaf

    for entry in group:
        entry.tensor = None
    # Prepended: hooks of the model's own that record outputs must record the replaced tensor.
    handles = [module.register_forward_hook(record, prepend=True) for module in runner.modules()]
    try:
        torch.set_grad_enabled(False)
        output = call(runner)
        for handle in handles:
            handle.remove()
        handles = []
        scores = score(output)
        total = scores.sum() if isinstance(scores, Tensor) else None
        if total is None or not total.requires_grad:
            return None
        present = [entry for entry in group if entry.tensor is not None and entry.tensor.requires_grad]
        if not present:
            return None
        gradients = torch.autograd.grad(total, [entry.tensor for entry in present], allow_unused=True)
        for entry, gradient in zip(reversed(present), reversed(gradients)):
            if gradient is not None:
                view = gradient if entry.reading.reshape is None else entry.reading.reshape(gradient)
                if bool((view != 0).any()):
                    return entry
        return None
    finally:
        torch.set_grad_enabled(grad_mode)
        for handle in handles:
            handle.remove()
        for entry in group:
            entry.tensor = None
