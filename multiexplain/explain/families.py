"""Per-family layer knowledge, kept as data: which layer a model family is explained at and how
its output is read. :func:`multiexplain.explain.layers.resolve_layer` is the only reader.

A rule recognises a family by architecture -- ``isinstance`` of a library class (so subclasses
match), a Hugging Face ``config.model_type``, or the modules a model has -- never by the exact
class name. Library classes are looked up only in modules that are already imported: a model of
a library that was never imported cannot exist, and the core stays free of those imports.

Families not listed here go to the probe, which finds the same layers for these families too;
the rules save the probe's two forward passes and fix the pick where several layers would do
(a pytorchvideo net's last stage rather than its head's 1x1x1 projection).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torch import nn

from .capture import Element
from .layers import ChannelsLast, MergedPatches, Reshape, TileTokens, TokenReshape, VideoTokens, find_module

__all__ = [
    "FAMILY_RULES", "FRAMES_FIRST", "HF_VIDEO_TYPES", "FamilyRule", "HasModules", "IsInstance", "ModelType", "Named",
    "SOFTMAX_HEADS", "VisionFeatureLayer", "clip_frames", "final_activations", "frames_first", "input_spatial_size",
    "pathway_alpha",
]

Located = tuple[nn.Module, Reshape | None, int | None, Element]


# -- how a family is recognised ------------------------------------------------------------------

@dataclass(frozen=True)
class IsInstance:
    """An instance (or subclass instance) of the class at ``path`` (``"module.Class"``)."""

    path: str

    def __call__(self, model: nn.Module) -> bool:
        module_name, _, class_name = self.path.rpartition(".")
        cls = getattr(sys.modules.get(module_name), class_name, None)
        return isinstance(cls, type) and isinstance(model, cls)


@dataclass(frozen=True)
class ModelType:
    """A Hugging Face model whose ``config.model_type`` is one of ``types`` and that has the
    attributes in ``having`` (e.g. a classifier head)."""

    types: frozenset[str]
    having: tuple[str, ...] = ()

    def __call__(self, model: nn.Module) -> bool:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        return model_type in self.types and all(hasattr(model, name) for name in self.having)


@dataclass(frozen=True)
class HasModules:
    """A model with submodules (or attributes) of these names, e.g. timm's ViTs."""

    names: tuple[str, ...]

    def __call__(self, model: nn.Module) -> bool:
        return all(hasattr(model, name) for name in self.names)


# -- where its layer is -----------------------------------------------------------------------------

@dataclass(frozen=True)
class At:
    """The submodule at a dotted path; negative indices count from the end (``"blocks.-1.norm1"``)."""

    path: str

    def __call__(self, model: nn.Module, branch: int | None) -> nn.Module | None:
        return find_module(model, self.path)


@dataclass(frozen=True)
class BaseAt:
    """A path inside a Hugging Face model's base model (``model.swin``, ``model.swinv2``, ...)."""

    path: str

    def __call__(self, model: nn.Module, branch: int | None) -> nn.Module | None:
        base = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
        return find_module(base, self.path) if isinstance(base, nn.Module) else None


@dataclass(frozen=True)
class LastBlockNorm:
    """The first of ``norms`` in the last block of the model's block list (Hugging Face ViTs keep
    it in ``vit.encoder.layer`` in transformers 4.x and ``vit.layers`` in 5.x)."""

    norms: tuple[str, ...]

    def __call__(self, model: nn.Module, branch: int | None) -> nn.Module | None:
        for module in model.modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                for norm in self.norms:
                    if isinstance(getattr(module[-1], norm, None), nn.Module):
                        return getattr(module[-1], norm)
        return None


@dataclass(frozen=True)
class Named:
    """The first submodule whose dotted name is ``suffix`` or ends with ``"." + suffix``: the
    same module whether a wrapper nests it (``model.vision_tower`` in transformers 5.x,
    ``vision_tower`` in 4.x)."""

    suffix: str

    def __call__(self, model: nn.Module, branch: int | None) -> nn.Module | None:
        for name, module in model.named_modules():
            if name == self.suffix or name.endswith("." + self.suffix):
                return module
        return None


