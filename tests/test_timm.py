"""timm models: the one resolver's layer for the common timm families, and ``timm:`` SPECs
(random weights, pretrained weights from the local Hugging Face cache, offline errors, a state
dict with ``--arch timm:NAME``). Real timm classes at small input sizes; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from multiexplain import ChannelsLast, GradCAMPlusPlus, TokenReshape, zoo

timm = pytest.importorskip("timm")  # in the test extra and the [timm] extra


@pytest.fixture(autouse=True)
def _offline(monkeypatch, one_torch_thread):
    monkeypatch.setenv("MULTIEXPLAIN_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


FAMILIES = [
    # name, create_model kwargs, input side, the layer, how its output is read
    ("resnet18", {}, 64, "layer4", None),
    ("convnext_atto", {}, 64, "stages", None),
    ("efficientnet_b0", {}, 64, "bn2", None),
    ("vit_tiny_patch16_224", {"img_size": 64}, 64, "blocks.11.norm1", TokenReshape(num_prefix_tokens=1)),
    ("deit_tiny_distilled_patch16_224", {"img_size": 64}, 64, "blocks.11.norm1", TokenReshape(num_prefix_tokens=2)),
    ("swin_tiny_patch4_window7_224", {"img_size": 112, "window_size": 7}, 112, "norm", ChannelsLast()),
    ("cait_xxs24_224", {"img_size": 64}, 64, "blocks.23", TokenReshape(num_prefix_tokens=0)),
    ("xcit_nano_12_p16_224", {"img_size": 64}, 64, "blocks.11", TokenReshape(num_prefix_tokens=0)),
]


@pytest.mark.slow
@pytest.mark.parametrize("name, kwargs, side, layer, reshape", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_auto_layer_of_timm_families_equals_the_named_layer(name, kwargs, side, layer, reshape):
    torch.manual_seed(0)
    model = timm.create_model(name, **kwargs).eval()
    x = torch.randn(2, 3, side, side)
    auto = GradCAMPlusPlus(model, "auto")(x, [1, 2])
    named = GradCAMPlusPlus(model, layer, reshape=reshape)(x, [1, 2])
    assert auto.layer == layer
    assert not auto.zero_gradient.any() and auto.maps.shape == (2, side, side)
    torch.testing.assert_close(auto.maps, named.maps)
    other = GradCAMPlusPlus(model, "auto")(x, [3, 4])
    assert not torch.allclose(other.maps, auto.maps)  # the map depends on the explained class


def test_timm_spec_with_random_weights():
    loaded = zoo.load_model("timm:resnet18@none")
    assert loaded.task == "classification" and loaded.layer == "auto"
    assert loaded.labels[:3] == ["tench", "goldfish", "great white shark"] and len(loaded.labels) == 1000
    assert loaded.mean == (0.485, 0.456, 0.406) and not loaded.model.training
    from PIL import Image

    assert loaded.preprocess(Image.new("L", (300, 200), 128)).shape == (3, 224, 224)


def _fake_hub_cache(root: Path, repo: str, state: dict) -> None:
    """A Hugging Face cache as ``timm.create_model(pretrained=True)`` leaves it: refs/main -> snapshot."""
    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    revision = "0" * 40
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    (folder / "snapshots" / revision).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "snapshots" / revision / "model.safetensors")


def test_timm_pretrained_weights_load_from_the_local_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "torch"))
    with pytest.raises(zoo.OfflineError, match=r"huggingface.co.*offline.*--arch timm:resnet18@none"):
        zoo.load_model("timm:resnet18")
    torch.manual_seed(3)
    reference = timm.create_model("resnet18").eval()
    repo = timm.models.get_pretrained_cfg("resnet18").hf_hub_id  # timm/resnet18.a1_in1k
    _fake_hub_cache(tmp_path / "hub", repo, reference.state_dict())
    loaded = zoo.load_model("timm:resnet18")
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(x))


def test_timm_state_dict_with_arch_and_a_new_head(tmp_path):
    torch.manual_seed(4)
    tuned = timm.create_model("convnext_atto", num_classes=5).eval()
    path = tmp_path / "tuned.pt"
    torch.save(tuned.state_dict(), path)
    loaded = zoo.load_model(str(path), arch="timm:convnext_atto")
    assert loaded.labels is None and loaded.model.num_classes == 5
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), tuned(x))
    with pytest.raises(zoo.SpecError, match="does not fit the architecture"):
        zoo.load_model(str(path), arch="timm:resnet18@none")


def test_timm_spec_errors():
    with pytest.raises(zoo.SpecError, match="no model named 'resnet1800'.*resnet18"):
        zoo.load_model("timm:resnet1800@none")
    with pytest.raises(zoo.SpecError, match=r"after a dot in the model name"):
        zoo.load_model("timm:resnet18@a1_in1k")
    assert zoo.parse_spec("timm:vit_small_patch16_224.augreg_in21k@none") == zoo.ModelSpec(
        "timm", "vit_small_patch16_224.augreg_in21k", "none")
