"""Model SPECs: one string form for every model source the command line and the demo accept.

=============================================  ==============================================================
SPEC                                           what it loads
=============================================  ==============================================================
``torchvision:resnet50``                       a torchvision classifier with its default pretrained weights
``torchvision:resnet50@IMAGENET1K_V2``         ... with a named weights enum member
``torchvision:resnet50@none``                  ... randomly initialised (no download)
``timm:resnet18`` / ``timm:vit_small_patch16_224.augreg_in21k_ft_in1k``  a timm model, pretrained
                                               (default tag, or the tag after the dot)
``timm:convnext_tiny@none``                    ... randomly initialised (no download)
``hf:google/vit-base-patch16-224``             a Hugging Face image classifier from the Hub
``hf:/path/to/saved_dir``                      ... from a directory written by ``save_pretrained`` (image
                                               classifiers, captioners, VideoMAE / TimeSformer / ViViT)
``pytorchvideo:x3d_s`` / ``...@none``          a pytorchvideo hub model, pretrained (Kinetics-400) or random
``builtin:scene-classifier``                   a model shipped with multiexplain (see ``BUILTIN_MODELS``)
``weights.pt`` together with ``arch=SPEC``     a state dict loaded into the architecture ``SPEC`` builds
=============================================  ==============================================================

Downloads happen only where the source's host is reachable. Offline, a model that is not in the
local cache raises :class:`OfflineError` whose message says so and shows the local-path
alternative (a ``save_pretrained`` directory for ``hf:``, a state-dict ``.pt`` with ``--arch``
for torchvision, timm and pytorchvideo). timm's pretrained weights are found in the local
Hugging Face cache (where ``timm.create_model(name, pretrained=True)`` put them) or torch hub's
checkpoint folder first; only a missing file is downloaded.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .adapters.caption_models import SUPPORTED_FAMILIES
from .sources import ResizeCrop
from .explain.families import HF_VIDEO_TYPES, clip_frames

__all__ = [
    "BUILTIN_MODELS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "LoadedModel",
    "ModelSpec",
    "OfflineError",
    "SpecError",
    "host_reachable",
    "load_model",
    "parse_spec",
    "read_labels",
    "resolve_device",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# pytorchvideo's hub models normalise with these; torchvision's video models use other
# Kinetics statistics (multiexplain.adapters.video.KINETICS_MEAN / KINETICS_STD).
PYTORCHVIDEO_MEAN = (0.45, 0.45, 0.45)
PYTORCHVIDEO_STD = (0.225, 0.225, 0.225)

SOURCES = ("torchvision", "timm", "hf", "pytorchvideo", "builtin", "file")

# Where each source downloads from (only used to decide whether we are offline).
_HOSTS = {"torchvision": "download.pytorch.org", "timm": "huggingface.co", "hf": "huggingface.co",
          "pytorchvideo": "dl.fbaipublicfiles.com"}

# Clip geometry of pytorchvideo's Kinetics-400 hub models: (frames, side). The layer comes from
# the one resolver (multiexplain.explain.families: the last stage before the head).
_PYTORCHVIDEO_CLIPS: dict[str, tuple[int, int]] = {
    "x3d_xs": (4, 182), "x3d_s": (13, 182), "x3d_m": (16, 256), "x3d_l": (16, 356),
    "slow_r50": (8, 256), "c2d_r50": (8, 256), "i3d_r50": (8, 256), "r2plus1d_r50": (16, 256), "csn_r101": (32, 256),
    "slowfast_r50": (32, 256), "slowfast_r101": (32, 256), "mvit_base_16x4": (16, 224), "mvit_base_32x3": (32, 224),
}


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped with multiexplain: the shipped checkpoint(s) it loads (see
    :data:`multiexplain.models.SHIPPED`) and the task it serves."""

    task: str
    checkpoints: tuple[str, ...]
    description: str


# Shipped models, by task; nothing is downloaded.
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "scene-classifier": BuiltinModel("classification", ("scene-classifier",),
                                     "small CNN trained on the synthetic multi-instance shape scenes"),
    "show-and-tell": BuiltinModel("captioning", ("show-and-tell",),
                                  "CNN encoder + LSTM decoder trained on the synthetic captioned scenes"),
    "action-c3d": BuiltinModel("video", ("action-c3d",), "small C3D-style 3D-conv net trained on the synthetic action clips"),
    "distill-pair": BuiltinModel("distillation", ("distill-teacher", "distill-student"),
                                 "teacher and explanation-distilled student (the student in extra['student'])"),
}


class SpecError(ValueError):
    """A model SPEC that cannot be parsed or does not name a known model."""


class OfflineError(RuntimeError):
    """A model needs a download but its host cannot be reached."""


