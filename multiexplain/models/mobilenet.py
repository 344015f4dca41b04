"""A MobileNetV2-style network for 32x32 inputs (Sandler et al. 2018): inverted residual blocks
with depthwise convolutions, the cross-family student of the distillation benchmark (a WRN
teacher, i.e. a ResNet, distilled into a MobileNet)."""

from __future__ import annotations

from typing import Any, ClassVar, Sequence

from torch import Tensor, nn

from ..data.distill_data import DISTILL_CLASSES

__all__ = ["MobileNetV2", "mobilenet_v2"]


class _InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (stride s) -> 1x1 linear projection, residual when shapes match."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden = in_channels * expansion
        self.residual = stride == 1 and in_channels == out_channels
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2-style classifier for ``(N, 3, 32, 32)`` inputs -> logits ``(N, num_classes)``.

    Layout: ``stem`` (3x3 conv, ``widths[0]`` channels, 32x32) -> ``stage1`` (16x16) -> ``stage2``
    (8x8) -> ``stage3`` (8x8) -> ``head`` (1x1 conv to ``head_channels``) -> ``bn`` -> ``relu``
    -> ``pool`` -> ``fc``. Downsampling early keeps the depthwise convolutions cheap on a CPU.
    Attention transfer pairs the three stage outputs with a WRN's three groups
    (:attr:`group_layers`; maps of another size are resized); Grad-CAM++ explains ``relu``, after
    the last batch norm (nothing between the layer and the scores couples samples in train mode),
    on the same 8x8 grid as a WRN's.
    """

    group_layers: ClassVar[tuple[str, ...]] = ("stage1", "stage2", "stage3")
    explain_layer: ClassVar[str] = "relu"
    strides: ClassVar[tuple[int, int, int]] = (2, 2, 1)

    def __init__(self, widths: Sequence[int] = (16, 24, 32, 64), blocks: Sequence[int] = (1, 1, 2), expansion: int = 2,
                 head_channels: int = 128, num_classes: int = len(DISTILL_CLASSES), in_channels: int = 3) -> None:
        super().__init__()
        widths, blocks = [int(w) for w in widths], [int(b) for b in blocks]
        if len(widths) != 4 or len(blocks) != 3 or min(widths) < 1 or min(blocks) < 1 or expansion < 1:
            raise ValueError(f"widths needs 4 positive channel counts and blocks 3 positive counts, got {widths}, {blocks}")
        self.widths, self.blocks, self.expansion = widths, blocks, int(expansion)
        self.head_channels, self.num_classes = int(head_channels), int(num_classes)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU6(inplace=True))

        def stage(index: int, stride: int) -> nn.Sequential:
            first, out = widths[index], widths[index + 1]
            return nn.Sequential(*(_InvertedResidual(first if i == 0 else out, out, stride if i == 0 else 1, expansion)
                                   for i in range(blocks[index])))

        self.stage1, self.stage2, self.stage3 = stage(0, self.strides[0]), stage(1, self.strides[1]), stage(2, self.strides[2])
        self.head = nn.Conv2d(widths[3], head_channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(head_channels)
        self.relu = nn.ReLU6()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(head_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0, 0.01)
                nn.init.zeros_(module.bias)

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (what a checkpoint stores to rebuild the model)."""
        return {"widths": list(self.widths), "blocks": list(self.blocks), "expansion": self.expansion,
                "head_channels": self.head_channels, "num_classes": self.num_classes}

    def forward(self, x: Tensor) -> Tensor:
        x = self.stage3(self.stage2(self.stage1(self.stem(x))))
        x = self.relu(self.bn(self.head(x)))
        return self.fc(self.pool(x).flatten(1))


def mobilenet_v2(num_classes: int = len(DISTILL_CLASSES), **options: Any) -> MobileNetV2:
    """The benchmark's MobileNetV2-style student (40k parameters; a WRN-10-1 has 78k)."""
    return MobileNetV2(num_classes=num_classes, **options)
