"""Image classification: load a classifier, pick its layer, explain a batch (``multiexplain.adapters.classification``).

Public entry points (stable):

* :func:`load_classifier` ``(spec, *, weights=None, checkpoint=None, num_classes=None, device="cpu") -> nn.Module``
  -- a torchvision name (``weights="DEFAULT"`` downloads where the internet is reachable), a
  Hugging Face hub name or a local ``save_pretrained`` directory (``AutoModelForImageClassification``),
  a local state-dict / checkpoint file, ``"scene"`` for the shipped model, or a zoo SPEC
  (``"torchvision:resnet50"``, ``"hf:DIR"``, ``"builtin:scene-classifier"``). Eval mode.
* :func:`explain_images` ``(model, images, *, method="gradcam++", targets=None, topk=None,
  multi_label=False, threshold=0.5, layer="auto", reshape=None) -> Explanation`` -- top-1, given
  classes, the top-k classes, or every positive label of a sigmoid multi-label model, ``K`` maps
  per image from one forward pass (the core's ``(N, K)`` target path).
* :func:`default_layer` ``(model) -> (layer, reshape)`` -- the layer ``layer="auto"`` resolves to.
* :func:`load_scene_classifier` ``(device="cpu") -> SceneCNN`` -- the shipped multi-label CNN.
* :func:`make_scenes` ``(n, seed, ...) -> Scenes`` -- the generated scenes it was trained on
  (re-exported from :mod:`multiexplain.scenes`).

The adapter only turns a classifier and images into "activations at a layer" and "scores"; all
CAM math is :class:`multiexplain.GradCAMPlusPlus` / :class:`multiexplain.GradCAM`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

import multiexplain
from multiexplain.cam import METHODS, Explanation, Targets, model_logits
from multiexplain.layers import ChannelsLast, TokenReshape, layer_name
from multiexplain.scenes import SCENE_CLASSES, Scenes, make_scenes

__all__ = [
    "ChannelsLast",
    "SceneCNN",
    "SCENE_CHECKPOINT",
    "SCENE_CLASSES",
    "Scenes",
    "TokenReshape",
    "default_layer",
    "explain_images",
    "load_classifier",
    "load_scene_classifier",
    "make_scenes",
    "positive_labels",
]

#: The shipped checkpoint (written by scripts/train_scene_classifier.py).
SCENE_CHECKPOINT = Path(multiexplain.__file__).resolve().parent / "checkpoints" / "scene_cnn.pt"
_CHECKPOINT_FORMAT = "multiexplain.scene_cnn/1"


# -- the shipped model --------------------------------------------------------------------------

class SceneCNN(nn.Module):
    """A small all-ReLU CNN for the multi-label scenes: ``(N, 3, 64, 64)`` in ``[0, 1]`` -> ``(N, 6)`` logits.

    Three conv stages (two 3x3 conv + batch-norm + ReLU each; 2x2 max-pool after the first two)
    end in ``features`` at 1/4 resolution (16x16 for 64x64 inputs), then global average pooling and
    one linear layer. Everything between ``features`` and the logits is piecewise linear, so the
    Grad-CAM++ closed form is exact for it, and ``"auto"`` resolves to ``features``. Use
    ``sigmoid`` on the logits: labels are independent (multi-label).
    """

    def __init__(self, widths: Sequence[int] = (16, 32, 64), num_classes: int = len(SCENE_CLASSES)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for stage, width in enumerate(widths):
            for _ in range(2):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            if stage < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
        self.widths = tuple(int(w) for w in widths)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        #: The layer explain_images explains by default (what "auto" would pick, without the traced pass).
        self.explain_layer = "features"
        self.labels: list[str] = list(SCENE_CLASSES) if num_classes == len(SCENE_CLASSES) else [str(i) for i in range(num_classes)]
        self.multi_label = True

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(images)).flatten(1))

    def checkpoint(self, **meta: Any) -> dict[str, Any]:
        """The payload :func:`load_classifier` / :func:`load_scene_classifier` read back."""
        return {
            "format": _CHECKPOINT_FORMAT,
            "config": {"widths": list(self.widths), "num_classes": self.classifier.out_features},
            "labels": list(self.labels),
            "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()},
            "meta": meta,
        }

    @classmethod
    def from_checkpoint(cls, payload: Mapping[str, Any]) -> "SceneCNN":
        if payload.get("format") != _CHECKPOINT_FORMAT:
            raise ValueError(f"not a SceneCNN checkpoint (format {payload.get('format')!r}, expected {_CHECKPOINT_FORMAT!r})")
        model = cls(**payload["config"])
        model.load_state_dict(payload["state_dict"])
        model.labels = list(payload.get("labels") or model.labels)
        model.meta = dict(payload.get("meta") or {})
        return model.eval()


def load_scene_classifier(device: str | torch.device = "cpu", path: str | os.PathLike | None = None) -> SceneCNN:
    """The shipped :class:`SceneCNN` (``multiexplain/checkpoints/scene_cnn.pt``), in eval mode.

    Inputs are :func:`make_scenes` images ``(N, 3, 64, 64)`` in ``[0, 1]`` (no normalisation).
    ``model.meta`` holds the training seed and held-out accuracy the script measured.
    """
    path = Path(path) if path is not None else SCENE_CHECKPOINT
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; run scripts/train_scene_classifier.py to create it")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return SceneCNN.from_checkpoint(payload).to(device)


# -- loading user models ------------------------------------------------------------------------

_ZOO_PREFIXES = ("torchvision:", "hf:", "builtin:", "pytorchvideo:")


def _torchvision_names() -> set[str]:
    import torchvision

    return set(torchvision.models.list_models(module=torchvision.models))


def _last_matrix_rows(state: Mapping[str, Tensor]) -> int | None:
    """Rows of the last 2-D weight in a state dict: the class count of torchvision-style heads."""
    matrices = [v for k, v in state.items() if k.endswith("weight") and isinstance(v, Tensor) and v.ndim == 2]
    return int(matrices[-1].shape[0]) if matrices else None


def _read_state_dict(path: Path) -> tuple[Mapping[str, Tensor] | None, Any]:
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(payload, Mapping):
        if payload and all(isinstance(v, Tensor) for v in payload.values()):
            return payload, payload
        for key in ("state_dict", "model_state_dict", "model"):
            inner = payload.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
                return inner, payload
    return None, payload


def load_classifier(
    spec: str | os.PathLike | nn.Module,
    *,
    weights: str | None = None,
    checkpoint: str | os.PathLike | None = None,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Load an image classifier the way users do, in eval mode on ``device``.

    Args:
        spec: one of
            * a torchvision model name (``"resnet50"``, ``"vit_b_16"``): built with ``weights``
              (``"DEFAULT"``, an enum member name such as ``"IMAGENET1K_V2"``, or ``None`` for random
              initialisation); a download happens only with ``weights`` and where reachable;
            * a Hugging Face hub name or a local directory written by ``save_pretrained``
              (``AutoModelForImageClassification.from_pretrained``; outputs ``ModelOutput.logits``);
            * a ``.pt`` / ``.pth`` :class:`SceneCNN` checkpoint (for a plain state dict, name the
              architecture as ``spec`` and pass the file as ``checkpoint=``);
            * ``"scene"`` (the shipped :class:`SceneCNN`) or a zoo SPEC (``"torchvision:resnet18@none"``,
              ``"hf:DIR"``, ``"builtin:scene-classifier"``), see :mod:`multiexplain.zoo`;
            * an ``nn.Module``, returned as is (moved and put in eval mode).
        weights: torchvision weights for a torchvision name.
        checkpoint: a local state-dict file (``torch.save(model.state_dict(), path)``, or a dict with a
            ``"state_dict"`` / ``"model_state_dict"`` / ``"model"`` entry) loaded into the architecture
            ``spec`` names, strictly. The class count is read from the file's last weight matrix
            unless ``num_classes`` is given.
        num_classes: head size for a randomly initialised torchvision model.
    Raises:
        ValueError: an unknown name, conflicting arguments, or a checkpoint that does not fit.
        FileNotFoundError: a path that does not exist.
        OSError: a hub name that cannot be downloaded (offline), with the local-directory alternative.
    """
    model = _load_classifier(spec, weights, checkpoint, num_classes)
    return model.eval().to(device)