@dataclass(frozen=True)
class ModelSpec:
    """A parsed SPEC: ``source`` is one of ``torchvision``, ``timm``, ``hf``, ``pytorchvideo``,
    ``builtin``, ``file``; ``weights`` is the part after ``@`` (``None`` means the default
    pretrained weights)."""

    source: str
    name: str
    weights: str | None = None

    def __str__(self) -> str:
        if self.source == "file":
            return self.name
        return f"{self.source}:{self.name}" + (f"@{self.weights}" if self.weights else "")


@dataclass
class LoadedModel:
    """A model plus what is needed to feed and explain it.

    Attributes:
        model: the module, in eval mode, on the requested device.
        spec: the parsed SPEC it came from.
        task: ``classification``, ``captioning``, ``video`` or ``distillation`` (``None`` if unknown).
        preprocess: PIL image -> normalised ``(3, H, W)`` float tensor (images only).
        labels: class names, index-aligned with the logits, when known.
        layer: the layer to explain: ``"auto"``, which the one resolver turns into the same layer
            for every entry point (:func:`multiexplain.resolve_layer`).
        reshape: a channels-first rule when the SPEC knows one the resolver does not, else ``None``.
        mean, std: the input normalisation (to undo it for display).
        geometry: where ``preprocess`` takes the input's pixels from (resize, centre crop), so ground
            truth drawn on the original image can be carried onto the input grid; ``None`` if unknown.
        extra: source-specific details (clip frames/size for video models, the HF processor, ...).
    """

    model: nn.Module
    spec: ModelSpec
    task: str | None = None
    preprocess: Callable[[Any], Tensor] | None = None
    labels: list[str] | None = None
    layer: str = "auto"
    reshape: Callable[[Tensor], Tensor] | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    extra: dict[str, Any] = field(default_factory=dict)
    geometry: ResizeCrop | None = None

    @property
    def device(self) -> torch.device:
        parameter = next(self.model.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    def video_geometry(self, frames: int | None = None) -> tuple[int, int, tuple[tuple[float, ...], tuple[float, ...]] | None]:
        """``(frames per clip, frame side, (mean, std) or None)`` a video model takes.

        Zoo video models (torchvision, pytorchvideo, Hugging Face) take clips at the zoo's frames and
        size, normalised with their weights' statistics; the shipped C3D takes 16 x 64 x 64 clips in
        ``[0, 1]`` (it normalises inside). ``frames`` overrides the clip length.
        """
        if "frames" in self.extra:
            clip_frames, side = int(self.extra.get("frames", 16)), int(self.extra.get("size", 224))
            return frames or clip_frames, side, (self.mean, self.std)
        clip_size = list(getattr(self.model, "config", {}).get("clip_size", (16, 112, 112)))
        return frames or int(clip_size[0]), int(clip_size[1]), None


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but no CUDA GPU is available; use --device cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}: choose cpu, cuda or auto")
    return torch.device(name)


