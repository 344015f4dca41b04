"""Video action recognition: space-time Grad-CAM++ maps for video classifiers.

:func:`explain_clip` turns a classifier and clips into one :class:`~multiexplain.ExplainRequest`
(the call inputs in the model's own layout: the clip, SlowFast's ``[slow, fast]`` pathway list, or
a Hugging Face video model's frames-first ``pixel_values``; the target classes' pre-softmax logits
as scores; the layer from the one resolver, with the pathway as its branch) and returns a
:class:`VideoExplanation`: the shared explanation fields with ``maps (N, T, H, W)``.

Clips are always given as ``(N, C, T, H, W)`` (or ``(C, T, H, W)``); the adapter packs them for
the model: SlowFast gets its two pathways (:func:`slowfast_pathways`, alpha read off the model),
VideoMAE / TimeSformer / ViViT get ``{"pixel_values": (N, T, C, H, W)}``. A Hugging Face
processor's output (a mapping with ``pixel_values``) is taken as it is.

A whole video is explained window by window (:func:`window_starts`); :class:`WindowBlend`
combines the maps of overlapping windows into one map per frame.

Channel weights pool over the whole ``T', H', W'`` volume by default (the paper's form: the
Grad-CAM++ denominator's ``sum_q A_k(q)`` and the weight sums run over the volume);
``per_slice=True`` pools over ``H', W'`` only, one weight per channel and time slice.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from multiexplain.core import normalize_maps
from multiexplain.explain import ExplainRequest, Explanation, explain_request, method_names
from multiexplain.explain.families import clip_frames, frames_first, pathway_alpha
from multiexplain.explain.layers import LayerSpec, Reshape

__all__ = [
    "KINETICS_MEAN", "KINETICS_STD", "PATHWAYS", "VideoExplanation", "WindowBlend", "explain_clip", "model_inputs",
    "normalize_clip", "slowfast_pathways", "window_starts",
]

# Kinetics-400 statistics of torchvision's video models (pytorchvideo's hub models use others:
# multiexplain.zoo.PYTORCHVIDEO_MEAN / PYTORCHVIDEO_STD).
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)

#: SlowFast pathway names -> the resolver's branch index.
PATHWAYS = {"slow": 0, "fast": 1}


@dataclass
class VideoExplanation(Explanation):
    """Space-time maps for a batch of clips: the shared fields plus how they were made.

    ``maps`` are ``(N, T, H, W)`` in ``[0, 1]``, aligned with the input frames (trilinear upsampling
    of the layer's ``(T', H', W')`` map, min-max normalised per clip over the volume); ``raw``
    ``(N, T', H', W')``; ``weights`` ``(N, C)`` (``(N, C, T')`` with ``per_slice``). For SlowFast
    with ``pathway="both"``, ``raw`` and ``weights`` are ``(slow, fast)`` pairs and ``layer`` names both.
    """

    per_slice: bool = False
    pathway: str | None = None


def _as_batch(clip: Tensor, name: str) -> Tensor:
    if not isinstance(clip, Tensor):
        raise TypeError(f"{name} must be a tensor (C, T, H, W) or (N, C, T, H, W), got {type(clip).__name__}")
    if clip.ndim == 4:
        clip = clip.unsqueeze(0)
    if clip.ndim != 5:
        raise ValueError(f"{name} must be (C, T, H, W) or (N, C, T, H, W), got shape {tuple(clip.shape)}")
    if not clip.is_floating_point():
        raise TypeError(f"{name} has dtype {clip.dtype}; convert to float (e.g. clip.float() / 255) and normalise first")
    if not torch.isfinite(clip).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return clip


def _first_conv3d(model: nn.Module) -> nn.Conv3d | None:
    return next((module for module in model.modules() if isinstance(module, nn.Conv3d)), None)


def _check_channels(clip: Tensor, channels: int | None, name: str) -> None:
    """Catch the common ``(N, T, C, H, W)`` mistake before the model fails with a cryptic error."""
    _, c, t, _, _ = clip.shape
    expected = channels if channels is not None else 3
    if c != expected and t == expected:
        raise ValueError(
            f"{name} has shape {tuple(clip.shape)}, which looks like (N, T, C, H, W) with T={c} frames of "
            f"{t} channels; video models take (N, C, T, H, W): use clip.permute(0, 2, 1, 3, 4)"
        )
    if channels is not None and c != channels:
        raise ValueError(f"{name} has {c} channels (shape {tuple(clip.shape)}) but the model's first convolution takes {channels}")


def _min_frames(model: nn.Module) -> int:
    """Frames the model needs at least: what it declares (``min_frames``), and the first 3D
    convolution's temporal extent."""
    conv = _first_conv3d(model)
    need = int(getattr(model, "min_frames", 1) or 1)
    if conv is not None:
        need = max(need, (conv.kernel_size[0] - 1) * conv.dilation[0] + 1 - 2 * conv.padding[0])
    return need


