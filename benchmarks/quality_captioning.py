"""Per-word map quality of the captioning adapter on held-out synthetic captioned scenes.

    python benchmarks/quality_captioning.py [--scenes 300] [--seeds 0,1,2] [--train-missing]

Four captioner recipes trained on the scenes by repo scripts: the shipped Show-Attend-Tell
(``scripts/train_show_and_tell.py``), the two shipped small vision-language models answering
"describe the scene" (``scripts/train_llava_scenes.py``): a transformers
``LlavaForConditionalGeneration`` (CLIP tower) and a ``FastVlmForConditionalGeneration`` (LLaVA's
layout with a RegNet tower, ``--tower regnet``), and that FastVLM recipe with its attention
supervised by the masks (``--attention-supervision 1``, not shipped): a model known to read each word
off the named object, to see whether the maps follow.
Seed 0 of each shipped recipe is the shipped model; the other seeds (all three of the supervised one) are read from
``--seeds-dir`` (``show_and_tell_s{S}.pt``, ``llava_scenes_s{S}/``, ``fastvlm_scenes_s{S}/``,
``fastvlm_supervised_scenes_s{S}/``; ``--train-missing`` trains the
missing ones with the scripts, one thread each, a few minutes to an hour on a shared machine).

On ``--scenes`` held-out scenes (seed 3; training used seed 1, validation seed 2) every word of the
ground-truth caption is explained (one teacher-forced forward per image; Grad-CAM comes from the
same gradients). Reported for Grad-CAM++ and Grad-CAM side by side (and, on every recipe's
seeds, HiResCAM: Grad-CAM without the spatial mean of the gradients, a reference, not a target):

* per-word pointing game (the map's peak inside the union of the masks of the objects the word
  names), exactly (0 px) and within 2 px, and energy-in-mask, for colour, shape and count words,
  for every seed of both recipes, and the issue's target: the MEAN over the seeds of shape-word
  pointing at 2 px (>= 90% Show-Attend-Tell, >= 85% a vision-language model);
* for the shipped Show-Attend-Tell, other layers / scores and the look-alike cases, and
  whole-caption Average Drop % / % Increase in Confidence / Win % (paper eq. 25 with the
  confidence ``Y`` = the caption's probability on the full image and ``O`` = the same on
  ``E = map * image``);
* where each model really read the word: its own attention at the position predicting it, over the
  image cells (Show-Attend-Tell's one attention; for a vision-language model the mean of all layers'
  and heads' attention, and the one head that points best on 100 validation scenes), pointing within 2 px;
* a reference: the pointing accuracy a uniformly random peak would get (mean mask area share).

Metrics come from :mod:`multiexplain.metrics`. Results: ``benchmarks/results/captioning.md`` and
``captioning.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from multiexplain import metrics
from multiexplain.adapters.caption_models import captioner_for
from multiexplain.adapters.captioning import caption_scores, explain_caption
from multiexplain.data.captioned_scenes import PLURALS, make_captioned_scenes
from multiexplain.explain import METHODS as REGISTERED, GradCAM, register_method
from multiexplain.models import CaptionVocabulary, load_checkpoint, load_show_and_tell

SINGULAR = {plural: singular for singular, plural in PLURALS.items()}

METHODS = ("gradcam++", "gradcam")
# Scored on the recipes' seeds beside them, not a target: is the gradient on the object where the pooled weights are not?
REFERENCE_METHODS = ("hirescam",)  # HiResCAM.method, below
KINDS = ("colour", "shape", "count")
# (row label, layer, word score): the default layer (the encoder's output, 16x16) with the
# default log-probability score, the same with pre-softmax logits, and an earlier layer (32x32).
CONFIGS = (("encoder", "encoder", "logprob"), ("encoder, score=logit", "encoder", "logit"), ("encoder.3", "encoder.3", "logprob"))
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "multiexplain" / "checkpoints"
SHIPPED = {"show-attend-tell": CHECKPOINTS / "show_and_tell.pt", "llava": CHECKPOINTS / "llava_scenes",
           "fastvlm": CHECKPOINTS / "fastvlm_scenes"}  # seed 0 of a recipe not shipped is read from --seeds-dir
# recipe -> (training script and its options, the file or folder name of seed S's model)
TRAINING = {"show-attend-tell": ([ROOT / "scripts" / "train_show_and_tell.py"], "show_and_tell_s{seed}.pt"),
            "llava": ([ROOT / "scripts" / "train_llava_scenes.py"], "llava_scenes_s{seed}"),
            "fastvlm": ([ROOT / "scripts" / "train_llava_scenes.py", "--tower", "regnet"], "fastvlm_scenes_s{seed}"),
            "fastvlm-supervised": ([ROOT / "scripts" / "train_llava_scenes.py", "--tower", "regnet", "--attention-supervision", "1"],
                                   "fastvlm_supervised_scenes_s{seed}")}
RECIPES = tuple(TRAINING)
TARGETS = {"show-attend-tell": 0.90, "llava": 0.85, "fastvlm": 0.85, "fastvlm-supervised": 0.85}  # the issue's: mean over the seeds, shape words, 2 px
VLM_PROMPT = "describe the scene"
HEAD_CHOICE_SCENES = 100  # validation scenes (seed 2) a vision-language model's reading head is chosen on


def caption_probability(model, vocabulary, images: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """``(N,)`` probability of each caption (end token included) given each image; no grad."""
    ids = vocabulary.batch_encode(captions).to(images.device)
    mask = (ids != vocabulary.pad_token_id).long()
    with torch.no_grad():
        return caption_scores(model(images, ids[:, :-1]), ids, mask).sum(dim=1).double().exp()


def caption_accuracy(model, vocabulary, images: torch.Tensor, captions: list[str]) -> dict[str, float]:
    """Greedy exact-caption accuracy and teacher-forced per-word accuracy."""
    generated = model.generate(images, max_length=20)
    exact = sum(vocabulary.decode(g.tolist()) == c for g, c in zip(generated, captions)) / len(captions)
    ids = vocabulary.batch_encode(captions)
    with torch.no_grad():
        predicted = model(images, ids[:, :-1]).argmax(dim=2)
    real = (ids[:, 1:] != vocabulary.pad_token_id) & (ids[:, 1:] != vocabulary.eos_token_id)
    return {"exact_caption": exact, "word": float(((predicted == ids[:, 1:]) & real).sum() / real.sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=300)
    parser.add_argument("--batch", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seeds", default="0,1,2", help="training seeds of each recipe (0: the shipped model)")
    parser.add_argument("--seeds-dir", default=str(ROOT / "benchmarks" / "seeds"), help="where the other seeds' models are")
    parser.add_argument("--train-missing", action="store_true", help="train the seeds that are missing with the repo scripts")
    parser.add_argument("--only", choices=RECIPES, help="one recipe only (the others' results are kept)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    began = time.time()
    scenes = make_captioned_scenes(args.scenes, seed=3)
    seeds = [int(s) for s in args.seeds.split(",")]
    previous = load_results()
    report: dict = {"scenes": len(scenes), "seed": 3, "recipes": previous.get("recipes", {})}
    if args.only in (None, "show-attend-tell"):
        report.update(shipped_show_and_tell(scenes, args.batch))
    for recipe in RECIPES:
        if args.only not in (None, recipe):
            continue
        rows = {}
        for seed in seeds:
            location = model_location(recipe, seed, Path(args.seeds_dir), args.train_missing)
            if location is None:
                print(f"{recipe} seed {seed}: missing; train it with: {training_command(recipe, seed, Path(args.seeds_dir))}", flush=True)
                continue
            rows[str(seed)] = seed_row(recipe, location, scenes, args.batch)
            print(f"{recipe} seed {seed}: shape words 2 px {100 * rows[str(seed)]['shape']['gradcam++']['pointing_tol2']:.1f}%  "
                  f"{time.time() - began:.0f}s", flush=True)
        report["recipes"][recipe] = summary(recipe, rows, seeds)
    if args.only in (None, "show-attend-tell"):  # the time the detail section states is its run's
        report["seconds"] = round(time.time() - began, 1)
    write(report)


def training_command(recipe: str, seed: int, folder: Path) -> list[str]:
    script, name = TRAINING[recipe]
    return [sys.executable, *map(str, script), "--seed", str(seed), "--out", str(folder / name.format(seed=seed))]


def model_location(recipe: str, seed: int, folder: Path, train_missing: bool) -> Path | None:
    """The model of ``recipe`` trained with ``seed`` (seed 0: the shipped one, where the recipe is
    shipped), trained now if asked."""
    if seed == 0 and recipe in SHIPPED:
        return SHIPPED[recipe]
    command = training_command(recipe, seed, folder)
    location = Path(command[-1])
    if not location.exists() and train_missing:
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return location if location.exists() else None


def fingerprint(location: Path) -> str:
    """sha256 (first 12 hex digits) of a checkpoint file or of a model directory's weights."""
    path = location if location.is_file() else location / "model.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def seed_row(recipe: str, location: Path, scenes, batch: int) -> dict:
    """Per-word localisation of one trained model (default layer and score)."""
    words: list[dict] = []
    if recipe == "show-attend-tell":
        checkpoint = load_checkpoint(location)
        model, vocabulary = checkpoint.model, CaptionVocabulary(checkpoint.vocabulary or [])
        training = checkpoint.meta
        attention = attention_maps(model, vocabulary, scenes)
        for start in range(0, len(scenes), batch):
            stop = min(start + batch, len(scenes))
            both = explain_caption(model, scenes.images[start:stop], scenes.captions[start:stop], tokenizer=vocabulary,
                                   methods=METHODS + reference_methods())
            for offset in range(stop - start):
                words += with_attention(word_entries(scenes[start + offset], {m: both[m][offset] for m in both}),
                                        scenes[start + offset], attention[start + offset])
    else:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(location).eval()  # LLaVA or FastVLM
        processor = AutoProcessor.from_pretrained(location)
        training = json.loads((location / "training.json").read_text()) if (location / "training.json").exists() else {}
        for index in range(len(scenes)):
            scene = scenes[index]
            both = explain_caption(model, scene.image, scene.caption, prompt=VLM_PROMPT, processor=processor,
                                   methods=METHODS + reference_methods())
            heads = vlm_attention(model, processor, scene)
            entries = with_attention(word_entries(scene, both), scene, heads.mean(dim=1))
            for entry, j in zip(entries, content_words(scene)):
                entry["head_hits_tol2"] = metrics.pointing_game(heads[j], entry["mask"].expand_as(heads[j]), tolerance=2)
            words += entries
    row = {kind: localisation_row([w for w in words if w["kind"] == kind]) for kind in KINDS}
    if recipe != "show-attend-tell":
        # The head is chosen on validation scenes and scored on the held-out ones, as a map would be.
        chosen = reading_head(model, processor, make_captioned_scenes(HEAD_CHOICE_SCENES, seed=2))
        heads = model.config.get_text_config().num_attention_heads
        for kind in KINDS:
            row[kind]["chosen_head"] = chosen
            row[kind]["chosen_head_label"] = f"layer {chosen // heads}, head {chosen % heads}"
            row[kind]["chosen_head_attention_pointing_tol2"] = row[kind]["head_attention_pointing_tol2"][chosen]
    row["model"] = {"path": str(location.relative_to(ROOT) if location.is_relative_to(ROOT) else location),
                    "sha256": fingerprint(location), "held_out": training.get("held_out")}
    return row