def host_reachable(host: str, port: int = 443, timeout: float = 1.5) -> bool:
    """Whether a TCP connection to ``host:port`` opens within ``timeout`` seconds.
    ``MULTIEXPLAIN_OFFLINE=1`` forces ``False`` (used by the tests and for air-gapped runs)."""
    if os.environ.get("MULTIEXPLAIN_OFFLINE", "") not in ("", "0"):
        return False
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def parse_spec(spec: str) -> ModelSpec:
    """Parse a SPEC string (see the module docstring). A string ending in ``.pt``/``.pth`` or
    naming an existing file is a ``file`` spec."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty model SPEC; use e.g. torchvision:resnet50, timm:resnet18, hf:DIR, pytorchvideo:x3d_s, "
                        "builtin:NAME or a .pt path")
    spec = spec.strip()
    source, sep, rest = spec.partition(":")
    if sep and source in ("torchvision", "timm", "hf", "pytorchvideo", "builtin"):
        if not rest:
            raise SpecError(f"model SPEC {spec!r} names no model after {source!r}")
        name, weights = rest, None
        if source != "hf" and "@" in rest:  # HF names and paths may legitimately contain '@'
            name, _, weights = rest.partition("@")
            if not weights:
                raise SpecError(f"model SPEC {spec!r} has an empty weights name after '@'")
        return ModelSpec(source, name, weights)
    if spec.endswith((".pt", ".pth")) or Path(spec).is_file():
        return ModelSpec("file", spec)
    raise SpecError(
        f"cannot parse model SPEC {spec!r}: expected torchvision:NAME[@WEIGHTS|@none], timm:NAME[@none], hf:NAME-or-DIR, "
        "pytorchvideo:NAME[@none], builtin:NAME or a .pt/.pth state dict with --arch SPEC"
    )


def load_model(
    spec: str | ModelSpec,
    *,
    arch: str | None = None,
    task: str | None = None,
    device: str | torch.device = "cpu",
) -> LoadedModel:
    """Load the model a SPEC names, in eval mode, on ``device``.

    Args:
        spec: a SPEC string (see the module docstring) or a parsed :class:`ModelSpec`.
        arch: for a ``.pt`` state dict, the SPEC of the architecture to load it into
            (``torchvision:resnet18@none``, ``timm:convnext_tiny``, ``builtin:scene-classifier``, ``hf:DIR``, ...).
        task: the task the caller wants (checked against builtin models; picks the HF auto class).
        device: ``cpu``, ``cuda``, ``auto`` or a torch device.

    Raises:
        SpecError: unknown source, model name, weights name, or a builtin for another task.
        OfflineError: the weights must be downloaded and the host cannot be reached.
        FileNotFoundError: a ``.pt`` file or HF directory that does not exist.
    """
    parsed = parse_spec(spec) if isinstance(spec, str) else spec
    target = resolve_device(device)
    if parsed.source == "torchvision":
        loaded = _load_torchvision(parsed)
    elif parsed.source == "timm":
        loaded = _load_timm(parsed)
    elif parsed.source == "hf":
        loaded = _load_hf(parsed, task)
    elif parsed.source == "pytorchvideo":
        loaded = _load_pytorchvideo(parsed)
    elif parsed.source == "builtin":
        loaded = _load_builtin(parsed, task)
    else:
        loaded = _load_file(parsed, arch, task)
    if task is not None and loaded.task is not None and loaded.task != task:
        raise SpecError(f"model {parsed} is a {loaded.task} model, not a {task} model")
    loaded.model.eval().to(target)
    for other in loaded.extra.values():  # e.g. the student of a distillation pair
        if isinstance(other, nn.Module):
            other.eval().to(target)
    return loaded


# -- torchvision --------------------------------------------------------------------------------
def _offline_message(parsed: ModelSpec, what: str, alternative: str) -> str:
    return (
        f"{parsed} needs {what} from {_HOSTS[parsed.source]}, which cannot be reached (offline?). "
        f"Local alternative: {alternative}"
    )


def _torchvision_weights(parsed: ModelSpec):
    import torchvision

    try:
        enum = torchvision.models.get_model_weights(parsed.name)
    except ValueError:
        available = ", ".join(sorted(torchvision.models.list_models())[:12])
        raise SpecError(f"torchvision has no model named {parsed.name!r} (e.g. {available}, ...)") from None
    if parsed.weights is None or parsed.weights.lower() == "default":
        return enum, enum.DEFAULT
    if parsed.weights.lower() == "none":
        return enum, None
    try:
        return enum, enum[parsed.weights]
    except KeyError:
        members = ", ".join(m.name for m in enum)
        raise SpecError(f"{parsed.name} has no weights {parsed.weights!r}; choose one of: {members}, none") from None


def _cached(url: str) -> bool:
    return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)).is_file()


def _load_torchvision(parsed: ModelSpec, num_classes: int | None = None) -> LoadedModel:
    import torchvision

    enum, weights = _torchvision_weights(parsed)
    if weights is not None and not _cached(weights.url) and not host_reachable(_HOSTS["torchvision"]):
        raise OfflineError(_offline_message(
            parsed, f"the pretrained weights {os.path.basename(weights.url)}",
            f"on a machine with internet run torch.save(torchvision.models.{parsed.name}(weights='DEFAULT')"
            f".state_dict(), '{parsed.name}.pt'), copy the file here and pass "
            f"--model {parsed.name}.pt --arch torchvision:{parsed.name}@none (or put the file in "
            f"{Path(torch.hub.get_dir()) / 'checkpoints'}); torchvision:{parsed.name}@none gives random weights",
        ))
    extra_kwargs = {"num_classes": num_classes} if num_classes is not None else {}
    model = torchvision.models.get_model(parsed.name, weights=weights, **extra_kwargs)
    # The preprocessing of the weights family applies to random weights too (same input convention).
    reference = weights if weights is not None else enum.DEFAULT
    labels = list(reference.meta.get("categories") or []) or None
    if labels is not None and num_classes is not None and num_classes != len(labels):
        labels = None  # a head of another size: the weights' class names do not apply
    transforms = reference.transforms()
    if parsed.name in torchvision.models.list_models(module=torchvision.models.video):
        # A video builder: clips of 16 frames (the weights' recipe; MViT takes exactly its own
        # count) at the transforms' crop size.
        frames = clip_frames(model) or max(16, int(reference.meta.get("min_temporal_size") or 1))
        return LoadedModel(model, parsed, "video", labels=labels, mean=tuple(transforms.mean), std=tuple(transforms.std),
                           extra={"frames": frames, "size": int(transforms.crop_size[0])})
    return LoadedModel(model, parsed, "classification", preprocess=transforms, labels=labels,
                       geometry=_torchvision_geometry(transforms))


def _torchvision_geometry(transforms: Any) -> ResizeCrop | None:
    """The geometry of torchvision's ``ImageClassification`` preset: resize (one int: the shorter
    side), then a centre crop."""
    resize, crop = getattr(transforms, "resize_size", None), getattr(transforms, "crop_size", None)
    if resize is None or crop is None:
        return None
    crop_hw = (int(crop[0]), int(crop[-1]))
    if len(resize) == 1:
        return ResizeCrop(shorter=int(resize[0]), crop=crop_hw)
    return ResizeCrop(size=(int(resize[0]), int(resize[1])), crop=crop_hw)


def _hf_geometry(processor: Any, size: int) -> ResizeCrop | None:
    """The geometry of a Hugging Face image processor: a fixed ``{height, width}`` resize, or the
    shortest edge then a centre crop; ``None`` for others (e.g. ConvNeXt's ``crop_pct`` rule)."""
    if processor is None:
        return ResizeCrop(size=(size, size))  # plain_preprocess
    target = getattr(processor, "size", None) or {}
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    crop_hw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) and "height" in crop else None
    if not getattr(processor, "do_resize", True):
        return ResizeCrop(crop=crop_hw) if crop_hw or not crop else None
    if "height" in target and "width" in target:
        return ResizeCrop(size=(int(target["height"]), int(target["width"])), crop=crop_hw)
    if "shortest_edge" in target and "crop_pct" not in getattr(processor, "to_dict", dict)():
        return ResizeCrop(shorter=int(target["shortest_edge"]), crop=crop_hw)
    return None


