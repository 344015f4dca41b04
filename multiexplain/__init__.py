"""multiexplain: Grad-CAM++ explanations for classification, captioning, video and distillation."""

from .cam import METHODS, BaseCAM, Explanation, GradCAM, GradCAMPlusPlus, call_model, model_logits, primary_input
from .core import (
    class_activation_map,
    grad_cam_plus_plus_alpha,
    grad_cam_plus_plus_weights,
    grad_cam_weights,
    normalize_maps,
    upsample_maps,
    weighted_activation_map,
)
from .layers import ChannelsLast, TokenReshape, find_auto_layer, resolve_layer

__version__ = "0.1.0"

__all__ = [
    "BaseCAM",
    "ChannelsLast",
    "Explanation",
    "GradCAM",
    "GradCAMPlusPlus",
    "METHODS",
    "TokenReshape",
    "call_model",
    "class_activation_map",
    "find_auto_layer",
    "grad_cam_plus_plus_alpha",
    "grad_cam_plus_plus_weights",
    "grad_cam_weights",
    "model_logits",
    "normalize_maps",
    "primary_input",
    "resolve_layer",
    "upsample_maps",
    "weighted_activation_map",
    "__version__",
]