class HiResCAM(GradCAM):
    """HiResCAM (Draelos & Carin 2020): every cell's features weighed by that cell's own gradient,
    Grad-CAM without the spatial mean. A reference: a word's gradient on the named object shows here
    even where weights pooled over all cells light other objects."""

    method = "hirescam"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **{**kwargs, "pool_axes": ()})


def reference_methods() -> tuple[str, ...]:
    """:data:`REFERENCE_METHODS`, registered once per process (the registry refuses a second class of one name)."""
    if HiResCAM.method not in REGISTERED:
        register_method(HiResCAM)
    return REFERENCE_METHODS


def content_words(scene) -> list[int]:
    """Positions of the words :func:`word_entries` scores, in its order."""
    return [j for j, kind in enumerate(scene.word_kinds) if kind in KINDS]


def with_attention(entries: list[dict], scene, attention: torch.Tensor) -> list[dict]:
    """``entries`` with each word's attention map (``attention``: ``(T, H, W)``, one per caption word)."""
    for entry, j in zip(entries, content_words(scene)):
        entry["attention"] = attention[j]
    return entries


def word_entries(scene, explained: dict) -> list[dict]:
    """The content words of a scene with their masks and each explained method's map."""
    first = explained[METHODS[0]]
    assert first.words == scene.words, (first.words, scene.words)
    return [{"kind": kind, "look_alike": has_look_alike(scene, j), "mask": scene.word_masks[j],
             "objects": scene.object_masks.any(dim=0), **{m: explained[m].maps[j] for m in explained}}
            for j, kind in enumerate(scene.word_kinds) if kind in KINDS]


