"""Images and video in and out: the only module that uses PIL and PyAV.

* images: :func:`read_image` (one file -> RGB PIL image), :func:`read_images` (many, the bad ones
  reported by name), :func:`image_to_tensor`, :func:`image_size`, :func:`folder_files`;
* video: :class:`VideoReader` (streaming reads: only the frames used are decoded, resized while
  decoding), :func:`read_clip` (a clip of ``T`` frames as ``(C, T, H, W)`` in ``[0, 1]``),
  :class:`AnimationWriter` (frame | overlay GIF / MP4 written frame by frame, keeping the source's
  frame times), :func:`write_gif` / :func:`write_mp4` (a whole clip), :class:`MapWriter` (maps to ``.npy``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor

from .viz import DEFAULT_ALPHA, DEFAULT_COLORMAP, clip_and_maps, overlay, to_rgb_array

__all__ = [
    "IMAGE_SUFFIXES", "VIDEO_SUFFIXES", "AnimationWriter", "MapWriter", "VideoClip", "VideoInfo", "VideoReader",
    "folder_files", "image_size", "image_to_tensor", "read_clip", "read_image", "read_images", "read_mask", "to_rgb_image",
    "write_gif", "write_mp4",
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
#
# Reading streams: a VideoReader decodes only the frames it is asked for (seeking to the key frame
# before a far-away one), and FFmpeg's scaler converts each decoded frame to RGB at the output size
# while it is decoded, so memory holds one decoded frame plus the frames returned, at their output
# size, whatever the file's length or resolution. PyAV (which brings its own FFmpeg) does the
# decoding: torchcodec installs here but cannot load without system FFmpeg libraries, and it
# returns full-resolution frames that would then have to be resized.

# FFmpeg demuxers of still images: a PNG or JPEG opens as a one-frame "video".
_STILL_IMAGE_FORMATS = ("image2", "image2pipe", "apng", "webp_pipe")
# Decode this many frames forward at most before seeking instead (one or two groups of pictures).
_SEEK_GAP = 48


@dataclass(frozen=True)
class VideoInfo:
    """What a video file says about itself.

    Attributes:
        path: the file.
        fps: average frame rate.
        num_frames: the header's frame count, else packets counted (no decoding).
        duration: seconds the video lasts (``num_frames / fps`` for a constant rate).
        width, height: the frames' size as stored.
    """

    path: str
    fps: float
    num_frames: int
    duration: float
    width: int
    height: int


@dataclass
class VideoClip:
    """Frames read from a video file and where they came from.

    Attributes:
        frames: ``(3, T, H, W)`` float32 in ``[0, 1]``.
        indices: the source frame index of each frame (repeated where the clip was padded).
        times: the source time in seconds of each frame.
        end: when the last frame stops showing in the source (its time plus one frame).
        info: the source's :class:`VideoInfo`.
        padded: frames were repeated because the source had too few.
    """

    frames: Tensor
    indices: list[int]
    times: list[float]
    end: float
    info: VideoInfo
    padded: bool = False

    def display_times(self) -> list[float]:
        """When each frame starts showing in an animation of the clip, from 0: the source's frame
        times, or, for a padded clip (repeated frames), the clip's span shared evenly."""
        start = self.times[0]
        if self.padded or any(b <= a for a, b in zip(self.times, self.times[1:])):
            step = (self.end - start) / len(self.times)
            return [k * step for k in range(len(self.times))]
        return [t - start for t in self.times]

    @property
    def display_end(self) -> float:
        """The animation's length in seconds: the source span the clip covers."""
        return self.end - self.times[0]


