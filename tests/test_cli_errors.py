"""Bad input on the command line, tried as a new user would: every mistake is ONE
``multiexplain CMD: error: ...`` line naming the problem and what to do, exit status 2, no traceback
(unless ``--debug``), and the other inputs of a batch are still processed."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from multiexplain import cli, zoo


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("MULTIEXPLAIN_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def image(tmp_path: Path) -> str:
    path = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((48, 48, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def resnet_state(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), path)
    return str(path)


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(err: str, command: str) -> str:
    """The single error line of ``err`` (other lines may only be warnings or skip notes)."""
    lines = [line for line in err.splitlines() if line.startswith(f"multiexplain {command}: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    assert len(lines[0]) <= len(f"multiexplain {command}: error: ") + cli.MESSAGE_LIMIT + 40, lines[0]
    return lines[0]


def classify(image: str, resnet_state: str, tmp_path: Path, *extra: str) -> list[str]:
    return ["classify", image, "--model", resnet_state, "--arch", "torchvision:resnet18", "--out",
            str(tmp_path / "out"), "--device", "cpu", *extra]


def test_unknown_layer_is_one_line_naming_the_modules_and_debug_shows_the_traceback(image, resnet_state, tmp_path, capsys):
    code, _, err = run(capsys, *classify(image, resnet_state, tmp_path, "--layer", "does.not.exist"))
    line = one_error_line(err, "classify")
    assert code == 2 and "--layer 'does.not.exist'" in line and "layer1, layer2, layer3, layer4" in line
    assert not (tmp_path / "out").exists(), "the layer is checked before any image is processed"
    code, _, err = run(capsys, *classify(image, resnet_state, tmp_path, "--layer", "layr4"))
    assert code == 2 and "close names: layer4" in one_error_line(err, "classify")
    with pytest.raises(cli.CommandError, match="no layer named 'does.not.exist'"):
        cli.main(classify(image, resnet_state, tmp_path, "--layer", "does.not.exist", "--debug"))


def test_a_layer_without_spatial_axes_is_one_line(image, resnet_state, tmp_path, capsys):
    code, _, err = run(capsys, *classify(image, resnet_state, tmp_path, "--layer", "fc"))
    line = one_error_line(err, "classify")
    assert code == 2 and "--layer 'fc'" in line and "no spatial axes" in line and "omit --layer" in line


@pytest.mark.parametrize("k", ["0", "-2"])
def test_topk_below_one_is_one_line_without_a_dtype_message(k, image, resnet_state, tmp_path, capsys):
    code, _, err = run(capsys, *classify(image, resnet_state, tmp_path, "--topk", k))
    line = one_error_line(err, "classify")
    assert code == 2 and "--topk must be at least 1" in line and "dtype" not in line


def test_a_state_dict_for_another_architecture_is_capped_at_its_first_keys(image, resnet_state, tmp_path, capsys):
    code, _, err = run(capsys, "classify", image, "--model", resnet_state, "--arch", "torchvision:resnet34",
                       "--out", str(tmp_path / "out"), "--device", "cpu")
    line = one_error_line(err, "classify")
    assert code == 2 and "does not fit the architecture torchvision:resnet34@none" in line
    assert "96 missing key(s): layer1.2.conv1.weight, layer1.2.bn1.weight, layer1.2.bn1.bias and 93 more" in line
    assert len(line) < 400, line
    # A wrapped (DataParallel) state dict: the message says which prefix to strip.
    wrapped = tmp_path / "wrapped.pt"
    torch.save({f"module.{k}": v for k, v in torch.load(resnet_state, weights_only=True).items()}, wrapped)
    code, _, err = run(capsys, "classify", image, "--model", str(wrapped), "--arch", "torchvision:resnet18",
                       "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code == 2 and "every key of the file starts with 'module.'" in one_error_line(err, "classify")


def test_a_pickled_model_instead_of_a_state_dict_is_refused_without_running_it(image, tmp_path, capsys):
    pickled = tmp_path / "whole_model.pt"
    torch.save(torchvision.models.resnet18(num_classes=3), pickled)  # a whole model: loading it runs code
    code, _, err = run(capsys, "classify", image, "--model", str(pickled), "--arch", "torchvision:resnet18",
                       "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code == 2 and "not a plain state dict: it holds pickled Python objects" in one_error_line(err, "classify")
    code, _, err = run(capsys, "evaluate", "--task", "distillation", "--model", str(pickled), "--out",
                       str(tmp_path / "eval"), "--device", "cpu")
    line = one_error_line(err, "evaluate")
    assert code == 2 and "written by `multiexplain distill`" in line and "pickled Python objects" in line
    config = tmp_path / "run.yaml"
    config.write_text(f"student: {{depth: 10, widen_factor: 1}}\nteacher: {{checkpoint: {pickled}}}\n"
                      "data: {train_size: 8, test_size: 8}\n")
    code, _, err = run(capsys, "distill", "--config", str(config), "--out", str(tmp_path / "d"), "--device", "cpu")
    assert code == 2 and "pickled Python objects" in one_error_line(err, "distill")


def test_a_yaml_config_with_a_python_tag_is_one_line_and_runs_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "run.yaml"
    config.write_text('seed: !!python/object/apply:os.mkdir ["created-by-the-config"]\nstudent: {depth: 10}\n')
    code, _, err = run(capsys, "distill", "--config", str(config), "--out", str(tmp_path / "d"), "--device", "cpu")
    line = one_error_line(err, "distill")
    assert code == 2 and "line 1, column 7" in line and "tags such as !!python/object are refused" in line
    assert not (tmp_path / "created-by-the-config").exists()
    broken = tmp_path / "broken.yaml"
    broken.write_text("student: {depth: 10\n")
    code, _, err = run(capsys, "distill", "--config", str(broken), "--out", str(tmp_path / "d"), "--device", "cpu")
    assert code == 2 and "not a plain YAML config (line 2" in one_error_line(err, "distill")


def test_classify_with_a_captioner_says_to_use_caption(image, tmp_path, capsys):
    import transformers

    text = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 32, "bos_token_id": 1, "sep_token_id": 2, "pad_token_id": 0}
    vision = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    blip = transformers.BlipForConditionalGeneration(transformers.BlipConfig(text_config=text, vision_config=vision))
    blip.save_pretrained(tmp_path / "blip")
    code, _, err = run(capsys, "classify", image, "--model", f"hf:{tmp_path / 'blip'}", "--out", str(tmp_path / "o"),
                       "--device", "cpu")
    line = one_error_line(err, "classify")
    assert code == 2 and "'blip' captioner, not an image classifier" in line
    assert f"multiexplain caption IMAGE --model hf:{tmp_path / 'blip'}" in line


class NaNOnBrightImages(nn.Module):
    """A classifier whose numerics fail (NaN) on very bright images only, as an overflow would."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        features = self.features(x)
        overflow = 1 / (1 - (x.mean(dim=(1, 2, 3)) > 0.9).float())  # inf for bright images, else 1
        return self.head((features * overflow[:, None, None, None]).mean(dim=(2, 3)))