def summary(recipe: str, rows: dict, seeds: list[int]) -> dict:
    """Each seed's rows and the target: mean over the seeds of shape-word pointing at 2 px."""
    shape = [rows[s]["shape"]["gradcam++"] for s in rows]
    mean_2px = sum(r["pointing_tol2"] for r in shape) / len(shape) if shape else float("nan")
    mean_0px = sum(r["pointing"] for r in shape) / len(shape) if shape else float("nan")
    return {"seeds": rows, "seeds_asked": seeds, "complete": len(rows) == len(seeds), "target": TARGETS[recipe],
            "mean_shape_pointing_tol2": mean_2px, "mean_shape_pointing": mean_0px,
            "met": bool(len(rows) == len(seeds) and mean_2px >= TARGETS[recipe])}


def shipped_show_and_tell(scenes, batch: int) -> dict:
    """The shipped Show-Attend-Tell in detail: layers / scores, look-alikes, attention, whole-caption drop."""
    model, vocabulary = load_show_and_tell()
    report: dict = {"model": "show_and_tell.pt", "caption_accuracy": caption_accuracy(model, vocabulary, scenes.images, scenes.captions),
                    "words": {}, "caption": {}}
    attention = attention_maps(model, vocabulary, scenes)
    caption_maps: dict[str, list] = {}
    for label, layer, score in CONFIGS:
        words: list[dict] = []
        for start in range(0, len(scenes), batch):
            stop = min(start + batch, len(scenes))
            # Grad-CAM++ and Grad-CAM from the same forward pass and gradients.
            both = explain_caption(model, scenes.images[start:stop], scenes.captions[start:stop], tokenizer=vocabulary,
                                   target_layer=layer, score=score, methods=METHODS)
            for offset, result in enumerate(both[METHODS[0]]):
                scene = scenes[start + offset]
                words += with_attention(word_entries(scene, {m: both[m][offset] for m in METHODS}), scene, attention[start + offset])
                if label == CONFIGS[0][0]:
                    for method in METHODS:
                        caption_maps.setdefault(method, []).append(both[method][offset].caption_map)
        report["words"][label] = {}
        for kind in KINDS:
            report["words"][label][kind] = localisation_row([w for w in words if w["kind"] == kind])
        for kind in ("colour", "shape"):
            report["words"][label][f"{kind}, look-alike present"] = localisation_row([w for w in words if w["kind"] == kind and w["look_alike"]])

    full = caption_probability(model, vocabulary, scenes.images, scenes.captions)
    drops = {}
    for method in METHODS:
        explained_inputs = metrics.explanation_inputs(scenes.images, torch.stack(caption_maps[method]))
        explained = caption_probability(model, vocabulary, explained_inputs, scenes.captions)
        drops[method] = metrics.per_sample_drop(full, explained, clip=False)
        report["caption"][method] = {
            "average_drop": metrics.average_drop(full, explained),
            "increase_in_confidence": metrics.increase_in_confidence(full, explained),
        }
    report["caption"]["gradcam++"]["win"] = metrics.win_percent(drops["gradcam++"], drops["gradcam"])
    report["caption"]["gradcam"]["win"] = metrics.win_percent(drops["gradcam"], drops["gradcam++"])
    return report


