"""One checkpoint format for every model multiexplain ships or trains, and the shipped models.

A checkpoint is a plain dict that ``torch.load(..., weights_only=True)`` reads (tensors, lists,
numbers and strings only, so loading one runs no code)::

    {"format": "multiexplain/1", "architecture": "scene_cnn", "config": {...constructor kwargs},
     "state_dict": {...}, "labels": [...] | None, "vocabulary": [...] | None, "meta": {...}}

Writes go to a temporary file that is renamed into place, so a crash never leaves a truncated
checkpoint under the final name.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

__all__ = [
    "CHECKPOINT_DIR", "CHECKPOINT_FORMAT", "Checkpoint", "SHIPPED", "architectures", "load_checkpoint",
    "load_shipped", "save_checkpoint", "shipped_path", "load_scene_classifier", "load_show_and_tell", "load_action_c3d",
    "load_distillation_pair",
]

CHECKPOINT_FORMAT = "multiexplain/1"
#: Where the shipped checkpoints live (package data).
CHECKPOINT_DIR = Path(__file__).resolve().parent.parent / "checkpoints"


def architectures() -> dict[str, Callable[..., nn.Module]]:
    """Architecture names a checkpoint may carry -> the class built from its ``config``."""
    from .conv3d import C3D
    from .mobilenet import MobileNetV2
    from .scene_cnn import SceneCNN
    from .show_attend_tell import ShowAttendTell
    from .wrn import WideResNet

    return {"scene_cnn": SceneCNN, "show_attend_tell": ShowAttendTell, "c3d": C3D, "wide_resnet": WideResNet,
            "mobilenet_v2": MobileNetV2}


#: The shipped models: name -> (file in CHECKPOINT_DIR, task, the script that makes it).
SHIPPED: Mapping[str, tuple[str, str, str]] = {
    "scene-classifier": ("scene_cnn.pt", "classification", "scripts/train_scene_classifier.py"),
    "show-and-tell": ("show_and_tell.pt", "captioning", "scripts/train_show_and_tell.py"),
    "action-c3d": ("action_c3d.pt", "video", "scripts/train_action_c3d.py"),
    "distill-teacher": ("distill_teacher.pt", "distillation", "scripts/train_distillation_pair.py"),
    "distill-student": ("distill_student.pt", "distillation", "scripts/train_distillation_pair.py"),
}


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode) and what came with it."""

    model: nn.Module
    architecture: str
    labels: list[str] | None = None
    vocabulary: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)


def _architecture_of(model: nn.Module) -> str:
    for name, cls in architectures().items():
        if type(model) is cls:
            return name
    raise TypeError(f"{type(model).__name__} has no checkpoint architecture name; known: {sorted(architectures())}")


