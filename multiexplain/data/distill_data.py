"""A 32x32 synthetic classification set for the distillation experiment (CIFAR-10 stand-in).

Each image is a dim textured background with one *target* shape and a few smaller *distractor*
shapes of other kinds. The class is the kind of the target shape, which is always the largest
one, so a model has to compare sizes and outlines rather than spot a colour: every shape takes a
random colour, distractors are never of the target's kind, and the target's size range overlaps
little with the distractors', and pixel noise blurs the outlines. Masks are exact (the pixels painted with the target shape, minus
those a distractor painted over), so how much of a map's energy falls on the target can be
measured without boxes.

Everything is drawn with :mod:`multiexplain.synthetic`, seeded, in torch only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .synthetic import COLOURS, SHAPES, generator, paint, shape_mask, textured_background

__all__ = ["DISTILL_CLASSES", "IMAGE_SIZE", "DistillDataset", "make_distill_dataset"]

#: The class names, in label order: the kind of the target shape.
DISTILL_CLASSES: tuple[str, ...] = SHAPES
IMAGE_SIZE = 32

# Radius-like sizes in pixels (see shape_mask). Targets are clearly, but not hugely, larger.
_TARGET_SIZE = (4.5, 7.0)
_DISTRACTOR_SIZE = (2.5, 4.25)
# Per-pixel Gaussian noise on the finished image (clamped to [0, 1]), so outlines are not crisp.
_NOISE = 0.06
# Rotation is kept small: a square turned by 45 degrees would be a diamond.
_MAX_ANGLE = math.radians(15)


class DistillDataset(Dataset):
    """The generated images with labels and target masks.

    Attributes:
        images: ``(N, 3, 32, 32)`` float32 in ``[0, 1]``.
        labels: ``(N,)`` int64 class indices into :data:`DISTILL_CLASSES`.
        masks: ``(N, 32, 32)`` bool, the visible pixels of the target shape.

    ``dataset[i]`` is ``(image, label)``, the pair a training loop wants.
    """

    def __init__(self, images: Tensor, labels: Tensor, masks: Tensor) -> None:
        if not (images.shape[0] == labels.shape[0] == masks.shape[0]):
            raise ValueError(
                f"images, labels and masks disagree on the number of samples: "
                f"{images.shape[0]}, {labels.shape[0]}, {masks.shape[0]}"
            )
        self.images, self.labels, self.masks = images, labels, masks
        self.classes = DISTILL_CLASSES

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.images[index], self.labels[index]

    def subset(self, fraction: float, seed: int = 0) -> "DistillDataset":
        """A class-balanced random ``fraction`` of the samples (the low-data regime)."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        gen = generator(seed)
        keep = []
        for label in range(len(self.classes)):
            members = torch.nonzero(self.labels == label).flatten()
            count = max(1, round(fraction * len(members)))
            keep.append(members[torch.randperm(len(members), generator=gen)[:count]])
        index = torch.cat(keep).sort().values
        return DistillDataset(self.images[index], self.labels[index], self.masks[index])


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1, generator=gen).item()


def _draw_one(gen: torch.Generator, label: int, distractors: int) -> tuple[Tensor, Tensor]:
    size = IMAGE_SIZE
    image = textured_background(gen, size, size)
    colour_names = list(COLOURS)
    target_kind = SHAPES[label]
    target_size = _uniform(gen, *_TARGET_SIZE)
    margin = target_size + 0.5
    cy, cx = _uniform(gen, margin, size - margin), _uniform(gen, margin, size - margin)
    target = shape_mask(target_kind, cy, cx, target_size, size, size, _uniform(gen, -_MAX_ANGLE, _MAX_ANGLE))
    colour = colour_names[int(torch.randint(len(colour_names), (1,), generator=gen))]
    paint(image, target, COLOURS[colour], gen)
    visible = target.clone()
    others = [kind for kind in SHAPES if kind != target_kind]
    for _ in range(distractors):
        kind = others[int(torch.randint(len(others), (1,), generator=gen))]
        extent = _uniform(gen, *_DISTRACTOR_SIZE)
        # Distractors sit anywhere, may touch the target and cover at most a little of it.
        dy, dx = _uniform(gen, extent, size - extent), _uniform(gen, extent, size - extent)
        mask = shape_mask(kind, dy, dx, extent, size, size, _uniform(gen, -_MAX_ANGLE, _MAX_ANGLE))
        if (mask & visible).sum() > 0.25 * visible.sum():
            continue  # would hide too much of the target: skip rather than redraw (keeps it seeded)
        colour = colour_names[int(torch.randint(len(colour_names), (1,), generator=gen))]
        paint(image, mask, COLOURS[colour], gen)
        visible &= ~mask
    image = (image + _NOISE * torch.randn(image.shape, generator=gen)).clamp(0, 1)
    return image, visible


def make_distill_dataset(n: int, seed: int, distractors: tuple[int, int] = (3, 4)) -> DistillDataset:
    """Draw ``n`` labelled 32x32 images (classes balanced by cycling through them, then shuffled).

    Args:
        n: number of samples.
        seed: the generator seed; the same ``(n, seed)`` gives the same tensors on any machine.
        distractors: inclusive range of the number of distractor shapes per image.

    Returns:
        A :class:`DistillDataset` with ``images (n, 3, 32, 32)``, ``labels (n,)``, ``masks (n, 32, 32)``.
    """
    if n < 1:
        raise ValueError(f"n must be a positive number of samples, got {n}")
    low, high = distractors
    if not 0 <= low <= high:
        raise ValueError(f"distractors must be a range (low, high) with 0 <= low <= high, got {distractors}")
    gen = generator(seed)
    labels = torch.arange(n) % len(DISTILL_CLASSES)
    labels = labels[torch.randperm(n, generator=gen)]
    images = torch.empty(n, 3, IMAGE_SIZE, IMAGE_SIZE)
    masks = torch.empty(n, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.bool)
    for i in range(n):
        count = int(torch.randint(low, high + 1, (1,), generator=gen))
        images[i], masks[i] = _draw_one(gen, int(labels[i]), count)
    return DistillDataset(images, labels, masks)
