"""The only place that runs a model for an explanation: explainers and their method registry
(:mod:`.explainer`), the one capture (:mod:`.capture`), the one layer resolver (:mod:`.layers`,
with per-family rules as data in :mod:`.families`) and the target rules (:mod:`.targets`).
Imports only torch and :mod:`multiexplain.core`."""

from .capture import LayerCapture, feature_element
from .explainer import (
    AUTO_CHUNK_BYTES,
    METHODS,
    BaseCAM,
    ExplainRequest,
    Explanation,
    GradCAM,
    GradCAMPlusPlus,
    MaxBatch,
    auto_chunk,
    check_max_batch,
    explain_request,
    method_names,
    register_method,
)
from .layers import ChannelsLast, LayerChoice, MergedPatches, TileTokens, TokenReshape, layer_name, resolve_layer
from .targets import Inputs, PositionScores, Targets, call_model, model_logits, primary_input, target_scores

__all__ = [
    "AUTO_CHUNK_BYTES", "BaseCAM", "ChannelsLast", "ExplainRequest", "Explanation", "GradCAM", "GradCAMPlusPlus", "Inputs",
    "LayerCapture", "LayerChoice", "METHODS", "MaxBatch", "MergedPatches", "PositionScores", "Targets", "TileTokens", "TokenReshape", "auto_chunk", "call_model", "check_max_batch", "explain_request",
    "feature_element", "layer_name", "method_names", "model_logits", "primary_input", "register_method",
    "resolve_layer", "target_scores",
]