def _load_classifier(spec: Any, weights: str | None, checkpoint: Any, num_classes: int | None) -> nn.Module:
    if isinstance(spec, nn.Module):
        model = spec
        if checkpoint is not None:
            _load_state_into(model, checkpoint)
        return model
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"spec must be a model name, a path or an nn.Module, got {type(spec).__name__}")
    text = os.fspath(spec)
    if text in ("scene", "scene-classifier", "builtin:scene-classifier"):
        return load_scene_classifier() if checkpoint is None else load_scene_classifier(path=checkpoint)
    if text.startswith(_ZOO_PREFIXES):
        from multiexplain import zoo

        if weights is not None or num_classes is not None:
            raise ValueError("with a zoo SPEC give the weights after '@' (torchvision:resnet50@IMAGENET1K_V2), not weights=")
        if checkpoint is not None:
            return zoo.load_model(os.fspath(checkpoint), arch=text, task="classification").model
        return zoo.load_model(text, task="classification").model
    path = Path(text).expanduser()
    if path.is_file():
        if checkpoint is not None:
            raise ValueError(f"{text} is a file; pass the architecture as spec and the file as checkpoint=")
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(payload, Mapping) and payload.get("format") == _CHECKPOINT_FORMAT:
            return SceneCNN.from_checkpoint(payload)
        raise ValueError(
            f"{text} is not a multiexplain checkpoint; for a plain state dict name the architecture: "
            f"load_classifier('resnet18', checkpoint='{text}')"
        )
    if path.is_dir():
        return _load_hf(str(path), local=True)
    if text in _torchvision_names():
        return _load_torchvision(text, weights, checkpoint, num_classes)
    if text.endswith((".pt", ".pth")) or text.startswith(("/", ".", "~")):
        raise FileNotFoundError(f"{text}: no such file or directory")
    if weights is not None:
        raise ValueError(f"{text!r} is not a torchvision model name, so weights={weights!r} cannot apply")
    model = _load_hf(text, local=False)
    if checkpoint is not None:
        _load_state_into(model, checkpoint)
    return model


