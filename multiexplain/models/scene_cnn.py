"""The shipped multi-label scene classifier (trained by ``scripts/train_scene_classifier.py``)."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor, nn

from ..data.scenes import SCENE_CLASSES

__all__ = ["SceneCNN"]


class SceneCNN(nn.Module):
    """A small all-ReLU CNN for the multi-label scenes: ``(N, 3, 64, 64)`` in ``[0, 1]`` -> ``(N, 6)`` logits.

    Three conv stages (two 3x3 conv + batch-norm + ReLU each; 2x2 max-pool after the first two)
    end in ``features`` at 1/4 resolution (16x16 for 64x64 inputs), then global average pooling and
    one linear layer. Everything between ``features`` and the logits is piecewise linear, so the
    Grad-CAM++ closed form is exact for it. It declares ``features`` as its layer to explain
    (``explain_layer``). Use ``sigmoid`` on the logits: labels are independent (multi-label).
    """

    #: The layer "auto" resolves to (see multiexplain.explain.layers.resolve_layer).
    explain_layer = "features"
    multi_label = True

    def __init__(self, widths: Sequence[int] = (16, 32, 64), num_classes: int = len(SCENE_CLASSES)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for stage, width in enumerate(widths):
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            if stage < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.widths = tuple(int(w) for w in widths)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.labels: list[str] = list(SCENE_CLASSES) if num_classes == len(SCENE_CLASSES) else [str(i) for i in range(num_classes)]

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (what a checkpoint stores to rebuild the model)."""
        return {"widths": list(self.widths), "num_classes": self.classifier.out_features}

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(images)).flatten(1))
