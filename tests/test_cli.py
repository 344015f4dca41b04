"""The command line and the model SPECs: parsing, loading from local files, offline errors,
and the subcommands run end to end on tiny models and real files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from multiexplain import GradCAMPlusPlus, cli, zoo


@pytest.fixture(autouse=True)
def _offline_and_few_threads(monkeypatch):
    # Tests never reach the network: the zoo must answer from local files or say it is offline.
    monkeypatch.setenv("MULTIEXPLAIN_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def images(tmp_path: Path) -> list[str]:
    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("a.png", (70, 90)), ("b.jpg", (64, 64))):
        path = tmp_path / name
        Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def resnet_state(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=1000).state_dict(), path)
    return str(path)


# -- SPEC parsing --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, expected",
    [
        ("torchvision:resnet50", zoo.ModelSpec("torchvision", "resnet50", None)),
        ("torchvision:resnet50@none", zoo.ModelSpec("torchvision", "resnet50", "none")),
        ("torchvision:vit_b_16@IMAGENET1K_V1", zoo.ModelSpec("torchvision", "vit_b_16", "IMAGENET1K_V1")),
        ("hf:google/vit-base-patch16-224", zoo.ModelSpec("hf", "google/vit-base-patch16-224", None)),
        ("hf:/models/my@vit", zoo.ModelSpec("hf", "/models/my@vit", None)),
        ("pytorchvideo:x3d_s", zoo.ModelSpec("pytorchvideo", "x3d_s", None)),
        ("timm:resnet18", zoo.ModelSpec("timm", "resnet18", None)),
        ("timm:convnext_tiny.fb_in1k@none", zoo.ModelSpec("timm", "convnext_tiny.fb_in1k", "none")),
        ("builtin:scene-classifier", zoo.ModelSpec("builtin", "scene-classifier", None)),
        ("weights/model.pt", zoo.ModelSpec("file", "weights/model.pt", None)),
    ],
)
def test_parse_spec(spec, expected):
    parsed = zoo.parse_spec(spec)
    assert parsed == expected
    assert str(parsed) == spec


@pytest.mark.parametrize("spec", ["", "resnet50", "torchvision:", "torchvision:resnet50@", "s3:bucket/x"])
def test_parse_spec_rejects_bad_strings(spec):
    with pytest.raises(zoo.SpecError):
        zoo.parse_spec(spec)


def test_unknown_names_are_clear_errors():
    with pytest.raises(zoo.SpecError, match="no model named 'resnet5000'"):
        zoo.load_model("torchvision:resnet5000@none")
    with pytest.raises(zoo.SpecError, match="has no weights 'BOGUS'.*IMAGENET1K_V1"):
        zoo.load_model("torchvision:resnet18@BOGUS")
    with pytest.raises(zoo.SpecError, match="no builtin model 'nope'.*scene-classifier"):
        zoo.load_model("builtin:nope")
    with pytest.raises(zoo.SpecError, match="pytorchvideo has no hub model"):
        zoo.load_model("pytorchvideo:not_a_model@none")


def test_offline_errors_say_so_and_show_the_local_alternative(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty weights cache
    with pytest.raises(zoo.OfflineError, match=r"cannot be reached \(offline\?\).*--arch torchvision:resnet18@none"):
        zoo.load_model("torchvision:resnet18")
    with pytest.raises(zoo.OfflineError, match=r"offline.*save_pretrained.*--model hf:DIR"):
        zoo.load_model("hf:google/vit-base-patch16-224")
    with pytest.raises(zoo.OfflineError, match=r"offline.*--arch pytorchvideo:x3d_s@none"):
        zoo.load_model("pytorchvideo:x3d_s")


def test_state_dict_with_arch_loads_the_same_weights(resnet_state):
    loaded = zoo.load_model(resnet_state, arch="torchvision:resnet18", device="cpu")
    reference = torchvision.models.resnet18()
    reference.load_state_dict(torch.load(resnet_state, weights_only=True))
    reference.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(x), reference(x))
    assert not loaded.model.training
    assert loaded.labels is not None and len(loaded.labels) == 1000 and loaded.preprocess is not None


def test_state_dict_errors(resnet_state, tmp_path):
    with pytest.raises(zoo.SpecError, match="--arch"):
        zoo.load_model(resnet_state)
    with pytest.raises(zoo.SpecError, match="does not fit the architecture"):
        zoo.load_model(resnet_state, arch="torchvision:resnet34@none")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.load_model(str(tmp_path / "missing.pt"), arch="torchvision:resnet18@none")


def test_hf_local_directory_and_token_layer(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64, num_labels=3, id2label={0: "cat", 1: "dog", 2: "fox"},
                       label2id={"cat": 0, "dog": 1, "fox": 2})
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path / "vit")
    loaded = zoo.load_model(f"hf:{tmp_path / 'vit'}", device="cpu")
    assert loaded.labels == ["cat", "dog", "fox"]
    assert loaded.layer == "auto"  # the one resolver's family rule: the last block's pre-attention norm
    x = loaded.preprocess(Image.new("RGB", (50, 40), "red")).unsqueeze(0)
    assert x.shape == (1, 3, 32, 32)
    explanation = GradCAMPlusPlus(loaded.model, loaded.layer, reshape=loaded.reshape)(x, 2)
    assert explanation.layer in ("vit.layers.1.layernorm_before", "vit.encoder.layer.1.layernorm_before")
    assert explanation.raw.shape == (1, 4, 4) and explanation.maps.shape == (1, 32, 32)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        zoo.load_model(f"hf:{tmp_path / 'absent'}")


def test_resolve_device():
    assert zoo.resolve_device("cpu") == torch.device("cpu")
    assert zoo.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="unknown device"):
        zoo.resolve_device("tpu")


# -- the command line ------------------------------------------------------------------------------
@pytest.mark.parametrize("command", ["demo", "classify", "caption", "video", "evaluate", "distill"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--device" in text and "--out" in text


def test_classify_end_to_end_with_an_unreadable_file(images, resnet_state, tmp_path, capsys):
    bad = tmp_path / "broken.png"
    bad.write_text("not an image")
    out = tmp_path / "out"
    code = cli.main(["classify", images[0], str(bad), images[1], str(tmp_path / "missing.jpg"), "--model", resnet_state,
                     "--arch", "torchvision:resnet18", "--topk", "2", "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    assert "broken.png" in captured.err and "missing.jpg" in captured.err and "no such file" in captured.err
    assert f"report: {out / 'index.html'}" in captured.out
    predictions = json.loads((out / "predictions.json").read_text())
    assert [Path(r["image"]).name for r in predictions["results"]] == ["a.png", "b.jpg"]
    assert all(len(r["targets"]) == 2 for r in predictions["results"])
    assert {Path(p).name for p in predictions["skipped"]} == {"broken.png", "missing.jpg"}
    for result in predictions["results"]:
        with Image.open(out / result["figure"]) as figure:
            assert figure.width > 400  # input + 4 overlays + colour bar
    page = (out / "index.html").read_text()
    assert "broken.png" in page and predictions["results"][0]["figure"] in page


def test_classify_target_by_name_matches_the_explainer(images, resnet_state, tmp_path):
    out = tmp_path / "out"
    assert cli.main(["classify", images[0], "--model", resnet_state, "--arch", "torchvision:resnet18@none",
                     "--target", "goldfish", "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads((out / "predictions.json").read_text())["results"][0]
    assert result["targets"][0]["class"] == 1 and result["targets"][0]["label"] == "goldfish"
    # The CLI's probability is the softmax of the same model on the same preprocessed input.
    loaded = zoo.load_model(resnet_state, arch="torchvision:resnet18", device="cpu")
    x = loaded.preprocess(Image.open(images[0]).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        p = loaded.model(x).softmax(1)[0, 1].item()
    assert result["targets"][0]["probability"] == pytest.approx(p, rel=1e-4)


def test_classify_with_a_timm_spec(images, tmp_path, capsys):
    """``multiexplain classify img.png --model timm:resnet18@none``: timm's preprocessing, the one
    resolver's layer (layer4), ImageNet class names, the same top-1 as the model run by hand."""
    timm = pytest.importorskip("timm")
    out = tmp_path / "out"
    torch.manual_seed(0)
    assert cli.main(["classify", images[0], "--model", "timm:resnet18@none", "--out", str(out), "--device", "cpu"]) == 0
    payload = json.loads((out / "predictions.json").read_text())
    assert payload["settings"]["layer"] == "layer4" and payload["settings"]["model"] == "timm:resnet18@none"
    target = payload["results"][0]["targets"][0]
    torch.manual_seed(0)
    model = timm.create_model("resnet18").eval()
    transform = timm.data.create_transform(**timm.data.resolve_model_data_config(model))
    with torch.no_grad():
        probabilities = model(transform(Image.open(images[0]).convert("RGB")).unsqueeze(0)).softmax(1)[0]
    assert target["class"] == int(probabilities.argmax())
    assert target["probability"] == pytest.approx(float(probabilities.max()), rel=1e-4)
    assert target["label"] == timm.data.ImageNetInfo().index_to_description(target["class"]).split(",")[0]
    assert (out / payload["results"][0]["figure"]).is_file()
    assert f"{images[0]}: {target['label']}" in capsys.readouterr().out


