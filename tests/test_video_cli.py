"""`multiexplain video` on real MP4 files written with PyAV: every model family gets the same layer
and the same maps through the command line as through the Python adapter; whole videos window by
window; the source's timing kept; bad input reported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from multiexplain import cli, zoo
from multiexplain.adapters.video import WindowBlend, explain_clip, normalize_clip, window_starts
from multiexplain.io import VideoReader


def _mp4(path: Path, frames: int = 24, height: int = 48, width: int = 64, fps: int = 12, seed: int = 0) -> str:
    """A real MP4 (PyAV, MPEG-4 part 2): a bright square moving over textured noise."""
    import av

    rng = np.random.default_rng(seed)
    background = rng.integers(40, 120, (height, width, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            image = background.copy()
            x = (2 * t) % (width - 16)
            image[height // 3 : height // 3 + 16, x : x + 16] = (250, 220, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def _run(*argv: str) -> int:
    return cli.main(["video", *argv, "--device", "cpu"])


def _result(out: Path, index: int = 0) -> dict:
    return json.loads((out / "video.json").read_text())["results"][index]


def _adapter_maps(model, path: str, frames: int, size: int, loaded, **kwargs):
    """What the Python adapter gives for the clip the command line reads."""
    with VideoReader(path, size=size) as reader:
        clip = reader.clip(frames)
    x = clip.frames if "frames" not in loaded.extra else normalize_clip(clip.frames, loaded.mean, loaded.std)
    return explain_clip(model, x.unsqueeze(0), methods=("gradcam++", "gradcam"), **kwargs)


def _assert_same(out: Path, explained: dict, frames: int, size: int) -> None:
    result = _result(out)
    for method, explanation in explained.items():
        saved = np.load(out / result["outputs"][method]["maps"])
        assert saved.shape == (frames, size, size)
        assert result["outputs"][method]["layer"] == explanation.layer
        assert result["outputs"][method]["class"] == int(explanation.targets[0])
        np.testing.assert_allclose(saved, explanation.maps[0].numpy(), atol=2e-3)  # float16 on disk
        assert saved.max() == pytest.approx(1.0, abs=1e-3)


# -- every family: the same layer and maps from the command line and the adapter ----------------------

@pytest.mark.slow
def test_torchvision_state_dict_with_arch_gets_kinetics_names(tmp_path, one_torch_thread):
    torch.manual_seed(0)
    loaded = zoo.load_model("torchvision:r3d_18@none")
    weights = tmp_path / "r3d.pt"
    torch.save(loaded.model.state_dict(), weights)
    path = _mp4(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    assert _run(path, "--model", str(weights), "--arch", "torchvision:r3d_18", "--size", "32", "--save-maps",
                "--out", str(out)) == 0
    assert loaded.extra["frames"] == 16 and loaded.task == "video"
    explained = _adapter_maps(loaded.model, path, 16, 32, loaded)
    _assert_same(out, explained, 16, 32)
    result = _result(out)
    assert result["outputs"]["gradcam++"]["layer"] == "layer4"
    assert result["outputs"]["gradcam++"]["label"] in loaded.labels and len(loaded.labels) == 400  # Kinetics-400


@pytest.mark.slow
@pytest.mark.parametrize("spec, frames, size, layer", [
    ("torchvision:swin3d_t@none", 8, 64, "norm"),
    ("pytorchvideo:x3d_xs@none", 4, 182, "blocks.4"),
])
def test_zoo_video_models_through_the_command_line(tmp_path, spec, frames, size, layer, one_torch_thread):
    path = _mp4(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    torch.manual_seed(0)
    assert _run(path, "--model", spec, "--frames", str(frames), "--size", str(size), "--save-maps", "--out", str(out)) == 0
    torch.manual_seed(0)  # the same random weights as the command line's
    loaded = zoo.load_model(spec)
    explained = _adapter_maps(loaded.model, path, frames, size, loaded)
    assert explained["gradcam++"].layer == layer
    _assert_same(out, explained, frames, size)


def _tiny_hf(kind: str, directory: Path) -> Path:
    import transformers

    common = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=4,
                  id2label={0: "wave", 1: "jump", 2: "run", 3: "sit"}, label2id={"wave": 0, "jump": 1, "run": 2, "sit": 3})
    if kind == "videomae":
        config = transformers.VideoMAEConfig(image_size=32, patch_size=8, num_frames=8, tubelet_size=2, **common)
        model = transformers.VideoMAEForVideoClassification(config)
    elif kind == "timesformer":
        config = transformers.TimesformerConfig(image_size=32, patch_size=8, num_frames=4, **common)
        model = transformers.TimesformerForVideoClassification(config)
    else:
        config = transformers.VivitConfig(image_size=32, num_frames=8, tubelet_size=[2, 8, 8], **common)
        model = transformers.VivitForVideoClassification(config)
    torch.manual_seed(0)
    model.init_weights()
    model.save_pretrained(directory)
    processor = transformers.VideoMAEImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                                    image_mean=[0.4, 0.45, 0.5], image_std=[0.2, 0.25, 0.3])
    processor.save_pretrained(directory)
    return directory


@pytest.mark.parametrize("kind", ["videomae", "timesformer", "vivit"])
def test_hugging_face_video_models_from_a_saved_directory(tmp_path, kind, one_torch_thread):
    directory = _tiny_hf(kind, tmp_path / kind)
    path = _mp4(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    assert _run(path, "--model", f"hf:{directory}", "--save-maps", "--out", str(out)) == 0
    loaded = zoo.load_model(f"hf:{directory}")
    assert loaded.task == "video" and loaded.labels == ["wave", "jump", "run", "sit"]
    assert loaded.mean == pytest.approx((0.4, 0.45, 0.5)) and loaded.std == pytest.approx((0.2, 0.25, 0.3))
    frames = loaded.extra["frames"]
    assert frames == loaded.model.config.num_frames and loaded.extra["size"] == 32
    explained = _adapter_maps(loaded.model, path, frames, 32, loaded)
    assert explained["gradcam++"].layer.endswith("1.layernorm_before")
    assert explained["gradcam++"].maps.shape == (1, frames, 32, 32)
    _assert_same(out, explained, frames, 32)
    assert _result(out)["outputs"]["gradcam++"]["label"] in loaded.labels


@pytest.mark.slow
def test_slowfast_pathway_through_the_command_line(tmp_path, one_torch_thread):
    """The command line packs SlowFast's [slow, fast] list and explains the pathway asked for: the
    same layer and maps as the adapter's. All three pathway choices are checked against each other
    on a small SlowFast in tests/test_video.py; this is the full-size hub architecture (random
    weights, ~1 min on two busy cores), so it runs one choice: the slow pathway (not the default)."""
    path = _mp4(tmp_path / "clip.mp4", frames=40)
    torch.manual_seed(0)
    loaded = zoo.load_model("pytorchvideo:slowfast_r50@none")
    weights = tmp_path / "slowfast.pt"
    torch.save(loaded.model.state_dict(), weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"action {i}" for i in range(400)) + "\n")
    out = tmp_path / "out"
    assert _run(path, "--model", str(weights), "--arch", "pytorchvideo:slowfast_r50", "--size", "224",
                "--pathway", "slow", "--labels", str(labels), "--save-maps", "--out", str(out)) == 0
    explained = _adapter_maps(loaded.model, path, 32, 224, loaded, pathway="slow")
    assert explained["gradcam++"].layer == "blocks.4.multipathway_blocks.0"
    assert explained["gradcam++"].raw.shape[1] == 8  # the slow pathway's 32 / alpha frames
    _assert_same(out, explained, 32, 224)
    assert _result(out)["outputs"]["gradcam++"]["label"].startswith("action ")
    assert json.loads((out / "video.json").read_text())["settings"]["pathway"] == "slow"


def test_mvit_takes_exactly_its_16_frames(tmp_path, capsys):
    """MViT's position embeddings fix its clip length: the zoo reads it off the model, another
    --frames is refused before anything runs. (The full MViT run through the command line, maps
    compared with the adapter's, takes about two minutes on two CPU cores; the layer the probe picks
    for both MViTs is checked in tests/test_layers.py.)"""
    path = _mp4(tmp_path / "clip.mp4")
    for spec in ("pytorchvideo:mvit_base_16x4@none", "torchvision:mvit_v2_s@none"):
        loaded = zoo.load_model(spec)
        assert (loaded.extra["frames"], loaded.extra["size"]) == (16, 224)
        assert _run(path, "--model", spec, "--frames", "8", "--out", str(tmp_path / "out")) == 2
        assert "takes clips of exactly 16 frames" in capsys.readouterr().err
        with pytest.raises(ValueError, match="exactly 16 frames"):
            explain_clip(loaded.model, torch.rand(1, 3, 8, 224, 224))


# -- a whole video, window by window ---------------------------------------------------------------

@pytest.mark.slow
def test_whole_video_windows_match_the_adapter_and_keep_the_timing(tmp_path, one_torch_thread):
    import av
    from PIL import Image

    from multiexplain.models import load_action_c3d

    path = _mp4(tmp_path / "long.mp4", frames=40, fps=10)
    out = tmp_path / "out"
    assert _run(path, "--window", "16", "--stride", "8", "--save-maps", "--out", str(out)) == 0
    result = _result(out)
    assert [w["start_frame"] for w in result["windows"]] == window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert all({"class", "label", "score", "start_time", "end_time"} <= set(w) for w in result["windows"])
    model, names = load_action_c3d()
    with VideoReader(path, size=64) as reader:
        images = torch.stack([image for _, _, image in reader.frames()], dim=1).float() / 255  # (3, 40, 64, 64)
    blend = {"gradcam++": WindowBlend(), "gradcam": WindowBlend()}
    for window in result["windows"]:
        start = window["start_frame"]
        explained = explain_clip(model, images[:, start : start + 16].unsqueeze(0), methods=tuple(blend))
        assert window["label"] == names[int(explained["gradcam++"].targets[0])]
        assert window["score"] == pytest.approx(float(explained["gradcam++"].scores[0]), abs=1e-4)
        for method, explanation in explained.items():
            blend[method].add(start, explanation.maps[0])
    for method, combined in blend.items():
        expected = torch.stack([m for _, m in combined.pop()])
        saved = np.load(out / result["outputs"][method]["maps"])
        assert saved.shape == (40, 64, 64)
        np.testing.assert_allclose(saved, expected.numpy(), atol=2e-3)
        # Every source frame is in the animations, which last as long as the source (4.0 s).
        with av.open(str(out / result["outputs"][method]["mp4"])) as container:
            stream = container.streams.video[0]
            assert sum(1 for _ in container.decode(stream)) == 40
            assert float(stream.duration * stream.time_base) == pytest.approx(4.0, abs=0.1)
        with Image.open(out / result["outputs"][method]["gif"]) as gif:
            durations = []
            for k in range(gif.n_frames):
                gif.seek(k)
                durations.append(gif.info["duration"])
        assert len(durations) == 40 and sum(durations) == pytest.approx(4000, abs=100)


@pytest.mark.slow
def test_sampled_clip_animations_last_as_long_as_the_source(tmp_path):
    """16 frames sampled over a 6 s video play for 6 s, not 16 / fps."""
    import av
    from PIL import Image

    path = _mp4(tmp_path / "six_seconds.mp4", frames=72, fps=12)
    out = tmp_path / "out"
    assert _run(path, "--out", str(out)) == 0
    result = _result(out)
    assert result["duration"] == pytest.approx(6.0) and len(result["frame_indices"]) == 16
    files = result["outputs"]["gradcam++"]
    with av.open(str(out / files["mp4"])) as container:
        stream = container.streams.video[0]
        assert sum(1 for _ in container.decode(stream)) == 16
        assert abs(float(stream.duration * stream.time_base) - 6.0) <= 1 / 12
    with Image.open(out / files["gif"]) as gif:
        total = 0
        for k in range(gif.n_frames):
            gif.seek(k)
            total += gif.info["duration"]
    assert gif.n_frames == 16 and abs(total - 6000) <= 1000 / 12


# -- bad input -------------------------------------------------------------------------------------

def _damaged_mp4(tmp_path: Path) -> str:
    """An MP4 whose payload stops decoding after 2 frames (bytes overwritten, index intact)."""
    import av

    path = _mp4(tmp_path / "damaged.mp4", frames=24)
    with av.open(path) as container:
        positions = [p.pos for p in container.demux(video=0) if p.pos is not None]
    data = bytearray(Path(path).read_bytes())
    start, stop = positions[2], positions[-1]
    data[start:stop] = np.random.default_rng(0).integers(0, 256, stop - start, dtype=np.uint8).tobytes()
    Path(path).write_bytes(bytes(data))
    return path


@pytest.mark.slow
def test_bad_inputs_are_reported_and_the_good_ones_still_run(tmp_path, capsys):
    from PIL import Image

    good = _mp4(tmp_path / "good.mp4")
    still = tmp_path / "still.png"
    Image.new("RGB", (32, 32), (200, 10, 10)).save(still)
    folder = tmp_path / "folder"
    folder.mkdir()
    damaged = _damaged_mp4(tmp_path)
    two = _mp4(tmp_path / "two_frames.mp4", frames=2)
    out = tmp_path / "out"
    assert _run(str(folder), str(still), damaged, two, good, "--out", str(out)) == 0
    err = capsys.readouterr().err
    assert f"{folder} is a directory" in err
    assert "still image" in err and "still.png" in err
    assert "cannot decode frame 2" in err and "damaged.mp4" in err
    assert "two_frames.mp4 has 2 frame(s) but the clip needs 16: each frame is repeated about 8.0 times" in err
    payload = json.loads((out / "video.json").read_text())
    assert [Path(r["video"]).name for r in payload["results"]] == ["two_frames.mp4", "good.mp4"]
    assert payload["results"][0]["padded"] and payload["results"][0]["warnings"]
    assert not payload["results"][1]["warnings"]
    assert {Path(p).name for p in payload["skipped"]} == {"folder", "still.png", "damaged.mp4"}


def test_option_errors(tmp_path, capsys):
    path = _mp4(tmp_path / "clip.mp4")
    out = str(tmp_path / "out")
    assert _run(path, "--pathway", "slow", "--out", out) == 2
    assert "--pathway is for SlowFast models" in capsys.readouterr().err
    assert _run(path, "--stride", "4", "--out", out) == 2
    assert "--stride needs --window" in capsys.readouterr().err
    assert _run(path, "--window", "16", "--stride", "20", "--out", out) == 2
    assert "leave frames without a map" in capsys.readouterr().err
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps(["a", "b", "c"]))
    assert _run(path, "--labels", str(labels), "--out", out) == 2
    err = capsys.readouterr().err
    assert "3 class names" in err and "8 outputs" in err


def test_labels_files(tmp_path):
    lines = tmp_path / "labels.txt"
    lines.write_text("abseiling\nair drumming\n\n")
    assert zoo.read_labels(lines) == ["abseiling", "air drumming"]
    listed = tmp_path / "labels.json"
    listed.write_text('["a", "b"]')
    assert zoo.read_labels(listed) == ["a", "b"]
    mapping = tmp_path / "id2label.json"
    mapping.write_text('{"1": "b", "0": "a"}')
    assert zoo.read_labels(mapping) == ["a", "b"]
    mapping.write_text('{"0": "a", "2": "c"}')
    with pytest.raises(ValueError, match="0 to 1"):
        zoo.read_labels(mapping)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        zoo.read_labels(bad)
    with pytest.raises(FileNotFoundError):
        zoo.read_labels(tmp_path / "none.txt")
