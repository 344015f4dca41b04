"""Per-word maps for the Hugging Face captioners and vision-language models: every family is built
from a tiny random config, saved with its processor to a directory and loaded back (tests/tiny_vlms.py).

Checked for each: words (sub-words merged, no empty words), maps ``(W, H, W)`` on the ORIGINAL
image's size (a non-square image the processors resize, crop, pad or tile), finite and not
constant, equal to a loop of single-word Grad-CAM++ explanations (1e-5), the prompt's tokens
excluded (scores equal an independent forward), the processor's geometry undone (a coordinate
ramp through the processor), and the layer each family rule picks.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import tiny_vlms
from multiexplain import GradCAMPlusPlus
from multiexplain.adapters import caption_models
from multiexplain.adapters.captioning import SUPPORTED_FAMILIES, explain_caption
from vjp_batches import record_vjp_batches
from multiexplain.core import normalize_maps
from multiexplain.explain import resolve_layer
from repo_scripts import load_repo_module

# A non-square image: CLIP crops its sides, LLaVA-NeXT pads and tiles it, Qwen2-VL keeps its aspect
# ratio (a 4 x 7 merged grid), Idefics3 resizes and cuts it into 2 x 2 crops plus a global view.
HEIGHT, WIDTH = 40, 60
ANSWER = "two red circles and  a blue square"  # a double space; "circles" is two BPE tokens
WORDS = ANSWER.split()
PROMPT = "what is in the image?"
FAMILIES = ["ved-swin", "git", "blip-2", "instructblip", "llava", "fast-vlm", "llava-next", "paligemma", "qwen2-vl", "idefics3", "smolvlm"]
PROMPTED = {name for name in FAMILIES if name != "ved-swin"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Every family saved to its own directory (built once; each test loads what it needs)."""
    return {name: tiny_vlms.BUILDERS[name](tmp_path_factory.mktemp(name)) for name in FAMILIES}


@pytest.fixture(scope="module")
def image():
    generator = torch.Generator().manual_seed(0)
    return torch.rand(3, HEIGHT, WIDTH, generator=generator)


def _load(built, name):
    model, processor = tiny_vlms.load(built[name])
    if isinstance(processor, tuple):  # VisionEncoderDecoder: image processor and tokenizer
        return model, {"processor": processor[0], "tokenizer": processor[1]}
    return model, {"processor": processor}


def _explain(model, kwargs, name, image, **extra):
    prompt = PROMPT if name in PROMPTED else None
    return explain_caption(model, image, extra.pop("caption", ANSWER), prompt=extra.pop("prompt", prompt), **kwargs, **extra)


def _reference_inputs(model, kwargs, name, image, answer_ids):
    """The teacher-forced inputs for context + answer, and the context length (via the family's
    own preparation: what the processor makes of the image and the prompt)."""
    captioner = caption_models.captioner_for(model, kwargs.get("processor"), kwargs.get("tokenizer"))
    prepared = captioner.prepare(image, PROMPT if name in PROMPTED else None)
    ids = torch.tensor([prepared.context + answer_ids])
    inputs = captioner.forward_inputs([prepared], ids, torch.ones_like(ids))
    inputs.pop("logits_to_keep", None)
    return captioner, prepared, ids, inputs


