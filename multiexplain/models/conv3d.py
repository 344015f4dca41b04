"""C3D (Tran et al., 2015): the paper's 3D-conv video classifier and the small variant shipped for
the synthetic action clips (trained by ``scripts/train_action_c3d.py``)."""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ACTION_C3D_STAGES", "C3D", "C3D_PAPER_STAGES", "c3d", "load_c3d_weights"]

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

    #: The layer "auto" resolves to: the last convolution, after its ReLU.
    explain_layer = "features"

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
        # A checkpoint's config holds lists; the layers below want tuples.
        stages = [(int(convs), int(width), tuple(pool) if pool else None) for convs, width, pool in stages]
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

    @property
    def min_frames(self) -> int:
        """Frames a clip needs at least: each temporal pool needs at least its kernel along T."""
        product = 1
        for module in self.features:
            if isinstance(module, nn.MaxPool3d):
                kernel = module.kernel_size if isinstance(module.kernel_size, tuple) else (module.kernel_size,) * 3
                product *= kernel[0]
        if self.final_pool is not None:
            product *= self.final_pool[0]
        return product

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
        from .checkpoints import CheckpointCodeError, CheckpointReadError, read_weights_only

        try:
            weights = read_weights_only(weights)
        except CheckpointCodeError as error:
            raise ValueError(f"{weights} holds pickled objects that only load by running code ({error}); "
                             "give a state dict saved with torch.save(model.state_dict(), path)") from None
        except CheckpointReadError as error:
            raise ValueError(f"{weights} is not a readable weights file ({error})") from None
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

