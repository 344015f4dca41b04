"""Figures at the edge: NumPy and matplotlib appear here (PIL and PyAV only in multiexplain.io), never in the core.

Overlays blend a colour-mapped heat map over the input at ``DEFAULT_ALPHA`` (0.5): each output
pixel is ``(1 - alpha) * image + alpha * colormap(map)``. ``jet`` is the default for parity with
the paper's figures; ``inferno`` and ``turbo`` (or any matplotlib colormap name) work too.
"""

from __future__ import annotations

import os
import textwrap
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = ["DEFAULT_ALPHA", "DEFAULT_COLORMAP", "clip_and_maps", "colorize", "overlay", "save_overlay", "save_overlay_grid",
           "to_rgb_array", "write_strip"]

DEFAULT_ALPHA = 0.5
DEFAULT_COLORMAP = "jet"


def to_rgb_array(image, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """An image as ``uint8 (H, W, 3)``.

    Accepts a torch tensor ``(3, H, W)`` / ``(1, H, W)`` / ``(H, W)`` (float in ``[0, 1]``, or
    normalised with ``mean``/``std`` which are undone first, or uint8), a PIL image, or a NumPy
    array ``(H, W[, 3])``.
    """
    if isinstance(image, Tensor):
        tensor = image.detach().to("cpu")
        if tensor.ndim == 2:
            tensor = tensor.unsqueeze(0)
        if tensor.ndim != 3:
            raise ValueError(f"expected an image (C, H, W), got shape {tuple(tensor.shape)}")
        if tensor.dtype == torch.uint8:
            tensor = tensor.float() / 255
        tensor = tensor.float()
        if mean is not None and std is not None:
            tensor = tensor * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
        if tensor.shape[0] == 1:
            tensor = tensor.expand(3, -1, -1)
        return (tensor.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.shape[-1] == 4:
        array = array[..., :3]
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0, 1) * 255).round().astype(np.uint8)
    return array


def colorize(heatmap, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """A map in ``[0, 1]`` (tensor or array ``(H, W)``) as ``uint8 (H, W, 3)`` colours."""
    import matplotlib

    values = heatmap.detach().float().cpu().numpy() if isinstance(heatmap, Tensor) else np.asarray(heatmap, np.float32)
    rgba = matplotlib.colormaps[colormap](np.clip(values, 0, 1))
    return (rgba[..., :3] * 255).round().astype(np.uint8)


def overlay(image, heatmap, alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP) -> np.ndarray:
    """Blend a ``[0, 1]`` heat map over an image; the map is resized (bilinear) to the image."""
    rgb = to_rgb_array(image)
    height, width = rgb.shape[:2]
    values = heatmap if isinstance(heatmap, Tensor) else torch.as_tensor(np.asarray(heatmap, np.float32))
    values = values.detach().float().cpu()
    if values.ndim != 2:
        raise ValueError(f"expected a 2D heat map, got shape {tuple(values.shape)}")
    if tuple(values.shape) != (height, width):
        values = torch.nn.functional.interpolate(values[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    heat = colorize(values, colormap).astype(np.float32)
    return ((1 - alpha) * rgb.astype(np.float32) + alpha * heat).round().clip(0, 255).astype(np.uint8)


def save_overlay(path: str | os.PathLike, image, heatmap, *, alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP,
                 min_side: int = 256) -> str:
    """Write one overlay as a PNG at the image's own resolution, enlarged by a whole factor
    (nearest neighbour, so pixels stay sharp) until its shorter side is at least ``min_side``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    picture = overlay(image, heatmap, alpha, colormap)
    factor = max(1, -(-min_side // max(1, min(picture.shape[:2]))))
    if factor > 1:
        picture = picture.repeat(factor, axis=0).repeat(factor, axis=1)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    plt.imsave(path, picture)
    return str(path)


def save_overlay_grid(
    path: str | os.PathLike,
    image,
    heatmaps: Sequence,
    titles: Sequence[str],
    *,
    image_title: str = "input",
    ncols: int = 4,
    alpha: float = DEFAULT_ALPHA,
    colormap: str = DEFAULT_COLORMAP,
    suptitle: str | None = None,
    wrap: int = 22,
    panel_inches: float = 2.2,
    dpi: int = 100,
) -> str:
    """Write a PNG grid: the input, then one overlay per heat map with its (wrapped) title,
    and one colour bar for the map scale. Returns the path written."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    if len(heatmaps) != len(titles):
        raise ValueError(f"{len(heatmaps)} heat maps but {len(titles)} titles")
    panels = 1 + len(heatmaps)
    ncols = max(1, min(ncols, panels))
    nrows = -(-panels // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(panel_inches * ncols + 0.6, panel_inches * nrows + (0.5 if suptitle else 0.2)), squeeze=False)
    rgb = to_rgb_array(image)
    cells = [(rgb, image_title)] + [(overlay(rgb, h, alpha, colormap), t) for h, t in zip(heatmaps, titles)]
    for ax, (picture, title) in zip(axes.flat, cells):
        ax.imshow(picture)
        ax.set_title("\n".join(textwrap.wrap(str(title), wrap)) or " ", fontsize=9)
    for ax in axes.flat:
        ax.axis("off")
    if suptitle:
        fig.suptitle("\n".join(textwrap.wrap(suptitle, 20 * ncols)), fontsize=10)
    fig.colorbar(ScalarMappable(Normalize(0, 1), colormap), ax=axes.ravel().tolist(), fraction=0.02, pad=0.02, label="relevance")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def clip_and_maps(clip: Tensor, maps: Tensor) -> tuple[Tensor, Tensor]:
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


def write_strip(
    path: str | os.PathLike, clip: Tensor, maps: Tensor, num_frames: int = 8, *,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP,
    title: str | None = None, active: Tensor | None = None, panel_inches: float = 1.3, dpi: int = 100,
    frame_numbers: Sequence[int] | None = None,
) -> str:
    """PNG strip of ``num_frames`` uniformly sampled frames: frames on top, overlays below.

    ``active`` ``(T,)`` bool (optional) marks the frames where the action happens in the titles;
    ``frame_numbers`` (``T`` ints, optional) are the frames' numbers in their source video, shown in
    the titles instead of their positions in the clip. Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    clip, maps = clip_and_maps(clip, maps)
    total = clip.shape[1]
    count = max(1, min(num_frames, total))
    index = torch.linspace(0, total - 1, count).round().long().tolist()
    fig, axes = plt.subplots(2, count, figsize=(panel_inches * count, panel_inches * 2 + (0.45 if title else 0.25)), squeeze=False)
    for column, t in enumerate(index):
        frame = to_rgb_array(clip[:, t], mean, std)
        axes[0, column].imshow(frame)
        axes[1, column].imshow(overlay(frame, maps[t], alpha, colormap))
        mark = " *" if active is not None and bool(active[t]) else ""
        number = t if frame_numbers is None else int(frame_numbers[t])
        axes[0, column].set_title(f"t={number}{mark}", fontsize=8)
    for ax in axes.flat:
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return os.fspath(path)
