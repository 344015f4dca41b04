"""Multi-label shape scenes with exact per-instance and per-class masks (the classification set).

Each image is a dim textured background with 1-4 shapes of the six :data:`SCENE_CLASSES`; the
label is multi-hot (which shape classes appear). Several instances of one class in one image are
common by design (the Grad-CAM++ paper's multi-instance claim): after the first instance, each
further one repeats a class already in the image with probability ``repeat_probability``.
Colours are drawn independently of the class (a model has to read outlines), rotation is kept
small (a square turned by 45 degrees would be a diamond), and later shapes may partly occlude
earlier ones, but every instance keeps at least ``min_visible`` of its pixels.

Masks are exact: an instance's mask is the set of pixels painted with it that no later shape
painted over; a class mask is the union of its instances' masks. Scene ``i`` of
``make_scenes(n, seed)`` is drawn from its own generator seeded with :func:`scene_seed`, so any
subset is reproducible without drawing the scenes before it, and the first draw from that
generator is the background (``textured_background``), which lets tests re-create it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .synthetic import COLOURS, SHAPES, generator, paint, shape_mask, textured_background

__all__ = ["SCENE_CLASSES", "SCENE_SIZE", "Scenes", "make_scenes", "scene_seed"]

#: Class names in label order.
SCENE_CLASSES: tuple[str, ...] = SHAPES
SCENE_SIZE = 64
_MAX_ANGLE = math.radians(15)
_COLOUR_NAMES = tuple(COLOURS)


def scene_seed(seed: int, index: int) -> int:
    """Seed of the generator that draws scene ``index`` of the stream ``seed``."""
    return int(seed) * 1_000_003 + int(index)


@dataclass
class Scenes:
    """A batch of generated scenes. ``I`` is the largest instance count allowed (padding is
    all-false masks with class ``-1``).

    Attributes:
        images: ``(N, 3, H, W)`` float32 in ``[0, 1]`` (no normalisation; the shipped model takes them as is).
        labels: ``(N, C)`` float32 multi-hot over :data:`SCENE_CLASSES`.
        class_masks: ``(N, C, H, W)`` bool, the visible pixels of every instance of the class.
        instance_masks: ``(N, I, H, W)`` bool, the visible pixels of each instance, in drawing order.
        instance_classes: ``(N, I)`` int64 class index of each instance, ``-1`` for padding.
        instance_colours: ``(N, I, 3)`` float32 RGB each instance was painted with (before jitter).
        seeds: ``(N,)`` int64, the :func:`scene_seed` of each scene.
    """

    images: Tensor
    labels: Tensor
    class_masks: Tensor
    instance_masks: Tensor
    instance_classes: Tensor
    instance_colours: Tensor
    seeds: Tensor
    classes: tuple[str, ...] = SCENE_CLASSES

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int | slice | Tensor) -> "Scenes":
        """A sub-batch (an int keeps the batch axis)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Scenes(
            self.images[index], self.labels[index], self.class_masks[index], self.instance_masks[index],
            self.instance_classes[index], self.instance_colours[index], self.seeds[index], self.classes,
        )

    def instances_of(self, classes: Tensor) -> Tensor:
        """Instance masks of one class per sample: ``classes`` ``(N,)`` -> ``(N, I, H, W)`` bool,
        the instances of other classes blanked (as :func:`multiexplain.metrics.multi_instance_coverage` wants)."""
        classes = torch.as_tensor(classes, device=self.instance_classes.device).view(-1, 1)
        keep = self.instance_classes == classes
        return self.instance_masks & keep[:, :, None, None]

    def instance_counts(self) -> Tensor:
        """``(N, C)`` int64: how many instances of each class every scene holds."""
        counts = torch.zeros(len(self), len(self.classes), dtype=torch.long)
        valid = self.instance_classes >= 0
        counts.scatter_add_(1, self.instance_classes.clamp(min=0), valid.long())
        return counts


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1, generator=gen).item()


def _randint(gen: torch.Generator, high: int) -> int:
    return int(torch.randint(high, (1,), generator=gen).item())