def _answer_log_probs(model, inputs, ids):
    """log p(answer token | everything before it) from the full logits of one forward."""
    logits = model(**inputs).logits.double().log_softmax(-1)
    logits = logits[:, -(ids.shape[1] - 1):]  # GIT prepends its image tokens to the text
    return logits.gather(-1, ids[:, 1:, None])[0, :, 0]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_words_maps_and_a_loop_of_single_word_explanations(built, image, name, one_torch_thread):
    model, kwargs = _load(built, name)
    explanation = _explain(model, kwargs, name, image)
    # Words: sub-words merged, the double space gives no empty word.
    assert explanation.words == WORDS and all(explanation.words)
    assert any(len(members) > 1 for members in explanation.word_tokens), "some word is several tokens"
    # Maps on the original image grid, finite, in [0, 1], not constant.
    maps = explanation.maps
    assert maps.shape == (len(WORDS), HEIGHT, WIDTH) and explanation.caption_map.shape == (HEIGHT, WIDTH)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert (maps.flatten(1).std(dim=1) > 0.01).all(), "every word's map varies over the image"
    assert explanation.image.shape == (3, HEIGHT, WIDTH)

    # The same maps from one Grad-CAM++ call per word: its own forward and one backward each.
    captioner, prepared, ids, inputs = _reference_inputs(model, kwargs, name, image, captioner_answer(model, kwargs, name))
    context = len(prepared.context)
    choice = resolve_layer(model, "auto")
    explainer = GradCAMPlusPlus(model, choice.module, reshape=choice.reshape, layer_call=choice.layer_call)
    for j, members in enumerate(explanation.word_tokens):
        # Answer token t of the word is predicted at position context - 1 + t.
        positions = [context - 1 + t for t in members]

        def word_score(output, positions=positions):
            logits = output.logits[:, -(ids.shape[1] - 1):].log_softmax(-1)
            return logits.gather(-1, ids[:, 1:, None])[:, positions, 0].sum(dim=1)

        single = explainer(inputs, word_score, input_size=prepared.input_size, batch_size=1)
        torch.testing.assert_close(explanation.raw[j], single.raw[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(explanation.scores[j], single.scores[0], atol=1e-5, rtol=1e-5)
        on_image = normalize_maps(caption_models.place_on_image(single.raw[0][None], prepared.views, (HEIGHT, WIDTH)), 2)[0]
        torch.testing.assert_close(maps[j], on_image, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_teacher_forced_forward_builds_no_cache_and_scores_only_the_answer(built, image, name):
    """Nothing is generated in the explanation's forward, so no key-value cache; a forward that can
    skip the logits of the context's positions (logits_to_keep) returns only the answer's."""
    import inspect

    model, kwargs = _load(built, name)
    calls = []
    handle = model.register_forward_hook(lambda _m, _args, call_kwargs, output: calls.append((call_kwargs, output)),
                                         with_kwargs=True)
    try:
        explanation = _explain(model, kwargs, name, image)
    finally:
        handle.remove()
    (call_kwargs, output), = calls
    parameters = inspect.signature(model.forward).parameters
    assert call_kwargs.get("use_cache") is False
    assert getattr(output, "past_key_values", None) is None
    if "logits_to_keep" in parameters:
        # the answer's tokens and the end token, each predicted from the position before it
        assert output.logits.shape[1] == len(explanation.tokens) + 1


@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_crosses_its_token_head_once(built, image, name, monkeypatch):
    """The family names its token head (the layer that makes the logits), so the K word scores are
    differentiated through it in one pass and only the model below it runs K-batched."""
    from multiexplain.explain import explainer as explainer_module

    model, kwargs = _load(built, name)
    head = caption_models.captioner_for(model, kwargs.get("processor"), kwargs.get("tokenizer")).output_head
    logits = []
    handle = head.register_forward_hook(lambda _m, _args, output: logits.append(output.shape))
    batched = []
    original = explainer_module._batched_vjp

    def recording(outputs, inputs, cotangents, *args):
        batched.append((tuple(outputs.shape), cotangents.shape[0]))
        return original(outputs, inputs, cotangents, *args)

    monkeypatch.setattr(explainer_module, "_batched_vjp", recording)
    try:
        explanation = _explain(model, kwargs, name, image)
    finally:
        handle.remove()
    assert isinstance(head, torch.nn.Linear) and len(logits) == 1 and logits[0][-1] == head.out_features
    # One batched product, from the head's input (N, P, width), one cotangent per explained score.
    (shape, k), = batched
    assert shape[0] == 1 and shape[1] == logits[0][1] and shape[-1] == head.in_features
    assert k == len(explanation.tokens) + sum(len(m) > 1 for m in explanation.word_tokens) + 1  # tokens, multi-token words, the answer
    assert explanation.raw.abs().amax() > 0


def captioner_answer(model, kwargs, name):
    """The answer's token ids straight from the tokenizer (content, then the end token)."""
    captioner = caption_models.captioner_for(model, kwargs.get("processor"), kwargs.get("tokenizer"))
    ids = captioner.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    return list(ids) + [captioner.end_id]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PROMPTED))
def test_the_prompt_is_read_not_explained(built, image, name, one_torch_thread):
    model, kwargs = _load(built, name)
    explanation = _explain(model, kwargs, name, image)
    answer = captioner_answer(model, kwargs, name)
    # The explained tokens are the answer's, none of the prompt's.
    assert explanation.token_ids.tolist() == answer[:-1] and explanation.prompt == PROMPT
    # Their scores are the answer's log-probabilities given image and prompt, from an independent forward.
    _, prepared, ids, inputs = _reference_inputs(model, kwargs, name, image, answer)
    with torch.no_grad():
        log_probs = _answer_log_probs(model, inputs, ids)[len(prepared.context) - 1:]
    torch.testing.assert_close(explanation.token_scores.double(), log_probs[:-1], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(explanation.caption_score.double(), log_probs.sum(), atol=1e-4, rtol=1e-4)
    # The prompt conditions the answer: another prompt, other scores.
    other = _explain(model, kwargs, name, image, prompt="describe the scene.")
    assert other.words == WORDS and not torch.allclose(other.scores, explanation.scores)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["git", "blip-2", "llava", "fast-vlm", "qwen2-vl", "idefics3"])
def test_generated_answers(built, image, name, one_torch_thread):
    model, kwargs = _load(built, name)
    explanation = _explain(model, kwargs, name, image, caption=None, max_new_tokens=4, min_new_tokens=3)
    assert explanation.generated and 1 <= len(explanation.token_ids) <= 4
    assert explanation.maps.shape == (len(explanation.words), HEIGHT, WIDTH) and all(w.strip() for w in explanation.words)
    # The explained answer is what the model generates for the prompt (greedy).
    captioner = caption_models.captioner_for(model, kwargs.get("processor"), kwargs.get("tokenizer"))
    prepared = captioner.prepare(image, PROMPT)
    with torch.no_grad():
        written = captioner.generate(prepared, max_new_tokens=4, min_new_tokens=3)
    assert [t for t in written if t not in captioner.special_ids] == explanation.token_ids.tolist()
    beams = _explain(model, kwargs, name, image, caption=None, max_new_tokens=3, num_beams=2)
    assert beams.generated and beams.maps.shape[1:] == (HEIGHT, WIDTH)


def _ramp(height: int, width: int) -> torch.Tensor:
    """x in the red channel, y in the green channel (pixel centres, as fractions of the side)."""
    ys = (torch.arange(height) + 0.5) / height
    xs = (torch.arange(width) + 0.5) / width
    return torch.stack([xs[None, :].expand(height, -1), ys[:, None].expand(-1, width), torch.full((height, width), 0.5)])


def _views_pixels(name, prepared, image_processor):
    """Each view's processed picture back in [0, 1]: ``[(view, (3, h, w))]``."""
    pixels = prepared.inputs["pixel_values"].float()
    mean = torch.tensor(image_processor.image_mean).view(3, 1, 1)
    std = torch.tensor(image_processor.image_std).view(3, 1, 1)
    if name == "qwen2-vl":  # flattened patches: (t, h/m, w/m, m, m) x (C, T, p, p)
        _, gh, gw = prepared.inputs["image_grid_thw"][0].tolist()
        m, p = image_processor.merge_size, image_processor.patch_size
        patches = pixels.reshape(gh // m, gw // m, m, m, 3, image_processor.temporal_patch_size, p, p)[:, :, :, :, :, 0]
        tiles = [patches.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)]
    else:
        tiles = list(pixels.reshape(-1, 3, *pixels.shape[-2:]))
    return [(view, tile * std + mean) for view, tile in zip(prepared.views, tiles)]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["git", "blip-2", "llava-next", "paligemma", "qwen2-vl", "idefics3", "ved-swin"])