def _open_video(path: str | os.PathLike):
    import av

    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a video file; give the video files in it (e.g. {os.path.join(path, '*.mp4')})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video file not found: {path}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"video file {path} is empty (0 bytes)")
    try:
        container = av.open(path)
    except Exception as error:  # PyAV raises several error types for garbage input
        raise ValueError(f"cannot read {path} as a video ({type(error).__name__}: {error})") from None
    format_name = container.format.name
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path} has no video stream (format {format_name!r}); give a video file such as .mp4")
    if format_name in _STILL_IMAGE_FORMATS or format_name.endswith("_pipe"):
        container.close()
        raise ValueError(f"{path} is a still image ({format_name}), not a video; explain images with `multiexplain classify`")
    return container


def _output_geometry(height: int, width: int, size: int | Sequence[int] | None, crop: bool) -> tuple[int, int, int, int, int, int]:
    """``(scaled_h, scaled_w, top, left, out_h, out_w)``: the size FFmpeg scales a frame to and the
    crop taken from it (an int ``size``: the short side to it, then a centred square crop)."""
    if size is None:
        return height, width, 0, 0, height, width
    if isinstance(size, int):
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        if not crop:
            return size, size, 0, 0, size, size
        scale = size / min(height, width)
        new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
        return new_h, new_w, (new_h - size) // 2, (new_w - size) // 2, size, size
    out_h, out_w = (int(s) for s in size)
    return out_h, out_w, 0, 0, out_h, out_w