def test_an_image_the_model_turns_into_nan_is_reported_and_the_others_are_processed(tmp_path, capsys, monkeypatch):
    paths = []
    for name, value in (("dark.png", 60), ("white.png", 255), ("grey.png", 128)):
        paths.append(str(tmp_path / name))
        Image.fromarray(np.full((32, 32, 3), value, np.uint8)).save(paths[-1])
    model = NaNOnBrightImages().eval()
    monkeypatch.setattr(cli, "_load", lambda *a: zoo.LoadedModel(model, zoo.ModelSpec("file", "nan.pt"), "classification",
                                                                 mean=(0, 0, 0), std=(1, 1, 1)))
    code, out, err = run(capsys, "classify", *paths, "--model", "nan.pt", "--out", str(tmp_path / "out"), "--device", "cpu",
                         "--layer", "features")
    assert code == 0
    line = one_error_line(err, "classify")
    assert "white.png: the model's output is NaN or inf for this image" in line
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [Path(r["image"]).name for r in predictions["results"]] == ["dark.png", "grey.png"]
    assert [Path(p).name for p in predictions["skipped"]] == ["white.png"]
    # Every image failing is exit status 1 (nothing processed), still one line per image.
    code, _, err = run(capsys, "classify", paths[1], "--model", "nan.pt", "--out", str(tmp_path / "o2"), "--device", "cpu",
                       "--layer", "features")
    assert code == 1 and one_error_line(err, "classify")


def test_warnings_are_one_line_each(tmp_path, resnet_state, capsys):
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 0], rgba[:20, :, 3] = 255, 255
    path = tmp_path / "half_transparent.png"
    Image.fromarray(rgba, "RGBA").save(path)
    code, _, err = run(capsys, "classify", str(path), "--model", resnet_state, "--arch", "torchvision:resnet18",
                       "--out", str(tmp_path / "out"), "--device", "cpu")
    assert code == 0
    warning = [line for line in err.splitlines() if "warning:" in line]
    assert warning == [f"multiexplain classify: warning: {path} has transparent pixels; they are composited on white "
                       "(the alpha channel is not an input of the model)"], err


# -- caption and video ---------------------------------------------------------------------------