def _load_state_into(model: nn.Module, checkpoint: Any) -> None:
    """Load the state dict held in the file ``checkpoint`` into ``model``."""
    state, _ = _read_state_dict(Path(checkpoint))
    if state is None:
        raise ValueError(f"{checkpoint} holds no state dict")
    model.load_state_dict(state)


def _load_torchvision(name: str, weights: str | None, checkpoint: Any, num_classes: int | None) -> nn.Module:
    import torchvision

    kwargs: dict[str, Any] = {}
    state = None
    if checkpoint is not None:
        if weights is not None:
            raise ValueError("give either weights= (pretrained) or checkpoint= (a local state dict), not both")
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
        state, _ = _read_state_dict(path)
        if state is None:
            raise ValueError(f"{checkpoint} holds no state dict (a mapping of parameter names to tensors)")
        num_classes = num_classes or _last_matrix_rows(state)
    if num_classes is not None:
        kwargs["num_classes"] = int(num_classes)
    if weights is not None and str(weights).lower() == "none":
        weights = None
    if weights is not None:
        enum = torchvision.models.get_model_weights(name)
        if str(weights).upper() != "DEFAULT" and str(weights) not in enum.__members__:
            raise ValueError(f"{name} has no weights {weights!r}; choose DEFAULT, None or one of {', '.join(enum.__members__)}")
    try:
        model = torchvision.models.get_model(name, weights=weights, **kwargs)
    except (OSError, RuntimeError) as error:  # urllib errors are OSErrors
        if weights is None:
            raise
        raise OSError(
            f"could not fetch the {name} weights {weights!r} ({error}); offline, save them elsewhere with "
            f"torch.save(torchvision.models.{name}(weights={weights!r}).state_dict(), '{name}.pt') and "
            f"call load_classifier({name!r}, checkpoint='{name}.pt')"
        ) from error
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"{checkpoint} does not fit torchvision {name}: {str(error).splitlines()[0]}") from None
    return model


def _load_hf(name: str, local: bool) -> nn.Module:
    import transformers

    try:
        return transformers.AutoModelForImageClassification.from_pretrained(name, local_files_only=local)
    except OSError as error:
        raise OSError(
            f"cannot load the Hugging Face image classifier {name!r}: {error}. Offline, run "
            f"AutoModelForImageClassification.from_pretrained({name!r}).save_pretrained(DIR) where the hub is "
            "reachable and pass DIR"
        ) from error


# -- choosing the layer -------------------------------------------------------------------------