class VideoReader:
    """A video file opened for streaming reads.

    Args:
        path: any file PyAV (FFmpeg) decodes; still images, directories, empty and unreadable
            files are refused with an error naming the file.
        size: output frame size: an int scales the short side to it and centre-crops a square
            (``crop=True``) or scales to a square (``crop=False``); ``(H, W)`` scales to exactly
            that; ``None`` keeps the stored size.

    :meth:`read` returns chosen frames, :meth:`clip` a clip of ``T`` frames, :meth:`frames` every
    frame in order. A frame that fails to decode raises ``ValueError`` naming the file and the frame.
    Use as a context manager (or call :meth:`close`).
    """

    def __init__(self, path: str | os.PathLike, size: int | Sequence[int] | None = None, crop: bool = True,
                 seek_gap: int = _SEEK_GAP) -> None:
        self.path = os.fspath(path)
        self._container = _open_video(self.path)
        try:
            self._stream = self._container.streams.video[0]
            self._stream.thread_type = "AUTO"
            self.info = self._read_info()
            self._geometry = _output_geometry(self.info.height, self.info.width, size, crop)
        except Exception:
            self._container.close()
            raise
        self.seek_gap = seek_gap

    # -- what the file is --------------------------------------------------------------------------
    def _read_info(self) -> VideoInfo:
        stream = self._stream
        fps = float(stream.average_rate or stream.guessed_rate or stream.base_rate or 25.0)
        self._time_base = stream.time_base
        self._start_pts = stream.start_time or 0
        count = int(stream.frames or 0)
        if count <= 0:  # some containers (WebM, MKV) store no count: count packets, decoding nothing
            count = sum(1 for packet in self._container.demux(stream) if packet.size)
            self._container.seek(0)
        if stream.duration and self._time_base:
            duration = float(stream.duration * self._time_base)
        elif self._container.duration:
            duration = self._container.duration / 1e6
        else:
            duration = count / fps
        width, height = stream.codec_context.width, stream.codec_context.height
        return VideoInfo(self.path, fps, count, duration, width, height)

    @property
    def frame_size(self) -> tuple[int, int]:
        """``(H, W)`` of the frames this reader returns."""
        return self._geometry[4], self._geometry[5]

    # -- decoding ----------------------------------------------------------------------------------
    def _index_of(self, frame: Any, previous: int | None) -> int:
        if frame.pts is None or not self._time_base:
            return 0 if previous is None else previous + 1
        return int(round(float((frame.pts - self._start_pts) * self._time_base) * self.info.fps))

    def _time_of(self, index: int) -> float:
        return index / self.info.fps

    def _decoded(self, first: int) -> Iterator[tuple[int, Any]]:
        """``(index, PyAV frame)`` from the key frame at or before frame ``first`` on."""
        import av

        if first > 0:
            pts = self._start_pts + int(self._time_of(first) / self._time_base)
            self._container.seek(pts, stream=self._stream, backward=True, any_frame=False)
        else:
            self._container.seek(0)
        previous: int | None = None
        frames = self._container.decode(self._stream)
        while True:
            try:
                frame = next(frames)
            except StopIteration:
                return
            except av.error.FFmpegError as error:
                where = first if previous is None else previous + 1
                raise ValueError(
                    f"cannot decode frame {where} (at {self._time_of(where):.2f} s) of {self.path}: {error}; "
                    "the file is damaged (re-encode it, e.g. with ffmpeg -i IN -c:v libx264 OUT.mp4)"
                ) from None
            previous = self._index_of(frame, previous)
            yield previous, frame

    def _convert(self, frame: Any) -> Tensor:
        """A decoded frame as ``uint8 (3, H, W)`` at the output size (scaled by FFmpeg while converting)."""
        scaled_h, scaled_w, top, left, out_h, out_w = self._geometry
        downscale = scaled_h * scaled_w < frame.width * frame.height
        rgb = frame.reformat(width=scaled_w, height=scaled_h, format="rgb24",
                             interpolation="AREA" if downscale else "BILINEAR").to_ndarray()
        rgb = rgb[top : top + out_h, left : left + out_w]
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1)

    def frames(self, start: int = 0) -> Iterator[tuple[int, float, Tensor]]:
        """Every frame from index ``start`` on, in order: ``(index, time in s, uint8 (3, H, W))``."""
        for index, frame in self._decoded(start):
            if index >= start:
                yield index, self._time_of(index), self._convert(frame)

    def read(self, indices: Sequence[int]) -> tuple[Tensor, list[float]]:
        """Frames ``indices`` (any order, repeats allowed) as ``uint8 (T, 3, H, W)`` and their times.

        Decodes forward from the last position while the next wanted frame is near, and seeks to
        the key frame before it when it is far (more than ``seek_gap`` frames) or behind.
        A stream that ends more than two frames short of a wanted frame is an error (a truncated
        or damaged file); one or two missing at the very end (a rounded header count) repeat the
        last frame.
        """
        if not indices:
            raise ValueError("no frame indices given")
        wanted = sorted(set(int(i) for i in indices))
        if wanted[0] < 0:
            raise ValueError(f"frame index {wanted[0]} is negative")
        got: dict[int, Tensor] = {}
        decoder: Iterator[tuple[int, Any]] | None = None
        position = last = -1
        last_frame: Tensor | None = None
        for target in wanted:
            if decoder is None or target < position or target - position > self.seek_gap:
                decoder, sought = self._decoded(target), True
            else:
                sought = False
            for index, frame in decoder:
                if sought and index > target and target > 0:
                    # The seek landed after the frame (an imprecise index): decode from the start.
                    decoder, sought = self._decoded(0), False
                    continue
                sought = False
                position, last = index + 1, index
                if index >= target:
                    got[target] = last_frame = self._convert(frame)
                    break
            else:
                decoder = None
                break
        missing = [i for i in wanted if i not in got]
        if missing:
            if last_frame is None and not got:
                raise ValueError(f"{self.path} has no decodable frames" + (f" from frame {wanted[0]} on" if wanted[0] else ""))
            if missing[-1] - last > 2:
                raise ValueError(
                    f"{self.path} ends after frame {last} ({self._time_of(last):.2f} s) but frame {missing[0]} was "
                    f"wanted (the file says it has {self.info.num_frames} frames): it is truncated or damaged"
                )
            for index in missing:
                got[index] = got[max(i for i in got)]
        return torch.stack([got[int(i)] for i in indices]), [self._time_of(int(i)) for i in indices]

    def clip(self, num_frames: int, start: float | None = None) -> VideoClip:
        """A clip of ``num_frames`` frames.

        ``start=None`` samples them uniformly over the whole video; a time in seconds takes
        consecutive frames from there. A video with too few frames is padded by repeating frames,
        with a warning that says how (uniform sampling repeats every frame about equally; from a
        start time, the last frame is repeated).
        """
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        total = self.info.num_frames
        if total < 1:
            raise ValueError(f"{self.path} has no frames")
        padded = False
        if start is None:
            indices = torch.linspace(0, total - 1, num_frames).round().long().tolist()
            if total < num_frames:
                padded = True
                warnings.warn(
                    f"{self.path} has {total} frame(s) but the clip needs {num_frames}: each frame is repeated "
                    f"about {num_frames / total:.1f} times (uniform resampling) to fill it", UserWarning, stacklevel=2,
                )
            end = self.info.num_frames / self.info.fps
        else:
            first = max(0, int(round(start * self.info.fps)))
            if first >= total:
                raise ValueError(f"{self.path} has no decodable frames after {start} s (it lasts {self.info.duration:.2f} s)")
            available = total - first
            indices = [first + min(k, available - 1) for k in range(num_frames)]
            if available < num_frames:
                padded = True
                warnings.warn(
                    f"{self.path} has {available} frame(s) from {start} s on but the clip needs {num_frames}: the "
                    f"last frame is repeated {num_frames - available} time(s) to fill it", UserWarning, stacklevel=2,
                )
            end = (indices[-1] + 1) / self.info.fps
        images, times = self.read(indices)
        frames = images.permute(1, 0, 2, 3).float().div_(255).contiguous()
        return VideoClip(frames, indices, times, end, self.info, padded)

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "VideoReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read_clip(
    path: str | os.PathLike,
    num_frames: int = 16,
    size: int | Sequence[int] | None = 112,
    start: float | None = None,
    crop: bool = True,
) -> tuple[Tensor, float]:
    """Read ``num_frames`` frames of a video file as a clip (see :meth:`VideoReader.clip`).

    Returns ``(clip (3, T, H, W) float32 in [0, 1], fps)``. Normalise with
    :func:`~multiexplain.adapters.video.normalize_clip` for models that expect it (the shipped C3D
    normalises inside). For the frames' source times use :class:`VideoReader` directly.

    Raises:
        FileNotFoundError, IsADirectoryError, or ValueError for an empty, unreadable, still-image
        or damaged file (naming the frame that failed to decode).
    """
    with VideoReader(path, size=size, crop=crop) as reader:
        clip = reader.clip(num_frames, start)
    return clip.frames, clip.info.fps