# -- timm ---------------------------------------------------------------------------------------
def _import_timm():
    try:
        import timm
        import timm.data
    except ImportError:
        raise SpecError("timm: models need the timm package: pip install timm (or multiexplain[timm])") from None
    return timm


def _timm_name(timm: Any, name: str) -> None:
    if not timm.is_model(name):
        import difflib

        close = difflib.get_close_matches(name.partition(".")[0], timm.list_models(), n=4)
        raise SpecError(f"timm has no model named {name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))


def _timm_cached_weights(config: Any) -> Path | None:
    """The pretrained weights file already on this machine: the Hugging Face cache (timm's default
    source) or torch hub's checkpoint folder (timm's older URL source), else ``None``."""
    hub_id = getattr(config, "hf_hub_id", None)
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in (getattr(config, "hf_hub_filename", None), "model.safetensors", "pytorch_model.bin"):
            if filename:
                found = try_to_load_from_cache(hub_id, filename)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
    url = getattr(config, "url", None)
    if url and _cached(url):
        return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)
    return None


def _read_weights(path: Path) -> Mapping[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from .models.checkpoints import CheckpointCodeError, CheckpointReadError, read_weights_only

    try:
        state = _state_dict(read_weights_only(path))
    except CheckpointCodeError as error:
        raise SpecError(f"{path} holds pickled objects that only load by running code ({error}), which multiexplain "
                        "never does; save the weights with torch.save(model.state_dict(), path)") from None
    except CheckpointReadError as error:
        raise SpecError(f"{path} is not a readable weights file ({error})") from None
    if state is None:
        raise SpecError(f"{path} holds no state dict")
    return state


def _timm_classes(timm: Any, name: str, state: Mapping[str, Tensor]) -> int | None:
    """The class count of a state dict's classifier (``pretrained_cfg['classifier']``), when it has one."""
    classifier = timm.models.get_pretrained_cfg(name)
    keys = getattr(classifier, "classifier", None) if classifier is not None else None
    for key in [keys] if isinstance(keys, str) else list(keys or ()):
        weight = state.get(f"{key}.weight")
        if isinstance(weight, Tensor) and weight.ndim >= 2:
            return int(weight.shape[0])
    return None


def _load_timm(parsed: ModelSpec, state: Mapping[str, Tensor] | None = None) -> LoadedModel:
    """A timm classifier: pretrained from the local cache (downloaded only when missing and the
    hub is reachable), random with ``@none``, or built for ``state`` (a ``.pt`` with ``--arch``)."""
    timm = _import_timm()
    _timm_name(timm, parsed.name)
    if parsed.weights not in (None, "none", "default"):
        raise SpecError(f"timm:{parsed.name} takes @none (random) or no suffix; timm names a weights variant "
                        f"after a dot in the model name (e.g. timm:resnet18.a1_in1k), not @{parsed.weights}")
    kwargs: dict[str, Any] = {}
    if state is not None:
        classes = _timm_classes(timm, parsed.name, state)
        kwargs = {"num_classes": classes} if classes is not None else {}
        model = timm.create_model(parsed.name, pretrained=False, **kwargs)
    elif parsed.weights == "none":
        model = timm.create_model(parsed.name, pretrained=False)
    else:
        config = timm.models.get_pretrained_cfg(parsed.name)
        if config is None or not (getattr(config, "hf_hub_id", None) or getattr(config, "url", None)):
            raise SpecError(f"timm:{parsed.name} has no pretrained weights; use timm:{parsed.name}@none")
        cached = _timm_cached_weights(config)
        if cached is not None:  # timm applies its own key remapping and head handling to the dict
            model = timm.create_model(parsed.name, pretrained=True, pretrained_cfg_overlay={"state_dict": dict(_read_weights(cached))})
        elif host_reachable(_HOSTS["timm"]):
            model = timm.create_model(parsed.name, pretrained=True)
        else:
            raise OfflineError(_offline_message(
                parsed, "its pretrained weights",
                f"on a machine with internet run timm.create_model('{parsed.name}', pretrained=True) (it fills the "
                f"Hugging Face cache; copy ~/.cache/huggingface/hub here), or torch.save(timm.create_model('{parsed.name}', "
                f"pretrained=True).state_dict(), '{parsed.name}.pt') and pass --model {parsed.name}.pt "
                f"--arch timm:{parsed.name}@none; timm:{parsed.name}@none gives random weights",
            ))
    data = timm.data.resolve_model_data_config(model)
    transform = timm.data.create_transform(**data)
    subset = timm.data.infer_imagenet_subset(model)
    # "tench, Tinca tinca" -> "tench", as torchvision names the ImageNet classes.
    labels = [d.split(",")[0].strip() for d in timm.data.ImageNetInfo(subset).label_descriptions()] if subset else None
    if labels is not None and len(labels) != getattr(model, "num_classes", len(labels)):
        labels = None
    return LoadedModel(model, parsed, "classification", preprocess=lambda image: transform(image.convert("RGB")),
                       labels=labels, mean=tuple(data["mean"]), std=tuple(data["std"]))


# -- Hugging Face -------------------------------------------------------------------------------
def _load_hf(parsed: ModelSpec, task: str | None) -> LoadedModel:
    import transformers

    name = parsed.name
    local = Path(name).expanduser()
    is_dir = local.is_dir()
    if not is_dir and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise FileNotFoundError(f"hf:{name}: no such directory (a local model is a directory written by save_pretrained)")
    if task not in (None, "classification", "captioning", "video"):
        raise SpecError(f"hf: models are supported for classification, captioning and video; for {task} use "
                        "builtin: or a .pt file with --arch")
    offline = not is_dir and not host_reachable(_HOSTS["hf"])
    source = str(local) if is_dir else name
    if task == "captioning":
        return _load_hf_captioner(parsed, source, offline or is_dir, offline)
    if task == "video" or (task is None and _hf_model_type(source, offline or is_dir) in HF_VIDEO_TYPES):
        return _load_hf_video(parsed, source, offline or is_dir, offline)
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(source, local_files_only=offline or is_dir)
    except ValueError as error:  # a config AutoModelForImageClassification has no class for
        raise SpecError(_not_a_classifier(parsed, source, offline or is_dir, error)) from None
    except OSError as error:
        if offline:
            raise OfflineError(_offline_message(
                parsed, "the model files",
                f"on a machine with internet run AutoModelForImageClassification.from_pretrained('{name}')"
                f".save_pretrained('DIR') (and the same for AutoImageProcessor), copy DIR here and pass --model hf:DIR",
            )) from None
        raise SpecError(f"cannot load hf:{name}: {error}") from None
    processor = None
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source, local_files_only=offline or is_dir)
    except (OSError, ValueError):
        processor = None
    config = model.config
    mean = tuple(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5))
    std = tuple(getattr(processor, "image_std", None) or (0.5, 0.5, 0.5))
    size = int(getattr(config, "image_size", 224) or 224)
    preprocess = _hf_preprocess(processor, size, mean, std)
    labels = _hf_labels(config)
    return LoadedModel(model, parsed, "classification", preprocess=preprocess, labels=labels, mean=mean, std=std,
                       extra={"processor": processor}, geometry=_hf_geometry(processor, size))