def test_views_undo_the_processor_geometry(built, name, one_torch_thread):
    """A coordinate ramp through the processor: each processed pixel shows the original pixel its
    view's box says (within a pixel; crops and tiles included, padding excluded)."""
    model, kwargs = _load(built, name)
    captioner = caption_models.captioner_for(model, kwargs.get("processor"), kwargs.get("tokenizer"))
    ramp = _ramp(HEIGHT, WIDTH)
    prepared = captioner.prepare(ramp, PROMPT if name in PROMPTED else None)
    checked = 0
    for view, picture in _views_pixels(name, prepared, captioner.image_processor):
        h, w = picture.shape[1:]
        ys = view.top + (torch.arange(h) + 0.5) / h * (view.bottom - view.top)
        xs = view.left + (torch.arange(w) + 0.5) / w * (view.right - view.left)
        # Away from the image's border and the view's edges (interpolation there mixes in padding).
        rows = ((ys > 1.5) & (ys < HEIGHT - 1.5)).nonzero()[1:-1, 0]
        columns = ((xs > 1.5) & (xs < WIDTH - 1.5)).nonzero()[1:-1, 0]
        got_x = picture[0][rows][:, columns] * WIDTH
        got_y = picture[1][rows][:, columns] * HEIGHT
        torch.testing.assert_close(got_x, xs[columns][None].expand_as(got_x), atol=1.0, rtol=0)
        torch.testing.assert_close(got_y, ys[rows][:, None].expand_as(got_y), atol=1.0, rtol=0)
        checked += rows.numel() * columns.numel()
    assert checked > 500
    if name == "git":  # CLIP: shortest edge to 32, centre crop: the image's sides are not seen
        assert prepared.views[0].left > 5 and prepared.views[0].right < WIDTH - 5
    if name == "llava-next":  # base image + 2 x 2 tiles of a padded 64 x 64 copy
        assert len(prepared.views) == 5 and prepared.input_size == (5, 32, 32)
    if name == "idefics3":  # 2 x 2 crops + the global image
        assert len(prepared.views) == 5 and prepared.views[-1] == caption_models.View.full(HEIGHT, WIDTH)


@pytest.mark.slow
def test_family_layers(built, one_torch_thread):
    """What the family rules pick: the vision tokens where they leave for the language model."""
    expected = {
        "git": ("git.image_encoder.vision_model.post_layernorm", None), "blip-2": ("vision_model.post_layernorm", 0),
        "instructblip": ("vision_model.post_layernorm", 0), "llava": ("model.vision_tower.encoder.layers.1", None),
        "llava-next": ("model.vision_tower.encoder.layers.1", None), "paligemma": ("model.vision_tower.post_layernorm", None),
        "qwen2-vl": ("model.visual.merger", None), "idefics3": ("model.vision_model.post_layernorm", None),
        "smolvlm": ("model.vision_model.post_layernorm", None), "ved-swin": ("encoder.layernorm", None),
        "fast-vlm": ("model.vision_tower", None),
    }
    for name, (layer, call) in expected.items():
        model, _ = _load(built, name)
        choice = resolve_layer(model, "auto")
        assert (choice.name, choice.layer_call) == (layer, call), name
        assert choice.source.startswith("family"), name
        if name == "fast-vlm":  # the convolutional tower's feature map, channels first
            assert choice.element == "last_hidden_state" and choice.reshape is None
    # LLaVA's vision_feature_layer decides: -2 is the second-to-last layer; of several, the shallowest.
    model, _ = _load(built, "llava")
    model.config.vision_feature_layer = [-1, -3]
    assert resolve_layer(model, "auto").name == "model.vision_tower.encoder.layers.0"
    model.config.vision_feature_layer = 2
    assert resolve_layer(model, "auto").name == "model.vision_tower.encoder.layers.1"
    # hidden_states has len(layers) + 1 entries: -4 of a 3-layer tower is the embeddings, not a layer.
    from multiexplain.explain.families import VisionFeatureLayer

    layers = model.model.vision_tower.vision_model.encoder.layers if hasattr(model.model.vision_tower, "vision_model") \
        else model.model.vision_tower.encoder.layers
    assert len(layers) == 3
    model.config.vision_feature_layer = -3
    assert VisionFeatureLayer()(model, None) is layers[0]
    model.config.vision_feature_layer = -4
    assert VisionFeatureLayer()(model, None) is None  # the embeddings: left to the probe


