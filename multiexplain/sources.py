"""What a data-set run explains and what it is checked against: item lists and ground truth.

* Items: an image folder (flat, or the ImageFolder layout ``root/<class>/<image>``), a list file
  (``path [label]`` per line; ``#`` comments; paths relative to the list), a folder or list of videos,
  or a COCO-captions style JSON (``images`` + ``annotations`` with ``caption``) for per-word maps.
* Ground truth: boxes from a COCO instances JSON or Pascal VOC XML files, or mask images (one per
  image, same file stem; non-zero pixels are the object). Boxes are in the original image's pixels.
* :class:`ResizeCrop`: where the pixels of a model's input came from in the original image (resize,
  then centre crop), so ground truth drawn on the original lands on the model's input grid.

Parsing here needs no image library (masks are read by :mod:`multiexplain.io`).
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "Box", "Item", "ResizeCrop", "boxes_mask", "coco_instance_boxes", "list_items", "mask_files", "voc_boxes",
]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


@dataclass(frozen=True)
class Item:
    """One thing to explain.

    Attributes:
        index: its position in the run (items are numbered 0..N-1 in a fixed, sorted order).
        path: the image or video file.
        key: a stable name for it (the path relative to the data root, or the COCO file name).
        label: the class name given by the data (ImageFolder folder, list file), else ``None``.
        captions: the captions to explain (COCO captions), else empty.
    """

    index: int
    path: str
    key: str
    label: str | None = None
    captions: tuple[str, ...] = ()


def _files(root: Path, suffixes: Sequence[str]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)


def list_items(source: str | os.PathLike, task: str, *, images: str | os.PathLike | None = None) -> list[Item]:
    """The items of ``source`` for ``task`` (``classification``, ``video`` or ``captioning``).

    ``source`` is a folder, a list file (``.txt``/``.lst``/``.csv``) or, for captioning, a COCO
    captions JSON (``images=`` the folder its file names are relative to; default the JSON's folder).
    """
    source = Path(source)
    if task == "captioning":
        return _coco_caption_items(source, Path(images) if images is not None else source.parent)
    suffixes = VIDEO_SUFFIXES if task == "video" else IMAGE_SUFFIXES
    if source.is_dir():
        files = _files(source, suffixes)
        if not files:
            raise ValueError(f"no {'/'.join(suffixes)} files under {source}")
        classes = {p.relative_to(source).parts[0] for p in files if len(p.relative_to(source).parts) > 1}
        # ImageFolder layout: every file sits in a class folder directly under the root.
        layout = bool(classes) and all(len(p.relative_to(source).parts) == 2 for p in files)
        return [Item(i, str(p), str(p.relative_to(source)), p.parent.name if layout else None) for i, p in enumerate(files)]
    if source.is_file():
        return _list_file_items(source)
    raise FileNotFoundError(f"--data {source}: no such folder or list file")


def _list_file_items(path: Path) -> list[Item]:
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = [p.strip() for p in (line.split(",") if path.suffix == ".csv" else line.split(maxsplit=1))]
        file = Path(parts[0]) if Path(parts[0]).is_absolute() else path.parent / parts[0]
        entries.append((str(file), parts[0], parts[1] if len(parts) > 1 and parts[1] else None))
    if not entries:
        raise ValueError(f"the list file {path} names no files")
    return [Item(i, file, key, label) for i, (file, key, label) in enumerate(entries)]


def _coco_caption_items(path: Path, images: Path) -> list[Item]:
    if not path.is_file():
        raise FileNotFoundError(f"--data {path}: a captioning run reads a COCO captions JSON file")
    payload = json.loads(path.read_text())
    if not isinstance(payload, dict) or "images" not in payload or "annotations" not in payload:
        raise ValueError(f"{path} is not a COCO captions file (it needs 'images' and 'annotations' lists)")
    captions: dict[Any, list[str]] = {}
    for annotation in payload["annotations"]:
        if "caption" in annotation:
            captions.setdefault(annotation["image_id"], []).append(str(annotation["caption"]).strip())
    rows = sorted(payload["images"], key=lambda image: str(image["file_name"]))
    items = []
    for image in rows:
        found = captions.get(image["id"])
        if found:
            items.append(Item(len(items), str(images / image["file_name"]), str(image["file_name"]), None, tuple(found)))
    if not items:
        raise ValueError(f"{path} pairs no image with a caption")
    return items


# -- ground truth -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Box:
    """An object's box in original-image pixels: ``x0, y0`` inclusive, ``x1, y1`` exclusive."""

    label: str
    x0: float
    y0: float
    x1: float
    y1: float


def coco_instance_boxes(path: str | os.PathLike) -> dict[str, list[Box]]:
    """``{file_name: [Box]}`` from a COCO instances JSON (``bbox`` is ``[x, y, width, height]``)."""
    payload = json.loads(Path(path).read_text())
    try:
        names = {c["id"]: str(c["name"]) for c in payload["categories"]}
        files = {image["id"]: str(image["file_name"]) for image in payload["images"]}
        boxes: dict[str, list[Box]] = {name: [] for name in files.values()}
        for annotation in payload["annotations"]:
            x, y, w, h = (float(v) for v in annotation["bbox"])
            boxes[files[annotation["image_id"]]].append(Box(names[annotation["category_id"]], x, y, x + w, y + h))
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path} is not a COCO instances file ({type(error).__name__}: {error}); it needs "
                         "'images', 'categories' and 'annotations' with 'bbox'") from None
    return boxes