@dataclass(frozen=True)
class VisionFeatureLayer:
    """The vision-tower layer whose output a LLaVA-style model feeds its projector:
    ``hidden_states[config.vision_feature_layer]`` of the tower, i.e. the output of encoder layer
    ``k`` for ``k < 0`` and of layer ``k - 1`` for ``k > 0``. For several feature layers
    (concatenated features) the shallowest: every selected layer's features depend on it."""

    tower: str = "vision_tower"

    def __call__(self, model: nn.Module, branch: int | None) -> nn.Module | None:
        tower = Named(self.tower)(model, branch)
        selected = getattr(getattr(model, "config", None), "vision_feature_layer", None)
        if tower is None or selected is None:
            return None
        layers = next((m for m in tower.modules() if isinstance(m, nn.ModuleList) and len(m) > 0), None)
        if layers is None:
            return None
        indices = [selected] if isinstance(selected, int) else list(selected)
        # hidden_states[0] is the embeddings, hidden_states[k] the output of layers[k - 1]; a negative
        # k counts from the end of those len(layers) + 1 entries, so -len(layers) - 1 is the embeddings.
        positions = [index - 1 if index >= 0 else len(layers) + index for index in indices]
        if not positions or any(p < 0 or p >= len(layers) for p in positions) or 0 in indices:
            return None  # the embeddings themselves, or out of range: left to the probe
        return layers[min(positions)]


_PYTORCHVIDEO_HEADS = (
    "pytorchvideo.models.head.ResNetBasicHead", "pytorchvideo.models.head.ResNetRoIHead",
    "pytorchvideo.models.head.SequencePool", "pytorchvideo.models.head.VisionTransformerBasicHead",
    "pytorchvideo.models.slowfast.PoolConcatPathway",
)


@dataclass(frozen=True)
class LastBodyBlock:
    """The last entry of ``model.blocks`` before the head (pytorchvideo nets); for a block with
    parallel pathways (SlowFast) its pathway ``branch`` (default ``default_branch``: the fast one)."""

    default_branch: int = 1

    def __call__(self, model: nn.Module, branch: int | None) -> nn.Module | None:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.ModuleList):
            return None
        heads = [IsInstance(path) for path in _PYTORCHVIDEO_HEADS]
        body = [block for block in blocks if not any(head(block) for head in heads)]
        if not body or len(body) == len(blocks):
            return None
        last = body[-1]
        pathways = getattr(last, "multipathway_blocks", None)
        if isinstance(pathways, nn.ModuleList):
            index = self.default_branch if branch is None else branch
            if not 0 <= index < len(pathways):
                raise ValueError(f"branch {branch} is out of range: this model has {len(pathways)} pathways (0 = slow, 1 = fast)")
            return pathways[index]
        return last


# -- how its output is read --------------------------------------------------------------------------

