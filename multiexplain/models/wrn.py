"""Wide ResNets for 32x32 inputs (Zagoruyko & Komodakis 2016, pre-activation blocks): the
distillation pair's architecture (WRN-16-2 teacher, WRN-10-1 student; the paper's WRN-40-2 -> 16-2)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import Tensor, nn

from ..data.distill_data import DISTILL_CLASSES

__all__ = ["WideResNet", "wide_resnet"]


class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a (projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for ``(N, 3, 32, 32)`` inputs -> logits ``(N, num_classes)``.

    Layout: ``conv1`` (16 channels, 32x32) -> ``block1`` (16k, 32x32) -> ``block2`` (32k, 16x16) ->
    ``block3`` (64k, 8x8) -> ``bn`` -> ``relu`` -> ``pool`` -> ``fc``. Attention transfer uses the
    three group outputs (:attr:`group_layers`); Grad-CAM++ uses :attr:`explain_layer` = ``"relu"``,
    the last activation before pooling. It sits *after* the final batch norm, so in train mode
    nothing between the explained layer and the scores couples samples (a train-mode batch norm
    after the layer would make one sample's score depend on the others' activations).
    """

    group_layers: ClassVar[tuple[str, ...]] = ("block1", "block2", "block3")
    #: The layer "auto" resolves to (see multiexplain.explain.layers.resolve_layer).
    explain_layer: ClassVar[str] = "relu"

    def __init__(self, depth: int = 16, widen_factor: int = 2, num_classes: int = len(DISTILL_CLASSES), in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"a WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {widen_factor}")
        self.depth, self.widen_factor, self.num_classes = depth, widen_factor, num_classes
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)

        def group(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
            return nn.Sequential(*(_WideBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(blocks_per_group)))

        self.block1 = group(widths[0], widths[1], 1)
        self.block2 = group(widths[1], widths[2], 2)
        self.block3 = group(widths[2], widths[3], 2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (what a checkpoint stores to rebuild the model)."""
        return {"depth": self.depth, "widen_factor": self.widen_factor, "num_classes": self.num_classes}

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(self.pool(x).flatten(1))

    def extra_repr(self) -> str:
        return f"WRN-{self.depth}-{self.widen_factor}, {self.num_classes} classes"


def wide_resnet(depth: int, widen_factor: int, num_classes: int = len(DISTILL_CLASSES)) -> WideResNet:
    """A WRN-``depth``-``widen_factor`` for 32x32 inputs; ``wide_resnet(40, 2, 10)`` is the paper's teacher."""
    return WideResNet(depth, widen_factor, num_classes)