@pytest.mark.slow
def test_a_subclass_is_recognised_and_max_batch_chunks_the_gradients(built, image, monkeypatch, one_torch_thread):
    import transformers

    class MyLlava(transformers.LlavaForConditionalGeneration):
        """A user's subclass: the family is recognised by architecture, not by class name."""

    model = MyLlava.from_pretrained(built["llava"]).eval()
    processor = transformers.AutoProcessor.from_pretrained(built["llava"])
    whole = explain_caption(model, image, ANSWER, prompt=PROMPT, processor=processor)
    # A second call sees transformers' hidden-state hooks installed by the first (LLaVA reads its
    # features through them): the capture still comes first, the maps are the same and not zero.
    again = explain_caption(model, image, ANSWER, prompt=PROMPT, processor=processor)
    assert not whole.zero_gradient.any() and whole.raw.abs().amax() > 0
    torch.testing.assert_close(again.raw, whole.raw)
    batches = record_vjp_batches(monkeypatch)
    chunked = explain_caption(model, image, ANSWER, prompt=PROMPT, processor=processor, max_batch=3)
    monkeypatch.undo()
    k = len(whole.tokens) + sum(len(m) > 1 for m in whole.word_tokens) + 1  # tokens, multi-token words, the answer
    assert batches and max(batches) <= 3 and sum(batches) >= k - 1
    torch.testing.assert_close(chunked.raw, whole.raw, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(chunked.maps, whole.maps, atol=1e-6, rtol=0)
    # The default is "auto": with a CPU budget below one word's gradient every product runs alone.
    from multiexplain.explain import AUTO_CHUNK_BYTES

    monkeypatch.setitem(AUTO_CHUNK_BYTES, "cpu", 1)
    batches = record_vjp_batches(monkeypatch)
    alone = explain_caption(model, image, ANSWER, prompt=PROMPT, processor=processor)
    monkeypatch.undo()
    assert len(batches) >= k - 1 and set(batches) == {1}
    torch.testing.assert_close(alone.raw, whole.raw, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="max_batch must be a positive int"):
        explain_caption(model, image, ANSWER, prompt=PROMPT, processor=processor, max_batch=0)


@pytest.mark.slow
def test_unsupported_models_say_what_to_pass(built, image):
    from transformers import CLIPVisionConfig, CLIPVisionModel

    with pytest.raises(TypeError, match=r"model_type 'clip_vision_model'.*target_layer=.*reshape="):
        explain_caption(CLIPVisionModel(CLIPVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                         intermediate_size=32, image_size=32, patch_size=8)), image, "a red circle")
    model, kwargs = _load(built, "llava")
    with pytest.raises(TypeError, match="needs processor="):
        explain_caption(model, image, ANSWER, tokenizer=kwargs["processor"].tokenizer)
    with pytest.raises(ValueError, match="empty"):
        explain_caption(model, image, "  ", prompt=PROMPT, **kwargs)
    with pytest.raises(ValueError, match="2 prompts for 1 images"):
        explain_caption(model, [image], ANSWER, prompt=["a", "b"], **kwargs)


def test_loading_a_vlm_as_a_classifier_points_to_caption(tmp_path):
    """The zoo names every family the adapter explains (one list), so a VLM given to ``classify``
    gets the command that explains it, not transformers' error."""
    from multiexplain import zoo

    assert zoo.HF_CAPTIONERS is SUPPORTED_FAMILIES
    directory = tiny_vlms.build_llava(tmp_path / "llava")
    with pytest.raises(zoo.SpecError, match=r"'llava' captioner, not an image classifier; .*multiexplain caption IMAGE --model hf:"):
        zoo.load_model(f"hf:{directory}", task="classification")