def attention_maps(model, vocabulary, scenes) -> list[torch.Tensor]:
    """The model's own attention at every word step, upsampled to the image: per scene ``(T, H, W)``.
    A reference for the maps: where the decoder actually read each word from."""
    ids = vocabulary.batch_encode(scenes.captions)
    with torch.no_grad():
        _, attention = model(scenes.images, ids[:, :-1], return_attention=True)
    side = int(round(attention.shape[-1] ** 0.5))
    grid = attention.reshape(len(scenes), -1, side, side)
    upsampled = torch.nn.functional.interpolate(grid, size=tuple(scenes.images.shape[2:]), mode="bilinear", align_corners=False)
    return [upsampled[i, : len(words)] for i, words in enumerate(scenes.words)]


def vlm_attention(model, processor, scene) -> torch.Tensor:
    """Where a vision-language model read each word from: ``(words, layers * heads, H, W)``, the
    attention of the position predicting the word over the image tokens (renormalised among them),
    every layer and head, upsampled to the image. The teacher-forced inputs are the ones the maps are
    made from (the captioning adapter's own preparation: the chat template with the image and the
    prompt, then the caption); eager attention for this one forward, restored after. A reference for
    the maps, as Show-Attend-Tell's own attention is."""
    captioner = captioner_for(model, processor, None)
    prepared = captioner.prepare(scene.image, VLM_PROMPT)
    answer = captioner.content_ids(scene.caption)
    if len(answer) != len(scene.words):
        raise ValueError(f"expected one token per word (a word-level tokenizer), got {len(answer)} for {len(scene.words)} words")
    context = len(prepared.context)
    ids = torch.tensor([prepared.context + answer])
    inputs = captioner.forward_inputs([prepared], ids, torch.ones_like(ids))
    inputs.pop("logits_to_keep", None)
    image = (inputs["input_ids"][0] == model.config.image_token_id).nonzero().flatten()
    implementation = model.config.get_text_config()._attn_implementation
    model.set_attn_implementation({"text_config": "eager"})  # only eager attention returns its weights
    try:
        with torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.set_attn_implementation({"text_config": implementation})
    # Position context - 1 + j predicts word j.
    read = torch.cat([a[0, :, context - 1 : context - 1 + len(answer)][:, :, image] for a in attentions])  # (L*heads, words, cells)
    read = read / read.sum(dim=2, keepdim=True).clamp_min(1e-12)
    side = int(round(read.shape[-1] ** 0.5))
    grid = read.transpose(0, 1).reshape(len(answer), -1, side, side)
    return torch.nn.functional.interpolate(grid, size=tuple(scene.image.shape[1:]), mode="bilinear", align_corners=False)