def voc_boxes(folder: str | os.PathLike) -> dict[str, list[Box]]:
    """``{image file name: [Box]}`` from Pascal VOC XML annotation files in ``folder``. VOC boxes
    are 1-based and inclusive; they become 0-based, end-exclusive."""
    boxes: dict[str, list[Box]] = {}
    for path in sorted(Path(folder).glob("*.xml")):
        try:
            root = ElementTree.parse(path).getroot()
            name = root.findtext("filename") or f"{path.stem}.jpg"
            found = []
            for obj in root.iter("object"):
                box = obj.find("bndbox")
                x0, y0, x1, y1 = (float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
                found.append(Box(str(obj.findtext("name")).strip(), x0 - 1, y0 - 1, x1, y1))
        except (ElementTree.ParseError, AttributeError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is not a Pascal VOC annotation ({type(error).__name__}: {error})") from None
        boxes[name] = found
    if not boxes:
        raise ValueError(f"no Pascal VOC .xml files in {folder}")
    return boxes


def mask_files(folder: str | os.PathLike) -> dict[str, str]:
    """``{file stem: mask image path}`` of the mask images in ``folder``."""
    found = {p.stem: str(p) for p in _files(Path(folder), IMAGE_SUFFIXES)}
    if not found:
        raise ValueError(f"no mask images in {folder}")
    return found


def boxes_mask(boxes: Sequence[Box], label: str | None, size: tuple[int, int]) -> Tensor:
    """``(H, W)`` bool: the union of the boxes of ``label`` (all boxes when ``label`` is None) on an
    image of ``size = (H, W)``; a pixel belongs to a box when its centre lies inside it."""
    height, width = size
    mask = torch.zeros(height, width, dtype=torch.bool)
    for box in boxes:
        if label is not None and box.label != label:
            continue
        top, left = max(0, math.ceil(box.y0 - 0.5)), max(0, math.ceil(box.x0 - 0.5))
        bottom, right = min(height, math.ceil(box.y1 - 0.5)), min(width, math.ceil(box.x1 - 0.5))
        if bottom > top and right > left:
            mask[top:bottom, left:right] = True
    return mask


# -- where the input's pixels came from ------------------------------------------------------------

@dataclass(frozen=True)
class ResizeCrop:
    """A preprocessing's geometry: resize (the shorter side to ``shorter``, or to ``size = (h, w)``),
    then a centre crop of ``crop = (h, w)`` (``None``: no crop). :meth:`to_input` carries an
    original-size mask (or map) onto the model's input grid the way the image was carried."""

    shorter: int | None = None
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = None

    def resized(self, original: tuple[int, int]) -> tuple[int, int]:
        height, width = original
        if self.size is not None:
            return self.size
        if self.shorter is not None:
            scale = self.shorter / min(height, width)
            # torchvision's Resize(int): the shorter side becomes `shorter`, the other is truncated.
            return (self.shorter, int(width * scale)) if height <= width else (int(height * scale), self.shorter)
        return original

    def to_input(self, mask: Tensor) -> Tensor:
        """``(H, W)`` at the original size -> ``(h, w)`` on the input grid (bool stays bool)."""
        boolean = mask.dtype == torch.bool
        height, width = self.resized(tuple(mask.shape[-2:]))
        resized = F.interpolate(mask[None, None].float(), size=(height, width), mode="nearest")[0, 0]
        if self.crop is not None:
            crop_h, crop_w = self.crop
            top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
            resized = resized[top : top + crop_h, left : left + crop_w]
        return resized > 0.5 if boolean else resized