_HF_TOKEN_MODELS = ("vit", "deit", "dinov2", "beit", "data2vec-vision", "vit_msn", "vit_mae")


def default_layer(model: nn.Module) -> tuple[str | nn.Module, Callable[[Tensor], Tensor] | None]:
    """The layer ``explain_images(layer="auto")`` explains, and the reshape rule it needs.

    * Hugging Face ViT / DeiT / BEiT / DINOv2: the last encoder block's first layer norm (the
      final block's output only reaches the logits through the CLS token, so its patch tokens
      carry no gradient), tokens ``(N, L, D)`` -> ``(N, D, h, w)`` with the CLS (and DeiT's
      distillation, and any register) tokens dropped.
    * Hugging Face Swin: the final layer norm, ``(N, L, C)`` tokens on a square grid, no prefix.
    * torchvision ``VisionTransformer``: ``encoder.layers[-1].ln_1`` with one CLS token.
    * torchvision ``SwinTransformer``: ``features`` (channels-last ``(N, H, W, C)``).
    * timm-style ViTs (``blocks`` + ``num_prefix_tokens``): ``blocks[-1].norm1``.
    * a model with an ``explain_layer`` attribute (:class:`SceneCNN`): that layer (and ``explain_reshape``).
    * everything else (CNNs: torchvision resnet / vgg / densenet / mobilenet / efficientnet /
      convnext, HF ResNet / ConvNeXt): ``"auto"``, the last module whose output
      has spatial axes (see :func:`multiexplain.find_auto_layer`).
    """
    declared = getattr(model, "explain_layer", None)
    if isinstance(declared, str):  # a model that names its own layer (SceneCNN: "features")
        return declared, getattr(model, "explain_reshape", None)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type in _HF_TOKEN_MODELS:
        base = getattr(model, "base_model_prefix", "vit")
        backbone = getattr(model, base, None)
        # transformers 4.x keeps the blocks in backbone.encoder.layer, 5.x in backbone.layers.
        layers = getattr(getattr(backbone, "encoder", None), "layer", None) or getattr(backbone, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            prefix = 1
            if model_type == "deit" and getattr(getattr(backbone, "embeddings", None), "distillation_token", None) is not None:
                prefix = 2
            prefix += int(getattr(config, "num_register_tokens", 0) or 0)
            last = layers[-1]
            norm = getattr(last, "layernorm_before", None) or getattr(last, "norm1", None) or last
            return layer_name(model, norm), TokenReshape(num_prefix_tokens=prefix)
    if model_type == "swin" and hasattr(getattr(model, "swin", None), "layernorm"):
        return "swin.layernorm", TokenReshape(num_prefix_tokens=0)
    try:
        import torchvision.models as tvm

        if isinstance(model, tvm.VisionTransformer):
            return layer_name(model, model.encoder.layers[-1].ln_1), TokenReshape(num_prefix_tokens=1)
        if isinstance(model, tvm.SwinTransformer):
            return "features", ChannelsLast()
    except ImportError:  # pragma: no cover - torchvision is a dependency
        pass
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential) and hasattr(model, "num_prefix_tokens") and len(blocks) > 0:
        last = getattr(blocks[-1], "norm1", None) or blocks[-1]
        return layer_name(model, last), TokenReshape(num_prefix_tokens=int(model.num_prefix_tokens))
    return "auto", None


# -- explaining ---------------------------------------------------------------------------------