def test_a_bad_caption_text_is_one_line_for_the_option(tmp_path, capsys):
    paths = []
    for name in ("one.png", "two.png"):
        paths.append(str(tmp_path / name))
        Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(paths[-1])
    code, _, err = run(capsys, "caption", *paths, "--caption", "", "--out", str(tmp_path / "o"), "--device", "cpu")
    line = one_error_line(err, "caption")
    assert code == 2 and "--caption '' is empty" in line and "omit --caption" in line
    # Words outside the vocabulary fail every image alike: one line for the option, not one per image.
    code, _, err = run(capsys, "caption", *paths, "--caption", "a pink circle", "--out", str(tmp_path / "o"), "--device", "cpu")
    line = one_error_line(err, "caption")
    assert code == 2 and "unknown token: ['pink']" in line and "one.png" not in line


def test_an_image_captioned_with_only_special_tokens_is_reported_and_the_others_are_processed(tmp_path, capsys, monkeypatch):
    from multiexplain.models import ShowAttendTell, load_show_and_tell

    shipped, vocabulary = load_show_and_tell()

    class EndsAtOnceOnWhite(ShowAttendTell):
        """The shipped captioner, except that it ends the caption at once on an all-white image."""

        def generate(self, images, **kwargs):
            rows = super().generate(images, **kwargs)
            white = images.flatten(1).amin(dim=1) > 0.99
            rows[white] = vocabulary.pad_token_id
            rows[white, 0], rows[white, 1] = vocabulary.bos_token_id, vocabulary.eos_token_id
            return rows

    model = EndsAtOnceOnWhite(**shipped.config)
    model.load_state_dict(shipped.state_dict())
    model.eval()
    monkeypatch.setattr(cli, "_load", lambda *a: zoo.LoadedModel(model, zoo.ModelSpec("builtin", "show-and-tell"),
                                                                 "captioning", extra={"tokenizer": vocabulary}))
    from multiexplain.data.captioned_scenes import make_captioned_scenes

    scene = make_captioned_scenes(1, seed=2)
    paths = [str(tmp_path / "white.png"), str(tmp_path / "scene.png")]
    Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(paths[0])
    Image.fromarray((scene.images[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(paths[1])
    code, out, err = run(capsys, "caption", *paths, "--out", str(tmp_path / "o"), "--device", "cpu")
    line = one_error_line(err, "caption")
    assert code == 0 and "white.png: " in line and "only special tokens" in line
    captions = json.loads((tmp_path / "o" / "captions.json").read_text())
    assert [Path(r["image"]).name for r in captions["results"]] == ["scene.png"] and captions["results"][0]["words"]
    assert [Path(p).name for p in captions["skipped"]] == ["white.png"]
    code, _, err = run(capsys, "caption", paths[0], "--out", str(tmp_path / "o2"), "--device", "cpu")
    assert code == 1 and "only special tokens" in one_error_line(err, "caption")


def _write_mp4(path: Path, frames: int = 12) -> str:
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=12)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 10 * t, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def test_video_frames_below_what_a_model_takes_and_a_directory_are_one_line(tmp_path, capsys):
    video = _write_mp4(tmp_path / "clip.mp4")
    for frames in ("0", "-3"):
        code, _, err = run(capsys, "video", video, "--frames", frames, "--out", str(tmp_path / "o"), "--device", "cpu")
        assert code == 2 and f"--frames must be a positive number of frames, got {frames}" in one_error_line(err, "video")
    code, _, err = run(capsys, "video", video, "--frames", "1", "--out", str(tmp_path / "o"), "--device", "cpu")
    assert code == 2 and "1 frames but this model needs at least 2" in one_error_line(err, "video")
    folder = tmp_path / "clips"
    folder.mkdir()
    code, _, err = run(capsys, "video", str(folder), "--out", str(tmp_path / "o"), "--device", "cpu")
    assert code == 2 and "Traceback" not in err
    assert f"{folder} is a directory, not a video file; give the video files in it" in err and "not found" not in err


class _RunsCodeWhenLoaded:
    """Unpickling this object would call print: a stand-in for a file that runs code."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_every_torch_file_reader_refuses_code_and_names_unreadable_files(tmp_path, capsys):
    """The one weights-only reader: a file that would run code and a truncated file are told apart,
    and each entry point (checkpoints, C3D weights) turns them into a ValueError naming the file."""
    import torch

    from multiexplain.models import load_checkpoint
    from multiexplain.models.checkpoints import CheckpointCodeError, CheckpointReadError, read_weights_only
    from multiexplain.models.conv3d import c3d

    unsafe, truncated = tmp_path / "unsafe.pt", tmp_path / "truncated.pt"
    torch.save({"weights": torch.zeros(3), "payload": _RunsCodeWhenLoaded()}, unsafe)
    torch.save({"weights": torch.zeros(1000)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointCodeError):
        read_weights_only(unsafe)
    with pytest.raises(CheckpointReadError):
        read_weights_only(truncated)
    for path in (unsafe, truncated):
        for load in (load_checkpoint, lambda p: c3d(weights=p)):
            with pytest.raises(ValueError, match=str(path)):
                load(path)
    assert "this must never run" not in capsys.readouterr().out