def _not_a_classifier(parsed: ModelSpec, source: str, local_only: bool, error: Exception) -> str:
    """The message for an ``hf:`` model that is no image classifier (a captioner, a text model, ...)."""
    import transformers

    try:
        model_type = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only).model_type
    except (OSError, ValueError):
        return f"cannot load {parsed} as an image classifier: {str(error).splitlines()[0][:200]}"
    if model_type in HF_CAPTIONERS:
        return (f"{parsed} is a {model_type!r} captioner, not an image classifier; explain its captions with "
                f"`multiexplain caption IMAGE --model {parsed}`")
    return (f"{parsed} is a {model_type!r} model, which transformers' AutoModelForImageClassification cannot load "
            "as an image classifier; classify takes image-classification models (ViT, ConvNeXt, ResNet, Swin, ...)")


def _hf_model_type(source: str, local_only: bool) -> str | None:
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(source, local_files_only=local_only).model_type
    except (OSError, ValueError):
        return None


def _hf_labels(config: Any) -> list[str] | None:
    id2label = getattr(config, "id2label", None)
    if id2label and not all(str(v).startswith("LABEL_") for v in id2label.values()):
        return [str(id2label[i]) for i in sorted(id2label)]
    return None


def _load_hf_video(parsed: ModelSpec, source: str, local_only: bool, offline: bool) -> LoadedModel:
    """A Hugging Face video classifier (VideoMAE, TimeSformer, ViViT: ``pixel_values`` frames first,
    ``(N, T, C, H, W)``) with its processor's normalisation; clips of ``config.num_frames`` frames
    at ``config.image_size`` (the sizes its position embeddings were made for)."""
    import transformers

    try:
        model = transformers.AutoModelForVideoClassification.from_pretrained(source, local_files_only=local_only)
    except OSError as error:
        if offline:
            raise OfflineError(_offline_message(
                parsed, "the model files",
                f"on a machine with internet run AutoModelForVideoClassification.from_pretrained('{parsed.name}')"
                f".save_pretrained('DIR') (and the same for AutoVideoProcessor), copy DIR here and pass --model hf:DIR",
            )) from None
        raise SpecError(f"cannot load hf:{parsed.name}: {error}") from None
    except ValueError as error:  # not a video classifier
        raise SpecError(f"hf:{parsed.name} is not a video classifier this library knows ({error})"[:400]) from None
    processor = None
    for factory in (getattr(transformers, "AutoVideoProcessor", None), transformers.AutoImageProcessor):
        if factory is None or processor is not None:
            continue
        try:
            processor = factory.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError, KeyError, TypeError):
            processor = None
    config = model.config
    mean = tuple(getattr(processor, "image_mean", None) or (0.5, 0.5, 0.5))
    std = tuple(getattr(processor, "image_std", None) or (0.5, 0.5, 0.5))
    size = config.image_size if isinstance(config.image_size, int) else int(config.image_size[0])
    extra = {"frames": clip_frames(model) or int(config.num_frames), "size": int(size), "processor": processor}
    return LoadedModel(model, parsed, "video", labels=_hf_labels(config), mean=mean, std=std, extra=extra)


