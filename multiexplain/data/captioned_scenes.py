"""Seeded synthetic captioned scenes with an exact mask for every object and every word.

A scene holds 2-4 coloured shapes on a dim textured background (drawn with
:mod:`multiexplain.synthetic`, so shapes look the same as in every other task). Objects with the
same colour and shape form a *group*; the caption names every group once, with a count word:

    "a red circle and two blue squares"          "a green triangle and a white ring and a purple cross"

Groups are listed in a canonical order (colour order of :data:`~multiexplain.synthetic.COLOURS`,
then shape order of :data:`~multiexplain.synthetic.SHAPES`), so the caption is a function of the
image. The ground truth of a word is the union of the masks of the objects it names: the group's
objects for its count, colour and shape words; ``"and"`` names nothing (an all-false mask).

Every scene ``i`` of ``make_captioned_scenes(n, seed)`` is drawn from its own generator seeded
with ``(seed, i)``, so a subset is reproducible without drawing the scenes before it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .synthetic import COLOURS, SHAPES, generator, paint, shape_mask, textured_background

__all__ = [
    "COUNT_WORDS",
    "PLURALS",
    "CAPTION_VOCABULARY",
    "CaptionedScene",
    "CaptionedScenes",
    "make_captioned_scene",
    "make_captioned_scenes",
    "word_kind",
]

COUNT_WORDS: tuple[str, ...] = ("a", "two", "three", "four")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "cross": "crosses",
    "ring": "rings",
    "diamond": "diamonds",
}
_SINGULAR = {plural: singular for singular, plural in PLURALS.items()}

#: Every word a caption can contain (without special tokens), in a fixed order.
CAPTION_VOCABULARY: tuple[str, ...] = (
    *COUNT_WORDS, "and", *COLOURS, *SHAPES, *PLURALS.values()
)


def word_kind(word: str) -> str:
    """``"count"``, ``"colour"``, ``"shape"`` (singular or plural) or ``"other"`` (``"and"``)."""
    if word in COUNT_WORDS:
        return "count"
    if word in COLOURS:
        return "colour"
    if word in SHAPES or word in _SINGULAR:
        return "shape"
    return "other"


@dataclass
class CaptionedScene:
    """One scene.

    Attributes:
        image: ``(3, H, W)`` float in ``[0, 1]``.
        caption: the caption, words separated by single spaces.
        words: the caption's words.
        word_kinds: ``word_kind`` of every word.
        word_masks: ``(W, H, W)`` bool, the union of the masks of the objects each word names.
        objects: ``(colour, shape)`` of every object.
        object_masks: ``(num_objects, H, W)`` bool, exactly the pixels painted for each object.
    """

    image: Tensor
    caption: str
    words: list[str]
    word_kinds: list[str]
    word_masks: Tensor
    objects: list[tuple[str, str]]
    object_masks: Tensor


@dataclass
class CaptionedScenes:
    """A batch of scenes: ``images`` is ``(N, 3, H, W)``; the other fields are per-scene lists."""

    images: Tensor
    captions: list[str]
    words: list[list[str]]
    word_kinds: list[list[str]]
    word_masks: list[Tensor]
    objects: list[list[tuple[str, str]]]
    object_masks: list[Tensor]
    seed: int = 0
    size: int = 64

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> CaptionedScene:
        return CaptionedScene(
            self.images[index], self.captions[index], self.words[index], self.word_kinds[index],
            self.word_masks[index], self.objects[index], self.object_masks[index],
        )


def _sample_objects(gen: torch.Generator, count: int) -> list[tuple[str, str]]:
    """``count`` (colour, shape) pairs; later objects repeat an earlier pair with probability 0.3,
    which produces count words ("two green triangles")."""
    colours, shapes = list(COLOURS), list(SHAPES)
    objects: list[tuple[str, str]] = []
    while len(objects) < count:
        if objects and torch.rand(1, generator=gen).item() < 0.3:
            objects.append(objects[int(torch.randint(len(objects), (1,), generator=gen))])
            continue
        pair = (colours[int(torch.randint(len(colours), (1,), generator=gen))],
                shapes[int(torch.randint(len(shapes), (1,), generator=gen))])
        if pair not in objects:
            objects.append(pair)
    return objects


def _place(gen: torch.Generator, count: int, size: int, min_radius: float, max_radius: float) -> list[tuple[float, float, float]]:
    """Non-overlapping ``(cy, cx, radius)`` for ``count`` objects (rejection sampling, with a gap
    of 2 pixels so masks never touch)."""
    for _attempt in range(200):
        placed: list[tuple[float, float, float]] = []
        for _ in range(count):
            for _try in range(100):
                radius = min_radius + (max_radius - min_radius) * torch.rand(1, generator=gen).item()
                margin = radius + 1
                cy, cx = (margin + (size - 2 * margin) * torch.rand(2, generator=gen)).tolist()
                if all((cy - y) ** 2 + (cx - x) ** 2 >= (radius + r + 2) ** 2 for y, x, r in placed):
                    placed.append((cy, cx, radius))
                    break
            else:
                break
        if len(placed) == count:
            return placed
    raise RuntimeError(f"could not place {count} objects of radius <= {max_radius} in a {size}x{size} image")


def make_captioned_scene(seed: int, index: int = 0, size: int = 64, min_objects: int = 2, max_objects: int = 4) -> CaptionedScene:
    """Scene ``index`` of the stream seeded with ``seed`` (see the module docstring)."""
    if not 1 <= min_objects <= max_objects <= 4:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 4, got {min_objects}, {max_objects}")
    if size < 32:
        raise ValueError(f"scenes need at least 32x32 pixels, got size={size}")
    gen = generator(int(seed) * 1_000_003 + int(index))
    count = int(torch.randint(min_objects, max_objects + 1, (1,), generator=gen))
    objects = _sample_objects(gen, count)
    scale = size / 64
    places = _place(gen, count, size, 6.5 * scale, 9.5 * scale)
    image = textured_background(gen, size, size)
    masks = []
    for (colour, shape), (cy, cx, radius) in zip(objects, places):
        angle = 0.0 if shape in ("circle", "ring") else 0.35 * (torch.rand(1, generator=gen).item() - 0.5)
        mask = shape_mask(shape, cy, cx, radius, size, size, angle)
        paint(image, mask, COLOURS[colour], gen)
        masks.append(mask)
    object_masks = torch.stack(masks)

    colour_order = {c: i for i, c in enumerate(COLOURS)}
    shape_order = {s: i for i, s in enumerate(SHAPES)}
    groups = sorted(set(objects), key=lambda pair: (colour_order[pair[0]], shape_order[pair[1]]))
    words: list[str] = []
    word_masks: list[Tensor] = []
    empty = torch.zeros(size, size, dtype=torch.bool)
    for position, group in enumerate(groups):
        members = [i for i, pair in enumerate(objects) if pair == group]
        group_mask = object_masks[members].any(dim=0)
        if position:
            words.append("and")
            word_masks.append(empty)
        n = len(members)
        words += [COUNT_WORDS[n - 1], group[0], group[1] if n == 1 else PLURALS[group[1]]]
        word_masks += [group_mask] * 3
    return CaptionedScene(
        image, " ".join(words), words, [word_kind(w) for w in words], torch.stack(word_masks), objects, object_masks
    )


def make_captioned_scenes(n: int, seed: int = 0, size: int = 64, min_objects: int = 2, max_objects: int = 4, start: int = 0) -> CaptionedScenes:
    """Scenes ``start .. start + n - 1`` of the stream seeded with ``seed``: images ``(n, 3, size, size)``."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    scenes = [make_captioned_scene(seed, start + i, size, min_objects, max_objects) for i in range(n)]
    return CaptionedScenes(
        torch.stack([s.image for s in scenes]),
        [s.caption for s in scenes],
        [s.words for s in scenes],
        [s.word_kinds for s in scenes],
        [s.word_masks for s in scenes],
        [s.objects for s in scenes],
        [s.object_masks for s in scenes],
        seed=seed,
        size=size,
    )
