"""Drawing primitives for the project's synthetic data sets (exact masks, seeded, torch only).

Every task's generator (classification scenes, captioned scenes, action clips, the
distillation set) draws with these, so a shape looks the same everywhere and its mask is the
exact set of pixels painted with it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["SHAPES", "COLOURS", "shape_mask", "textured_background", "paint", "generator"]

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")

# Saturated, well-separated RGB colours in [0, 1]; backgrounds stay darker and low-contrast.
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.80, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.90, 0.15),
    "purple": (0.65, 0.20, 0.85),
    "white": (0.97, 0.97, 0.97),
}


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed`` (all sampling here goes through one)."""
    return torch.Generator().manual_seed(int(seed))


def _grid(height: int, width: int, cy: float, cx: float, angle: float) -> tuple[Tensor, Tensor]:
    """Pixel-centre coordinates relative to ``(cy, cx)``, rotated by ``-angle`` radians."""
    ys = torch.arange(height, dtype=torch.float32).view(-1, 1) + 0.5 - cy
    xs = torch.arange(width, dtype=torch.float32).view(1, -1) + 0.5 - cx
    cos, sin = math.cos(angle), math.sin(angle)
    return ys * cos - xs * sin, ys * sin + xs * cos


def shape_mask(kind: str, cy: float, cx: float, size: float, height: int, width: int, angle: float = 0.0) -> Tensor:
    """Boolean mask ``(height, width)`` of one shape centred at ``(cy, cx)``.

    ``size`` is the shape's radius-like extent in pixels (half the side of a square); ``angle``
    rotates it (radians). Shapes are chosen to differ in outline, not only in area.
    """
    y, x = _grid(height, width, cy, cx, angle)
    r = size
    if kind == "circle":
        return y * y + x * x <= r * r
    if kind == "square":
        return (y.abs() <= r * 0.85) & (x.abs() <= r * 0.85)
    if kind == "diamond":
        return y.abs() + x.abs() <= r
    if kind == "triangle":
        # Upward triangle with its centroid at the centre.
        top, base = -r, r * 0.6
        half_width = (y - top) / (base - top) * r
        return (y >= top) & (y <= base) & (x.abs() <= half_width)
    if kind == "cross":
        arm = r * 0.35
        return ((y.abs() <= arm) & (x.abs() <= r)) | ((x.abs() <= arm) & (y.abs() <= r))
    if kind == "ring":
        d2 = y * y + x * x
        return (d2 <= r * r) & (d2 >= (0.55 * r) ** 2)
    raise ValueError(f"unknown shape {kind!r}; choose one of {SHAPES}")


def textured_background(gen: torch.Generator, height: int, width: int, contrast: float = 0.12) -> Tensor:
    """A dim, low-contrast textured background ``(3, height, width)`` in ``[0, 1]``:
    a random base colour, smooth noise blobs and faint stripes, so maps cannot cheat on edges."""
    base = 0.15 + 0.25 * torch.rand(3, 1, 1, generator=gen)
    coarse = torch.rand(3, max(height // 8, 2), max(width // 8, 2), generator=gen)
    noise = torch.nn.functional.interpolate(coarse[None], size=(height, width), mode="bilinear", align_corners=False)[0]
    freq = 0.15 + 0.35 * torch.rand(1, generator=gen).item()
    phase = 6.28 * torch.rand(1, generator=gen).item()
    theta = 3.14 * torch.rand(1, generator=gen).item()
    yy = torch.arange(height, dtype=torch.float32).view(-1, 1)
    xx = torch.arange(width, dtype=torch.float32).view(1, -1)
    stripes = torch.sin(freq * (yy * math.cos(theta) + xx * math.sin(theta)) + phase)
    image = base + contrast * (noise - 0.5) + 0.5 * contrast * stripes
    return image.clamp(0, 1)


def paint(image: Tensor, mask: Tensor, rgb: tuple[float, float, float], gen: torch.Generator | None = None, jitter: float = 0.06) -> Tensor:
    """Paint ``rgb`` (with small per-pixel jitter when ``gen`` is given) where ``mask`` is set.
    ``image`` is ``(3, H, W)`` and is modified in place and returned."""
    colour = torch.tensor(rgb, dtype=image.dtype).view(3, 1, 1).expand_as(image)
    if gen is not None and jitter > 0:
        colour = (colour + jitter * (torch.rand(image.shape, generator=gen) - 0.5)).clamp(0, 1)
    image[:, mask] = colour[:, mask]
    return image