def reading_head(model, processor, scenes) -> int:
    """The layer and head (flat index, layer-major) whose attention points at the named object (2 px)
    for the most shape words of ``scenes``."""
    hits = []
    for index in range(len(scenes)):
        scene = scenes[index]
        heads = vlm_attention(model, processor, scene)
        hits += [metrics.pointing_game(heads[j], scene.word_masks[j].expand_as(heads[j]), tolerance=2)
                 for j, kind in enumerate(scene.word_kinds) if kind == "shape"]
    return int(torch.stack(hits).float().mean(dim=0).argmax())


def has_look_alike(scene, j: int) -> bool:
    """Whether the scene has an object the word does NOT name that shares the word's attribute:
    the same shape in another colour for a shape word, the same colour on another shape for a
    colour word. Maps from channel weights light every object with the weighted features, so
    these words are the hard cases."""
    kind = scene.word_kinds[j]
    if kind not in ("colour", "shape"):
        return False
    count = j - 2 if kind == "shape" else j - 1  # a group is "<count> <colour> <shape>"
    colour, shape = scene.words[count + 1], SINGULAR.get(scene.words[count + 2], scene.words[count + 2])
    if kind == "shape":
        return any(s == shape and c != colour for c, s in scene.objects)
    return any(c == colour and s != shape for c, s in scene.objects)


def localisation_row(words: list[dict]) -> dict:
    """Pointing / energy metrics of each method explained (and the attention's pointing, when recorded) over ``words``."""
    mask, objects = torch.stack([w["mask"] for w in words]), torch.stack([w["objects"] for w in words])
    row = {"count": len(words), "random_peak_pointing": float(mask.float().mean())}
    if all("attention" in w for w in words):
        attention = torch.stack([w["attention"] for w in words])
        row["attention_pointing"] = float(metrics.pointing_game(attention, mask).float().mean())
        row["attention_pointing_tol2"] = float(metrics.pointing_game(attention, mask, tolerance=2).float().mean())
    if all("head_hits_tol2" in w for w in words):  # a vision-language model: each layer's and head's own attention
        row["head_attention_pointing_tol2"] = torch.stack([w["head_hits_tol2"] for w in words]).float().mean(dim=0).tolist()
    for method in [m for m in METHODS + REFERENCE_METHODS if all(m in w for w in words)]:
        stacked = torch.stack([w[method] for w in words])
        row[method] = {
            "pointing": float(metrics.pointing_game(stacked, mask).float().mean()),
            "pointing_tol2": float(metrics.pointing_game(stacked, mask, tolerance=2).float().mean()),
            "energy_in_mask": float(metrics.energy_pointing_game(stacked, mask).mean()),
            "peak_on_any_object": float(metrics.pointing_game(stacked, objects).float().mean()),
        }
    return row