def test_classify_errors(images, resnet_state, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["classify", str(tmp_path / "none.png"), "--model", resnet_state, "--arch",
                     "torchvision:resnet18", "--out", out, "--device", "cpu"]) == 2
    assert "no readable image" in capsys.readouterr().err
    assert cli.main(["classify", images[0], "--model", "torchvision:resnet18@none", "--target", "zebraa",
                     "--out", out, "--device", "cpu"]) == 2
    assert "did you mean zebra" in capsys.readouterr().err
    assert cli.main(["classify", images[0], "--model", resnet_state, "--out", out, "--device", "cpu"]) == 2
    assert "--arch" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["classify", images[0], "--model", "torchvision:resnet18@none", "--alpha", "2"])
    with pytest.raises(SystemExit):
        cli.main(["classify", images[0], "--model", "torchvision:resnet18@none", "--colormap", "nocmap"])


# -- caption / evaluate / distill ------------------------------------------------------------------
CHECKPOINTS = Path(__file__).resolve().parents[1] / "multiexplain" / "checkpoints"


def _shipped(*names: str):
    """The shipped checkpoints are committed: a missing one is a packaging error, not a skip."""
    missing = [n for n in names if not (CHECKPOINTS / n).is_file()]
    assert not missing, f"shipped checkpoint(s) {missing} missing from multiexplain/checkpoints"
    return lambda test: test