def save_checkpoint(
    path: str | os.PathLike,
    model: nn.Module,
    *,
    labels: list[str] | None = None,
    vocabulary: list[str] | None = None,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model`` (one of :func:`architectures`, rebuilt from its ``config``) atomically."""
    path = Path(path)
    payload = {
        "format": CHECKPOINT_FORMAT,
        "architecture": _architecture_of(model),
        "config": dict(model.config),
        "state_dict": {key: value.detach().cpu() for key, value in model.state_dict().items()},
        "labels": list(labels) if labels is not None else getattr(model, "labels", None),
        "vocabulary": list(vocabulary) if vocabulary is not None else None,
        "meta": dict(meta or {}),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)
    return path


class CheckpointCodeError(ValueError):
    """A file that only loads by running code (pickled objects other than tensors and plain containers)."""


class CheckpointReadError(ValueError):
    """A file ``torch.load`` cannot read at all (truncated, empty, not written by ``torch.save``)."""


def read_weights_only(path: str | os.PathLike) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: the one way multiexplain reads a torch file.

    Raises :class:`CheckpointCodeError` when the file holds objects that would run code when loaded
    (its message: the first offending global), :class:`CheckpointReadError` when it cannot be read
    (its message: the error's first line). Callers turn these into advice for their own file kind.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - truncated, empty, not a torch file, or unsafe
        message = str(error)
        if "Weights only load failed" in message or "weights_only" in message:
            detail = next((line.strip() for line in message.splitlines() if "GLOBAL" in line or "Unsupported" in line), "")
            raise CheckpointCodeError(detail[:200] or "not allowed with weights_only=True") from None
        first = message.splitlines()[0][:200] if message else "no details"
        raise CheckpointReadError(f"{type(error).__name__}: {first}") from None


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``: no code runs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = read_weights_only(path)
    except CheckpointCodeError:
        raise ValueError(
            f"{path} is not a multiexplain checkpoint: it holds pickled Python objects (a whole model or a training "
            "state?) that only load by running code, which multiexplain never does (weights_only=True); write "
            "checkpoints with multiexplain.models.save_checkpoint or `multiexplain distill`"
        ) from None
    except CheckpointReadError as error:
        raise ValueError(f"{path} is not a readable multiexplain checkpoint ({error}); "
                         "is it truncated, or not written by torch.save?") from None
    if not isinstance(payload, Mapping) or payload.get("format") != CHECKPOINT_FORMAT:
        found = payload.get("format") if isinstance(payload, Mapping) else type(payload).__name__
        raise ValueError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint (format {found!r}); "
                         "write one with multiexplain.models.save_checkpoint")
    architecture = payload.get("architecture")
    classes = architectures()
    if architecture not in classes:
        raise ValueError(f"{path} holds an unknown architecture {architecture!r}; known: {sorted(classes)}")
    model = classes[architecture](**payload["config"])
    model.load_state_dict(payload["state_dict"], strict=True)
    labels = payload.get("labels")
    if labels is not None and hasattr(model, "labels"):
        model.labels = list(labels)
    model.meta = dict(payload.get("meta") or {})
    return Checkpoint(model.to(device).eval(), architecture, labels, payload.get("vocabulary"), dict(payload.get("meta") or {}))


def shipped_path(name: str) -> Path:
    """The file of a shipped model (see :data:`SHIPPED`); a missing file names the script that makes it."""
    if name not in SHIPPED:
        raise KeyError(f"no shipped model {name!r}; shipped: {', '.join(SHIPPED)}")
    filename, _task, script = SHIPPED[name]
    path = CHECKPOINT_DIR / filename
    if not path.is_file():
        raise FileNotFoundError(f"shipped checkpoint {path} is missing; run {script} to create it")
    return path


def load_shipped(name: str, device: str | torch.device = "cpu") -> Checkpoint:
    """A shipped model by name (``"scene-classifier"``, ``"show-and-tell"``, ``"action-c3d"``,
    ``"distill-teacher"``, ``"distill-student"``), in eval mode."""
    return load_checkpoint(shipped_path(name), device)


def load_scene_classifier(device: str | torch.device = "cpu") -> nn.Module:
    """The shipped :class:`~multiexplain.models.SceneCNN`: ``(N, 3, 64, 64)`` in ``[0, 1]`` -> 6 logits."""
    return load_shipped("scene-classifier", device).model


def load_show_and_tell(device: str | torch.device = "cpu") -> tuple[nn.Module, Any]:
    """The shipped Show-Attend-Tell captioner and its :class:`~multiexplain.models.CaptionVocabulary`."""
    from .show_attend_tell import CaptionVocabulary

    loaded = load_shipped("show-and-tell", device)
    return loaded.model, CaptionVocabulary(loaded.vocabulary or [])


def load_action_c3d(device: str | torch.device = "cpu") -> tuple[nn.Module, list[str]]:
    """The shipped small C3D (16 x 64 x 64 clips in ``[0, 1]``, 8 actions) and its class names."""
    loaded = load_shipped("action-c3d", device)
    return loaded.model, list(loaded.labels or [])


def load_distillation_pair(device: str | torch.device = "cpu") -> tuple[nn.Module, nn.Module]:
    """The shipped ``(teacher, student)``: WRN-16-2 and WRN-10-1 trained (CE only) on the distillation set."""
    return load_shipped("distill-teacher", device).model, load_shipped("distill-student", device).model
