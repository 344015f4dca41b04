"""multiexplain: Grad-CAM++ explanations for classification, captioning, video and distillation.

Importing the package loads only the core (:mod:`multiexplain.core`, the CAM math) and the
explainer (:mod:`multiexplain.explain`); both import nothing but torch. The task adapters
(``multiexplain.adapters``), model definitions (``multiexplain.models``), data generators
(``multiexplain.data``) and applications (``zoo``, ``io``, ``cli``, ``demo``, ``train``) load on
first import.
"""

from .core import (
    class_activation_map,
    grad_cam_plus_plus_alpha,
    grad_cam_plus_plus_weights,
    grad_cam_weights,
    normalize_maps,
    scale_maps,
    upsample_maps,
    weighted_activation_map,
)
from .explain import (
    METHODS,
    BaseCAM,
    ChannelsLast,
    ExplainRequest,
    Explanation,
    GradCAM,
    GradCAMPlusPlus,
    LayerChoice,
    MergedPatches,
    TileTokens,
    TokenReshape,
    call_model,
    explain_request,
    model_logits,
    primary_input,
    register_method,
    resolve_layer,
)

__version__ = "0.2.0"

__all__ = [
    "BaseCAM", "ChannelsLast", "ExplainRequest", "Explanation", "GradCAM", "GradCAMPlusPlus", "LayerChoice",
    "METHODS", "MergedPatches", "TileTokens", "TokenReshape", "call_model", "class_activation_map", "explain_request", "grad_cam_plus_plus_alpha",
    "grad_cam_plus_plus_weights", "grad_cam_weights", "model_logits", "normalize_maps", "primary_input",
    "register_method", "resolve_layer", "scale_maps", "upsample_maps", "weighted_activation_map", "__version__",
]
