"""Compatibility matrix: every torchvision classifier and video model, random weights, ``"auto"`` layer.

Run alone with ``pytest -m matrix tests/test_matrix.py``. Each model is built with its real
torchvision class (``weights=None``, ``num_classes=10``; ViTs get ``image_size=`` so they stay small),
explained once at the smallest input whose last feature map still has more than one position, and
must give a finite map of the input's spatial size computed from non-zero gradients at the chosen
layer, leaving the model as it was (no hooks, no ``.grad``, eval flags kept). Random weights can
legitimately give an all-zero map after the ReLU, so the map's contents are not checked here.

With ``--update-results`` a run merges its per-model results (layer chosen, how it was chosen,
layout, grid, pass, seconds) into ``benchmarks/results/compatibility.json`` and re-renders
``compatibility.md``; without it nothing tracked is written. ``scripts/update_readme_compat.py``
writes the README's list from that JSON.

The module also holds the token / channels-last path's own tests on small models (Hugging Face ViT
and Swin from tiny configs, a hand-built Swin-style model, and the errors).
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torchvision import models

from multiexplain import GradCAMPlusPlus
from multiexplain.explain.layers import ChannelsLast, TokenReshape, probe_layer
from repo_scripts import load_repo_module

pytestmark = pytest.mark.matrix

REPO = Path(__file__).resolve().parents[1]
RESULTS_JSON = REPO / "benchmarks" / "results" / "compatibility.json"

IMAGE_MODELS = models.list_models(module=models)
VIDEO_MODELS = models.list_models(module=models.video)


@dataclass(frozen=True)
class Case:
    """How one architecture is built and fed: builder kwargs and the input shape ``(1, 3, [T,] H, W)``."""

    kwargs: dict[str, Any] = field(default_factory=dict)
    input_shape: tuple[int, ...] = (1, 3, 64, 64)
    expected_layout: str = "channels_first"


# The smallest inputs that keep the last feature map at >= 2 x 2 (stride-32 nets: 64 x 64).
_VIT_IMAGE_SIZE = {"vit_b_16": 32, "vit_l_16": 32, "vit_h_14": 28, "vit_b_32": 64, "vit_l_32": 64}


def case_for(name: str) -> Case:
    if name in _VIT_IMAGE_SIZE:
        size = _VIT_IMAGE_SIZE[name]  # builder kwarg: the position embedding is sized for it
        return Case({"image_size": size}, (1, 3, size, size), "tokens")
    if name == "alexnet":
        return Case(input_shape=(1, 3, 96, 96))  # 64 x 64 collapses its features to 1 x 1
    if name == "inception_v3":
        return Case({"init_weights": True}, (1, 3, 107, 107))  # valid convs: 107 -> 2 x 2 Mixed_7c
    if name == "googlenet":
        return Case({"init_weights": True})
    if name == "maxvit_t":
        return Case(input_shape=(1, 3, 224, 224))  # partition size 7 is fixed: every stage must divide by 7
    if name in ("r3d_18", "mc3_18", "r2plus1d_18"):
        return Case(input_shape=(1, 3, 8, 64, 64))
    if name == "s3d":
        return Case(input_shape=(1, 3, 16, 224, 224))  # fixed AvgPool3d((2, 7, 7)) after the features
    if name.startswith("mvit"):
        # The builders fix spatial_size=(224, 224), temporal_size=16 (no kwarg to shrink them).
        return Case(input_shape=(1, 3, 16, 224, 224), expected_layout="tokens")
    if name.startswith("swin3d"):
        return Case(input_shape=(1, 3, 8, 64, 64), expected_layout="channels_last")
    if name.startswith("swin"):
        return Case(expected_layout="channels_last")  # the last stage's norm, (N, H, W, C)
    return Case()


ALL_MODELS = [(name, "classification") for name in IMAGE_MODELS] + [(name, "video") for name in VIDEO_MODELS]


def _render_module():
    return load_repo_module("scripts/update_readme_compat.py")


@pytest.fixture(scope="module")
def matrix_results(request):
    """Collects one record per model; with ``--update-results``, on teardown merges them into the
    results JSON and re-renders the Markdown twin (entries of models torchvision no longer lists are dropped)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(threads, 2))
    records: dict[str, dict[str, Any]] = {}
    yield records
    torch.set_num_threads(threads)
    if not records or not request.config.getoption("--update-results"):
        return
    previous = json.loads(RESULTS_JSON.read_text())["models"] if RESULTS_JSON.exists() else []
    merged = {entry["model"]: entry for entry in previous}
    merged.update(records)
    listed = {name for name, _ in ALL_MODELS}
    ordered = [merged[name] for name, _ in ALL_MODELS if name in merged and name in listed]
    payload = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "method": "gradcam++",
        "target_layer": "auto",
        "models": ordered,
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(payload, indent=1) + "\n")
    render = _render_module()
    (RESULTS_JSON.with_suffix(".md")).write_text(render.render_results_markdown(payload))