def _draw_scene(
    seed: int,
    size: int,
    num_classes: int,
    min_instances: int,
    max_instances: int,
    repeat_probability: float,
    min_visible: float,
    radius: tuple[float, float],
) -> tuple[Tensor, list[Tensor], list[int], list[tuple[float, float, float]]]:
    gen = generator(seed)
    image = textured_background(gen, size, size)
    count = min_instances + _randint(gen, max_instances - min_instances + 1)
    full_masks: list[Tensor] = []
    visible: list[Tensor] = []
    kinds: list[int] = []
    colours: list[tuple[float, float, float]] = []
    for _ in range(count):
        if kinds and torch.rand(1, generator=gen).item() < repeat_probability:
            kind = kinds[_randint(gen, len(kinds))]
        else:
            kind = _randint(gen, num_classes)
        placed = False
        for _attempt in range(30):
            r = _uniform(gen, *radius)
            cy, cx = _uniform(gen, r, size - r), _uniform(gen, r, size - r)
            angle = _uniform(gen, -_MAX_ANGLE, _MAX_ANGLE)
            mask = shape_mask(SCENE_CLASSES[kind], cy, cx, r, size, size, angle)
            # Every earlier instance must keep min_visible of its own full area.
            if all(((v & ~mask).sum() >= min_visible * f.sum()) for v, f in zip(visible, full_masks)):
                placed = True
                break
        if not placed:
            continue  # a crowded scene keeps fewer instances rather than hiding one
        touching = {colours[j] for j, v in enumerate(visible) if (_dilate(v) & mask).any()}
        options = [COLOURS[name] for name in _COLOUR_NAMES if COLOURS[name] not in touching]
        colour = options[_randint(gen, len(options))]
        visible = [v & ~mask for v in visible]
        visible.append(mask.clone())
        full_masks.append(mask)
        kinds.append(kind)
        colours.append(colour)
        paint(image, mask, colour, gen)
    return image, visible, kinds, colours


def _dilate(mask: Tensor) -> Tensor:
    """One-pixel (8-neighbour) dilation, so touching shapes count as neighbours."""
    return torch.nn.functional.max_pool2d(mask[None, None].float(), 3, 1, 1)[0, 0] > 0


def make_scenes(
    n: int,
    seed: int = 0,
    *,
    size: int = SCENE_SIZE,
    min_instances: int = 1,
    max_instances: int = 4,
    repeat_probability: float = 0.5,
    min_visible: float = 0.6,
    start: int = 0,
) -> Scenes:
    """Scenes ``start .. start + n - 1`` of the stream seeded with ``seed``.

    Args:
        n: number of scenes.
        seed: stream seed (the training script uses 0, the held-out split and benchmark others).
        size: image side in pixels; shape radii scale with it (9% to 17% of the side).
        min_instances, max_instances: instance count range per scene (uniform).
        repeat_probability: chance that an instance after the first repeats a class already present.
        min_visible: smallest visible share of an instance's pixels after occlusion.
        start: index of the first scene in the stream.
    Returns:
        :class:`Scenes` with images ``(n, 3, size, size)``.
    """
    if n < 0 or not 1 <= min_instances <= max_instances:
        raise ValueError(f"need n >= 0 and 1 <= min_instances <= max_instances, got n={n}, {min_instances}..{max_instances}")
    if not 0.0 <= repeat_probability <= 1.0 or not 0.0 < min_visible <= 1.0:
        raise ValueError("repeat_probability must lie in [0, 1] and min_visible in (0, 1]")
    num_classes = len(SCENE_CLASSES)
    radius = (0.09 * size, 0.17 * size)
    images = torch.empty(n, 3, size, size)
    labels = torch.zeros(n, num_classes)
    class_masks = torch.zeros(n, num_classes, size, size, dtype=torch.bool)
    instance_masks = torch.zeros(n, max_instances, size, size, dtype=torch.bool)
    instance_classes = torch.full((n, max_instances), -1, dtype=torch.long)
    instance_colours = torch.zeros(n, max_instances, 3)
    seeds = torch.tensor([scene_seed(seed, start + i) for i in range(n)], dtype=torch.long)
    threads = torch.get_num_threads()
    # Every op here is on a few thousand pixels: intra-op threads only add synchronisation,
    # which costs 1000x the work on a busy machine (a 64x64 torch.sin took 28 ms with 2 threads).
    torch.set_num_threads(1)
    try:
        drawn = [
            _draw_scene(int(s), size, num_classes, min_instances, max_instances, repeat_probability, min_visible, radius)
            for s in seeds
        ]
    finally:
        torch.set_num_threads(threads)
    for i, (image, visible, kinds, colours) in enumerate(drawn):
        images[i] = image
        for j, (mask, kind, colour) in enumerate(zip(visible, kinds, colours)):
            instance_masks[i, j] = mask
            instance_classes[i, j] = kind
            instance_colours[i, j] = torch.tensor(colour)
            class_masks[i, kind] |= mask
            labels[i, kind] = 1.0
    return Scenes(images, labels, class_masks, instance_masks, instance_classes, instance_colours, seeds)