def test_place_on_image_resamples_each_view_into_its_box():
    raw = torch.arange(4.0).reshape(1, 2, 2)
    # One view over the whole image equals a bilinear resize (align_corners=False).
    whole = caption_models.place_on_image(raw, [caption_models.View.full(6, 8)], (6, 8))
    expected = torch.nn.functional.interpolate(raw[None], size=(6, 8), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(whole, expected)
    # A crop's view covers only its box; a padded view's box reaches past the image.
    crop = caption_models.place_on_image(raw, [caption_models.View(0, 2, 6, 6)], (6, 8))
    assert (crop[:, :, :2] == 0).all() and (crop[:, :, 6:] == 0).all() and (crop[:, :, 2:6] > 0).any()
    padded = caption_models.place_on_image(torch.ones(1, 2, 2), [caption_models.View(-3, 0, 9, 8)], (6, 8))
    torch.testing.assert_close(padded, torch.ones(1, 6, 8))
    # Tiles add up: two side-by-side views of ones cover the image once each.
    tiles = caption_models.place_on_image(torch.ones(1, 2, 2, 2), [caption_models.View(0, 0, 6, 4), caption_models.View(0, 4, 6, 8)], (6, 8))
    torch.testing.assert_close(tiles, torch.ones(1, 6, 8))
    with pytest.raises(ValueError, match="2 tiles in the layer's maps for 1 views"):
        caption_models.place_on_image(torch.ones(1, 2, 2, 2), [caption_models.View.full(6, 8)], (6, 8))


@pytest.mark.slow
def test_the_shipped_vlm_answers_and_its_word_maps_land_on_the_scene(one_torch_thread):
    """The shipped LLaVA-architecture model (scripts/train_llava_scenes.py) loads through the
    transformers classes, answers the prompt with caption words, and its word maps are on the
    64 x 64 scene. Its localisation is weak (benchmarks/results/captioning.md: ~27% of shape words
    at 2 px against the issue's 85%); here only a floor well above a random peak (~5%)."""
    from pathlib import Path

    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import multiexplain
    from multiexplain import metrics
    from multiexplain.data.captioned_scenes import CAPTION_VOCABULARY, make_captioned_scenes

    directory = Path(multiexplain.__file__).parent / "checkpoints" / "llava_scenes"
    model = LlavaForConditionalGeneration.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    scenes = make_captioned_scenes(24, seed=2, start=200)  # validation scenes, not the benchmark's
    answer = explain_caption(model, scenes.images[0], prompt="describe the scene", processor=processor, max_new_tokens=20)
    assert answer.generated and answer.words and set(answer.words) <= set(CAPTION_VOCABULARY), answer.words
    assert answer.maps.shape == (len(answer.words), 64, 64) and torch.isfinite(answer.maps).all()
    hits, varied = [], []
    for i in range(len(scenes)):
        scene = scenes[i]
        explained = explain_caption(model, scene.image, scene.caption, prompt="describe the scene", processor=processor)
        assert explained.words == scene.words and explained.maps.shape == (len(scene.words), 64, 64)
        assert torch.isfinite(explained.maps).all() and explained.maps.min() >= 0 and explained.maps.max() <= 1
        # A Grad-CAM++ map is all zero where the ReLU of its weighted sum is: rare, not the rule.
        varied += (explained.maps.flatten(1).std(dim=1) > 0).tolist()
        for j, kind in enumerate(scene.word_kinds):
            if kind == "shape":
                hits.append(bool(metrics.pointing_game(explained.maps[j][None], scene.word_masks[j][None], tolerance=2)))
    assert sum(varied) >= 0.8 * len(varied), (sum(varied), len(varied))
    assert len(hits) >= 40 and sum(hits) / len(hits) >= 0.12, (sum(hits), len(hits))


@pytest.mark.slow
def test_the_shipped_fastvlm_reads_its_word_maps_off_objects(one_torch_thread):
    """The shipped FastVLM-layout model (``scripts/train_llava_scenes.py --tower regnet``: a RegNet
    whose 16 x 16 ReLU cells are the image tokens, + Llama) loads through ``AutoModelForImageTextToText``,
    answers the prompt, and its shape words' maps peak on one of the scene's objects (the scenes are
    mostly background), though often not the named one (benchmarks/results/captioning.md: ~43% of
    shape words at 2 px against the issue's 85%; the CLIP-tower LLaVA ~30%). Floors here: 80% on an
    object, 30% on the named one (a constant or a random map falls far below both)."""
    from pathlib import Path

    from transformers import AutoModelForImageTextToText, AutoProcessor, FastVlmForConditionalGeneration

    import multiexplain
    from multiexplain import metrics
    from multiexplain.data.captioned_scenes import CAPTION_VOCABULARY, make_captioned_scenes

    directory = Path(multiexplain.__file__).parent / "checkpoints" / "fastvlm_scenes"
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    assert isinstance(model, FastVlmForConditionalGeneration)
    processor = AutoProcessor.from_pretrained(directory)
    scenes = make_captioned_scenes(24, seed=2, start=200)  # validation scenes, not the benchmark's
    answer = explain_caption(model, scenes.images[0], prompt="describe the scene", processor=processor, max_new_tokens=20)
    assert answer.generated and answer.words and set(answer.words) <= set(CAPTION_VOCABULARY), answer.words
    assert answer.layer == "model.vision_tower" and answer.maps.shape == (len(answer.words), 64, 64)
    named, on_object = [], []
    for i in range(len(scenes)):
        scene = scenes[i]
        explained = explain_caption(model, scene.image, scene.caption, prompt="describe the scene", processor=processor)
        assert explained.words == scene.words and torch.isfinite(explained.maps).all()
        objects = scene.object_masks.any(dim=0)
        for j, kind in enumerate(scene.word_kinds):
            if kind == "shape":
                named.append(bool(metrics.pointing_game(explained.maps[j][None], scene.word_masks[j][None], tolerance=2)))
                on_object.append(bool(metrics.pointing_game(explained.maps[j][None], objects[None], tolerance=0)))
    assert len(named) >= 40
    assert sum(on_object) / len(on_object) >= 0.8, (sum(on_object), len(on_object))  # 60 of 64 when written
    assert sum(named) / len(named) >= 0.3, (sum(named), len(named))  # 27 of 64 when written


def test_no_maps_are_made_at_the_processors_size_when_it_resized_the_image(built, image, monkeypatch):
    """Those maps would be thrown away: a resized image's maps are drawn from the raw ones onto the
    original grid. The result is the same as with them made (the raw maps do not depend on it)."""
    from multiexplain import core
    from multiexplain.adapters import captioning

    model, kwargs = _load(built, "llava")
    sizes = []
    upsample = core.upsample_maps
    monkeypatch.setattr(core, "upsample_maps", lambda maps, size, *a, **k: (sizes.append(tuple(size)), upsample(maps, size, *a, **k))[1])
    request = captioning.ExplainRequest
    with monkeypatch.context() as patch:  # as before: the maps made at the processor's size, then dropped
        patch.setattr(captioning, "ExplainRequest", lambda *a, **k: request(*a, **{**k, "upsample": True}))
        expected = explain_caption(model, image, ANSWER, prompt=PROMPT, **kwargs)
    assert sizes and (HEIGHT, WIDTH) not in sizes  # the spy sees them: the processor's size, not the image's
    sizes.clear()
    result = explain_caption(model, image, ANSWER, prompt=PROMPT, **kwargs)
    assert sizes == []
    assert result.maps.shape == (len(WORDS), HEIGHT, WIDTH)
    torch.testing.assert_close(result.maps, expected.maps, rtol=0, atol=0)
    torch.testing.assert_close(result.raw, expected.raw, rtol=0, atol=0)


def _training_script():
    return load_repo_module("scripts/train_llava_scenes.py")


def test_the_vlm_recipes_tower_pretraining_reads_labels_off_captions_trains_and_freezes_the_tower(one_torch_thread):
    """``--tower-pretraining captions``: labels are exactly the colours, shapes and pairs the caption
    names (plurals read as their shape); the tower's weights move, then it is frozen, so the language
    model's training cannot change it."""
    import argparse

    from multiexplain.data.captioned_scenes import make_captioned_scenes
    from multiexplain.data.synthetic import COLOURS, SHAPES

    script = _training_script()
    labels = script.caption_labels(["a red circle and two blue squares"])
    colours, shapes = list(COLOURS), list(SHAPES)
    expected = {colours.index("red"), colours.index("blue"), 6 + shapes.index("circle"), 6 + shapes.index("square"),
                12 + 6 * colours.index("red") + shapes.index("circle"), 12 + 6 * colours.index("blue") + shapes.index("square")}
    assert labels.shape == (1, 48) and set(labels[0].nonzero().flatten().tolist()) == expected

    args = argparse.Namespace(tower="regnet", width=32, layers=1, heads=2, vision_width=16, regnet_layers=2, patch=8, vision_layers=1,
                              lr=2e-3, batch=4, pretrain_steps=3)
    torch.manual_seed(0)
    model, processor = script.build(args)
    assert model.config.text_config.num_attention_heads == model.config.text_config.num_key_value_heads == 2  # --heads
    before = {k: v.clone() for k, v in model.model.vision_tower.state_dict().items()}
    script.pretrain_tower(model, processor, make_captioned_scenes(8, seed=1), args, torch.Generator().manual_seed(0))
    after = model.model.vision_tower.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    assert all(p.requires_grad for p in model.model.language_model.parameters())


def test_the_vlm_recipes_tower_pretraining_reads_clip_patch_tokens_without_the_class_token(one_torch_thread):
    """The CLIP tower's image tokens are its patch tokens (LLaVA's "default" strategy drops the class
    token): ``tower_cells`` hands exactly those, channels first, to the pretraining head."""
    import argparse

    script = _training_script()
    args = argparse.Namespace(tower="clip", width=32, layers=1, heads=4, vision_width=16, regnet_layers=1, patch=8, vision_layers=1)
    torch.manual_seed(0)
    model, _ = script.build(args)
    pixels = torch.randn(2, 3, 64, 64)
    cells = script.tower_cells(model, pixels)
    tokens = model.model.vision_tower(pixels).last_hidden_state
    assert cells.shape == (2, 16, 64) and torch.equal(cells, tokens[:, 1:].transpose(1, 2))


def test_the_vlm_recipes_attention_entropy_reads_only_answer_queries_over_image_keys():
    """``--attention-entropy``: the mean entropy of each answer query's attention renormalised over
    the image keys, against a loop over rows, layers, heads and queries in float64. Uniform over the
    image is log(image tokens), one image key is 0, and what a query gives the text keys, or what a
    prompt query does, changes nothing."""
    import math

    script = _training_script()
    generator = torch.Generator().manual_seed(0)
    n, heads, length = 2, 3, 12
    image = torch.zeros(n, length, dtype=torch.bool)
    image[:, 1:6] = True  # five image tokens after a start token, as in every row's context
    answer = torch.zeros(n, length, dtype=torch.bool)
    answer[0, 8:12], answer[1, 8:10] = True, True  # the second row's answer is shorter (padding)
    attentions = tuple(torch.rand(n, heads, length, length, generator=generator).softmax(-1) for _ in range(2))

    expected, count = 0.0, 0
    for weights in attentions:
        terms = []
        for row in range(n):
            for head in range(heads):
                for query in answer[row].nonzero().flatten().tolist():
                    share = weights[row, head, query, image[row]].double()
                    share = share / share.sum()
                    terms.append(float(-(share * share.log()).sum()))
        expected += sum(terms) / len(terms)
        count += 1
    penalty = script.image_attention_entropy(attentions, image, answer)
    assert math.isclose(float(penalty), expected / count, rel_tol=1e-5)

    changed = tuple(w.clone() for w in attentions)
    for w in changed:
        w[:, :, :, 6:] *= 3.0  # more on the text keys
        w[:, :, :8] = torch.rand(n, heads, 8, length, generator=generator)  # the prompt's queries
    assert math.isclose(float(script.image_attention_entropy(changed, image, answer)), float(penalty), rel_tol=1e-5)

    uniform = torch.zeros(n, heads, length, length)
    uniform[:, :, :, 1:6] = 0.1
    assert math.isclose(float(script.image_attention_entropy((uniform,), image, answer)), math.log(5), rel_tol=1e-6)
    one_key = torch.zeros(n, heads, length, length)
    one_key[:, :, :, 3] = 0.5
    assert float(script.image_attention_entropy((one_key,), image, answer)) == 0.0


def test_the_vlm_recipes_attention_supervision_names_each_querys_cells_and_scores_its_share_there():
    """``--attention-supervision``: ``query_cells`` gives the query predicting word k (position
    context - 1 + k) the grid cells holding any pixel of the word's objects, checked cell by cell
    against the scene's masks; "and", the end token and the prompt's queries name none; flipping a
    scene's masks flips its cells. ``attention_off_mask`` is -log of each counted query's attention
    share on its cells among the image keys, against a float64 loop; what a query gives the text keys,
    a prompt query, or a query naming nothing changes nothing; all on the named cells costs 0."""
    import math

    from multiexplain.data.captioned_scenes import make_captioned_scenes

    script = _training_script()
    scenes = make_captioned_scenes(3, seed=1)
    context, grid, length = 5, 16, 5 + 12
    cells = script.query_cells(scenes.word_masks, context, length, grid)
    assert cells.shape == (3, length, grid * grid)
    for row in range(3):
        words, masks = scenes.words[row], scenes.word_masks[row]
        for query in range(length):
            k = query - context + 1
            if 0 <= k < len(words) and words[k] != "and":
                expected = torch.tensor([bool(masks[k, 4 * (c // grid) : 4 * (c // grid) + 4, 4 * (c % grid) : 4 * (c % grid) + 4].any())
                                         for c in range(grid * grid)])
                assert expected.any() and torch.equal(cells[row, query], expected), (row, query)
            else:
                assert not cells[row, query].any(), (row, query)
    flip = (True, True)
    turned = [script.flipped(m, flip) for m in scenes.word_masks]
    assert torch.equal(script.query_cells(turned, context, length, grid).view(3, length, grid, grid),
                       script.flipped(cells.view(3, length, grid, grid), flip))

    generator = torch.Generator().manual_seed(0)
    n, heads, length = 2, 3, 12
    image = torch.zeros(n, length, dtype=torch.bool)
    image[:, 1:6] = True  # five image tokens after a start token
    answer = torch.zeros(n, length, dtype=torch.bool)
    answer[0, 8:12], answer[1, 8:10] = True, True
    named = torch.zeros(n, length, 5, dtype=torch.bool)
    named[0, 8, :2], named[0, 9, 4], named[0, 11, 1:4] = True, True, True  # query 10 names nothing ("and")
    named[1, 8, 0], named[1, 9, 2:] = True, True
    attentions = tuple(torch.rand(n, heads, length, length, generator=generator).softmax(-1) for _ in range(2))
    expected = 0.0
    for weights in attentions:
        terms = []
        for row in range(n):
            for head in range(heads):
                for query in answer[row].nonzero().flatten().tolist():
                    if named[row, query].any():
                        share = weights[row, head, query, image[row]].double()
                        terms.append(-math.log(float(share[named[row, query]].sum() / share.sum())))
        expected += sum(terms) / len(terms)
    loss = script.attention_off_mask(attentions, image, answer, named)
    assert math.isclose(float(loss), expected / len(attentions), rel_tol=1e-5)

    changed = tuple(w.clone() for w in attentions)
    for w in changed:
        w[:, :, :, 6:] *= 3.0  # more on the text keys
        w[:, :, :8] = torch.rand(n, heads, 8, length, generator=generator)  # the prompt's queries
        w[0, :, 10] = torch.rand(heads, length, generator=generator)  # the query naming nothing
    assert math.isclose(float(script.attention_off_mask(changed, image, answer, named)), float(loss), rel_tol=1e-5)
    on_named = torch.zeros(n, heads, length, length)
    on_named[:, :, :, 1:6] = named[:, None].float()
    on_named[:, :, :, 6] = 1.0  # and some on a text key
    assert float(script.attention_off_mask((on_named,), image, answer, named)) == 0.0


def test_the_vlm_recipes_convnext_tower_gives_equal_length_cells_on_a_16x16_grid_and_reloads(one_torch_thread, tmp_path):
    """``--tower convnext``: a FastVLM with a timm ConvNeXt tower (TimmWrapper) whose output cells
    are LayerNorm-ed (zero mean, unit variance over the channels in every cell, at initialisation)
    on a 16 x 16 grid: the 64 px scenes are resized to the processor's 128 px, in training as by the
    processor, and the chat context holds 256 image tokens. The directory reloads through the Auto
    classes without the hub and explains."""
    import argparse

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from multiexplain.data.captioned_scenes import make_captioned_scenes

    script = _training_script()
    args = argparse.Namespace(tower="convnext", width=32, layers=1, heads=2, vision_width=16, regnet_layers=1, patch=8, vision_layers=1)
    torch.manual_seed(0)
    model, processor = script.build(args)
    scenes = make_captioned_scenes(2, seed=1)
    pixels = script.normalise(processor, scenes.images)
    assert pixels.shape == (2, 3, 128, 128)
    expected = (torch.nn.functional.interpolate(scenes.images, size=(128, 128), mode="bicubic", align_corners=False).clamp(0, 1) - 0.5) / 0.25
    torch.testing.assert_close(pixels, expected)
    cells = model.model.vision_tower(pixels).last_hidden_state
    assert cells.shape == (2, 16, 16, 16)
    torch.testing.assert_close(cells.mean(dim=1), torch.zeros(2, 16, 16), atol=1e-5, rtol=0)
    torch.testing.assert_close(cells.var(dim=1, unbiased=False), torch.ones(2, 16, 16), atol=1e-3, rtol=0)
    context = script.prompt_ids(processor)
    assert context.count(model.config.image_token_id) == 256

    model.eval().save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    result = explain_caption(loaded, scenes.images[0], scenes.captions[0], prompt=script.PROMPT,
                             processor=AutoProcessor.from_pretrained(tmp_path))
    assert result.layer == "model.vision_tower" and result.maps.shape == (len(scenes[0].words), 64, 64)
    assert torch.isfinite(result.maps).all()


def test_the_captioning_benchmarks_vlm_attention_is_the_reading_of_the_position_before_each_word(one_torch_thread):
    """``benchmarks/quality_captioning.py``'s reference for a vision-language model: each layer's and
    head's attention from the position PREDICTING word j over the image tokens. Checked on the shipped
    FastVLM against an independent forward built the training script's way (its context ids, the
    caption's ids, float pixel values), and causally: word j's reading cannot depend on word j itself
    (an off-by-one query position would), but does on the word before it. The model keeps its
    attention implementation."""
    from pathlib import Path

    from transformers import AutoModelForImageTextToText, AutoProcessor

    import multiexplain
    from multiexplain.data.captioned_scenes import PLURALS, make_captioned_scenes
    from multiexplain.data.synthetic import COLOURS, SHAPES

    benchmark = load_repo_module("benchmarks/quality_captioning.py")
    recipe = load_repo_module("scripts/train_llava_scenes.py")
    directory = Path(multiexplain.__file__).parent / "checkpoints" / "fastvlm_scenes"
    model = AutoModelForImageTextToText.from_pretrained(directory).eval()
    processor = AutoProcessor.from_pretrained(directory)
    implementation = model.config.get_text_config()._attn_implementation
    scene = make_captioned_scenes(1, seed=2, start=7)[0]
    heads = benchmark.vlm_attention(model, processor, scene)
    words, layers, per_layer = len(scene.words), model.config.text_config.num_hidden_layers, model.config.text_config.num_attention_heads
    assert heads.shape == (words, layers * per_layer, 64, 64) and torch.isfinite(heads).all()
    assert model.config.get_text_config()._attn_implementation == implementation

    context = recipe.prompt_ids(processor)
    ids, _ = recipe.encode(processor, [scene.caption], context)
    image = [i for i, token in enumerate(context) if token == model.config.image_token_id]
    model.set_attn_implementation({"text_config": "eager"})
    try:
        with torch.no_grad():
            attentions = model(input_ids=ids[:, :-2], pixel_values=recipe.normalise(processor, scene.image[None]), output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": implementation})
    for j in (0, words // 2, words - 1):
        cells = torch.stack([a[0, h, len(context) - 1 + j, image[0] : image[-1] + 1] for a in attentions for h in range(per_layer)])
        cells = (cells / cells.sum(dim=1, keepdim=True)).reshape(-1, 1, 16, 16)
        expected = torch.nn.functional.interpolate(cells, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
        # uint8 pixels through the processor vs float pixels: equal to the 8-bit rounding.
        assert torch.allclose(heads[j], expected, atol=2e-3), (j, float((heads[j] - expected).abs().max()))

    def with_words(new_words):
        return dataclasses.replace(scene, caption=" ".join(new_words), words=new_words)

    last, before = scene.words[-1], scene.words[-2]
    assert scene.word_kinds[-2:] == ["colour", "shape"], scene.words
    other_shape = next(PLURALS[shape] for shape in SHAPES if PLURALS[shape] != last)
    assert torch.equal(benchmark.vlm_attention(model, processor, with_words(scene.words[:-1] + [other_shape]))[-1], heads[-1])
    other_colour = next(colour for colour in COLOURS if colour != before)
    assert not torch.equal(benchmark.vlm_attention(model, processor, with_words(scene.words[:-2] + [other_colour, last]))[-1], heads[-1])

    # The reading head: the one whose attention peaks within 2 px of the named object for the most shape words.
    from multiexplain import metrics

    scenes = make_captioned_scenes(6, seed=2)
    hits = torch.zeros(layers * per_layer)
    for i in range(len(scenes)):
        maps = benchmark.vlm_attention(model, processor, scenes[i])
        for j, kind in enumerate(scenes[i].word_kinds):
            if kind == "shape":
                for h in range(layers * per_layer):
                    hits[h] += float(metrics.pointing_game(maps[j, h][None], scenes[i].word_masks[j][None], tolerance=2)[0])
    assert hits.max() > hits.min()
    assert benchmark.reading_head(model, processor, scenes) == int(hits.argmax())


def test_the_captioning_benchmark_reads_every_seed_of_an_unshipped_recipe_from_the_seeds_folder(tmp_path):
    """The attention-supervised FastVLM recipe is not shipped: its seed 0 is read from the seeds folder
    (missing there: None), while a shipped recipe's seed 0 is the shipped model; the command that
    trains a missing seed is the recipe's, with the supervision option."""
    benchmark = load_repo_module("benchmarks/quality_captioning.py")
    assert benchmark.model_location("fastvlm", 0, tmp_path, train_missing=False) == benchmark.SHIPPED["fastvlm"]
    assert benchmark.model_location("fastvlm-supervised", 0, tmp_path, train_missing=False) is None
    (tmp_path / "fastvlm_supervised_scenes_s0").mkdir()
    assert benchmark.model_location("fastvlm-supervised", 0, tmp_path, train_missing=False) == tmp_path / "fastvlm_supervised_scenes_s0"
    command = benchmark.training_command("fastvlm-supervised", 2, tmp_path)
    assert command[-6:] == ["--attention-supervision", "1", "--seed", "2", "--out", str(tmp_path / "fastvlm_supervised_scenes_s2")]
    assert "regnet" in command and set(benchmark.RECIPES) == set(benchmark.TARGETS) == set(benchmark.RECIPE_NAMES)


def test_the_captioning_benchmarks_hirescam_weighs_each_cell_by_its_own_gradient(one_torch_thread):
    """The benchmark's reference method, registered once however often it is asked for: its raw map is
    ReLU(sum_c g_c A_c) at every cell, from the layer's own activations and gradients (float64 hooks),
    where Grad-CAM's averages the gradients over the cells first."""
    benchmark = load_repo_module("benchmarks/quality_captioning.py")
    assert benchmark.reference_methods() == benchmark.reference_methods() == ("hirescam",)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(4, 5, 3, padding=1),
                                torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(5, 3)).double()
    images = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    with benchmark.HiResCAM(model, model[2]) as cam:  # the conv before a ReLU: its gradient varies over the cells
        result = cam(images, torch.tensor([0, 2]))
    store = {}
    handle = model[2].register_forward_hook(lambda module, inputs, output: store.update(a=output))
    try:
        scores = model(images)[[0, 1], [0, 2]]
    finally:
        handle.remove()
    gradients = torch.autograd.grad(scores.sum(), store["a"])[0]
    torch.testing.assert_close(result.raw, torch.relu((store["a"] * gradients).sum(dim=1)))
    pooled = torch.relu((store["a"] * gradients.mean(dim=(2, 3), keepdim=True)).sum(dim=1))
    assert not torch.allclose(result.raw, pooled)