def read_labels(path: str | os.PathLike) -> list[str]:
    """Class names from a file: one name per line, or a JSON list (or an ``{index: name}`` object,
    as Hugging Face's ``id2label``)."""
    import json

    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"labels file {os.fspath(path)!r} does not exist")
    text = file.read_text(encoding="utf-8")
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} looks like JSON but is not valid JSON: {error}") from None
        if isinstance(data, dict):
            try:
                keyed = {int(key): value for key, value in data.items()}
            except ValueError:
                raise ValueError(f"{path}: a JSON object of labels needs integer keys (an id2label mapping)") from None
            if sorted(keyed) != list(range(len(keyed))):
                raise ValueError(f"{path}: an id2label mapping needs every index from 0 to {len(keyed) - 1}")
            data = [keyed[i] for i in range(len(keyed))]
        if not isinstance(data, list) or not all(isinstance(v, str) for v in data):
            raise ValueError(f"{path}: expected a JSON list of class names")
        labels = [str(v) for v in data]
    else:
        labels = [line.strip() for line in text.splitlines()]
        while labels and not labels[-1]:
            labels.pop()
    if not labels:
        raise ValueError(f"labels file {path} holds no class names")
    return labels


#: Captioning families the captioning adapter explains (by ``config.model_type``: the adapter's own
#: list, so the two cannot drift); BLIP and VisionEncoderDecoder have their own classes, the others
#: load through AutoModelForImageTextToText.
HF_CAPTIONERS = SUPPORTED_FAMILIES


def _load_hf_captioner(parsed: ModelSpec, source: str, local_only: bool, offline: bool) -> LoadedModel:
    """A Hugging Face captioner or vision-language model (:data:`HF_CAPTIONERS`), with its
    processor (image processor + tokenizer) when the directory / Hub repo has one."""
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(source, local_files_only=local_only)
        if config.model_type not in HF_CAPTIONERS:
            raise SpecError(f"hf:{parsed.name} is a {config.model_type!r} model; captioning supports {', '.join(HF_CAPTIONERS)}")
        if config.model_type == "blip":
            factory: Any = transformers.BlipForConditionalGeneration
        elif config.model_type == "vision-encoder-decoder":
            factory = transformers.VisionEncoderDecoderModel
        else:
            factory = transformers.AutoModelForImageTextToText
        model = factory.from_pretrained(source, local_files_only=local_only)
    except OSError as error:
        if offline:
            raise OfflineError(_offline_message(
                parsed, "the model files",
                f"on a machine with internet save the model and its processor with save_pretrained('DIR') "
                f"(e.g. AutoModelForImageTextToText.from_pretrained('{parsed.name}') and AutoProcessor), "
                "copy DIR here and pass --model hf:DIR",
            )) from None
        raise SpecError(f"cannot load hf:{parsed.name}: {error}") from None
    return LoadedModel(model, parsed, "captioning", extra=_hf_caption_processor(source, local_only))