def load_results() -> dict:
    """The current ``captioning.json`` (the speed benchmark keeps its rows in the same file)."""
    path = os.path.join(RESULTS, "captioning.json")
    if os.path.exists(path):
        with open(path) as handle:
            return json.load(handle)
    return {}


def write(update: dict) -> None:
    """Merge ``update`` into ``captioning.json`` and re-render ``captioning.md`` from it."""
    report = {**load_results(), **update}
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, "captioning.json"), "w") as handle:
        json.dump(report, handle, indent=2)
    lines = ["# Captioning: per-word Grad-CAM++ vs Grad-CAM", ""]
    if report.get("recipes"):
        lines += recipe_lines(report)
    if "words" in report:
        lines += quality_lines(report)
    if "speed" in report:
        lines += speed_lines(report["speed"])
    with open(os.path.join(RESULTS, "captioning.md"), "w") as handle:
        handle.write("\n".join(lines))
    print("\n".join(lines))


RECIPE_NAMES = {"show-attend-tell": "Show-Attend-Tell (CNN + LSTM with attention)",
                "llava": "LLaVA (transformers LlavaForConditionalGeneration: CLIP vision tower + Llama)",
                "fastvlm": "FastVLM layout (transformers FastVlmForConditionalGeneration: RegNet tower + Llama)",
                "fastvlm-supervised": "FastVLM layout, attention supervised with the masks (`--attention-supervision 1`)"}


