"""Images and video in and out: the only module that uses PIL and PyAV.

* images: :func:`read_image` (one file -> RGB PIL image), :func:`read_images` (many, the bad ones
  reported by name), :func:`image_to_tensor`, :func:`image_size`, :func:`folder_files`;
* video: :func:`read_clip` (a clip of ``T`` frames as ``(C, T, H, W)`` in ``[0, 1]``),
  :func:`write_gif` and :func:`write_mp4` (frame | overlay side by side).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .viz import DEFAULT_ALPHA, DEFAULT_COLORMAP, clip_and_maps, overlay, to_rgb_array

__all__ = [
    "IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "folder_files", "image_size", "image_to_tensor", "read_clip", "read_image",
    "read_images", "read_mask", "to_rgb_image", "write_gif", "write_mp4",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


# -- images ------------------------------------------------------------------------------------

def read_image(path: str | os.PathLike) -> Any:
    """An image file as an 8-bit RGB PIL image (loaded into memory, the file closed).

    Decoded as a viewer shows it: the EXIF orientation of camera photos applied; 16-bit grey
    (``I;16``) and 32-bit integer images with 16-bit values scaled from 0..65535 to 0..255 (PIL's
    own ``convert("RGB")`` clips them, turning a 16-bit PNG all white); float images (``F``) taken
    as 0..1; transparency (RGBA, LA, a palette's transparent colour) composited on **white**, with
    a warning; the first frame of an animated file, with a warning.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for one
    that is not a readable image (or whose values have no defined range, e.g. floats outside 0..1).
    """
    from PIL import Image, UnidentifiedImageError

    if os.path.isdir(path):
        raise ValueError(f"{os.fspath(path)} is a directory, not an image file")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no image file {os.fspath(path)!r}")
    try:
        with Image.open(path) as image:
            return to_rgb_image(image, os.fspath(path))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise ValueError(f"{os.fspath(path)} is not a readable image ({type(error).__name__}: {error})") from None


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb_image(image: Any, name: str = "the image") -> Any:
    """A PIL image of any mode as 8-bit RGB, by the rules of :func:`read_image` (``name`` is used in
    warnings and errors)."""
    import warnings

    import numpy as np
    from PIL import Image, ImageOps

    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        warnings.warn(f"{name} has {frames} frames; only the first one is explained", UserWarning, stacklevel=3)
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        low, high = float(values.min()), float(values.max())
        if mode == "F":
            if low < 0 or high > 1:
                raise ValueError(f"{name} holds float values in [{low:.4g}, {high:.4g}], which have no defined "
                                 "display range; save it as an 8- or 16-bit image, or scale it to 0..1")
            scale = 1.0
        else:
            if low < 0 or high > 65535:
                raise ValueError(f"{name} holds 32-bit integer values in [{low:.0f}, {high:.0f}], outside 16 bits; "
                                 "save it as an 8- or 16-bit image")
            scale = 65535.0
        grey = np.round(values / scale * 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        if int(np.asarray(rgba)[..., 3].min()) < 255:
            warnings.warn(f"{name} has transparent pixels; they are composited on white (the alpha channel is "
                          "not an input of the model)", UserWarning, stacklevel=3)
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def read_images(paths: Sequence[str]) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """Open every image. Returns ``(ok, failed)``: ``[(path, RGB image)]`` and ``[(path, reason)]``;
    a bad file never stops the others."""
    ok, failed = [], []
    for path in paths:
        try:
            ok.append((path, read_image(path)))
        except FileNotFoundError:
            failed.append((path, "no such file"))
        except ValueError as error:
            failed.append((path, str(error)))
    return ok, failed


def image_to_tensor(image: Any) -> Tensor:
    """A PIL image, an ``(H, W[, C])`` array or an image file path as ``(3, H, W)`` float in ``[0, 1]``.

    PIL images follow :func:`read_image`'s rules; arrays are scaled by their dtype (``uint8`` by 255,
    ``uint16`` by 65535; float arrays are taken as ``[0, 1]``); a 4th channel (alpha) is dropped.
    """
    import numpy as np

    if isinstance(image, (str, os.PathLike)):
        image = read_image(image)
    array = np.asarray(to_rgb_image(image) if hasattr(image, "convert") else image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image (H, W[, 1 | 3 | 4]), got an array of shape {array.shape}")
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(array.dtype)
    if scale is None and not np.issubdtype(array.dtype, np.floating) and array.dtype != np.bool_:
        raise ValueError(f"an image array of dtype {array.dtype} has no defined range; use uint8, uint16 or float in [0, 1]")
    tensor = torch.from_numpy(np.array(array[..., :3], dtype=np.float32)).permute(2, 0, 1)  # a writable copy
    return tensor / scale if scale is not None else tensor


def read_mask(path: str | os.PathLike) -> Tensor:
    """A mask image as ``(H, W)`` bool: True where any channel of the pixel is non-zero."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"no mask file {os.fspath(path)!r}")
    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"{os.fspath(path)} is not a readable mask image ({type(error).__name__}: {error})") from None
    mask = torch.from_numpy(np.array(array != 0))
    return mask.any(dim=-1) if mask.ndim == 3 else mask


def image_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """``(width, height)`` of an image file, or ``None`` when it cannot be read."""
    try:
        from PIL import Image

        with Image.open(path) as image:
            return image.size
    except Exception:  # noqa: BLE001 - a size is only a layout hint
        return None


def folder_files(folder: str | os.PathLike, suffixes: Sequence[str]) -> list[str]:
    """Every file under ``folder`` (recursively) with one of ``suffixes``, sorted."""
    return sorted(str(p) for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


# -- video in -------------------------------------------------------------------------------------

def _open_video(path: str | os.PathLike):
    import av

    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"{path} is a directory, not a video file; give the video files in it (e.g. {path}/*.mp4)")
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



# -- video out ------------------------------------------------------------------------------------

def _side_by_side_frames(
    clip: Tensor, maps: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None,
    alpha: float, colormap: str,
) -> list:
    """One ``uint8 (H, 2W, 3)`` array per frame: the frame | the frame with its heat map."""
    import numpy as np

    clip, maps = clip_and_maps(clip, maps)
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