def _save_scene(path: Path, image: torch.Tensor) -> str:
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    return str(path)


@_shipped("show_and_tell.pt")
def test_caption_end_to_end(tmp_path, capsys):
    from multiexplain.data.captioned_scenes import make_captioned_scenes

    scenes = make_captioned_scenes(2, seed=77)
    paths = [_save_scene(tmp_path / f"scene{i}.png", scenes.images[i]) for i in range(2)]
    out = tmp_path / "out"
    code = cli.main(["caption", paths[0], str(tmp_path / "gone.png"), paths[1], "--out", str(out), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0 and "gone.png" in captured.err
    results = json.loads((out / "captions.json").read_text())["results"]
    assert len(results) == 2 and all(r["generated"] for r in results)
    for result in results:
        assert result["caption"] == " ".join(result["words"]) and len(result["word_log_probabilities"]) == len(result["words"])
        assert all(v <= 0 for v in result["word_log_probabilities"])
        for figure in result["figures"].values():
            with Image.open(out / figure) as image:
                assert image.width > 300
        assert f"{Path(result['image']).name}: " not in captured.err
    # A given caption is explained word for word, even one the model would not write.
    out2 = tmp_path / "given"
    assert cli.main(["caption", paths[0], "--caption", "two red diamonds", "--out", str(out2), "--device", "cpu"]) == 0
    given = json.loads((out2 / "captions.json").read_text())["results"][0]
    assert given["words"] == ["two", "red", "diamonds"] and given["generated"] is False


@pytest.mark.slow
def test_evaluate_an_image_folder(images, resnet_state, tmp_path, capsys):
    folder = tmp_path / "data"
    (folder / "nested").mkdir(parents=True)
    for i, path in enumerate(images):
        shutil.copy(path, folder / ("nested" if i else "") / Path(path).name)
    out = tmp_path / "out"
    assert cli.main(["evaluate", "--task", "classification", "--model", resnet_state, "--arch", "torchvision:resnet18",
                     "--data", str(folder), "--out", str(out), "--device", "cpu", "--road-samples", "1"]) == 0
    printed = capsys.readouterr().out
    assert "Average Drop % (lower is better)" in printed and "Grad-CAM++" in printed
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["settings"]["samples"] == 2 and payload["ROAD samples"] == 1
    assert payload["randomisation steps"].startswith("7 (per child module")  # fc, layer4 .. layer1, bn1, conv1
    pp, gc = payload["metrics"]["gradcam++"], payload["metrics"]["gradcam"]
    assert pp["Win % (higher is better)"] + gc["Win % (higher is better)"] == pytest.approx(100)
    for row in (pp, gc):
        assert 0 <= row["Average Drop % (lower is better)"] <= 100
        morf = row["ROAD MoRF confidence, mean over 10-90% removed (lower is better)"]
        lerf = row["ROAD LeRF confidence, mean over 10-90% removed (higher is better)"]
        assert 0 <= morf <= 1 and 0 <= lerf <= 1
        assert row["ROAD (LeRF - MoRF) / 2 (higher is better)"] == pytest.approx((lerf - morf) / 2)
        assert -1 <= row["Sanity: Spearman with the trained maps, all layers random (lower is better)"] <= 1
        assert row["Sanity: SSIM with the trained maps, all layers random (lower is better)"] <= 1
    assert (out / "index.html").is_file()


@pytest.mark.slow
def test_evaluate_an_image_folder_with_a_timm_spec(images, tmp_path, capsys):
    pytest.importorskip("timm")
    out = tmp_path / "out"
    spec = "timm:mobilenetv3_small_050@none"  # 0.02 GFLOPs a forward: ROAD runs 36 of them
    assert cli.main(["evaluate", "--task", "classification", "--model", spec, "--data",
                     str(Path(images[0]).parent), "--out", str(out), "--device", "cpu", "--road-samples", "1"]) == 0
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["settings"]["model"] == spec and payload["settings"]["samples"] == 2
    assert "ROAD (LeRF - MoRF) / 2 (higher is better)" in payload["metrics"]["gradcam"]
    assert "Sanity: SSIM with the trained maps, all layers random" in capsys.readouterr().out


def test_evaluate_errors(tmp_path, capsys):
    assert cli.main(["evaluate", "--task", "classification", "--model", "torchvision:resnet18@none",
                     "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "--data must be 'synthetic' or a folder" in capsys.readouterr().err
    assert cli.main(["evaluate", "--task", "captioning", "--data", str(tmp_path), "--out", str(tmp_path),
                     "--device", "cpu"]) == 2
    assert "evaluated on --data synthetic" in capsys.readouterr().err
    assert cli.main(["evaluate", "--task", "classification", "--model", "torchvision:resnet18@none",
                     "--out", str(tmp_path), "--device", "cpu"]) == 2
    assert "shipped shape scenes" in capsys.readouterr().err
    for flag, value in (("--road-samples", "-1"), ("--pointing-tolerance", "-2")):
        assert cli.main(["evaluate", "--task", "classification", "--out", str(tmp_path), "--device", "cpu",
                         flag, value]) == 2
        assert f"{flag} must be >= 0" in capsys.readouterr().err


@pytest.mark.slow
@_shipped("scene_cnn.pt")
def test_evaluate_synthetic_scenes(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["evaluate", "--task", "classification", "-n", "16", "--road-samples", "4", "--out", str(out),
                     "--device", "cpu"]) == 0
    payload = json.loads((out / "metrics.json").read_text())
    metrics = payload["metrics"]
    assert payload["ROAD samples"] == 4 and payload["pointing tolerance px"] == 2.0
    for method in ("gradcam++", "gradcam"):
        assert set(metrics[method]) >= {"Average Drop % (lower is better)", "Loc(0.25) (higher is better)",
                                        "Pointing game % (higher is better)", "Instances covered % (higher is better)",
                                        "Pointing game %, class mean (higher is better)",
                                        "ROAD (LeRF - MoRF) / 2 (higher is better)",
                                        "Sanity: Spearman with the trained maps, top layer random (lower is better)"}
        assert 0 <= metrics[method]["Energy inside the region % (higher is better)"] <= 100
        exact = metrics[method]["Pointing game %, class mean (higher is better)"]
        near = metrics[method]["Pointing game %, class mean, within 2 px (higher is better)"]
        assert 0 <= exact <= near <= 100  # a tolerance only adds hits


@pytest.mark.slow
@_shipped("action_c3d.pt")
def test_evaluate_synthetic_clips_with_space_time_road_and_the_sanity_check(tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["evaluate", "--task", "video", "-n", "4", "--road-samples", "2", "--pointing-tolerance", "1",
                     "--out", str(out), "--device", "cpu"]) == 0
    payload = json.loads((out / "metrics.json").read_text())
    assert payload["ROAD samples"] == 2 and payload["ROAD fractions"] == [0.1, 0.3, 0.5, 0.7, 0.9]
    for method in ("gradcam++", "gradcam"):
        row = payload["metrics"][method]
        morf = row["ROAD MoRF confidence, mean over 10-90% removed (lower is better)"]
        lerf = row["ROAD LeRF confidence, mean over 10-90% removed (higher is better)"]
        assert 0 <= morf <= 1 and 0 <= lerf <= 1
        assert row["ROAD (LeRF - MoRF) / 2 (higher is better)"] == pytest.approx((lerf - morf) / 2)
        for key in ("top layer random", "all layers random"):
            assert -1 <= row[f"Sanity: Spearman with the trained maps, {key} (lower is better)"] <= 1
        exact = row["Pointing game %, class mean (higher is better)"]
        assert 0 <= exact <= row["Pointing game %, class mean, within 1 px (higher is better)"] <= 100
    assert "Sanity: SSIM with the trained maps, all layers random" in capsys.readouterr().out
    assert (out / "index.html").is_file()


@pytest.mark.parametrize("suffix", [".yaml", ".toml"])
def test_distill_from_a_config_file(suffix, tmp_path, capsys):
    config = tmp_path / f"run{suffix}"
    if suffix == ".yaml":
        config.write_text("seed: 0\ndata: {train_size: 48, test_size: 24}\nstudent: {depth: 10, widen_factor: 1}\n"
                          "losses: {ce: 1.0}\ntrain: {epochs: 1, batch_size: 24, progress: false}\n")
    else:
        config.write_text("seed = 0\n[data]\ntrain_size = 48\ntest_size = 24\n[student]\ndepth = 10\nwiden_factor = 1\n"
                          "[losses]\nce = 1.0\n[train]\nepochs = 1\nbatch_size = 24\nprogress = false\n")
    out = tmp_path / "out"
    assert cli.main(["distill", "--config", str(config), "--out", str(out), "--device", "cpu"]) == 0
    assert "student test error:" in capsys.readouterr().out
    log = json.loads((out / "distill.json").read_text())
    assert 0 <= log["test_error"] <= 100 and len(log["history"]) == 1
    saved = torch.load(out / "student.pt", weights_only=True)
    assert saved["architecture"] == "wide_resnet" and saved["config"]["depth"] == 10 and "conv1.weight" in saved["state_dict"]


def test_distill_errors(tmp_path, capsys):
    assert cli.main(["distill", "--config", str(tmp_path / "none.yaml"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\ndata: {train_size: 8, test_size: 8}\n")
    assert cli.main(["distill", "--config", str(bad), "--out", str(tmp_path / "o"), "--device", "cpu"]) == 2
    assert "student" in capsys.readouterr().err


def _write_clip_mp4(path: Path, clip: torch.Tensor, fps: int) -> str:
    """A real MP4 file (PyAV) of a ``(3, T, H, W)`` clip in ``[0, 1]``."""
    import av

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = clip.shape[3], clip.shape[2], "yuv420p"
        for t in range(clip.shape[1]):
            frame = np.ascontiguousarray((clip[:, t].permute(1, 2, 0) * 255).round().byte().numpy())
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def _frames_of(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@_shipped("action_c3d.pt")
def test_video_end_to_end(tmp_path, capsys):
    from multiexplain.data.action_clips import ACTIONS, make_action_clips

    clips = make_action_clips(2, seed=55)
    paths = [_write_clip_mp4(tmp_path / f"clip{i}.mp4", clips.clips[i], fps=10) for i in range(2)]
    (tmp_path / "broken.mp4").write_bytes(b"\x00\x01garbage")
    out = tmp_path / "out"
    code = cli.main(["video", paths[0], str(tmp_path / "broken.mp4"), paths[1], "--out", str(out), "--device", "cpu"])
    assert code == 0 and "broken.mp4" in capsys.readouterr().err
    payload = json.loads((out / "video.json").read_text())
    assert [Path(r["video"]).name for r in payload["results"]] == ["clip0.mp4", "clip1.mp4"]
    for result in payload["results"]:
        assert result["fps"] == pytest.approx(10)
        for files in result["outputs"].values():
            assert files["label"] in ACTIONS
            with Image.open(out / files["gif"]) as gif:
                assert gif.n_frames == 16
                assert abs(gif.info["duration"] - 100) <= 10  # the clip's 10 fps is kept
            assert _frames_of(out / files["mp4"]) == 16
            with Image.open(out / files["strip"]) as strip:
                assert strip.width > 300
    # --class by name explains that class in every clip.
    out2 = tmp_path / "grow"
    assert cli.main(["video", paths[0], "--class", "grow", "--out", str(out2), "--device", "cpu"]) == 0
    outputs = json.loads((out2 / "video.json").read_text())["results"][0]["outputs"]
    assert {o["label"] for o in outputs.values()} == {"grow"}


@pytest.mark.slow
def test_video_with_a_pytorchvideo_model(tmp_path):
    """A pytorchvideo hub architecture (random weights: no download) through the same command."""
    torch.manual_seed(0)
    clip = torch.rand(3, 6, 48, 64)
    path = _write_clip_mp4(tmp_path / "random.mp4", clip, fps=6)
    out = tmp_path / "out"
    assert cli.main(["video", path, "--model", "pytorchvideo:x3d_xs@none", "--frames", "4", "--out", str(out),
                     "--device", "cpu"]) == 0
    result = json.loads((out / "video.json").read_text())["results"][0]
    assert result["frames"] == 4
    assert result["outputs"]["gradcam++"]["layer"].startswith("blocks")
    with Image.open(out / result["outputs"]["gradcam++"]["gif"]) as gif:
        assert gif.n_frames == 4


@_shipped("scene_cnn.pt")
def test_classify_with_the_shipped_multi_label_model(tmp_path):
    from multiexplain.data.scenes import make_scenes

    scenes = make_scenes(3, seed=4242)
    paths = [_save_scene(tmp_path / f"s{i}.png", scenes.images[i]) for i in range(3)]
    out = tmp_path / "out"
    assert cli.main(["classify", *paths, "--model", "builtin:scene-classifier", "--topk", "1", "--out", str(out),
                     "--device", "cpu"]) == 0
    results = json.loads((out / "predictions.json").read_text())["results"]
    loaded = zoo.load_model("builtin:scene-classifier")
    for i, result in enumerate(results):
        top = result["targets"][0]
        assert scenes.labels[i, top["class"]] == 1  # the top class is present in the scene
        # Sigmoid confidences (multi-label), not a softmax over the six classes.
        with torch.no_grad():
            logit = loaded.model(_reload(paths[i]))[0, top["class"]]
        assert top["probability"] == pytest.approx(torch.sigmoid(logit).item(), abs=1e-4)


def _reload(path: str) -> torch.Tensor:
    """The PNG as the CLI feeds it to a builtin model: RGB in [0, 1], (1, 3, H, W)."""
    array = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def test_caption_with_a_local_hf_vision_encoder_decoder(tmp_path):
    """`hf:DIR` for captioning: a tiny ViT + GPT-2 captioner saved with save_pretrained (random weights)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (GPT2Config, PreTrainedTokenizerFast, ViTConfig, ViTImageProcessor,
                              VisionEncoderDecoderConfig, VisionEncoderDecoderModel)

    from multiexplain.data.captioned_scenes import make_captioned_scenes

    scenes = make_captioned_scenes(20, seed=3)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(scenes.captions, trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    encoder = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    decoder = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    config = VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)
    config.decoder_start_token_id, config.eos_token_id, config.pad_token_id = (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    directory = tmp_path / "captioner"
    VisionEncoderDecoderModel(config=config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(directory)

    image = _save_scene(tmp_path / "scene.png", scenes.images[0])
    out = tmp_path / "out"
    assert cli.main(["caption", image, "--model", f"hf:{directory}", "--caption", scenes.captions[0],
                     "--out", str(out), "--device", "cpu"]) == 0
    result = json.loads((out / "captions.json").read_text())["results"][0]
    assert result["caption"] == scenes.captions[0] and result["words"] == scenes.captions[0].split()
    assert (out / result["figures"]["gradcam++"]).is_file()
