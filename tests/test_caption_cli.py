"""``multiexplain caption``: every captioner / vision-language family from a saved directory
(``--model hf:DIR``), prompts and generation options, one-line errors for bad captions, one image
failing while the others are explained, and the report's interactive word view in Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tiny_vlms
from multiexplain import cli
from multiexplain import report as rp
from multiexplain.data.captioned_scenes import make_captioned_scenes

FAMILIES = ["ved-swin", "git", "blip-2", "instructblip", "llava", "fast-vlm", "llava-next", "paligemma", "qwen2-vl", "idefics3", "smolvlm"]
ANSWER = "two red circles and a blue square"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("MULTIEXPLAIN_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> str:
    """A non-square photo-like PNG (a scene, stretched to 48 x 72)."""
    scene = torch.nn.functional.interpolate(make_captioned_scenes(1, seed=5).images, size=(48, 72), mode="bilinear")[0]
    path = tmp_path_factory.mktemp("images") / "scene.png"
    Image.fromarray((scene.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(path)
    return str(path)


def _run(*args: str) -> int:
    return cli.main(["caption", *args, "--device", "cpu"])


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_caption_command_for_every_family(tmp_path, picture, name, capsys, one_torch_thread):
    directory = tiny_vlms.BUILDERS[name](tmp_path / name)
    prompt = [] if name == "ved-swin" else ["--prompt", "what is in the image?"]
    out = tmp_path / "out"
    assert _run(picture, "--model", f"hf:{directory}", *prompt, "--caption", ANSWER, "--out", str(out)) == 0
    result = json.loads((out / "captions.json").read_text())["results"][0]
    assert result["words"] == ANSWER.split() and result["caption"] == ANSWER and result["generated"] is False
    assert result["prompt"] == (None if name == "ved-swin" else "what is in the image?")
    assert len(result["word_log_probabilities"]) == 7 and all(v <= 0 for v in result["word_log_probabilities"])
    for figure in result["figures"].values():
        assert (out / figure).is_file()
    # One overlay per word and one for the whole answer, each at the image's aspect ratio (48 x 72).
    overlays = result["word_maps"]["gradcam++"]
    assert len(overlays) == 8
    with Image.open(out / overlays[0]) as first:
        assert first.size[0] * 48 == first.size[1] * 72
    assert (out / "index.html").is_file() and "multiexplain caption: error" not in capsys.readouterr().err


@pytest.mark.slow
def test_generation_options_and_layer(tmp_path, picture, one_torch_thread):
    directory = tiny_vlms.BUILDERS["llava"](tmp_path / "llava")
    out = tmp_path / "out"
    assert _run(picture, "--model", f"hf:{directory}", "--prompt", "describe the scene.", "--max-new-tokens", "4",
                "--min-new-tokens", "3", "--num-beams", "2", "--layer", "model.vision_tower.encoder.layers.0",
                "--max-batch", "2", "--out", str(out)) == 0
    payload = json.loads((out / "captions.json").read_text())
    result = payload["results"][0]
    assert result["generated"] and 1 <= len(result["tokens"]) <= 4 and result["layer"] == "model.vision_tower.encoder.layers.0"
    assert payload["settings"]["num_beams"] == 2 and payload["settings"]["max_new_tokens"] == 4
    assert payload["settings"]["max_batch"] == 2
    assert _run(picture, "--model", f"hf:{directory}", "--prompt", "describe the scene.", "--caption", ANSWER,
                "--max-batch", "all", "--out", str(out)) == 0
    assert json.loads((out / "captions.json").read_text())["settings"]["max_batch"] == "all"


def _error_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if "multiexplain caption: error:" in line]


@pytest.mark.slow
def test_bad_captions_are_one_line_errors(tmp_path, picture, capsys, one_torch_thread):
    out = str(tmp_path / "out")
    # Empty caption, a word the shipped captioner has no token for, beams with a given caption.
    assert _run(picture, "--caption", "  ", "--out", out) == 2
    lines = _error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("multiexplain caption: error: --caption ")
    assert "is empty; give the text to explain, or omit --caption to explain the caption the model generates" in lines[0]
    assert _run(picture, "--caption", "a pink circle", "--out", out) == 2
    lines = _error_lines(capsys)
    # It would fail every image alike: one line for the option, not one per image.
    assert len(lines) == 1 and "unknown token: ['pink']" in lines[0] and Path(picture).name not in lines[0]
    assert _run(picture, "--caption", "a red circle", "--num-beams", "3", "--out", out) == 2
    assert "--num-beams applies to generated captions" in _error_lines(capsys)[0]
    for wrong in ("0", "many", "-3"):
        assert _run(picture, "--caption", "a red circle", "--max-batch", wrong, "--out", out) == 2
        lines = _error_lines(capsys)
        assert len(lines) == 1 and f"--max-batch takes a whole number of words of at least 1, 'all' or 'auto', got '{wrong}'" in lines[0]
    # A captioner that writes nothing but its end token.
    directory = tiny_vlms.BUILDERS["ved-swin"](tmp_path / "ved")
    from transformers import GenerationConfig

    config = GenerationConfig.from_pretrained(directory)
    config.forced_bos_token_id = config.eos_token_id  # the first generated token is the end token
    config.save_pretrained(directory)
    assert _run(picture, "--model", f"hf:{directory}", "--out", out) == 1  # read, but nothing to explain
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "generated only special tokens" in lines[0] and "min_new_tokens" in lines[0]


@pytest.mark.slow
def test_one_image_failing_does_not_stop_the_others(tmp_path, picture, capsys, one_torch_thread):
    from transformers import ViTImageProcessor

    directory = tiny_vlms.BUILDERS["ved-swin"](tmp_path / "ved")
    ViTImageProcessor(do_resize=False).save_pretrained(directory)  # the model takes 32 x 32: other sizes fail
    square = tmp_path / "square.png"
    Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(square)
    out = tmp_path / "out"
    code = _run(picture, str(tmp_path / "missing.png"), str(square), "--model", f"hf:{directory}", "--caption", ANSWER,
                "--out", str(out))
    assert code == 0
    lines = _error_lines(capsys)
    assert len(lines) == 1 and "scene.png" in lines[0] and "takes 32x32 pixel values but the image came out 48x72" in lines[0]
    payload = json.loads((out / "captions.json").read_text())
    assert [Path(r["image"]).name for r in payload["results"]] == ["square.png"]
    assert {Path(p).name for p in payload["skipped"]} == {"scene.png", "missing.png"}
    # Every image readable but none explained: exit status 1 (2 is for a bad option, SPEC or file).
    assert _run(picture, "--model", f"hf:{directory}", "--caption", ANSWER, "--out", str(out)) == 1


needs_chromium = pytest.mark.skipif(rp.find_chromium() is None and not __import__("os").environ.get("CI"),
                                    reason="chromium is not installed (.ci/run installs it)")

# Click every word of the first view in turn and note, after each click, the picture it shows and
# the word marked as selected (synchronous: the probe records right after, in the load event).
_CLICK_EVERY_WORD = """
var view = document.querySelector('.wordmaps'); var image = view.querySelector('img.wm-image');
return Array.prototype.map.call(view.querySelectorAll('button.wm-word'), function (button) {
  button.click();
  return {word: button.textContent, src: image.getAttribute('src'),
          active: view.querySelector('button.wm-word.active').textContent};
});
"""


@needs_chromium
@pytest.mark.slow
def test_the_report_shows_the_map_of_the_word_clicked(tmp_path, picture):
    out = tmp_path / "out"
    assert _run(picture, "--caption", "a red circle and two blue squares", "--out", str(out)) == 0
    result = json.loads((out / "captions.json").read_text())["results"][0]
    index = out / "index.html"
    page = index.read_text()
    assert page.count('class="wordmaps"') == 2 and "<script>" in page and "http" not in page.replace("<!DOCTYPE", "")
    shown = rp.render_in_chromium(index, actions=_CLICK_EVERY_WORD)["actions"]
    assert [s["word"] for s in shown] == result["words"] + ["whole caption"]
    assert [s["src"] for s in shown] == result["word_maps"]["gradcam++"]  # each click shows that word's picture
    assert all(s["active"] == s["word"] for s in shown)
    # A word chosen in the address ("#wm-0:2") is shown when the page opens, and its picture loads.
    probe = rp.render_in_chromium(index, fragment="#wm-0:2")
    assert probe["images"][0]["src"] == result["word_maps"]["gradcam++"][2]
    assert all(i["complete"] and i["naturalWidth"] > 0 for i in probe["images"])
    # What is on screen changes: the first word's and the third word's page differ in pixels.
    first, third = tmp_path / "first.png", tmp_path / "third.png"
    rp.render_in_chromium(index, screenshot=first, window=(900, 700), fragment="#wm-0:0")
    rp.render_in_chromium(index, screenshot=third, window=(900, 700), fragment="#wm-0:2")
    with Image.open(first) as a, Image.open(third) as b:
        difference = np.abs(np.asarray(a.convert("RGB"), np.int16) - np.asarray(b.convert("RGB"), np.int16)).sum(axis=2)
    assert (difference > 30).sum() > 1000