def _hook_count(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def _reinit_zero_linears(model: nn.Module) -> bool:
    """torchvision zero-initialises ViT heads, which makes every logit constant and every gradient
    zero; give such all-zero weight matrices small random values (as training would)."""
    changed = False
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.detach().any():
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
            changed = True
    return changed


@pytest.mark.slow
@pytest.mark.parametrize("name,family", ALL_MODELS, ids=[name for name, _ in ALL_MODELS])
def test_torchvision_model_explains_with_auto_layer(name: str, family: str, matrix_results) -> None:
    case = case_for(name)
    record: dict[str, Any] = {
        "model": name,
        "family": family,
        "input_shape": list(case.input_shape),
        "builder_kwargs": {"weights": None, "num_classes": 10, **case.kwargs},
        "passed": False,
    }
    matrix_results[name] = record
    torch.manual_seed(0)
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        model = models.get_model(name, weights=None, num_classes=10, **case.kwargs).eval()
        record["head_reinitialised"] = _reinit_zero_linears(model)
        record["params_M"] = round(sum(p.numel() for p in model.parameters()) / 1e6, 1)
        record["build_s"] = round(time.perf_counter() - started, 2)
        x = torch.randn(case.input_shape, generator=torch.Generator().manual_seed(1))
        started = time.perf_counter()
        explainer = GradCAMPlusPlus(model, "auto")
        explanation = explainer(x)
        record["explain_s"] = round(time.perf_counter() - started, 2)
        # CPU seconds of this process for build + explain: comparable across runs on a shared machine.
        record["cpu_s"] = round(time.process_time() - cpu_started, 2)
        found = explainer.auto
        assert found is not None
        record.update(layer=explanation.layer, layout=found.layout, grid=list(found.grid), probed=found.probed,
                      source=found.source)

        spatial = case.input_shape[2:]
        assert explanation.maps.shape == (1, *spatial)
        assert explanation.raw.shape == (1, *found.grid) and math.prod(found.grid) > 1
        assert torch.isfinite(explanation.maps).all() and torch.isfinite(explanation.raw).all()
        assert explanation.maps.min() >= 0 and explanation.maps.max() <= 1
        # A family rule names the layer; otherwise the probe confirmed a non-zero gradient on its grid.
        assert found.probed or found.source.startswith("family"), found
        assert not explanation.zero_gradient.any(), f"all gradients at {explanation.layer} are zero"
        assert found.layout == case.expected_layout, f"{name} went through the {found.layout} path"
        if name.startswith("vit_"):
            # The final tokens reach the head only through the class token: the last block's ln_1 is
            # the last layer whose patch tokens get a gradient.
            assert explanation.layer.endswith("encoder_layer_" + str(len(model.encoder.layers) - 1) + ".ln_1")
        # The model is left as it was.
        assert _hook_count(model) == 0
        assert all(p.grad is None for p in model.parameters())
        assert not any(m.training for m in model.modules())
        record["passed"] = True
    except BaseException as error:
        record["error"] = f"{type(error).__name__}: {str(error)[:300]}"
        raise
    finally:
        model = explainer = explanation = None  # free the big ones (vit_h_14, regnet_y_128gf) now
        gc.collect()


# ---- the token / channels-last path on small models -------------------------------------------


def test_hugging_face_vit_goes_through_the_token_path():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8, num_labels=4,
    )
    model = ViTForImageClassification(config).eval()
    x = torch.randn(2, 3, 32, 32)
    explainer = GradCAMPlusPlus(model, "auto")
    explanation = explainer({"pixel_values": x}, targets=[1, 3])
    assert explainer.auto.layout == "tokens" and explainer.auto.grid == (4, 4)
    assert explainer.auto.source.startswith("family") and explainer.reshape.num_prefix_tokens == 1
    # The probe, without the family rule, finds the same layer and reading.
    probed = probe_layer(model, lambda m: m(pixel_values=x), (2, 3, 32, 32), lambda out: out.logits[:, 1])
    assert probed.name == explanation.layer and probed.reshape == TokenReshape(grid=(4, 4), num_prefix_tokens=1)
    # The last layer whose patch tokens reach the CLS-token head: the last layer's pre-attention norm.
    assert explanation.layer.endswith(".1.layernorm_before")
    assert explanation.raw.shape == (2, 4, 4) and explanation.maps.shape == (2, 32, 32)
    assert torch.isfinite(explanation.maps).all() and not explanation.zero_gradient.any()


def test_hugging_face_swin_tokens_without_class_token():
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    config = SwinConfig(
        image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=4, num_labels=3,
    )
    model = SwinForImageClassification(config).eval()
    x = torch.randn(1, 3, 32, 32)
    explainer = GradCAMPlusPlus(model, "auto")
    explanation = explainer(x)
    assert explainer.auto.layout == "tokens" and explainer.auto.grid == (4, 4)
    assert explainer.reshape.num_prefix_tokens == 0
    assert explanation.maps.shape == (1, 32, 32) and not explanation.zero_gradient.any()