def recipe_lines(report: dict) -> list[str]:
    """The targets: each training seed of each recipe, and the mean over the seeds."""
    lines = [
        "## Trained captioners, every training seed (the issue's target: mean over 3 seeds, shape words, 2 px)",
        "",
        f"{report['scenes']} held-out scenes (seed {report['seed']}); the ground-truth caption is explained word by word "
        f"(the vision-language model answers \"{VLM_PROMPT}\"; its prompt tokens are not explained). Seed 0 is the shipped "
        "model (the attention-supervised recipe is not shipped: its seed 0 is in `benchmarks/seeds`). Pointing game within 2 px and exactly (0 px), Grad-CAM++ / Grad-CAM; energy-in-mask Grad-CAM++.",
        "",
        "| recipe | seed | model (sha256) | exact captions on validation scenes (training script) | shape 2 px GC++ / GC | shape 0 px GC++ / GC | colour 2 px GC++ | count 2 px GC++ | shape energy GC++ | shape: the model's attention 2 px (mean of heads / reading head) | shape 2 px HiResCAM (reference) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for recipe, entry in report["recipes"].items():
        for seed, row in entry["seeds"].items():
            shape, plain = row["shape"]["gradcam++"], row["shape"]["gradcam"]
            held = (row["model"].get("held_out") or {}).get("exact_caption_accuracy")
            lines.append(
                f"| {RECIPE_NAMES[recipe]} | {seed} | `{row['model']['sha256']}` | {'' if held is None else f'{100 * held:.1f}%'} | "
                f"{100 * shape['pointing_tol2']:.1f}% / {100 * plain['pointing_tol2']:.1f}% | "
                f"{100 * shape['pointing']:.1f}% / {100 * plain['pointing']:.1f}% | "
                f"{100 * row['colour']['gradcam++']['pointing_tol2']:.1f}% | {100 * row['count']['gradcam++']['pointing_tol2']:.1f}% | "
                f"{shape['energy_in_mask']:.3f} | {attention_cell(row['shape'])} | {reference_cell(row['shape'])} |")
        verdict = "met" if entry["met"] else ("MISSED" if entry["complete"] else "incomplete: seeds missing")
        lines.append(
            f"| **{RECIPE_NAMES[recipe]}** | **mean of {len(entry['seeds'])}** | | | **{100 * entry['mean_shape_pointing_tol2']:.1f}%** | "
            f"{100 * entry['mean_shape_pointing']:.1f}% | | | target >= {100 * entry['target']:.0f}% at 2 px: **{verdict}** | | |")
    return lines + [
        "",
        "The model's attention: where the position predicting the word attends among the image cells (Show-Attend-Tell: its one "
        "attention; a vision-language model: each layer's and head's, renormalised over the image tokens), upsampled to the image, "
        "pointing within 2 px. Mean of heads: all layers' and heads' attention averaged; reading head: the one layer and head that "
        "points best on 100 validation scenes (seed 2), scored here on the held-out ones. A map from the gradients "
        "can only be as local as what the model reads, and the attention-supervised recipe shows that it is not enough for "
        "the model to read the named object: all its heads do, and its maps land there hardly more often than the shipped FastVLM's. "
        "HiResCAM, a reference and not the target: every cell's features weighed by that cell's own gradient (Grad-CAM without "
        "the spatial mean), where the word's gradient itself lies.",
        ""]


def reference_cell(row: dict) -> str:
    """The recipe table's HiResCAM column for one seed's shape words ('' where not recorded)."""
    return f"{100 * row['hirescam']['pointing_tol2']:.1f}%" if "hirescam" in row else ""


def attention_cell(row: dict) -> str:
    """The recipe table's attention column for one seed's shape words ('' where not recorded)."""
    if "attention_pointing_tol2" not in row:
        return ""
    cell = f"{100 * row['attention_pointing_tol2']:.1f}%"
    if "chosen_head" in row:
        cell += f" / {100 * row['chosen_head_attention_pointing_tol2']:.1f}% ({row['chosen_head_label']})"
    return cell


def quality_lines(report: dict) -> list[str]:
    words, caption, accuracy = report["words"], report["caption"], report["caption_accuracy"]
    lines = [
        "## The shipped Show-Attend-Tell in detail",
        "",
        f"Shipped Show-Attend-Tell model, {report['scenes']} held-out synthetic scenes (seed {report['seed']}); the "
        "ground-truth caption is explained word by word (one teacher-forced forward per image; Grad-CAM shares its gradients). "
        f"Model: exact caption {100 * accuracy['exact_caption']:.1f}% (greedy), per-word {100 * accuracy['word']:.1f}% "
        f"(teacher forced). `benchmarks/quality_captioning.py`, {report['seconds']:.0f}s (one thread, shared machine).",
        "",
        "### Per-word localisation (word map vs the masks of the objects the word names)",
        "",
        "Pointing game: the map's peak inside the named objects, exactly (0 px) and within 2 px (Zhang et al.'s 15 px",
        "tolerance is 2-4% of a 375-640 px VOC/COCO image side; 2 px is 3% of ours). Energy: share of the map's",
        "mass inside them. Any object: the peak on some object, named or not. Random peak: the mask's area share.",
        "Attention: the model's own attention at that word (upsampled), where the decoder really read it from.",
        "*look-alike present*: the scene has an object the word does not name that shares its attribute (the same",
        "shape in another colour, or the same colour on another shape): a map built from channel weights lights",
        "both, so these are the hard cases. Rings are hollow: a map peaking at a ring's centre misses at 0 px.",
        "",
        "| layer, score | words | n | pointing GC++ | pointing GC | ratio | pointing 2 px GC++ / GC | energy GC++ | energy GC | ratio | any object GC++ / GC | attention 0 / 2 px | random peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for layer, rows in words.items():
        for kind, row in rows.items():
            plus, plain = row["gradcam++"], row["gradcam"]
            lines.append(
                f"| {layer} | {kind} | {row['count']} | {100 * plus['pointing']:.1f}% | {100 * plain['pointing']:.1f}% | "
                f"{plus['pointing'] / max(plain['pointing'], 1e-9):.2f} | {100 * plus['pointing_tol2']:.1f}% / {100 * plain['pointing_tol2']:.1f}% | "
                f"{plus['energy_in_mask']:.3f} | {plain['energy_in_mask']:.3f} | {plus['energy_in_mask'] / max(plain['energy_in_mask'], 1e-9):.2f} | "
                f"{100 * plus['peak_on_any_object']:.1f}% / {100 * plain['peak_on_any_object']:.1f}% | "
                f"{100 * row['attention_pointing']:.1f}% / {100 * row['attention_pointing_tol2']:.1f}% | {100 * row['random_peak_pointing']:.1f}% |"
            )
    lines += [
        "",
        "### Whole caption (confidence = caption probability; explanation input E = map * image, paper eq. 25)",
        "",
        "| method | Average Drop % (lower better) | % Increase in Confidence | Win % |",
        "|---|---|---|---|",
    ]
    for method in METHODS:
        row = caption[method]
        lines.append(f"| {method} | {row['average_drop']:.2f} | {row['increase_in_confidence']:.2f} | {row['win']:.2f} |")
    lines += ["", "Paper anchor (ImageNet VGG-16, classification): Avg Drop 36.84 vs 46.56, Incr. 17.05 vs 13.42, Win 70.72 vs 29.28 (GC++ vs GC).", ""]
    return lines


SPEED_TARGETS = {"encoder-decoder": 6.0, "decoder-only": 1.1}


def chunk_sizes(chunks: list[int]) -> str:
    """``[1, 3, 1, 1, 1, 1]`` as ``1 + 3 + 1 (x4)``: the products each backward pass carried, runs of three or
    more passes of one size written once with their count."""
    parts = []
    for size, run in itertools.groupby(chunks):
        count = len(list(run))
        parts += [f"{size} (x{count})"] if count >= 3 else [str(size)] * count
    return " + ".join(parts)


def speed_lines(speed: dict) -> list[str]:
    lines = [
        "## Speed: per-word maps, one forward + batched VJPs vs a loop of single-word explanations",
        "",
        "`benchmarks/speed_captioning.py` (random weights; sizes scaled down from hub models with their proportions). Ours: one "
        "teacher-forced forward, then the W word maps and the whole-caption map from batched vector-Jacobian products "
        "(`token_maps=False`). Loop: W single-word Grad-CAM++ calls (one forward and one backward each); its maps equal ours "
        "(checked). Ours crosses the token head (the vocabulary-sized output layer) once for all K scores, each position's score "
        "reading only its own position (`PositionScores`); the loop crosses it once per word. Forward + K backward: ours with "
        "`max_batch=1` (the K products one after another, below the head), measured in the same run: a stricter yardstick "
        "than K full backward passes. Ours runs the default `max_batch=\"auto\"`, which splits the K products into batches "
        "by their bytes and device for decoder-only models, times one such batch against single passes (the first and "
        "third passes) and runs the rest the faster way, and runs an encoder-decoder's all at once (chunks: the "
        "backward passes its first call ran and how many products each carried; as it times them, later calls may split "
        "them the other way); all at once: a decoder-only model with `max_batch=None`, in the same run. "
        f"Median of {speed['repeats']} turns after a warm-up; the variants take turns, each running twice per turn with the "
        "second call timed. Targets (the issue's): encoder-decoder >= 6x the loop; decoder-only at most 1.1x forward + K "
        "backward and faster than the loop. Single runs on the 2-core development machine (a virtual machine): the same "
        "call's time varies by up to ~20% between turns and runs, so a ratio near its target can land on either side of it.",
        "",
        "| device | model | kind | words | tokens | ours (s) | chunks | loop (s) | speed-up | all at once (s) | forward + K backward (s) "
        "| ours / (forward + K backward) | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for device, rows in speed["devices"].items():
        for row in rows:
            kind = row.get("kind", "")
            sequential = row.get("forward_plus_k_backward_s")
            ratio = row.get("ours_over_forward_plus_k_backward")
            if kind == "encoder-decoder":
                verdict = f"{'met' if row['speedup'] >= SPEED_TARGETS[kind] else 'MISSED'} (>= 6x)"
            elif kind == "decoder-only" and ratio is not None:
                met = ratio <= SPEED_TARGETS[kind] and row["speedup"] > 1
                verdict = f"{'met' if met else 'MISSED'} (<= 1.1, > 1x loop)"
            else:
                verdict = ""
            chunks, together = row.get("ours_chunks"), row.get("all_at_once_s")
            lines.append(
                f"| {device} | {row['model']} | {kind} | {row['words']} | {row['tokens']} | {row['ours_s']:.3f} | "
                f"{'' if chunks is None else chunk_sizes(chunks)} | {row['loop_s']:.3f} | {row['speedup']:.1f}x | "
                f"{'' if together is None else f'{together:.3f}'} | {'' if sequential is None else f'{sequential:.3f}'} | "
                f"{'' if ratio is None else f'{ratio:.2f}'} | {verdict} |")
    return lines + [""]


if __name__ == "__main__":
    main()
