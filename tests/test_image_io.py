"""Image decoding (``multiexplain.io.read_image``): real files of every awkward kind become the 8-bit
RGB image a viewer shows, or a clear error; nothing becomes silently white, black or rotated."""

from __future__ import annotations

import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from multiexplain.io import image_to_tensor, read_image, read_images


def write_png16(path: Path, array: np.ndarray) -> Path:
    """A 16-bit PNG written byte by byte (grey ``(H, W)`` or RGB ``(H, W, 3)`` uint16), independent of PIL."""
    height, width = array.shape[:2]
    colour_type = 2 if array.ndim == 3 else 0
    rows = b"".join(b"\x00" + np.ascontiguousarray(array[y]).astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return path


def test_a_16_bit_grey_png_keeps_its_values_instead_of_turning_white(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 16).reshape(16, 64).round().astype(np.uint16)
    path = write_png16(tmp_path / "ramp16.png", ramp)
    with Image.open(path) as raw:
        assert raw.mode == "I;16" and (np.asarray(raw.convert("RGB")) == 255).mean() > 0.99  # PIL alone: clipped white
    rgb = np.asarray(read_image(path))
    assert rgb.shape == (16, 64, 3) and rgb.dtype == np.uint8
    expected = np.round(ramp / 65535 * 255).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 1], expected)
    assert rgb.min() == 0 and rgb.max() == 255
    # PIL's own 16-bit writer gives the same image.
    Image.fromarray(ramp).save(tmp_path / "pil16.png")
    assert np.array_equal(np.asarray(read_image(tmp_path / "pil16.png")), rgb)


def test_a_16_bit_rgb_png_and_a_float_tiff(tmp_path):
    colours = np.stack([np.full((4, 4), v) for v in (0, 32896, 65535)], axis=-1).astype(np.uint16)
    assert np.asarray(read_image(write_png16(tmp_path / "rgb16.png", colours)))[0, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "half.tiff")
    assert np.asarray(read_image(tmp_path / "half.tiff"))[0, 0].tolist() == [128, 128, 128]
    Image.fromarray(np.full((4, 4), 300.0, np.float32)).save(tmp_path / "hdr.tiff")
    with pytest.raises(ValueError, match=r"hdr.tiff.*float values in \[300, 300\].*scale it to 0..1"):
        read_image(tmp_path / "hdr.tiff")


def test_transparency_is_composited_on_white_with_a_warning(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:4, :, 3] = 255  # top half opaque red, bottom half fully transparent, one half-transparent pixel
    rgba[7, 7, 3] = 128
    path = tmp_path / "rgba.png"
    Image.fromarray(rgba, "RGBA").save(path)
    with pytest.warns(UserWarning, match="rgba.png has transparent pixels; they are composited on white"):
        rgb = np.asarray(read_image(path)).astype(int)
    assert rgb[0, 0].tolist() == [200, 0, 0] and rgb[5, 0].tolist() == [255, 255, 255]
    assert np.abs(rgb[7, 7] - [(200 + 255) / 2, 127.5, 127.5]).max() <= 1  # alpha 128: half way to white
    # A palette image with a transparent colour, and grey + alpha, follow the same rule.
    palette = Image.fromarray(np.array([[0, 1], [1, 1]], np.uint8), "P")
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.save(tmp_path / "palette.png", transparency=0)
    with pytest.warns(UserWarning, match="transparent"):
        assert np.asarray(read_image(tmp_path / "palette.png")).tolist() == [[[255] * 3, [10, 20, 30]], [[10, 20, 30]] * 2]
    Image.fromarray(np.dstack([np.full((2, 2), 50, np.uint8), np.zeros((2, 2), np.uint8)]), "LA").save(tmp_path / "la.png")
    with pytest.warns(UserWarning, match="transparent"):
        assert np.asarray(read_image(tmp_path / "la.png")).min() == 255
    # Fully opaque RGBA: no warning.
    rgba[..., 3] = 255
    Image.fromarray(rgba, "RGBA").save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.asarray(read_image(path))[7, 7].tolist() == [200, 0, 0]


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((10, 20, 3), np.uint8)
    pixels[:, :5] = 255  # a white band on the left of a landscape picture
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    shown = np.asarray(read_image(tmp_path / "photo.jpg"))
    assert shown.shape == (20, 10, 3)  # portrait, as a viewer shows it
    assert shown[:5].mean() > 200 and shown[-5:].mean() < 50  # the band is now on top


def test_animated_files_use_the_first_frame_and_say_so(tmp_path):
    frames = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in (10, 240)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    with pytest.warns(UserWarning, match="anim.gif has 2 frames; only the first one is explained"):
        assert np.asarray(read_image(tmp_path / "anim.gif")).mean() < 30


def test_unreadable_paths_are_named(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "text.png").write_text("not an image")
    ok, failed = read_images([str(tmp_path / "folder"), str(tmp_path / "text.png"), str(tmp_path / "missing.png")])
    assert ok == []
    reasons = dict(failed)
    assert reasons[str(tmp_path / "folder")].endswith("is a directory, not an image file")
    assert "text.png is not a readable image" in reasons[str(tmp_path / "text.png")]
    assert reasons[str(tmp_path / "missing.png")] == "no such file"


def test_image_to_tensor_scales_arrays_by_their_dtype(tmp_path):
    assert image_to_tensor(np.full((2, 3), 65535, np.uint16)).tolist() == [[[1.0] * 3] * 2] * 3
    assert float(image_to_tensor(np.full((2, 2, 3), 51, np.uint8)).max()) == pytest.approx(0.2)
    assert image_to_tensor(np.zeros((2, 2, 4), np.uint8)).shape == (3, 2, 2)  # alpha dropped
    path = write_png16(tmp_path / "grey.png", np.full((3, 3), 32896, np.uint16))
    assert float(image_to_tensor(path).mean()) == pytest.approx(128 / 255)
    with pytest.raises(ValueError, match="dtype int64 has no defined range"):
        image_to_tensor(np.zeros((2, 2, 3), np.int64))
