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


# Each zoo family at the smallest clip its architecture takes: torchvision's ResNets at 32 x 32;
# S3D's and pytorchvideo's heads pool fixed 7 x 7 windows (>= 224 px) over a fixed number of time
# slices (the hub models' frames). C2D and I3D have a pooling block after their first stage, so
# their last stage is blocks.5. The MViTs (fixed 16 x 224 x 224 position embeddings, ~2 min a run
# here) are built small below.
ZOO_VIDEO_CASES = [
    ("torchvision:mc3_18@none", 16, 32, "layer4"),
    ("torchvision:r2plus1d_18@none", 16, 32, "layer4"),
    ("torchvision:s3d@none", 16, 224, "features"),
    ("torchvision:swin3d_t@none", 8, 64, "norm"),
    ("pytorchvideo:slow_r50@none", 8, 224, "blocks.4"),
    ("pytorchvideo:c2d_r50@none", 8, 224, "blocks.5"),
    ("pytorchvideo:i3d_r50@none", 8, 224, "blocks.5"),
    ("pytorchvideo:r2plus1d_r50@none", 16, 224, "blocks.4"),
    ("pytorchvideo:csn_r101@none", 32, 224, "blocks.4"),
    ("pytorchvideo:x3d_xs@none", 4, 182, "blocks.4"),
]


# Default initialisation shrinks S3D's activations to ~1e-7 by its last layer (no residual paths,
# eval-mode batch norms with unit running variance), so every map of a random S3D is flat (all
# zero after normalising). Its batch norms are calibrated on one random batch, as training would
# set them, and the command line gets the weights as a .pt with --arch.
_FLAT_AT_INIT = {"torchvision:s3d@none"}


def _calibrate_batch_norms(model: torch.nn.Module, shape: tuple[int, ...]) -> None:
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # the running statistics become this batch's
    model.train()
    with torch.no_grad():
        model(torch.randn(shape, generator=torch.Generator().manual_seed(1)))
    model.eval()
    for norm in norms:
        norm.momentum = 0.1


@pytest.mark.slow
@pytest.mark.parametrize("spec, frames, size, layer", ZOO_VIDEO_CASES, ids=[case[0] for case in ZOO_VIDEO_CASES])
def test_zoo_video_models_through_the_command_line(tmp_path, spec, frames, size, layer, one_torch_thread):
    """The CLI on a real MP4 and the Python adapter on the clip it reads: the same layer, class and
    maps (float16 on disk), for every zoo video family (r3d_18 with --arch above; SlowFast below)."""
    path = _mp4(tmp_path / "clip.mp4", frames=40)  # more than any clip here: no padding
    out = tmp_path / "out"
    torch.manual_seed(0)
    model_args = ["--model", spec]
    if spec in _FLAT_AT_INIT:
        loaded = zoo.load_model(spec)
        _calibrate_batch_norms(loaded.model, (2, 3, frames, size, size))
        torch.save(loaded.model.state_dict(), tmp_path / "weights.pt")
        model_args = ["--model", str(tmp_path / "weights.pt"), "--arch", spec]
    assert _run(path, *model_args, "--frames", str(frames), "--size", str(size), "--save-maps", "--out", str(out)) == 0
    if spec not in _FLAT_AT_INIT:
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