def positive_labels(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """``(N, classes)`` bool: the labels a sigmoid multi-label model predicts (``sigmoid >= threshold``)."""
    return logits.detach().sigmoid() >= threshold


def _multi_label_targets(logits: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Indices ``(N, K)`` of every positive label, highest first, ``K`` = the most positives of
    any sample (at least 1), and the validity mask ``(N, K)``; padding repeats the sample's top class."""
    detached = logits.detach()
    positive = positive_labels(detached, threshold)
    k = max(1, int(positive.sum(dim=1).max().item()))
    # Positives first (ordered by logit), then the rest: the first K columns hold every positive.
    ranking = torch.where(positive, detached, detached - detached.abs().max() * 4 - 1)
    order = ranking.argsort(dim=1, descending=True)[:, :k]
    valid = positive.gather(1, order)
    padded = torch.where(valid, order, order[:, :1])
    return padded, valid


def explain_images(
    model: nn.Module,
    images: Tensor | Mapping[str, Tensor],
    *,
    method: str = "gradcam++",
    targets: Targets = None,
    topk: int | None = None,
    multi_label: bool = False,
    threshold: float = 0.5,
    layer: str | nn.Module = "auto",
    reshape: Callable[[Tensor], Tensor] | None = None,
    input_size: Sequence[int] | None = None,
    create_graph: bool = False,
) -> Explanation:
    """Explain a batch of images for one or several classes each.

    Args:
        model: a classifier returning logits ``(N, classes)`` or a ``ModelOutput`` with ``.logits``.
        images: ``(N, 3, H, W)`` preprocessed as the model expects (or a dict of keyword inputs with
            ``pixel_values``).
        method: ``"gradcam++"`` or ``"gradcam"``.
        targets: ``None`` (top-1), an int, ``N`` ints, or ``(N, K)`` class indices (see the explainer).
        topk: explain each image's ``topk`` highest-scoring classes (``K = topk`` maps per image).
        multi_label: explain every label with ``sigmoid(logit) >= threshold``; ``K`` is the largest
            number of positives in the batch, and shorter rows are padded: padded entries have
            ``targets == -1`` and all-zero maps, raw maps, weights and scores.
        layer: ``"auto"`` (see :func:`default_layer`), a dotted name or a module.
        reshape: channels-first rule for token / channels-last layer outputs; defaults to the one
            :func:`default_layer` pairs with the layer when ``layer="auto"``.
    Returns:
        :class:`~multiexplain.Explanation`: maps ``(N, H, W)`` for top-1 / given single targets,
        ``(N, K, H, W)`` for ``(N, K)`` targets, ``topk`` or ``multi_label`` (always 4-D then, even
        for ``K = 1``), in ``[0, 1]`` on the model's device; ``.targets`` holds the class indices.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {sorted(METHODS)}")
    chosen = sum([targets is not None, topk is not None, bool(multi_label)])
    if chosen > 1:
        raise ValueError("give at most one of targets=, topk= and multi_label=True")
    if topk is not None and (isinstance(topk, bool) or int(topk) < 1):
        raise ValueError(f"topk must be a positive int, got {topk!r}")
    if isinstance(layer, str) and layer == "auto":
        layer, auto_reshape = default_layer(model)
        reshape = reshape if reshape is not None else auto_reshape
    explainer = METHODS[method](model, layer, reshape=reshape)

    chosen_targets: dict[str, Tensor] = {}
    if topk is not None or multi_label:
        def scores(output: Any) -> Tensor:
            logits = model_logits(output)
            if not isinstance(logits, Tensor) or logits.ndim != 2:
                raise ValueError(f"expected logits (N, classes) from the model, got {getattr(logits, 'shape', type(logits))}")
            if topk is not None:
                if topk > logits.shape[1]:
                    raise ValueError(f"topk={topk} but the model has only {logits.shape[1]} classes")
                indices = logits.detach().topk(int(topk), dim=1).indices
                valid = torch.ones_like(indices, dtype=torch.bool)
            else:
                indices, valid = _multi_label_targets(logits, threshold)
            chosen_targets["indices"], chosen_targets["valid"] = indices, valid
            return logits.gather(1, indices)

        explanation = explainer(images, scores, input_size=input_size, create_graph=create_graph)
        indices, valid = chosen_targets["indices"], chosen_targets["valid"]
        if bool(valid.all()):
            return dataclasses.replace(explanation, targets=indices)
        return _blank_padding(explanation, indices, valid)
    return explainer(images, targets, input_size=input_size, create_graph=create_graph)


def _blank_padding(explanation: Explanation, indices: Tensor, valid: Tensor) -> Explanation:
    """Zero the padded entries of a multi-label explanation and mark them ``targets == -1``."""

    def blank(tensor: Tensor) -> Tensor:
        keep = valid.view(*valid.shape, *([1] * (tensor.ndim - 2)))
        return torch.where(keep, tensor, torch.zeros_like(tensor))

    return dataclasses.replace(
        explanation,
        maps=blank(explanation.maps),
        raw=blank(explanation.raw),
        weights=blank(explanation.weights),
        scores=blank(explanation.scores),
        targets=torch.where(valid, indices, torch.full_like(indices, -1)),
        zero_gradient=explanation.zero_gradient | ~valid,
    )