class ChannelsLastNet(nn.Module):
    """A Swin-style model: channels-last stages, the head pools over (H, W) without a permute module."""

    def __init__(self, channels: int = 12, classes: int = 5):
        super().__init__()
        self.embed = nn.Conv2d(3, channels, 4, stride=4)
        self.stage = nn.Sequential(nn.LayerNorm(channels), nn.GELU())
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).permute(0, 2, 3, 1)  # (N, H, W, C)
        return self.head(self.stage(tokens).mean(dim=(1, 2)))


def test_channels_last_output_is_detected_and_matches_an_explicit_reshape():
    torch.manual_seed(0)
    model = ChannelsLastNet().eval()
    x = torch.randn(2, 3, 24, 32)  # non-square: the grid is 6 x 8
    explainer = GradCAMPlusPlus(model, "auto")
    auto = explainer(x)
    assert explainer.auto.layout == "channels_last" and auto.layer == "stage"
    assert auto.raw.shape == (2, 6, 8)
    explicit = GradCAMPlusPlus(model, "stage", reshape=ChannelsLast())(x)
    torch.testing.assert_close(auto.maps, explicit.maps)
    torch.testing.assert_close(auto.raw, explicit.raw)


def test_square_ambiguity_prefers_channels_first():
    # (N, 6, 6, 6) on a 24 x 24 input reads both ways; channels-first is PyTorch's convention.
    model = nn.Sequential(nn.Conv2d(3, 6, 4, stride=4), nn.ReLU(), nn.Flatten(), nn.Linear(216, 2))
    found = probe_layer(model, lambda m: m(torch.randn(1, 3, 24, 24)), (1, 3, 24, 24))
    assert found.layout == "channels_first" and found.reshape is None and found.name == "1"


class LatentTokenNet(nn.Module):
    """Perceiver-style: 7 learned latent tokens attend to the pixels, so no patch grid exists."""

    def __init__(self):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(7, 8))
        self.mix = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x.flatten(2).mean(1, keepdim=True)  # (N, 1, H*W)
        latents = self.latents.unsqueeze(0) * pixels.mean(-1, keepdim=True)  # (N, 7, 8)
        return self.head(self.mix(latents).mean(1))


def test_tokens_without_a_grid_give_a_clear_error():
    model = LatentTokenNet()
    with pytest.raises(ValueError, match=r"could not pick a layer automatically.*tokens.*TokenReshape\(grid="):
        GradCAMPlusPlus(model, "auto")(torch.randn(1, 3, 16, 16))
    assert _hook_count(model) == 0


def test_zero_gradient_everywhere_warns_and_falls_back_to_the_last_candidate():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    nn.init.zeros_(model[3].weight)
    with pytest.warns(RuntimeWarning, match="zero gradient on every candidate"):
        explanation = GradCAMPlusPlus(model, "auto")(torch.randn(1, 3, 8, 8))
    assert explanation.layer == "0" and explanation.zero_gradient.all()
    assert torch.equal(explanation.maps, torch.zeros_like(explanation.maps))


def test_frozen_model_is_probed_without_touching_requires_grad():
    model = torchvision.models.resnet18(num_classes=3).eval().requires_grad_(False)
    explanation = GradCAMPlusPlus(model, "auto")(torch.randn(1, 3, 64, 64))
    assert explanation.layer == "layer4" and not explanation.zero_gradient.any()
    assert not any(p.requires_grad for p in model.parameters())


class StemThenLatentTokens(LatentTokenNet):
    """A conv stem, then latent tokens with no grid: auto falls back to the stem and says why."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.stem(x))


def test_tokens_without_a_grid_after_a_conv_stem_warn_which_layer_was_chosen():
    torch.manual_seed(0)
    model = StemThenLatentTokens()
    with pytest.warns(RuntimeWarning, match=r"'mix' .*tokens of shape \(1, 7, 8\).*'stem' was chosen.*TokenReshape"):
        explanation = GradCAMPlusPlus(model, "auto")(torch.randn(1, 3, 16, 16))
    assert explanation.layer == "stem" and explanation.maps.shape == (1, 16, 16)


def test_one_spatial_axis_is_read_channels_first_only():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(1, 8, 5, stride=2), nn.ReLU(), nn.Conv1d(8, 16, 3, stride=2), nn.ReLU(),
        nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 3),
    )
    explainer = GradCAMPlusPlus(model, "auto")
    explanation = explainer(torch.randn(2, 1, 100))
    assert explainer.auto.layout == "channels_first" and explanation.layer == "3"
    assert explanation.raw.shape == (2, 23) and explanation.maps.shape == (2, 100)
