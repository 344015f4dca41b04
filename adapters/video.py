"""Grad-CAM++ space-time heat maps for 3D-conv action recognition.

Public entry points (stable; the CLI calls these):

    read_clip(path, num_frames=16, size=112, start=None, crop=True) -> (clip (C, T, H, W) float in [0, 1], fps)
    explain_clip(model, clip_or_batch, target=None, layer="auto", method="gradcam++",
                 per_slice=False, pathway="fast", create_graph=False) -> VideoExplanation
    write_gif(path, clip, maps, fps=8.0) / write_mp4(path, clip, maps, fps=8.0) / write_strip(path, clip, maps)
    load_action_c3d() -> (model, class_names)       the shipped C3D trained on synthetic action clips
    c3d(num_classes=487, ...) -> C3D                 the paper's C3D (Tran et al. 2015) or a smaller variant
    load_c3d_weights(model, path_or_state_dict)     a user's C3D state dict (ours, or the common
                                                     c3d-pytorch port's conv1..conv5b / fc6..fc8 names)
    make_action_clips(n, seed)                       re-exported from multiexplain.action_clips

Maps are ``(N, T, H, W)``: the layer's ``(T', H', W')`` map upsampled trilinearly to the input
clip, min-max normalised per clip over the whole volume. Channel weights are pooled over the whole
space-time volume by default (the paper's form: ``sum_q A_k(q)`` in the Grad-CAM++ denominator and
the weight sums run over ``T', H', W'``); ``per_slice=True`` pools over ``H', W'`` only, giving one
weight per channel and time slice ``t'``. All CAM math is :mod:`multiexplain.core`'s, reached through
:class:`multiexplain.cam.GradCAMPlusPlus` / :class:`~multiexplain.cam.GradCAM`.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from multiexplain.action_clips import ACTIONS, ActionClips, make_action_clips
from multiexplain.cam import METHODS, BaseCAM, Explanation
from multiexplain.core import normalize_maps
from multiexplain.layers import find_auto_layer
from multiexplain.viz import DEFAULT_ALPHA, DEFAULT_COLORMAP, overlay, to_rgb_array

__all__ = [
    "C3D",
    "C3D_PAPER_STAGES",
    "ACTION_C3D_STAGES",
    "KINETICS_MEAN",
    "KINETICS_STD",
    "VideoExplanation",
    "c3d",
    "load_c3d_weights",
    "load_action_c3d",
    "video_layer",
    "explain_clip",
    "slowfast_pathways",
    "read_clip",
    "normalize_clip",
    "write_gif",
    "write_mp4",
    "write_strip",
    "make_action_clips",
    "ActionClips",
    "ACTIONS",
]

# Kinetics-400 statistics used by torchvision's and pytorchvideo's video models.
KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)

# (convolutions, channels, pool kernel after the stage) per stage, as in Tran et al. 2015:
# conv1 pool1(1,2,2) conv2 pool2 conv3a/b pool3 conv4a/b pool4 conv5a/b pool5 fc6 fc7 fc8.
C3D_PAPER_STAGES: tuple[tuple[int, int, tuple[int, int, int]], ...] = (
    (1, 64, (1, 2, 2)),
    (1, 128, (2, 2, 2)),
    (2, 256, (2, 2, 2)),
    (2, 512, (2, 2, 2)),
    (2, 512, (2, 2, 2)),
)

# The small C3D-style network shipped for the synthetic action clips (16 x 64 x 64, averaged to
# 32 x 32 by ``input_pool=(1, 2, 2)``): time is pooled once only, so the last convolution keeps
# 8 x 8 x 8 positions for space-time maps.
ACTION_C3D_STAGES: tuple[tuple[int, int, tuple[int, int, int] | None], ...] = (
    (1, 8, (2, 2, 2)),
    (1, 16, (1, 2, 2)),
    (2, 32, None),
)


def _pooled(size: int, kernel: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // kernel + 1


class C3D(nn.Module):
    """C3D (Tran et al., "Learning Spatiotemporal Features with 3D Convolutional Networks", 2015).

    ``features`` holds every 3x3x3 convolution and ReLU (and the pools between stages) under the
    paper's names ``conv1, conv2, conv3a, conv3b, ... conv5b``, so its output is the last
    convolutional layer, which is what the Grad-CAM++ paper explains and what ``"auto"`` picks.
    The last stage's pool (``pool5``, with the paper's ``(0, 1, 1)`` padding) runs in
    :meth:`forward`, followed by ``classifier`` (``fc6, fc7, fc8``), or a global average pool and
    one linear layer when ``hidden=()`` and ``global_pool=True``.

    Args:
        num_classes: output logits (487 for Sports-1M).
        stages: ``(convolutions, channels, pool kernel or None)`` per stage.
        hidden: widths of the hidden fully connected layers (``(4096, 4096)`` in the paper).
        clip_size: ``(T, H, W)`` the fully connected layers are sized for (ignored with ``global_pool``).
        dropout: dropout before each hidden fully connected layer's successor.
        global_pool: average the last feature map instead of the paper's ``pool5`` + flatten.
        input_pool: an average pool applied to the input first (``pool0``; not in the paper: it
            makes the small variant cheap to train on a CPU).
        batch_norm: a BatchNorm3d after every convolution (not in the paper; it makes the small
            variant train reliably from scratch). In eval mode it is affine, so the network from
            the explained layer to the logits stays piecewise linear.
        mean, std: per-channel input normalisation applied inside the model (``None``: none).

    Input ``(N, 3, T, H, W)``; output logits ``(N, num_classes)``.
    """

    def __init__(
        self,
        num_classes: int = 487,
        stages: Sequence[tuple[int, int, tuple[int, int, int] | None]] = C3D_PAPER_STAGES,
        hidden: Sequence[int] = (4096, 4096),
        clip_size: Sequence[int] = (16, 112, 112),
        dropout: float = 0.5,
        global_pool: bool = False,
        batch_norm: bool = False,
        input_pool: Sequence[int] | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        if not stages:
            raise ValueError("C3D needs at least one stage")
        self.config = dict(
            num_classes=num_classes, stages=[list(s[:2]) + [list(s[2]) if s[2] else None] for s in stages],
            hidden=list(hidden), clip_size=list(clip_size), dropout=dropout, global_pool=global_pool, batch_norm=batch_norm,
            input_pool=list(input_pool) if input_pool is not None else None,
            mean=list(mean) if mean is not None else None, std=list(std) if std is not None else None,
        )
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        channels = 3
        size = [int(s) for s in clip_size]
        if input_pool is not None:
            layers["pool0"] = nn.AvgPool3d(tuple(input_pool), stride=tuple(input_pool))
            size = [_pooled(s, k, 0) for s, k in zip(size, input_pool)]
        for index, (convs, width, pool) in enumerate(stages, start=1):
            for j in range(convs):
                suffix = f"{index}{'ab'[j]}" if convs == 2 else f"{index}{chr(ord('a') + j) if convs > 2 else ''}"
                layers[f"conv{suffix}"] = nn.Conv3d(channels, width, kernel_size=3, padding=1, bias=not batch_norm)
                if batch_norm:
                    layers[f"bn{suffix}"] = nn.BatchNorm3d(width)
                layers[f"relu{suffix}"] = nn.ReLU(inplace=True)
                channels = width
            if pool is not None and index < len(stages):
                layers[f"pool{index}"] = nn.MaxPool3d(pool, stride=pool)
                size = [_pooled(s, k, 0) for s, k in zip(size, pool)]
        self.features = nn.Sequential(layers)
        last_pool = stages[-1][2]
        self.final_pool = tuple(last_pool) if last_pool is not None and not global_pool else None
        # The paper's pool5 pads H and W by one so that 7x7 becomes 4x4 at 112x112 input.
        self.final_padding = (0, 1, 1) if self.final_pool is not None and len(stages) == 5 else (0, 0, 0)
        self.global_pool = global_pool
        if global_pool:
            flat = channels
        else:
            if self.final_pool is not None:
                size = [_pooled(s, k, p) for s, k, p in zip(size, self.final_pool, self.final_padding)]
            flat = channels * math.prod(size)
        head: OrderedDict[str, nn.Module] = OrderedDict()
        width_in = flat
        for j, width in enumerate(hidden):
            head[f"fc{6 + j}"] = nn.Linear(width_in, width)
            head[f"relu{6 + j}"] = nn.ReLU(inplace=True)
            head[f"drop{6 + j}"] = nn.Dropout(dropout)
            width_in = width
        head[f"fc{6 + len(hidden)}"] = nn.Linear(width_in, num_classes)
        self.classifier = nn.Sequential(head)
        for module in self.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        self.normalize = mean is not None and std is not None
        if self.normalize:
            self.register_buffer("input_mean", torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1, 1), persistent=False)
            self.register_buffer("input_std", torch.tensor(std, dtype=torch.float32).view(-1, 1, 1, 1), persistent=False)

    def forward(self, clips: Tensor) -> Tensor:
        if self.normalize:
            clips = (clips - self.input_mean) / self.input_std
        features = self.features(clips)
        # Pooling here rather than as a module: the explained layer stays the last convolution.
        if self.global_pool:
            pooled = features.mean(dim=(2, 3, 4))
        elif self.final_pool is not None:
            pooled = F.max_pool3d(features, self.final_pool, stride=self.final_pool, padding=self.final_padding).flatten(1)
        else:
            pooled = features.flatten(1)
        return self.classifier(pooled)


def c3d(
    num_classes: int = 487,
    *,
    stages: Sequence[tuple[int, int, tuple[int, int, int] | None]] = C3D_PAPER_STAGES,
    hidden: Sequence[int] = (4096, 4096),
    clip_size: Sequence[int] = (16, 112, 112),
    weights: str | os.PathLike | Mapping[str, Tensor] | None = None,
    **kwargs: Any,
) -> C3D:
    """Build C3D; the defaults are the paper's architecture (Sports-1M, 16 x 112 x 112 clips).

    ``weights``: a state-dict file (or dict) to load, in our names or the c3d-pytorch port's
    (see :func:`load_c3d_weights`). No weights are downloaded.
    """
    model = C3D(num_classes, stages, hidden, clip_size, **kwargs)
    if weights is not None:
        load_c3d_weights(model, weights)
    return model


def load_c3d_weights(model: C3D, weights: str | os.PathLike | Mapping[str, Tensor]) -> C3D:
    """Load a C3D state dict from a file or mapping into ``model`` (strict).

    Accepts our keys (``features.conv1.weight``, ``classifier.fc6.weight``), the widely used
    c3d-pytorch port's keys (``conv1.weight`` ... ``conv5b.weight``, ``fc6.weight`` ... ``fc8.weight``),
    a ``"module."`` prefix from DataParallel, and checkpoints that wrap the dict under
    ``"state_dict"`` or ``"model"``.
    """
    if isinstance(weights, (str, os.PathLike)):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"C3D weights file not found: {weights}")
        weights = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(weights, Mapping):
        raise TypeError(f"expected a state dict (mapping of tensors), got {type(weights).__name__}")
    for key in ("state_dict", "model"):
        if key in weights and isinstance(weights[key], Mapping):
            weights = weights[key]
    remapped: dict[str, Tensor] = {}
    for key, value in weights.items():
        key = key.removeprefix("module.")
        head = key.split(".")[0]
        if head.startswith("conv"):
            key = f"features.{key}"
        elif head.startswith("fc"):
            key = f"classifier.{key}"
        remapped[key] = value
    try:
        missing, unexpected = model.load_state_dict(remapped, strict=False)
    except RuntimeError as error:  # shape mismatches
        raise ValueError(f"C3D weights do not fit this architecture: {error}") from None
    if missing or unexpected:
        raise ValueError(
            f"C3D weights do not fit this architecture: missing {sorted(missing)[:6]}, unexpected {sorted(unexpected)[:6]}"
        )
    return model


# -- the shipped model ----------------------------------------------------------------------

def _checkpoint_path() -> str:
    from importlib.resources import files

    return str(files("multiexplain") / "checkpoints" / "action_c3d.pt")


def load_action_c3d(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> tuple[C3D, list[str]]:
    """The small C3D shipped for :func:`make_action_clips` clips (16 x 64 x 64, 8 actions).

    It normalises its input inside, so it takes clips in ``[0, 1]`` as drawn or as returned by
    :func:`read_clip`. Returns ``(model in eval mode, class names)``.
    """
    path = os.fspath(path) if path is not None else _checkpoint_path()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"shipped checkpoint not found at {path}; run scripts/train_action_c3d.py")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    config = dict(checkpoint["config"])
    config["stages"] = [(convs, width, tuple(pool) if pool else None) for convs, width, pool in config["stages"]]
    model = C3D(**config)
    model.load_state_dict(checkpoint["state_dict"])
    return model.to(device).eval(), list(checkpoint["class_names"])


# -- layers ---------------------------------------------------------------------------------

_PATHWAYS = {"slow": 0, "fast": 1}


def _pytorchvideo_head_types() -> tuple[type, ...]:
    try:
        from pytorchvideo.models.head import ResNetBasicHead, ResNetRoIHead, SequencePool, VisionTransformerBasicHead
        from pytorchvideo.models.slowfast import PoolConcatPathway
    except ImportError:  # pytorchvideo is optional for users of the other families
        return ()
    return (ResNetBasicHead, ResNetRoIHead, SequencePool, VisionTransformerBasicHead, PoolConcatPathway)


def _is_multipathway(module: nn.Module) -> bool:
    return hasattr(module, "multipathway_blocks") and isinstance(module.multipathway_blocks, nn.ModuleList)


def video_layer(model: nn.Module, inputs: Tensor | list[Tensor], pathway: str = "fast") -> nn.Module:
    """The ``"auto"`` layer for a video classifier: the last block before the head.

    * our :class:`C3D`: ``features`` (the last convolution, after its ReLU);
    * pytorchvideo ``Net`` models (``create_x3d``, ``create_resnet``/``slow_r50``, ``create_r2plus1d``,
      ``create_csn``, ``create_slowfast``): the last entry of ``model.blocks`` that is not a head
      (``ResNetBasicHead`` and friends hold 1x1x1 projections and pools that the generic rule
      would otherwise pick); for SlowFast, that stage's ``slow`` (0) or ``fast`` (1) pathway;
    * torchvision ``r3d_18``, ``mc3_18``, ``r2plus1d_18`` (``VideoResNet``): ``layer4``; ``s3d``: ``features``
      (what :func:`multiexplain.layers.find_auto_layer` picks too, without its traced forward);
    * anything else: :func:`multiexplain.layers.find_auto_layer` (one traced forward without grad).
    """
    if pathway not in _PATHWAYS:
        raise ValueError(f"pathway must be 'slow' or 'fast' here, got {pathway!r}")
    if isinstance(model, C3D):
        return model.features
    # torchvision's video CNNs: known without a traced forward (saves a pass and its memory).
    try:
        from torchvision.models.video import S3D, VideoResNet
    except ImportError:
        S3D = VideoResNet = None  # type: ignore[assignment, misc]
    if VideoResNet is not None and isinstance(model, VideoResNet):
        return model.layer4
    if S3D is not None and isinstance(model, S3D):
        return model.features
    blocks = getattr(model, "blocks", None)
    heads = _pytorchvideo_head_types()
    if isinstance(blocks, nn.ModuleList) and heads:
        body = [block for block in blocks if not isinstance(block, heads)]
        if body and len(body) < len(blocks):
            last = body[-1]
            if _is_multipathway(last):
                return last.multipathway_blocks[_PATHWAYS[pathway]]
            return last
    batch = inputs[0].shape[0] if isinstance(inputs, list) else inputs.shape[0]
    return find_auto_layer(model, lambda: model(list(inputs) if isinstance(inputs, list) else inputs), batch)


# -- explaining -----------------------------------------------------------------------------

@dataclass
class VideoExplanation:
    """Space-time maps for a batch of clips. Tensors live on the model's device.

    Attributes:
        maps: ``(N, T, H, W)`` in ``[0, 1]``, aligned with the input frames (trilinear upsampling
            of the layer's ``(T', H', W')`` map, min-max normalised per clip over the volume).
        raw: the layer-resolution map ``(N, T', H', W')`` before normalisation; for SlowFast with
            ``pathway="both"`` a ``(slow, fast)`` pair.
        scores: the explained logits ``(N,)``.
        targets: the explained classes ``(N,)``.
        weights: channel weights ``(N, C)`` (``(N, C, T')`` with ``per_slice``); a pair for "both".
        method, layer, per_slice, pathway: how the maps were made (``layer`` is the dotted name,
            ``"slow+fast"`` names for "both").
    """

    maps: Tensor
    raw: Tensor | tuple[Tensor, Tensor]
    scores: Tensor
    targets: Tensor
    weights: Tensor | tuple[Tensor, Tensor]
    method: str
    layer: str
    per_slice: bool
    pathway: str | None = None


def _first_conv3d(model: nn.Module) -> nn.Conv3d | None:
    for module in model.modules():
        if isinstance(module, nn.Conv3d):
            return module
    return None


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


def _check_channels(clip: Tensor, channels: int | None, name: str) -> None:
    """Catch the common ``(N, T, C, H, W)`` mistake before the model fails with a cryptic error."""
    n, c, t, h, w = clip.shape
    expected = channels if channels is not None else 3
    if c != expected and t == expected:
        raise ValueError(
            f"{name} has shape {tuple(clip.shape)}, which looks like (N, T, C, H, W) with T={c} frames of "
            f"{t} channels; video models take (N, C, T, H, W): use clip.permute(0, 2, 1, 3, 4)"
        )
    if channels is not None and c != channels:
        raise ValueError(f"{name} has {c} channels (shape {tuple(clip.shape)}) but the model's first convolution takes {channels}")


def _min_frames(model: nn.Module) -> int:
    """Frames the model needs at least: the first 3D convolution's temporal extent, and for C3D
    the product of the temporal pool kernels (each pool needs >= its kernel along T)."""
    conv = _first_conv3d(model)
    need = 1
    if conv is not None:
        need = max(need, (conv.kernel_size[0] - 1) * conv.dilation[0] + 1 - 2 * conv.padding[0])
    if isinstance(model, C3D):
        product = 1
        for module in model.features:
            if isinstance(module, nn.MaxPool3d):
                kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 3
                product *= kernel[0]
        if model.final_pool is not None:
            product *= model.final_pool[0]
        need = max(need, product)
    return need


_TOO_SHORT = ("smaller than kernel size", "Kernel size can't be greater", "Output size is too small", "kernel size can't be greater")


def slowfast_pathways(clip: Tensor, alpha: int = 4) -> list[Tensor]:
    """``[slow, fast]`` pathway inputs for a SlowFast model from one clip ``(N, C, T, H, W)``:
    the fast pathway is the clip, the slow one takes ``T // alpha`` frames uniformly (as
    pytorchvideo's ``PackPathway`` does)."""
    clip = _as_batch(clip, "clip")
    frames = clip.shape[2]
    if frames < alpha:
        raise ValueError(f"a SlowFast clip needs at least alpha={alpha} frames, got {frames}")
    index = torch.linspace(0, frames - 1, frames // alpha, device=clip.device).long()
    return [clip.index_select(2, index), clip]


@contextmanager
def _pre_activation_head(model: nn.Module) -> Iterator[None]:
    """Explain pre-softmax logits (the paper's score) for pytorchvideo heads that end in a
    Softmax/Sigmoid (``create_resnet``, ``create_r2plus1d``, ``create_slowfast`` defaults): the head's
    activation is switched off for the call and always put back."""
    heads = _pytorchvideo_head_types()
    saved = []
    if heads:
        for module in model.modules():
            if isinstance(module, heads) and isinstance(getattr(module, "activation", None), (nn.Softmax, nn.Sigmoid)):
                saved.append((module, module.activation))
    try:
        for module, _ in saved:
            module.activation = None
        yield
    finally:
        for module, activation in saved:
            module.activation = activation


def explain_clip(
    model: nn.Module,
    clip_or_batch: Tensor | list[Tensor],
    target: int | Sequence[int] | Tensor | None = None,
    layer: str | nn.Module | tuple = "auto",
    method: str = "gradcam++",
    per_slice: bool = False,
    pathway: str = "fast",
    create_graph: bool = False,
) -> VideoExplanation:
    """Explain a video classifier's decision on clips with a space-time heat map.

    Args:
        model: a 3D-conv classifier taking ``(N, C, T, H, W)`` (or SlowFast's ``[slow, fast]``
            list). Explained in the train/eval mode it is in (use ``eval()`` for batch norm).
            Scores are pre-softmax logits: a pytorchvideo head's final Softmax is bypassed for
            the call (and restored).
        clip_or_batch: ``(C, T, H, W)``, ``(N, C, T, H, W)``, or for SlowFast a list
            ``[slow (N, C, T/alpha, H, W), fast (N, C, T, H, W)]`` (see :func:`slowfast_pathways`).
        target: class per clip: ``None`` (top-1), an int, or ``N`` ints.
        layer: ``"auto"`` (see :func:`video_layer`), a dotted name or a module (a ``(slow, fast)``
            pair of them for ``pathway="both"``).
        method: ``"gradcam++"`` (default) or ``"gradcam"``.
        per_slice: pool the channel weights over ``H', W'`` only, one weight per channel and time
            slice ``t'`` (default: over the whole ``T', H', W'`` volume, the paper's form).
        pathway: SlowFast only: ``"fast"``, ``"slow"``, or ``"both"`` (each pathway's map upsampled
            to the fast pathway's ``T, H, W``, averaged, renormalised).
        create_graph: keep the maps differentiable (double backprop); default inference mode, in
            which nothing below the explained layer records autograd state.

    Returns:
        :class:`VideoExplanation` with ``maps (N, T, H, W)`` aligned to the input frames.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    if isinstance(clip_or_batch, (list, tuple)):
        pathways = [_as_batch(x, f"pathway {i}") for i, x in enumerate(clip_or_batch)]
        if len(pathways) != 2:
            raise ValueError(f"a SlowFast input is a list of 2 pathway clips [slow, fast], got {len(pathways)}")
        for i, x in enumerate(pathways):
            _check_channels(x, None, f"pathway {i}")
        inputs: Tensor | list[Tensor] = pathways
        reference = pathways[-1]  # maps align with the fast pathway's (full-rate) frames
    else:
        reference = _as_batch(clip_or_batch, "clip")
        conv = _first_conv3d(model)
        _check_channels(reference, conv.in_channels if conv is not None else None, "clip")
        need = _min_frames(model)
        if reference.shape[2] < need:
            raise ValueError(f"the clip has {reference.shape[2]} frames but this model needs at least {need}")
        inputs = reference
    if pathway not in ("fast", "slow", "both"):
        raise ValueError(f"pathway must be 'fast', 'slow' or 'both', got {pathway!r}")
    is_slowfast = isinstance(inputs, list)
    if pathway != "fast" and not is_slowfast:
        raise ValueError(f"pathway={pathway!r} needs a SlowFast model and its [slow, fast] input list")
    size = tuple(reference.shape[2:])
    cam_class = METHODS[method]
    pool_axes = (1, 2) if per_slice else None

    def run(explained_layer: nn.Module | str) -> Explanation:
        explainer: BaseCAM = cam_class(model, explained_layer, pool_axes=pool_axes, create_graph=create_graph)
        try:
            with _pre_activation_head(model):
                return explainer(inputs, target, input_size=size)
        except RuntimeError as error:
            if any(marker in str(error) for marker in _TOO_SHORT):
                frames = [x.shape[2] for x in inputs] if is_slowfast else reference.shape[2]
                raise ValueError(
                    f"the clip is too short or too small for this model (frames {frames}, size {tuple(reference.shape[3:])}): {error}"
                ) from error
            raise

    if pathway == "both" and layer != "auto" and not (isinstance(layer, (tuple, list)) and len(layer) == 2):
        raise ValueError("pathway='both' needs layer='auto' or a (slow layer, fast layer) pair")

    def pick(which: str) -> nn.Module | str:
        if isinstance(layer, (tuple, list)):
            return layer[_PATHWAYS[which]]
        if layer != "auto":
            return layer
        try:
            return video_layer(model, inputs, which)
        except RuntimeError as error:
            if any(marker in str(error) for marker in _TOO_SHORT):
                raise ValueError(f"the clip is too short or too small for this model: {error}") from error
            raise

    if pathway == "both":
        slow, fast = run(pick("slow")), run(pick("fast"))
        fused = normalize_maps((slow.maps + fast.maps) / 2, 3)
        return VideoExplanation(
            fused, (slow.raw, fast.raw), fast.scores, fast.targets, (slow.weights, fast.weights),
            method, f"{slow.layer}+{fast.layer}", per_slice, "both",
        )
    result = run(pick(pathway))
    return VideoExplanation(
        result.maps, result.raw, result.scores, result.targets, result.weights, method, result.layer,
        per_slice, pathway if is_slowfast else None,
    )


# -- video in -------------------------------------------------------------------------------

def _open_video(path: str | os.PathLike):
    import av

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"video file {path} is empty (0 bytes)")
    try:
        container = av.open(path)
    except Exception as error:  # PyAV raises several error types for garbage input
        raise ValueError(f"cannot read video file {path}: {error}") from error
    if not container.streams.video:
        container.close()
        raise ValueError(f"video file {path} has no video stream")
    return container


def _resize_frames(frames: Tensor, size: int | Sequence[int] | None, crop: bool) -> Tensor:
    """``(T, C, H, W)`` float -> resized (short side to ``size`` then centre crop, or exact size)."""
    if size is None:
        return frames
    height, width = frames.shape[-2:]
    if isinstance(size, int):
        if crop:
            scale = size / min(height, width)
            new = (max(size, round(height * scale)), max(size, round(width * scale)))
            frames = F.interpolate(frames, size=new, mode="bilinear", align_corners=False, antialias=True)
            top, left = (new[0] - size) // 2, (new[1] - size) // 2
            return frames[..., top : top + size, left : left + size]
        size = (size, size)
    return F.interpolate(frames, size=tuple(size), mode="bilinear", align_corners=False, antialias=True)


def read_clip(
    path: str | os.PathLike,
    num_frames: int = 16,
    size: int | Sequence[int] | None = 112,
    start: float | None = None,
    crop: bool = True,
) -> tuple[Tensor, float]:
    """Read ``num_frames`` frames of a video file as a clip.

    Args:
        path: any file PyAV (FFmpeg) can decode.
        num_frames: ``T``.
        size: an int resizes the short side to it and centre-crops a square (``crop=True``) or
            resizes to a square (``crop=False``); ``(H, W)`` resizes to exactly that; ``None`` keeps
            the frames' size.
        start: ``None`` samples ``T`` frames uniformly over the whole video (repeating frames of a
            video shorter than ``T``); a time in seconds takes ``T`` consecutive frames from there
            (repeating the last frame if the video ends first).

    Returns:
        ``(clip (3, T, H, W) float32 in [0, 1], fps)``. Normalise with :func:`normalize_clip` for
        models that expect it (the shipped C3D normalises inside).

    Raises:
        FileNotFoundError, or ValueError for an empty, unreadable or frameless file.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    container = _open_video(path)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 25.0)
        frames: list[Tensor] = []
        try:
            for frame in container.decode(stream):
                if start is not None and frame.time is not None and frame.time + 0.5 / fps < start:
                    continue
                frames.append(torch.from_numpy(frame.to_ndarray(format="rgb24")))
                if start is not None and len(frames) >= num_frames:
                    break
        except Exception as error:
            if not frames:
                raise ValueError(f"cannot decode video file {path}: {error}") from error
    finally:
        container.close()
    if not frames:
        where = f" after {start} s" if start is not None else ""
        raise ValueError(f"video file {path} has no decodable frames{where}")
    if start is None:
        index = torch.linspace(0, len(frames) - 1, num_frames).round().long().tolist()
    else:
        index = [min(i, len(frames) - 1) for i in range(num_frames)]
    video = torch.stack([frames[i] for i in index]).permute(0, 3, 1, 2).float() / 255  # (T, C, H, W)
    video = _resize_frames(video, size, crop).clamp(0, 1)
    return video.permute(1, 0, 2, 3).contiguous(), fps


def normalize_clip(clip: Tensor, mean: Sequence[float] = KINETICS_MEAN, std: Sequence[float] = KINETICS_STD) -> Tensor:
    """``(clip - mean) / std`` per channel for ``(C, T, H, W)`` or ``(N, C, T, H, W)`` clips."""
    shape = (-1, 1, 1, 1)
    return (clip - torch.tensor(mean, dtype=clip.dtype, device=clip.device).view(shape)) / torch.tensor(
        std, dtype=clip.dtype, device=clip.device
    ).view(shape)


# -- video out ------------------------------------------------------------------------------

def _clip_and_maps(clip: Tensor, maps: Tensor) -> tuple[Tensor, Tensor]:
    """Single clip ``(C, T, H, W)`` and maps ``(T, H, W)`` on the CPU, batch axes of 1 removed."""
    if clip.ndim == 5 and clip.shape[0] == 1:
        clip = clip[0]
    if maps.ndim == 4 and maps.shape[0] == 1:
        maps = maps[0]
    if clip.ndim != 4 or maps.ndim != 3:
        raise ValueError(f"expected one clip (C, T, H, W) and its maps (T, H, W), got {tuple(clip.shape)} and {tuple(maps.shape)}")
    if clip.shape[1] != maps.shape[0]:
        raise ValueError(f"the clip has {clip.shape[1]} frames but the maps have {maps.shape[0]}")
    return clip.detach().cpu(), maps.detach().float().cpu()


def _side_by_side_frames(
    clip: Tensor, maps: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None,
    alpha: float, colormap: str,
) -> list:
    """One ``uint8 (H, 2W, 3)`` array per frame: the frame | the frame with its heat map."""
    import numpy as np

    clip, maps = _clip_and_maps(clip, maps)
    out = []
    for t in range(clip.shape[1]):
        frame = to_rgb_array(clip[:, t], mean, std)
        out.append(np.concatenate([frame, overlay(frame, maps[t], alpha, colormap)], axis=1))
    return out


def write_gif(
    path: str | os.PathLike, clip: Tensor, maps: Tensor, fps: float = 8.0, *,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP, scale: int = 1,
) -> str:
    """Animated GIF (loops) of ``frame | overlay`` side by side, one GIF frame per clip frame.

    ``clip`` is ``(C, T, H, W)`` in ``[0, 1]`` (or normalised with ``mean``/``std``, undone for
    display); ``maps`` ``(T, H, W)``; ``scale`` enlarges small clips (nearest). Returns the path.
    """
    from PIL import Image

    frames = _side_by_side_frames(clip, maps, mean, std, alpha, colormap)
    images = [Image.fromarray(f) for f in frames]
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(int(round(1000 / fps)), 20), loop=0, optimize=False)
    return os.fspath(path)


def write_mp4(
    path: str | os.PathLike, clip: Tensor, maps: Tensor, fps: float = 8.0, *,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP, scale: int = 1,
) -> str:
    """MP4 (H.264, or MPEG-4 part 2 where no H.264 encoder exists) of ``frame | overlay``.

    Frame sizes are padded to even numbers (yuv420p needs them). Arguments as :func:`write_gif`.
    """
    import av
    import numpy as np
    from fractions import Fraction

    frames = _side_by_side_frames(clip, maps, mean, std, alpha, colormap)
    if scale > 1:
        frames = [f.repeat(scale, axis=0).repeat(scale, axis=1) for f in frames]
    height, width = frames[0].shape[:2]
    pad_h, pad_w = height % 2, width % 2
    codec = "libx264" if "libx264" in av.codecs_available else ("h264" if "h264" in av.codecs_available else "mpeg4")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    rate = Fraction(fps).limit_denominator(1000)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = width + pad_w, height + pad_h, "yuv420p"
        if codec != "mpeg4":
            stream.options = {"crf": "18"}
        for frame in frames:
            if pad_h or pad_w:
                frame = np.pad(frame, ((0, pad_h), (0, pad_w), (0, 0)), mode="edge")
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return os.fspath(path)


def write_strip(
    path: str | os.PathLike, clip: Tensor, maps: Tensor, num_frames: int = 8, *,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP,
    title: str | None = None, active: Tensor | None = None, panel_inches: float = 1.3, dpi: int = 100,
) -> str:
    """PNG strip of ``num_frames`` uniformly sampled frames: frames on top, overlays below.

    ``active`` ``(T,)`` bool (optional) marks the frames where the action happens in the titles.
    Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    clip, maps = _clip_and_maps(clip, maps)
    total = clip.shape[1]
    count = max(1, min(num_frames, total))
    index = torch.linspace(0, total - 1, count).round().long().tolist()
    fig, axes = plt.subplots(2, count, figsize=(panel_inches * count, panel_inches * 2 + (0.45 if title else 0.25)), squeeze=False)
    for column, t in enumerate(index):
        frame = to_rgb_array(clip[:, t], mean, std)
        axes[0, column].imshow(frame)
        axes[1, column].imshow(overlay(frame, maps[t], alpha, colormap))
        mark = " *" if active is not None and bool(active[t]) else ""
        axes[0, column].set_title(f"t={t}{mark}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return os.fspath(path)