@pytest.mark.slow
@pytest.mark.parametrize("pathway", ["fast", "slow", "both"])
def test_every_slowfast_pathway_choice_through_the_command_line(tmp_path, monkeypatch, pathway, one_torch_thread):
    """`--pathway fast|slow|both` on a real MP4, the same layer(s) and maps as the adapter's. The
    model is a real pytorchvideo SlowFast built small (the hub architecture's heads fix 32 x 224 x
    224 clips, a minute per run on two busy cores: its slow pathway is checked above); the zoo
    hands it to the command line in place of a hub SPEC, everything after that is the command's."""
    from pytorchvideo.models import slowfast

    torch.manual_seed(0)
    model = slowfast.create_slowfast(model_num_class=5, stem_dim_outs=(16, 2),
                                     head_pool_kernel_sizes=((2, 1, 1), (8, 1, 1))).eval()
    loaded = zoo.LoadedModel(model, zoo.parse_spec("pytorchvideo:slowfast_r50@none"), "video", mean=zoo.PYTORCHVIDEO_MEAN,
                             std=zoo.PYTORCHVIDEO_STD, extra={"frames": 8, "size": 32})
    monkeypatch.setattr(zoo, "load_model", lambda *args, **kwargs: loaded)
    path = _mp4(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    assert _run(path, "--model", "pytorchvideo:slowfast_r50@none", "--pathway", pathway, "--save-maps",
                "--out", str(out)) == 0
    explained = _adapter_maps(model, path, 8, 32, loaded, pathway=pathway)
    expected_layer = {"fast": "blocks.4.multipathway_blocks.1", "slow": "blocks.4.multipathway_blocks.0",
                      "both": "blocks.4.multipathway_blocks.0+blocks.4.multipathway_blocks.1"}[pathway]
    assert explained["gradcam++"].layer == expected_layer and explained["gradcam++"].pathway == pathway
    _assert_same(out, explained, 8, 32)
    assert json.loads((out / "video.json").read_text())["settings"]["pathway"] == pathway


def _small_mvit(kind: str) -> torch.nn.Module:
    """A real MViT of the hub architecture's family, 4 x 32 x 32 clips, two blocks (the second pools)."""
    torch.manual_seed(0)
    if kind == "pytorchvideo":
        from pytorchvideo.models.vision_transformers import create_multiscale_vision_transformers

        return create_multiscale_vision_transformers(
            spatial_size=32, temporal_size=4, depth=2, head_num_classes=5, embed_dim_mul=[[1, 2.0]],
            atten_head_mul=[[1, 2.0]], pool_q_stride_size=[[1, 1, 2, 2]], pool_kv_stride_adaptive=[1, 4, 4],
            pool_kvq_kernel=[3, 3, 3], patch_embed_dim=8, num_heads=1).eval()
    from torchvision.models.video.mvit import MSBlockConfig, MViT

    # Two heads, as in every hub block: the attention's pooling convolutions then see (N * heads)
    # rows, not the clips' N, and are no candidates for the layer (as in mvit_v1_b / mvit_v2_s).
    blocks = [MSBlockConfig(2, 8, 8, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
              MSBlockConfig(2, 8, 16, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1])]
    return MViT(spatial_size=(32, 32), temporal_size=4, block_setting=blocks, residual_pool=True,
                residual_with_cls_embed=False, rel_pos_embed=True, proj_after_attn=True, num_classes=5).eval()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:auto layer")  # pytorchvideo's pooled attention: tokens after the pick carry no grid
@pytest.mark.parametrize("kind, spec", [("torchvision", "torchvision:mvit_v2_s@none"),
                                        ("pytorchvideo", "pytorchvideo:mvit_base_16x4@none")])
def test_mvit_tokens_through_the_command_line(tmp_path, monkeypatch, kind, spec, one_torch_thread):
    """MViT (token layers found by the probe, a fixed clip length) on a real MP4: the same layer
    and maps from the command line and the adapter. The model is a real MViT built small (the
    hub architectures take ~2 min a run on two busy cores; their layer is checked in
    tests/test_layers.py and test_matrix.py); the zoo hands it to the command line in place of the
    hub SPEC, and the clip length comes off the model as the zoo reads it."""
    from multiexplain.explain.families import clip_frames

    model = _small_mvit(kind)
    assert clip_frames(model) == 4
    loaded = zoo.LoadedModel(model, zoo.parse_spec(spec), "video", mean=(0.45,) * 3, std=(0.225,) * 3,
                             extra={"frames": clip_frames(model), "size": 32})
    monkeypatch.setattr(zoo, "load_model", lambda *args, **kwargs: loaded)
    path = _mp4(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    assert _run(path, "--model", spec, "--save-maps", "--out", str(out)) == 0
    explained = _adapter_maps(model, path, 4, 32, loaded)
    assert explained["gradcam++"].layer == "blocks.1.norm1"
    assert explained["gradcam++"].raw.shape[1] == 2  # (T', H', W') tokens: time kept
    _assert_same(out, explained, 4, 32)
    assert _run(path, "--model", spec, "--frames", "8", "--out", str(tmp_path / "out8")) == 2


def test_mvit_takes_exactly_its_16_frames(tmp_path, capsys):
    """MViT's position embeddings fix its clip length: the zoo reads it off the hub models, another
    --frames is refused before anything runs. (Small MViTs run through the command line above; the
    layer the probe picks for the hub MViTs is checked in tests/test_layers.py and test_matrix.py.)"""
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
