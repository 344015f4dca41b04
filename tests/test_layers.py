"""The one layer resolver and the one capture: the same layer and maps from every entry point,
container outputs kept intact, a probe that is cheap, thread-safe and leaves the model as it was."""

from __future__ import annotations

import collections
import threading
import warnings

import pytest
import torch
from torch import nn

from multiexplain import GradCAMPlusPlus, resolve_layer, zoo
from multiexplain.adapters.classification import explain_images
from multiexplain.adapters.video import explain_clip, slowfast_pathways
from multiexplain.explain.capture import LayerCapture, feature_element, replace_element
from multiexplain.explain.layers import probe_layer


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _flags(model: nn.Module) -> list[bool]:
    return [m.training for m in model.modules()]


def _nonzero_heads(model: nn.Module) -> nn.Module:
    """torchvision zero-initialises ViT heads (no gradient anywhere); small random weights instead."""
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.detach().any():
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * 0.02)
    return model


# -- the same layer and maps from the explainer, the task adapter and the zoo --------------------

IMAGE_CASES = {
    "torchvision:swin_t@none": ((1, 3, 64, 64), "norm"),
    "torchvision:vit_b_16@none": ((1, 3, 224, 224), "encoder.layers.encoder_layer_11.ln_1"),
}
VIDEO_CASES = {
    "torchvision:r3d_18@none": ((1, 3, 16, 56, 56), "layer4"),
    "pytorchvideo:x3d_s@none": ((1, 3, 13, 160, 160), "blocks.4"),
    "pytorchvideo:slowfast_r50@none": ((1, 3, 32, 224, 224), "blocks.4.multipathway_blocks.1"),
    "pytorchvideo:mvit_base_16x4@none": ((1, 3, 16, 224, 224), "blocks.15.norm1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("spec", list(IMAGE_CASES))
def test_image_models_get_one_layer_from_every_entry_point(spec, one_torch_thread):
    shape, expected = IMAGE_CASES[spec]
    torch.manual_seed(0)
    loaded = zoo.load_model(spec)
    model = _nonzero_heads(loaded.model)
    x = torch.rand(shape)
    explainer = GradCAMPlusPlus(model)(x, 3)
    adapter = explain_images(model, x, targets=3)
    zoo_path = GradCAMPlusPlus(model, loaded.layer, reshape=loaded.reshape)(x, 3)  # what the CLI runs
    cli_path = explain_images(model, x, targets=3, layer=loaded.layer, reshape=loaded.reshape)
    for result in (adapter, zoo_path, cli_path):
        assert result.layer == explainer.layer == expected
        torch.testing.assert_close(result.maps, explainer.maps, atol=1e-6, rtol=0)
        torch.testing.assert_close(result.raw, explainer.raw, atol=1e-6, rtol=0)
    assert not explainer.zero_gradient.any() and explainer.raw.shape[1:].numel() > 1
    assert _hooks(model) == 0


@pytest.mark.slow
@pytest.mark.parametrize("spec", list(VIDEO_CASES))
def test_video_models_get_one_layer_from_every_entry_point(spec, one_torch_thread):
    shape, expected = VIDEO_CASES[spec]
    torch.manual_seed(0)
    loaded = zoo.load_model(spec)
    assert loaded.task == "video"
    model = loaded.model
    clip = torch.rand(shape)
    inputs = slowfast_pathways(clip) if "slowfast" in spec else clip
    target = 5
    explainer = GradCAMPlusPlus(model)(inputs, target, input_size=shape[2:])
    adapter = explain_clip(model, inputs, target)
    zoo_path = explain_clip(model, inputs, target, layer=loaded.layer)  # what the CLI runs
    for result in (adapter, zoo_path):
        assert result.layer == explainer.layer == expected
        torch.testing.assert_close(result.raw, explainer.raw, atol=1e-6, rtol=0)
        torch.testing.assert_close(result.maps, explainer.maps, atol=1e-6, rtol=0)
        torch.testing.assert_close(result.scores, explainer.scores, atol=1e-6, rtol=0)
    assert adapter.raw.shape[1] > 1, "the chosen layer keeps the time axis"
    assert adapter.maps.shape == (1, *shape[2:]) and torch.isfinite(adapter.maps).all()
    assert _hooks(model) == 0


def test_hugging_face_vit_from_a_saved_tiny_config_gets_one_layer(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, num_labels=4)
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    loaded = zoo.load_model(f"hf:{tmp_path / 'vit'}")
    x = torch.rand(2, 3, 32, 32)
    explainer = GradCAMPlusPlus(loaded.model)(x, [1, 2])
    adapter = explain_images(loaded.model, x, targets=[1, 2], layer=loaded.layer, reshape=loaded.reshape)
    assert adapter.layer == explainer.layer and explainer.layer.endswith("1.layernorm_before")
    torch.testing.assert_close(adapter.maps, explainer.maps, atol=1e-6, rtol=0)
    assert explainer.raw.shape == (2, 4, 4)


def test_x3d_layer_keeps_the_time_axis_the_head_pool_collapses():
    from pytorchvideo.models import x3d

    torch.manual_seed(0)
    model = x3d.create_x3d(input_clip_length=4, input_crop_size=64, model_num_class=5, head_dim_out=32).eval()
    clip = torch.rand(1, 3, 4, 64, 64)
    # The probe, without the family rule, must not take the head's pool (T collapsed to 1).
    found = probe_layer(model, lambda m: m(clip), tuple(clip.shape), lambda out: out[:, 0])
    assert "blocks.5" not in found.name or found.grid[0] > 1
    assert found.grid[0] == 4 and found.layout == "channels_first"
    assert explain_clip(model, clip).raw.shape[1] == 4


# -- the capture keeps the container type -----------------------------------------------------------

class Returns(nn.Module):
    """A conv whose output is wrapped in a container of the given kind."""

    def __init__(self, kind: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.kind = kind

    def forward(self, x):
        y = self.conv(x)
        if self.kind == "tuple1":
            return (y,)
        if self.kind == "list":
            return [y, y.mean()]
        if self.kind == "dict":
            return {"features": y, "aux": 1}
        if self.kind == "namedtuple":
            return Pair(y, torch.zeros(1))
        if self.kind == "model_output":
            from transformers.modeling_outputs import BaseModelOutput

            return BaseModelOutput(last_hidden_state=y)
        return y


Pair = collections.namedtuple("Pair", "features extra")


class Reads(nn.Module):
    """The next module: checks it receives the container type the layer returned, then reads it."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.head = nn.Linear(4, 3)

    def forward(self, out):
        if self.kind == "tuple1":
            assert type(out) is tuple and len(out) == 1
            y = out[0]
        elif self.kind == "list":
            assert type(out) is list
            out[1] = out[1] * 1  # pytorchvideo's SlowFast assigns into the list
            y = out[0]
        elif self.kind == "dict":
            assert type(out) is dict and out["aux"] == 1
            y = out["features"]
        elif self.kind == "namedtuple":
            assert type(out) is Pair
            y = out.features
        elif self.kind == "model_output":
            from transformers.modeling_outputs import BaseModelOutput

            assert type(out) is BaseModelOutput
            y = out.last_hidden_state
        else:
            y = out
        return self.head(torch.relu(y).mean(dim=(2, 3)))


@pytest.mark.parametrize("kind", ["tensor", "tuple1", "list", "dict", "namedtuple", "model_output"])
def test_capture_hands_the_next_module_the_container_the_layer_returned(kind):
    torch.manual_seed(0)
    model = nn.Sequential(Returns(kind), Reads(kind)).eval()
    x = torch.rand(2, 3, 8, 8)
    element = "features" if kind == "dict" else None
    result = GradCAMPlusPlus(model, "0", element=element)(x, [0, 2])
    reference = GradCAMPlusPlus(model, "0.conv")(x, [0, 2])  # the same tensor, captured inside
    torch.testing.assert_close(result.raw, reference.raw)
    assert result.maps.shape == (2, 8, 8) and not result.zero_gradient.any()
    # "auto" finds the same layer through the container.
    auto = GradCAMPlusPlus(model)(x, [0, 2])
    torch.testing.assert_close(auto.raw, reference.raw)


def test_feature_element_rules_and_errors():
    y = torch.zeros(1, 2, 3, 3)
    assert feature_element((y, 1))[0] == 0 and feature_element([1, y])[0] == 1
    assert feature_element({"a": 1, "last_hidden_state": y, "b": y})[0] == "last_hidden_state"
    assert feature_element(("x", 1)) == (None, None)
    with pytest.raises(ValueError, match="no tensor under 'nope'"):
        feature_element({"a": y}, "nope")
    with pytest.raises(ValueError, match="out of range"):
        feature_element((y,), 3)
    replaced = replace_element([y, 2], 0, y + 1)
    assert type(replaced) is list and replaced[1] == 2 and replaced[0].sum() == 18
    capture = LayerCapture(nn.Identity(), "identity")
    with pytest.raises(RuntimeError, match="did not run"):
        capture.require()


@pytest.mark.slow
def test_slowfast_explains_with_the_generic_explainer():
    from pytorchvideo.models import slowfast

    torch.manual_seed(0)
    model = slowfast.create_slowfast(model_num_class=5, stem_dim_outs=(16, 2),
                                     head_pool_kernel_sizes=((2, 1, 1), (8, 1, 1))).eval()
    inputs = slowfast_pathways(torch.rand(1, 3, 8, 32, 32))
    result = GradCAMPlusPlus(model)(inputs, 1, input_size=(8, 32, 32))
    assert result.layer == "blocks.4.multipathway_blocks.1" and result.maps.shape == (1, 8, 32, 32)
    slow = GradCAMPlusPlus(model, branch=0)(inputs, 1, input_size=(8, 32, 32))
    assert slow.layer == "blocks.4.multipathway_blocks.0"
    # Naming the multi-pathway block itself (a list output) with the element to explain works too.
    block = GradCAMPlusPlus(model, "blocks.4", element=1)(inputs, 1, input_size=(8, 32, 32))
    torch.testing.assert_close(block.raw, result.raw)


# -- the probe: cheap, reproducible, thread-safe, leaves the model as it was --------------------------

class Net(nn.Module):
    """conv-BN-ReLU twice, no dropout: a train-mode forward is deterministic given the batch."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1, stride=2), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.body(x).mean(dim=(2, 3)))


def test_probe_does_not_touch_the_shared_model_and_is_reproducible():
    torch.manual_seed(0)
    model = Net().train()
    model.body[1].eval()  # mixed flags
    flags, state = _flags(model), {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.rand(2, 3, 8, 8)
    seen = []
    handle = model.body.register_forward_hook(lambda m, a, o: seen.append(m.training))
    try:
        first = probe_layer(model, lambda m: m(x), tuple(x.shape), lambda out: out[:, 0])
        second = probe_layer(model, lambda m: m(x), tuple(x.shape), lambda out: out[:, 0])
    finally:
        handle.remove()
    assert first.name == second.name == "body" and first.grid == (4, 4) and first.probed
    assert _flags(model) == flags and _hooks(model) == 0
    for key, value in model.state_dict().items():  # no running statistic moved (the shadow is in eval mode)
        assert torch.equal(value, state[key]), key
    # The user's own hook ran on the shadow in eval mode, never on the shared module in another mode.
    assert seen and not any(seen)
    assert all(p.grad is None for p in model.parameters())


def test_four_threads_on_one_train_mode_model_give_the_sequential_maps():
    torch.manual_seed(0)
    model = Net().train()
    model.body[4].eval()
    flags = _flags(model)
    batches = [torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(12)]
    sequential = [GradCAMPlusPlus(_copy(model))(x, [0, 1, 2, 3]).maps for x in batches]
    for repeat in range(3):
        explainer = GradCAMPlusPlus(model)  # "auto": the probe runs inside the threads, once
        results: dict[int, torch.Tensor] = {}
        errors: list[BaseException] = []

        def work(indices):
            try:
                for i in indices:
                    results[i] = explainer(batches[i], [0, 1, 2, 3]).maps
            except BaseException as error:  # noqa: BLE001 - reported below
                errors.append(error)

        threads = [threading.Thread(target=work, args=(range(t, 12, 4),)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors
        for i, expected in enumerate(sequential):
            torch.testing.assert_close(results[i], expected, atol=1e-6, rtol=0, msg=f"batch {i}, repeat {repeat}")
        assert _flags(model) == flags and _hooks(model) == 0


def _copy(model: nn.Module) -> nn.Module:
    """An independent copy with the same weights and flags, for the sequential reference."""
    import copy

    return copy.deepcopy(model)


def test_named_layer_tokens_and_channels_last_are_read_from_their_shape():
    import torchvision

    torch.manual_seed(0)
    swin = torchvision.models.swin_t(num_classes=3).eval()
    x = torch.rand(1, 3, 64, 64)
    named = GradCAMPlusPlus(swin, "features")(x, 1)  # (N, H, W, C) without reshape=
    assert named.raw.shape == (1, 2, 2)
    vit = _nonzero_heads(torchvision.models.vit_b_16(num_classes=3, image_size=32).eval())
    tokens = GradCAMPlusPlus(vit, "encoder.layers.encoder_layer_11.ln_1")(torch.rand(1, 3, 32, 32), 1)
    assert tokens.raw.shape == (1, 2, 2) and not tokens.zero_gradient.any()


def test_resolver_errors_name_what_to_do():
    model = Net()
    with pytest.raises(ValueError, match="no layer named 'bdy'.*close names: body"):
        resolve_layer(model, "bdy")
    with pytest.raises(ValueError, match="needs one forward"):
        resolve_layer(model, "auto")
    assert resolve_layer(model, "body.-1").name == "body.5"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GradCAMPlusPlus(model, "body.-3")(torch.rand(1, 3, 8, 8)).layer == "body.3"