def _hf_caption_processor(source: str, local_only: bool) -> dict[str, Any]:
    """``{"processor": ..., "tokenizer": ...}`` of a captioner's directory / Hub repo (what exists)."""
    import transformers

    def attempt(factory: Any) -> Any:
        try:
            return factory.from_pretrained(source, local_files_only=local_only)
        except (OSError, ValueError, KeyError, TypeError, ImportError):
            return None

    # AutoProcessor returns a combined processor when there is one, but falls back to the bare
    # tokenizer when a directory has a tokenizer and an image processor saved separately (VED).
    processor = attempt(transformers.AutoProcessor)
    if processor is not None and not hasattr(processor, "image_processor") and not hasattr(processor, "image_mean"):
        processor = None
    processor = processor or attempt(transformers.AutoImageProcessor)
    tokenizer = getattr(processor, "tokenizer", None) or attempt(transformers.AutoTokenizer)
    return {key: value for key, value in (("processor", processor), ("tokenizer", tokenizer)) if value is not None}


def _hf_preprocess(processor: Any, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable[[Any], Tensor]:
    def preprocess(image: Any) -> Tensor:
        if processor is not None:
            return processor(images=image.convert("RGB"), return_tensors="pt")["pixel_values"][0]
        return plain_preprocess(image, size, mean, std)

    return preprocess


def plain_preprocess(image: Any, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """PIL image -> ``(3, size, size)`` normalised float tensor (bilinear resize, no crop)."""
    import numpy as np

    rgb = image.convert("RGB").resize((size, size))
    tensor = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (tensor - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


# -- pytorchvideo -------------------------------------------------------------------------------
def _load_pytorchvideo(parsed: ModelSpec) -> LoadedModel:
    import pytorchvideo.models.hub as hub

    factory = getattr(hub, parsed.name, None)
    if factory is None or not callable(factory) or parsed.name.startswith("_"):
        known = ", ".join(sorted(_PYTORCHVIDEO_CLIPS))
        raise SpecError(f"pytorchvideo has no hub model {parsed.name!r} (e.g. {known})")
    if parsed.weights not in (None, "none", "default"):
        raise SpecError(f"pytorchvideo:{parsed.name} takes @none (random) or no weights suffix, not @{parsed.weights}")
    pretrained = parsed.weights in (None, "default")
    if pretrained and not host_reachable(_HOSTS["pytorchvideo"]):
        # torch.hub caches by file name; a cached checkpoint loads without the network.
        cached = list((Path(torch.hub.get_dir()) / "checkpoints").glob(f"*{parsed.name.upper()}*")) + \
            list((Path(torch.hub.get_dir()) / "checkpoints").glob(f"*{parsed.name}*"))
        if not cached:
            raise OfflineError(_offline_message(
                parsed, "its Kinetics-400 weights",
                f"on a machine with internet run torch.save(pytorchvideo.models.hub.{parsed.name}(pretrained=True)"
                f".state_dict(), '{parsed.name}.pt'), copy the file here and pass "
                f"--model {parsed.name}.pt --arch pytorchvideo:{parsed.name}@none",
            ))
    model = factory(pretrained=pretrained)
    frames, side = _PYTORCHVIDEO_CLIPS.get(parsed.name, (8, 224))
    frames = clip_frames(model) or frames
    return LoadedModel(model, parsed, "video", mean=PYTORCHVIDEO_MEAN, std=PYTORCHVIDEO_STD,
                       extra={"frames": frames, "size": side})


# -- builtin ------------------------------------------------------------------------------------
def _load_builtin(parsed: ModelSpec, task: str | None) -> LoadedModel:
    from .models import CaptionVocabulary, load_shipped

    entry = BUILTIN_MODELS.get(parsed.name)
    if entry is None:
        listing = ", ".join(f"{n} ({b.task})" for n, b in BUILTIN_MODELS.items())
        raise SpecError(f"no builtin model {parsed.name!r}; shipped models: {listing}")
    if task is not None and entry.task != task:
        matching = [n for n, b in BUILTIN_MODELS.items() if b.task == task]
        raise SpecError(f"builtin:{parsed.name} is a {entry.task} model; for {task} use builtin:{matching[0] if matching else '?'}")
    loaded = [load_shipped(name) for name in entry.checkpoints]
    extra: dict[str, Any] = {}
    if len(loaded) > 1:
        extra["student"] = loaded[1].model
    if loaded[0].vocabulary is not None:
        extra["tokenizer"] = CaptionVocabulary(loaded[0].vocabulary)
    # The shipped models take inputs in [0, 1] and normalise inside (or not at all).
    return LoadedModel(loaded[0].model, parsed, entry.task, labels=loaded[0].labels, mean=(0.0, 0.0, 0.0),
                       std=(1.0, 1.0, 1.0), extra=extra)


# -- state-dict files -----------------------------------------------------------------------------
def _state_dict(payload: Any) -> Mapping[str, Tensor] | None:
    if isinstance(payload, Mapping):
        if payload and all(isinstance(v, Tensor) for v in payload.values()):
            return payload
        for key in ("state_dict", "model_state_dict", "model"):
            inner = payload.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return inner
    return None


def _head_rows(state: Mapping[str, Tensor]) -> int | None:
    """Rows of the last 2-D weight in a state dict: the class count of torchvision-style heads."""
    matrices = [v for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def _load_file(parsed: ModelSpec, arch: str | None, task: str | None) -> LoadedModel:
    path = Path(parsed.name).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model file {parsed.name!r} does not exist")
    if arch is None:
        raise SpecError(
            f"{parsed.name} is a weights file: also give the architecture it belongs to with --arch SPEC "
            "(e.g. --arch torchvision:resnet50@none, --arch timm:resnet18@none, --arch pytorchvideo:x3d_s@none, "
            "--arch builtin:scene-classifier)"
        )
    arch_spec = parse_spec(arch)
    if arch_spec.source == "file":
        raise SpecError("--arch must be a model SPEC (torchvision:, timm:, hf:, pytorchvideo:, builtin:), not another file")
    if arch_spec.source in ("torchvision", "timm", "pytorchvideo") and arch_spec.weights is None:
        arch_spec = ModelSpec(arch_spec.source, arch_spec.name, "none")  # the file supplies the weights
    from .models.checkpoints import CheckpointCodeError, CheckpointReadError, read_weights_only

    try:
        payload = read_weights_only(path)
    except CheckpointCodeError:
        raise SpecError(
            f"{parsed.name} is not a plain state dict: it holds pickled Python objects (a whole model saved with "
            "torch.save(model)?) that only load by running code, which multiexplain never does; save the weights "
            "with torch.save(model.state_dict(), path)"
        ) from None
    except CheckpointReadError as error:
        raise SpecError(
            f"{parsed.name} is not a plain state dict ({str(error).split(':')[0]}); save it with "
            "torch.save(model.state_dict(), path)"
        ) from None
    state = _state_dict(payload)
    if state is None:
        raise SpecError(f"{parsed.name} holds no state dict (a mapping of parameter names to tensors)")
    if arch_spec.source == "torchvision":
        # A fine-tuned head: build the architecture with the file's class count.
        loaded = _load_torchvision(arch_spec, _head_rows(state))
        if task is not None and loaded.task != task:
            raise SpecError(f"model {arch_spec} is a {loaded.task} model, not a {task} model")
    elif arch_spec.source == "timm":
        loaded = _load_timm(arch_spec, state)
    else:
        loaded = load_model(arch_spec, task=task, device="cpu")
    misfit = _state_dict_misfit(state, loaded.model.state_dict())
    if misfit:
        raise SpecError(f"{parsed.name} does not fit the architecture {arch_spec}: {misfit}")
    loaded.model.load_state_dict(state, strict=True)
    loaded.spec = parsed
    return loaded


def _first(names: list[str], shown: int = 3) -> str:
    """The first ``shown`` names, then "and N more"."""
    text = ", ".join(names[:shown])
    return text + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _state_dict_misfit(state: Mapping[str, Tensor], expected: Mapping[str, Tensor]) -> str:
    """Why ``state`` cannot load into a model whose state dict is ``expected`` ("" when it fits):
    missing and unexpected keys and shape mismatches, each capped at its first few keys."""
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [f"{key} (file {tuple(state[key].shape)}, model {tuple(value.shape)})"
                  for key, value in expected.items() if key in state and state[key].shape != value.shape]
    parts = [f"{len(keys)} {what}: {_first(keys)}" for what, keys in (
        ("missing key(s)", missing), ("unexpected key(s)", unexpected), ("shape mismatch(es)", mismatched)) if keys]
    if not parts:
        return ""
    prefixes = {key.split(".", 1)[0] for key in state}
    if len(prefixes) == 1 and unexpected:
        prefix = next(iter(prefixes))
        if all(key.split(".", 1)[-1] in expected for key in state):
            parts.append(f"every key of the file starts with {prefix + '.'!r} (a wrapped model, e.g. DataParallel's "
                         f"'module.'): strip it with {{k.removeprefix({prefix + '.'!r}): v for k, v in state.items()}}")
    return "; ".join(parts) + "; was it saved from another architecture? pass the --arch it was trained as"