def _hf_prefix_tokens(model: nn.Module) -> Reshape:
    """A class token, DeiT's distillation token and any register tokens come before the patches."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    embeddings = getattr(base, "embeddings", None)
    prefix = 2 if getattr(embeddings, "distillation_token", None) is not None else 1
    prefix += int(getattr(model.config, "num_register_tokens", 0) or 0)
    return TokenReshape(num_prefix_tokens=prefix)


def _merged_patches(model: nn.Module) -> Reshape:
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    return MergedPatches(merge=int(getattr(vision, "spatial_merge_size", 2) or 2))


def _timm_prefix_tokens(model: nn.Module) -> Reshape:
    return TokenReshape(num_prefix_tokens=int(model.num_prefix_tokens))


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _hf_video_tokens(model: nn.Module) -> Reshape:
    """The token layout of a Hugging Face video transformer, from its config: VideoMAE (tubelets,
    no class token), ViViT (tubelets after a class token), TimeSformer (a class token; divided
    space-time blocks see one frame per batch row, joint ones a (H', W', T') sequence)."""
    config = model.config
    height, width = _pair(config.image_size)
    if config.model_type == "vivit":
        patch = (int(config.tubelet_size[1]), int(config.tubelet_size[2]))
    else:
        patch = _pair(config.patch_size)
    grid = (height // patch[0], width // patch[1])
    if config.model_type == "videomae":
        return VideoTokens(grid, num_prefix_tokens=0)
    if config.model_type == "vivit":
        return VideoTokens(grid, num_prefix_tokens=1)
    if getattr(config, "attention_type", "divided_space_time") == "joint_space_time":
        return VideoTokens(grid, num_prefix_tokens=1, order="hwt")
    return VideoTokens(grid, num_prefix_tokens=1, frames=int(config.num_frames))


def _constant(reshape: Reshape | None) -> Callable[[nn.Module], Reshape | None]:
    return lambda _model: reshape


@dataclass(frozen=True)
class FamilyRule:
    """One family: how it is recognised, where its layer is, how the layer's output is read."""

    family: str
    recognise: Callable[[nn.Module], bool]
    layer: Callable[[nn.Module, int | None], nn.Module | None]
    reshape: Callable[[nn.Module], Reshape | None] = _constant(None)
    layer_call: int | None = None
    element: Element = None

    def locate(self, model: nn.Module, branch: int | None) -> Located | None:
        module = self.layer(model, branch)
        if module is None:
            return None
        return module, self.reshape(model), self.layer_call, self.element


_HF_VIT_TYPES = frozenset({
    "vit", "deit", "dinov2", "dinov2_with_registers", "beit", "data2vec-vision", "vit_msn", "vit_mae", "ijepa",
})
#: Hugging Face video classifiers this module knows (frames-first pixel values, token layouts).
HF_VIDEO_TYPES = frozenset({"videomae", "timesformer", "vivit"})
_HF_VIDEO_TYPES = HF_VIDEO_TYPES

#: The rules, first match wins.
FAMILY_RULES: Sequence[FamilyRule] = (
    # torchvision: the final tokens of a ViT reach the head only through the class token, so the
    # last block's ln_1 is the last layer whose patch tokens get a gradient.
    FamilyRule("torchvision ViT", IsInstance("torchvision.models.vision_transformer.VisionTransformer"),
               At("encoder.layers.-1.ln_1"), _constant(TokenReshape(num_prefix_tokens=1))),
    FamilyRule("torchvision Swin", IsInstance("torchvision.models.swin_transformer.SwinTransformer"),
               At("norm"), _constant(ChannelsLast())),
    FamilyRule("torchvision Swin3D", IsInstance("torchvision.models.video.swin_transformer.SwinTransformer3d"),
               At("norm"), _constant(ChannelsLast())),
    FamilyRule("torchvision video ResNet", IsInstance("torchvision.models.video.resnet.VideoResNet"), At("layer4")),
    FamilyRule("torchvision S3D", IsInstance("torchvision.models.video.s3d.S3D"), At("features")),
    # pytorchvideo: the last stage before the head (its 1x1x1 projections and pools are not it).
    FamilyRule("pytorchvideo net", IsInstance("pytorchvideo.models.net.Net"), LastBodyBlock()),
    # Hugging Face image classifiers.
    FamilyRule("Hugging Face ViT-style classifier", ModelType(_HF_VIT_TYPES, ("classifier",)),
               LastBlockNorm(("layernorm_before", "norm1")), _hf_prefix_tokens),
    FamilyRule("Hugging Face Swin classifier", ModelType(frozenset({"swin", "swinv2"}), ("classifier",)),
               BaseAt("layernorm"), _constant(TokenReshape(num_prefix_tokens=0))),
    # Hugging Face video classifiers: as for ViTs, the last block's first norm (the last place the
    # class token, or VideoMAE's mean-pooled tokens, read every patch token); the tokens laid out
    # per family (see _hf_video_tokens).
    FamilyRule("Hugging Face video transformer", ModelType(_HF_VIDEO_TYPES, ("classifier",)),
               LastBlockNorm(("layernorm_before",)), _hf_video_tokens),
    # Hugging Face captioners: every final vision token reaches the text decoder.
    FamilyRule("Hugging Face BLIP", ModelType(frozenset({"blip"})), At("vision_model.post_layernorm"),
               _constant(TokenReshape(num_prefix_tokens=1)), layer_call=0),
    FamilyRule("Hugging Face VisionEncoderDecoder", ModelType(frozenset({"vision-encoder-decoder"})),
               At("encoder.layernorm"), _constant(TokenReshape(num_prefix_tokens=None))),
    # timm CaiT and XCiT: the class token joins only in the class-attention blocks after
    # ``blocks``, whose last output (patch tokens only) is what those blocks read.
    FamilyRule("timm CaiT", IsInstance("timm.models.cait.Cait"), At("blocks.-1"),
               _constant(TokenReshape(num_prefix_tokens=0))),
    FamilyRule("timm XCiT", IsInstance("timm.models.xcit.Xcit"), At("blocks.-1"),
               _constant(TokenReshape(num_prefix_tokens=0))),
    # Vision-language models: the vision tower's tokens where they leave for the language model
    # (through a projector, a Q-Former or a connector); class tokens are inferred (0-2).
    FamilyRule("Hugging Face GIT", ModelType(frozenset({"git"})), Named("image_encoder.vision_model.post_layernorm"),
               _constant(TokenReshape(num_prefix_tokens=None))),
    # BLIP-2 / InstructBLIP: post_layernorm runs on all tokens, then on the pooled one.
    FamilyRule("Hugging Face BLIP-2 / InstructBLIP", ModelType(frozenset({"blip-2", "instructblip"})),
               Named("vision_model.post_layernorm"), _constant(TokenReshape(num_prefix_tokens=None)), layer_call=0),
    # LLaVA: hidden_states[vision_feature_layer] of the tower (the CLS token dropped or not).
    FamilyRule("Hugging Face LLaVA", ModelType(frozenset({"llava"})), VisionFeatureLayer(),
               _constant(TokenReshape(num_prefix_tokens=None))),
    # LLaVA-NeXT: the same layer, run on the base image and the high-resolution tiles at once.
    FamilyRule("Hugging Face LLaVA-NeXT", ModelType(frozenset({"llava_next"})), VisionFeatureLayer(),
               _constant(TileTokens(num_prefix_tokens=None))),
    # FastVLM (LLaVA with a convolutional / hybrid timm tower): the tower's final feature map
    # (N, C, H, W), which the model flattens into the image tokens.
    FamilyRule("Hugging Face FastVLM", ModelType(frozenset({"fast_vlm"})), Named("vision_tower"), element="last_hidden_state"),
    FamilyRule("Hugging Face PaliGemma", ModelType(frozenset({"paligemma"})), Named("vision_tower.post_layernorm"),
               _constant(TokenReshape(num_prefix_tokens=None))),
    # Qwen2-VL: the merger's output, 2x2 patches merged, each image at its own (non-square) grid.
    FamilyRule("Hugging Face Qwen2-VL", ModelType(frozenset({"qwen2_vl"})), Named("visual.merger"), _merged_patches),
    # Idefics3 / SmolVLM: every crop and the global image through the vision model at once.
    FamilyRule("Hugging Face Idefics3 / SmolVLM", ModelType(frozenset({"idefics3", "smolvlm"})),
               Named("vision_model.post_layernorm"), _constant(TileTokens(num_prefix_tokens=0))),
    # timm ViTs (and DeiT, EVA, ...): blocks plus a count of prefix tokens.
    FamilyRule("timm ViT", HasModules(("blocks", "num_prefix_tokens", "patch_embed")),
               At("blocks.-1.norm1"), _timm_prefix_tokens),
)


# -- where the pre-softmax logits are -----------------------------------------------------------------

#: Heads whose ``activation`` (a Softmax or Sigmoid at the end of the model) is skipped while
#: explaining, so the explained scores are the pre-activation logits (the paper's score).
SOFTMAX_HEADS: Sequence[IsInstance] = (
    IsInstance("pytorchvideo.models.head.ResNetBasicHead"), IsInstance("pytorchvideo.models.head.ResNetRoIHead"),
    IsInstance("pytorchvideo.models.head.VisionTransformerBasicHead"),
)


def final_activations(model: nn.Module) -> list[nn.Module]:
    """The Softmax / Sigmoid modules of :data:`SOFTMAX_HEADS` in ``model`` (skipped while explaining)."""
    found = []
    for module in model.modules():
        activation = getattr(module, "activation", None)
        if isinstance(activation, (nn.Softmax, nn.Sigmoid)) and any(head(module) for head in SOFTMAX_HEADS):
            found.append(activation)
    return found


# -- how a video model takes its frames ----------------------------------------------------------------

#: Video models whose ``pixel_values`` are ``(N, T, C, H, W)`` (frames first), not ``(N, C, T, H, W)``.
FRAMES_FIRST: Sequence[Callable[[nn.Module], bool]] = (ModelType(_HF_VIDEO_TYPES),)


def frames_first(model: nn.Module) -> bool:
    """Whether ``model`` takes clips frames first, ``(N, T, C, H, W)`` (see :data:`FRAMES_FIRST`)."""
    return any(rule(model) for rule in FRAMES_FIRST)


def input_spatial_size(model: nn.Module, reference: Any) -> tuple[int, ...]:
    """The spatial axes of a model's primary input the maps align with: ``shape[2:]``, or
    ``(T, H, W)`` of a frames-first clip ``(N, T, C, H, W)``."""
    shape = tuple(reference.shape)
    if len(shape) == 5 and frames_first(model):
        return (shape[1], *shape[3:])
    return shape[2:]


def pathway_alpha(model: nn.Module) -> int | None:
    """For a pytorchvideo SlowFast model (a ``MultiPathWayWithFuse`` block), the fast pathway's
    frame-rate ratio alpha: the temporal stride of its fast-to-slow fusion convolution (4 in the hub
    models); ``None`` for a single-pathway model."""
    fused = IsInstance("pytorchvideo.models.net.MultiPathWayWithFuse")
    for module in model.modules():
        if fused(module):
            fusion = getattr(module, "multipathway_fusion", None)
            conv = getattr(fusion, "conv_fast_to_slow", None)
            stride = getattr(conv, "stride", None)
            return int(stride[0]) if stride else 4
    return None


def _hf_frames(model: nn.Module) -> int:
    return int(model.config.num_frames)


def _torchvision_mvit_frames(model: nn.Module) -> int:
    return int(model.pos_encoding.temporal_size) * int(model.conv_proj.stride[0])


def _pytorchvideo_mvit_frames(model: nn.Module) -> int:
    return int(model.cls_positional_encoding.patch_embed_shape[0]) * int(model.patch_embed.patch_model.stride[0])


#: Video models with a fixed number of input frames (learned temporal position embeddings): how to
#: read it off the model.
FIXED_FRAMES: Sequence[tuple[Callable[[nn.Module], bool], Callable[[nn.Module], int]]] = (
    (ModelType(_HF_VIDEO_TYPES), _hf_frames),
    (IsInstance("torchvision.models.video.mvit.MViT"), _torchvision_mvit_frames),
    (IsInstance("pytorchvideo.models.vision_transformers.MultiscaleVisionTransformers"), _pytorchvideo_mvit_frames),
)


def clip_frames(model: nn.Module) -> int | None:
    """The exact number of frames a fixed-length video model takes (see :data:`FIXED_FRAMES`), else ``None``."""
    for recognise, frames in FIXED_FRAMES:
        if recognise(model):
            try:
                return frames(model)
            except (AttributeError, TypeError, IndexError):
                return None
    return None