_TOO_SHORT = ("smaller than kernel size", "Kernel size can't be greater", "Output size is too small", "kernel size can't be greater")


def slowfast_pathways(clip: Tensor, alpha: int = 4) -> list[Tensor]:
    """``[slow, fast]`` pathway inputs for a SlowFast model from one clip ``(N, C, T, H, W)``: the
    fast pathway is the clip, the slow one takes ``T // alpha`` frames uniformly (as pytorchvideo's
    ``PackPathway`` does)."""
    clip = _as_batch(clip, "clip")
    frames = clip.shape[2]
    if frames < alpha:
        raise ValueError(f"a SlowFast clip needs at least alpha={alpha} frames, got {frames}")
    index = torch.linspace(0, frames - 1, frames // alpha, device=clip.device).long()
    return [clip.index_select(2, index), clip]


def normalize_clip(clip: Tensor, mean: Sequence[float] = KINETICS_MEAN, std: Sequence[float] = KINETICS_STD) -> Tensor:
    """``(clip - mean) / std`` per channel for ``(C, T, H, W)`` or ``(N, C, T, H, W)`` clips."""
    shape = (-1, 1, 1, 1)
    mean_t = torch.tensor(mean, dtype=clip.dtype, device=clip.device).view(shape)
    return (clip - mean_t) / torch.tensor(std, dtype=clip.dtype, device=clip.device).view(shape)


def _frames_first_inputs(model: nn.Module, clip: Tensor) -> dict[str, Tensor]:
    """``{"pixel_values": (N, T, C, H, W)}`` for a Hugging Face video model, checked against its config."""
    config = getattr(model, "config", None)
    channels = int(getattr(config, "num_channels", 3) or 3)
    _check_channels(clip, channels, "clip")
    frames = clip_frames(model)
    if frames is not None and clip.shape[2] != frames:
        raise ValueError(f"this model takes clips of exactly {frames} frames (config.num_frames), got {clip.shape[2]}")
    size = getattr(config, "image_size", None)
    if size is not None:
        expected = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(clip.shape[3:]) != tuple(expected):
            raise ValueError(f"this model takes {expected[0]}x{expected[1]} frames (config.image_size), got "
                             f"{clip.shape[3]}x{clip.shape[4]}; read the video at that size")
    return {"pixel_values": clip.permute(0, 2, 1, 3, 4)}


def model_inputs(model: nn.Module, clip_or_batch: Tensor | list[Tensor] | Mapping[str, Any]) -> tuple[Any, Tensor]:
    """``(call inputs in the model's own layout, reference clip (N, C, T, H, W) the maps align with)``, checked.

    A tensor clip becomes SlowFast's ``[slow, fast]`` list for a two-pathway model and
    ``{"pixel_values": (N, T, C, H, W)}`` for a frames-first (Hugging Face) model; a list is taken
    as SlowFast's pathways and a mapping (a processor's output) as keyword inputs, as they are.
    """
    if isinstance(clip_or_batch, Mapping):
        pixels = clip_or_batch.get("pixel_values")
        if not isinstance(pixels, Tensor) or pixels.ndim != 5:
            raise ValueError("a mapping of inputs needs 'pixel_values' of shape (N, T, C, H, W) (a video processor's output)")
        inputs = dict(clip_or_batch)
        return inputs, pixels.permute(0, 2, 1, 3, 4) if frames_first(model) else pixels
    if isinstance(clip_or_batch, (list, tuple)):
        pathways = [_as_batch(x, f"pathway {i}") for i, x in enumerate(clip_or_batch)]
        if len(pathways) != 2:
            raise ValueError(f"a SlowFast input is a list of 2 pathway clips [slow, fast], got {len(pathways)}")
        for i, x in enumerate(pathways):
            _check_channels(x, None, f"pathway {i}")
        return pathways, pathways[-1]  # maps align with the fast pathway's (full-rate) frames
    reference = _as_batch(clip_or_batch, "clip")
    if frames_first(model):
        return _frames_first_inputs(model, reference), reference
    alpha = pathway_alpha(model)
    if alpha is not None:
        _check_channels(reference, None, "clip")
        return slowfast_pathways(reference, alpha), reference
    conv = _first_conv3d(model)
    _check_channels(reference, conv.in_channels if conv is not None else None, "clip")
    need = _min_frames(model)
    if reference.shape[2] < need:
        raise ValueError(f"the clip has {reference.shape[2]} frames but this model needs at least {need}")
    frames = clip_frames(model)
    if frames is not None and reference.shape[2] != frames:
        raise ValueError(f"this model takes clips of exactly {frames} frames, got {reference.shape[2]}")
    return reference, reference


def explain_clip(
    model: nn.Module,
    clip_or_batch: Tensor | list[Tensor],
    target: int | Sequence[int] | Tensor | None = None,
    layer: LayerSpec | tuple = "auto",
    method: str | None = None,
    per_slice: bool = False,
    pathway: str = "fast",
    create_graph: bool = False,
    *,
    methods: Sequence[str] | None = None,
    reshape: Reshape | None = None,
) -> VideoExplanation | dict[str, VideoExplanation]:
    """Explain a video classifier's decision on clips with a space-time heat map.

    Args:
        model: a video classifier (torchvision, pytorchvideo including SlowFast and MViT, Hugging
            Face VideoMAE / TimeSformer / ViViT, or your own), explained in the train/eval mode it
            is in (use ``eval()`` for batch norm). Scores are pre-softmax logits (a pytorchvideo
            head's final Softmax is skipped, see the explainer).
        clip_or_batch: ``(C, T, H, W)`` or ``(N, C, T, H, W)``, packed for the model by
            :func:`model_inputs`; or SlowFast's own list ``[slow (N, C, T/alpha, H, W), fast
            (N, C, T, H, W)]``; or a Hugging Face processor's output (``pixel_values`` frames first).
        target: class per clip: ``None`` (top-1), an int, or ``N`` ints.
        layer: ``"auto"`` (the one resolver), a dotted name or a module (a ``(slow, fast)`` pair for
            ``pathway="both"``); ``reshape`` reads a named layer's output as ``(N, C, T', H', W')``
            (e.g. :class:`~multiexplain.TokenReshape` with ``grid=(T', H', W')`` for an MViT block).
        method / methods: one method -> one :class:`VideoExplanation`; several -> ``{method: ...}``
            from one forward pass.
        per_slice: pool the channel weights over ``H', W'`` only (one weight per channel and ``t'``).
        pathway: SlowFast only: ``"fast"``, ``"slow"``, or ``"both"`` (each pathway's map upsampled to
            the fast pathway's ``T, H, W``, averaged, renormalised).
        create_graph: keep the maps differentiable (double backprop).
    """
    names, single = method_names(method, methods)
    inputs, reference = model_inputs(model, clip_or_batch)
    if pathway not in ("fast", "slow", "both"):
        raise ValueError(f"pathway must be 'fast', 'slow' or 'both', got {pathway!r}")
    is_slowfast = isinstance(inputs, list)
    if pathway != "fast" and not is_slowfast:
        raise ValueError(f"pathway={pathway!r} needs a SlowFast model and its [slow, fast] input list")
    if pathway == "both" and layer != "auto" and not (isinstance(layer, (tuple, list)) and len(layer) == 2):
        raise ValueError("pathway='both' needs layer='auto' or a (slow layer, fast layer) pair")

    def run(which: str) -> dict[str, Explanation]:
        chosen = layer[PATHWAYS[which]] if isinstance(layer, (tuple, list)) else layer
        request = ExplainRequest(inputs, target, chosen, reshape=reshape, branch=PATHWAYS[which] if is_slowfast else None,
                                 input_size=tuple(reference.shape[2:]), pool_axes=(1, 2) if per_slice else None,
                                 create_graph=create_graph)
        try:
            return explain_request(model, request, names)
        except RuntimeError as error:
            if any(marker in str(error) for marker in _TOO_SHORT):
                frames = [x.shape[2] for x in inputs] if is_slowfast else reference.shape[2]
                raise ValueError(f"the clip is too short or too small for this model (frames {frames}, "
                                 f"size {tuple(reference.shape[3:])}): {error}") from error
            raise

    if pathway == "both":
        slow, fast = run("slow"), run("fast")
        results = {name: _fused(slow[name], fast[name], per_slice) for name in names}
    else:
        results = {name: _video(e, per_slice, pathway if is_slowfast else None) for name, e in run(pathway).items()}
    first = results[names[0]]
    for raw in first.raw if isinstance(first.raw, tuple) else (first.raw,):
        if raw.shape[1] == 1 and reference.shape[2] > 1:
            warnings.warn(
                f"the map of layer {first.layer!r} has one time slice for clips of {reference.shape[2]} frames: every "
                "frame gets the same map; give a longer clip or name an earlier layer", RuntimeWarning,
            )
    return results[names[0]] if single else results


def _video(explanation: Explanation, per_slice: bool, pathway: str | None) -> VideoExplanation:
    shared = {f.name: getattr(explanation, f.name) for f in fields(Explanation)}
    return VideoExplanation(**shared, per_slice=per_slice, pathway=pathway)


def _fused(slow: Explanation, fast: Explanation, per_slice: bool) -> VideoExplanation:
    return VideoExplanation(
        maps=normalize_maps((slow.maps + fast.maps) / 2, 3), raw=(slow.raw, fast.raw), weights=(slow.weights, fast.weights),
        scores=fast.scores, targets=fast.targets, zero_gradient=slow.zero_gradient & fast.zero_gradient,
        method=fast.method, layer=f"{slow.layer}+{fast.layer}", per_slice=per_slice, pathway="both",
    )


# -- whole videos: windows and how their maps are combined ----------------------------------------

def window_starts(num_frames: int, window: int, stride: int) -> list[int]:
    """First frame of each window of ``window`` frames, ``stride`` frames apart, plus one window
    ending at the last frame where the strides stop short of it: every frame is covered. A video
    of at most ``window`` frames is one window (start 0)."""
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got window={window}, stride={stride}")
    if stride > window:
        raise ValueError(f"stride {stride} > window {window} would leave frames without a map; use stride <= window")
    if num_frames <= window:
        return [0]
    starts = list(range(0, num_frames - window + 1, stride))
    if starts[-1] + window < num_frames:
        starts.append(num_frames - window)
    return starts


class WindowBlend:
    """One map per frame of a whole video from the maps of overlapping windows, streamed.

    A window's maps ``(T, H, W)`` (each window min-max normalised on its own, explaining its own
    target) are added with a weight for each position in the window that peaks at its centre,
    ``w_j = min(j + 1, T - j)``; a frame's map is the weighted mean over the windows that cover it.
    So a frame takes most from the window it is central in (where a 3D network's temporal
    receptive field is full), seams between windows are smooth, a frame covered by one window gets
    that window's map, and maps stay in ``[0, 1]``. :meth:`pop` hands out frames no later window
    covers, so memory holds at most one window of maps.
    """

    def __init__(self) -> None:
        self._sums: dict[int, Tensor] = {}
        self._weights: dict[int, float] = {}

    @staticmethod
    def weights(length: int) -> list[float]:
        """The weight of each position of a window of ``length`` frames."""
        return [float(min(j + 1, length - j)) for j in range(length)]

    def add(self, start: int, maps: Tensor) -> None:
        """Add one window's maps ``(T, H, W)`` that cover frames ``start .. start + T - 1``."""
        if maps.ndim != 3:
            raise ValueError(f"a window's maps are (T, H, W), got shape {tuple(maps.shape)}")
        for j, weight in enumerate(self.weights(maps.shape[0])):
            frame = start + j
            value = maps[j].detach() * weight
            self._sums[frame] = self._sums[frame] + value if frame in self._sums else value
            self._weights[frame] = self._weights.get(frame, 0.0) + weight

    def pop(self, before: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """``(frame index, map (H, W))`` of every frame before ``before`` (all with ``None``), in order."""
        for frame in sorted(f for f in self._sums if before is None or f < before):
            yield frame, self._sums.pop(frame) / self._weights.pop(frame)