# -- video out ------------------------------------------------------------------------------------

def _side_by_side(frame: Tensor, heatmap: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None,
                  alpha: float, colormap: str, scale: int) -> Any:
    """``uint8 (H, 2W, 3)``: the frame | the frame with its heat map, enlarged ``scale`` times (nearest)."""
    import numpy as np

    rgb = to_rgb_array(frame.detach().cpu(), mean, std)
    image = np.concatenate([rgb, overlay(rgb, heatmap.detach().float().cpu(), alpha, colormap)], axis=1)
    if scale > 1:
        image = image.repeat(scale, axis=0).repeat(scale, axis=1)
    return image


class _GifStream:
    """An animated GIF written frame by frame (each with its own palette and delay): memory
    holds one frame. GIF delays are centiseconds; they are rounded with the error carried on, so
    the total stays within 10 ms of the times given (delays under 20 ms, which browsers stretch,
    are raised to 20 ms)."""

    def __init__(self, path: str) -> None:
        self.handle = open(path, "wb")
        self.started = False
        self.written_cs = 0

    def add(self, image: Any, start: float, end: float) -> None:
        from PIL import GifImagePlugin, Image

        # Octree quantisation: ~20x faster than the median cut of convert("P", ADAPTIVE) and as good
        # for heat-map colours; each frame keeps its own palette.
        frame = Image.fromarray(image).quantize(256, method=Image.Quantize.FASTOCTREE)
        if not self.started:
            header, _ = GifImagePlugin.getheader(frame, None, {"loop": 0, "duration": 1})
            self.handle.write(b"".join(header))
            self.started = True
        delay = max(2, round(end * 100) - self.written_cs)
        self.written_cs += delay
        for chunk in GifImagePlugin.getdata(frame, duration=delay * 10, include_color_table=True):
            self.handle.write(chunk)

    def close(self) -> None:
        if self.started:
            self.handle.write(b";")
        self.handle.close()


