"""Video action recognition: space-time Grad-CAM++ maps for 3D-conv (and other) video classifiers.

:func:`explain_clip` turns a classifier and clips into one :class:`~multiexplain.ExplainRequest`
(the clip, or SlowFast's ``[slow, fast]`` pathway list, as call inputs; the target classes'
pre-softmax logits as scores; the layer from the one resolver, with the pathway as its branch)
and returns a :class:`VideoExplanation`: the shared explanation fields with ``maps (N, T, H, W)``.

Channel weights pool over the whole ``T', H', W'`` volume by default (the paper's form: the
Grad-CAM++ denominator's ``sum_q A_k(q)`` and the weight sums run over the volume);
``per_slice=True`` pools over ``H', W'`` only, one weight per channel and time slice.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, fields
from typing import Sequence

import torch
from torch import Tensor, nn

from multiexplain.core import normalize_maps
from multiexplain.explain import ExplainRequest, Explanation, explain_request, method_names
from multiexplain.explain.layers import LayerSpec

__all__ = ["KINETICS_MEAN", "KINETICS_STD", "PATHWAYS", "VideoExplanation", "explain_clip", "normalize_clip", "slowfast_pathways"]

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


def _inputs(model: nn.Module, clip_or_batch: Tensor | list[Tensor]) -> tuple[Tensor | list[Tensor], Tensor]:
    """``(call inputs, reference clip the maps align with)``, checked."""
    if isinstance(clip_or_batch, (list, tuple)):
        pathways = [_as_batch(x, f"pathway {i}") for i, x in enumerate(clip_or_batch)]
        if len(pathways) != 2:
            raise ValueError(f"a SlowFast input is a list of 2 pathway clips [slow, fast], got {len(pathways)}")
        for i, x in enumerate(pathways):
            _check_channels(x, None, f"pathway {i}")
        return pathways, pathways[-1]  # maps align with the fast pathway's (full-rate) frames
    reference = _as_batch(clip_or_batch, "clip")
    conv = _first_conv3d(model)
    _check_channels(reference, conv.in_channels if conv is not None else None, "clip")
    need = _min_frames(model)
    if reference.shape[2] < need:
        raise ValueError(f"the clip has {reference.shape[2]} frames but this model needs at least {need}")
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
) -> VideoExplanation | dict[str, VideoExplanation]:
    """Explain a video classifier's decision on clips with a space-time heat map.

    Args:
        model: a video classifier taking ``(N, C, T, H, W)`` (or SlowFast's ``[slow, fast]`` list),
            explained in the train/eval mode it is in (use ``eval()`` for batch norm). Scores are
            pre-softmax logits (a pytorchvideo head's final Softmax is skipped, see the explainer).
        clip_or_batch: ``(C, T, H, W)``, ``(N, C, T, H, W)``, or for SlowFast a list
            ``[slow (N, C, T/alpha, H, W), fast (N, C, T, H, W)]`` (see :func:`slowfast_pathways`).
        target: class per clip: ``None`` (top-1), an int, or ``N`` ints.
        layer: ``"auto"`` (the one resolver), a dotted name or a module (a ``(slow, fast)`` pair for
            ``pathway="both"``).
        method / methods: one method -> one :class:`VideoExplanation`; several -> ``{method: ...}``
            from one forward pass.
        per_slice: pool the channel weights over ``H', W'`` only (one weight per channel and ``t'``).
        pathway: SlowFast only: ``"fast"``, ``"slow"``, or ``"both"`` (each pathway's map upsampled to
            the fast pathway's ``T, H, W``, averaged, renormalised).
        create_graph: keep the maps differentiable (double backprop).
    """
    names, single = method_names(method, methods)
    inputs, reference = _inputs(model, clip_or_batch)
    if pathway not in ("fast", "slow", "both"):
        raise ValueError(f"pathway must be 'fast', 'slow' or 'both', got {pathway!r}")
    is_slowfast = isinstance(inputs, list)
    if pathway != "fast" and not is_slowfast:
        raise ValueError(f"pathway={pathway!r} needs a SlowFast model and its [slow, fast] input list")
    if pathway == "both" and layer != "auto" and not (isinstance(layer, (tuple, list)) and len(layer) == 2):
        raise ValueError("pathway='both' needs layer='auto' or a (slow layer, fast layer) pair")

    def run(which: str) -> dict[str, Explanation]:
        chosen = layer[PATHWAYS[which]] if isinstance(layer, (tuple, list)) else layer
        request = ExplainRequest(inputs, target, chosen, branch=PATHWAYS[which] if is_slowfast else None,
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