class _Mp4Stream:
    """H.264 (or MPEG-4 part 2 where no H.264 encoder exists) at millisecond time stamps, each frame
    lasting until the next one's time (no B-frames, so every packet's duration can be set)."""

    def __init__(self, path: str, rate: float) -> None:
        import av

        self.av = av
        self.container = av.open(path, mode="w")
        self.codec = "libx264" if "libx264" in av.codecs_available else ("h264" if "h264" in av.codecs_available else "mpeg4")
        self.rate = Fraction(rate).limit_denominator(1000) if rate > 0 else Fraction(25)
        self.stream = None
        self.durations: dict[int, int] = {}

    def add(self, image: Any, start: float, end: float) -> None:
        import numpy as np

        av = self.av
        height, width = image.shape[:2]
        if self.stream is None:
            self.stream = self.container.add_stream(self.codec, rate=self.rate)
            self.stream.width, self.stream.height, self.stream.pix_fmt = width + width % 2, height + height % 2, "yuv420p"
            self.stream.codec_context.time_base = Fraction(1, 1000)
            self.stream.options = {"crf": "18", "bf": "0"} if self.codec != "mpeg4" else {"bf": "0"}
        if height % 2 or width % 2:  # yuv420p needs even sizes
            image = np.pad(image, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        frame.pts, frame.time_base = round(start * 1000), Fraction(1, 1000)
        self.durations[frame.pts] = max(1, round(end * 1000) - frame.pts)
        self._mux(self.stream.encode(frame))

    def _mux(self, packets: Any) -> None:
        for packet in packets:
            if packet.pts in self.durations:
                packet.duration = self.durations.pop(packet.pts)
            self.container.mux(packet)

    def close(self) -> None:
        try:
            if self.stream is not None:
                self._mux(self.stream.encode())
        finally:
            self.container.close()


class AnimationWriter:
    """``frame | overlay`` animations written frame by frame, so long videos need bounded memory.

    Args:
        path: ``.gif`` or ``.mp4`` (the suffix picks the format), or several such paths: each frame
            is drawn once and written to all of them.
        rate: the nominal frame rate stored in an MP4 header (the frame times decide the playback).
        mean, std: undo a normalisation for display; ``alpha``, ``colormap``: the overlay;
        ``scale``: enlarge small frames (nearest).

    :meth:`add` takes one frame ``(C, H, W)``, its map ``(H, W)`` and the time in seconds it starts
    showing; :meth:`close` takes the time the last frame stops, so the animation lasts as long as
    the source span it shows. A frame is written when the next one arrives (its duration is then known).
    """

    def __init__(self, path: str | os.PathLike | Sequence[str | os.PathLike], rate: float = 25.0, *,
                 mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP,
                 scale: int = 1) -> None:
        paths = [os.fspath(p) for p in path] if isinstance(path, (list, tuple)) else [os.fspath(path)]
        for file in paths:
            if Path(file).suffix.lower() not in (".gif", ".mp4"):
                raise ValueError(f"an animation is a .gif or .mp4 file, got {file!r}")
        self.paths = paths
        self.path = paths[0]
        self._outs: list[Any] = []
        for file in paths:
            os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
            self._outs.append(_GifStream(file) if Path(file).suffix.lower() == ".gif" else _Mp4Stream(file, rate))
        self._style = (mean, std, alpha, colormap, max(1, int(scale)))
        self._pending: tuple[Any, float] | None = None
        self._closed = False
        self.frames = 0

    def add(self, frame: Tensor, heatmap: Tensor, time: float) -> None:
        if self._pending is not None:
            image, start = self._pending
            if time <= start:
                raise ValueError(f"frame times must increase: {time} s after {start} s")
            for out in self._outs:
                out.add(image, start, time)
        self._pending = (_side_by_side(frame, heatmap, *self._style), float(time))
        self.frames += 1

    def close(self, end: float | None = None) -> str:
        """Write the last frame (shown until ``end``; default 40 ms) and finish the file."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            if self._pending is not None:
                image, start = self._pending
                for out in self._outs:
                    out.add(image, start, end if end is not None and end > start else start + 0.04)
                self._pending = None
        finally:
            for out in self._outs:
                out.close()
        return self.path

    def __enter__(self) -> "AnimationWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _write_animation(path: str | os.PathLike, clip: Tensor, maps: Tensor, fps: float, times: Sequence[float] | None,
                     end: float | None, **style: Any) -> str:
    clip, maps = clip_and_maps(clip, maps)
    count = clip.shape[1]
    if times is None:
        times, end = [t / fps for t in range(count)], count / fps
    elif len(times) != count:
        raise ValueError(f"{len(times)} frame times for {count} frames")
    writer = AnimationWriter(path, rate=fps, **style)
    for t in range(count):
        writer.add(clip[:, t], maps[t], times[t])
    return writer.close(end)


def write_gif(
    path: str | os.PathLike, clip: Tensor, maps: Tensor, fps: float = 8.0, *,
    times: Sequence[float] | None = None, end: float | None = None,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP, scale: int = 1,
) -> str:
    """Animated GIF (loops) of ``frame | overlay`` side by side.

    ``clip`` is ``(C, T, H, W)`` in ``[0, 1]`` (or normalised with ``mean``/``std``, undone for
    display); ``maps`` ``(T, H, W)``. Frames play at ``fps``, or each from ``times[t]`` seconds until
    the next (the last until ``end``): pass a :class:`VideoClip`'s ``display_times()`` and
    ``display_end`` to keep the source's timing. ``scale`` enlarges small clips. Returns the path.
    """
    return _write_animation(path, clip, maps, fps, times, end, mean=mean, std=std, alpha=alpha, colormap=colormap, scale=scale)


def write_mp4(
    path: str | os.PathLike, clip: Tensor, maps: Tensor, fps: float = 8.0, *,
    times: Sequence[float] | None = None, end: float | None = None,
    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
    alpha: float = DEFAULT_ALPHA, colormap: str = DEFAULT_COLORMAP, scale: int = 1,
) -> str:
    """MP4 (H.264, or MPEG-4 part 2 where no H.264 encoder exists) of ``frame | overlay``, frame
    sizes padded to even numbers (yuv420p needs them). Arguments as :func:`write_gif`."""
    return _write_animation(path, clip, maps, fps, times, end, mean=mean, std=std, alpha=alpha, colormap=colormap, scale=scale)


class MapWriter:
    """Per-frame maps written one frame at a time to a ``.npy`` file (float16 ``(T, H, W)``), for
    videos too long to keep their maps in memory. ``num_frames`` is the expected count; a file
    that got fewer is rewritten with the frames it got."""

    def __init__(self, path: str | os.PathLike, num_frames: int, size: tuple[int, int]) -> None:
        import numpy as np

        self.path = os.fspath(path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._array = np.lib.format.open_memmap(self.path, mode="w+", dtype=np.float16, shape=(num_frames, *size))
        self.count = 0

    def add(self, heatmap: Tensor) -> None:
        if self.count >= self._array.shape[0]:
            raise ValueError(f"{self.path} was opened for {self._array.shape[0]} frames")
        self._array[self.count] = heatmap.detach().float().cpu().numpy()
        self.count += 1

    def close(self) -> str:
        import numpy as np

        self._array.flush()
        if self.count < self._array.shape[0]:
            kept = np.array(self._array[: self.count])
            del self._array
            np.save(self.path, kept)
        else:
            del self._array
        return self.path
