"""``multiexplain demo``: explain all four tasks with the shipped models and write a report.

With no input the demo draws fresh synthetic data (seeded streams that the training scripts never
used), explains it with Grad-CAM++ and Grad-CAM side by side, computes the headline metrics on a
small held-out batch per task and writes figures plus ``index.html`` into the output folder:

* classification -- multi-instance shape scenes, one map per present class (``SceneCNN``);
  Average Drop / Increase in Confidence / Win % (sigmoid confidences), Loc(delta) at 0, 0.25,
  0.5, pointing game, energy pointing game and multi-instance coverage on the class masks.
* captioning -- generated captions of captioned scenes with one map per word (Show-Attend-Tell);
  per-word pointing game and energy inside the words' object masks.
* video -- action clips explained by the small C3D: space-time maps as GIF, MP4 and frame strip;
  Average Drop / Increase / Win % (softmax) and space-time pointing / energy on the actor's masks.
* distillation -- teacher vs student maps on the distillation set; test error, map agreement
  (Pearson correlation of student and teacher maps) and energy on the target shape.

A task whose shipped checkpoint (or adapter) is missing gets a section saying so; the others run.
"""

from __future__ import annotations

import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import data, models
from .adapters.captioning import explain_caption
from .adapters.classification import explain_images
from .adapters.video import explain_clip
from .evaluation import (
    METHOD_NAMES,
    METHODS_COMPARED,
    add_metrics_table,
    evaluate_captioning,
    evaluate_classification,
    evaluate_distillation,
    evaluate_video,
)
from .explain import ExplainRequest, explain_request
from .io import write_gif, write_mp4
from .report import Figure, Report, Section, WordMaps, write_report
from .viz import DEFAULT_ALPHA, DEFAULT_COLORMAP, save_overlay_grid, write_strip

__all__ = ["DATA_SEED_OFFSET", "DemoResult", "DemoSettings", "TASKS", "run_demo"]

TASKS = ("classification", "captioning", "video", "distillation")
TITLES = {
    "classification": "Classification: multi-instance scenes",
    "captioning": "Captioning: a map per word",
    "video": "Video: space-time maps of a 3D CNN",
    "distillation": "Distillation: teacher vs student",
}
#: The demo draws its data from stream ``DATA_SEED_OFFSET + seed``, far from the seeds (0, 1, ...)
#: the training scripts use, so every explained sample is held out.
DATA_SEED_OFFSET = 9_000


@dataclass
class DemoSettings:
    """What the demo runs. ``eval_size`` and ``show`` are per task (held-out samples scored by
    the metrics; samples drawn as figures)."""

    out: Path
    device: torch.device = torch.device("cpu")
    seed: int = 0
    tasks: Sequence[str] = TASKS
    colormap: str = DEFAULT_COLORMAP
    alpha: float = DEFAULT_ALPHA
    eval_size: dict[str, int] = field(default_factory=lambda: {
        "classification": 128, "captioning": 24, "video": 32, "distillation": 128})
    show: dict[str, int] = field(default_factory=lambda: {
        "classification": 4, "captioning": 3, "video": 2, "distillation": 4})
    progress: bool = True

    @property
    def data_seed(self) -> int:
        return DATA_SEED_OFFSET + self.seed


@dataclass
class DemoResult:
    """Where the report is, what each task measured, and how long each took (seconds)."""

    index: Path
    status: dict[str, str]
    metrics: dict[str, dict[str, Any]]
    seconds: dict[str, float]


class Unavailable(Exception):
    """A task cannot run here (missing checkpoint or adapter): its section says so."""


# -- small shared helpers ----------------------------------------------------------------------------
def _progress(items: Sequence[Any], settings: DemoSettings, desc: str):
    if not settings.progress or len(items) <= 1:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, leave=False, file=sys.stderr)


# -- classification ----------------------------------------------------------------------------------
def _shipped(loader: Callable[..., Any], device: Any) -> Any:
    """What a shipped-model loader returns; a missing checkpoint makes the section "unavailable"."""
    try:
        return loader(device=device)
    except FileNotFoundError as error:
        raise Unavailable(str(error)) from None


def _classification(settings: DemoSettings, section: Section) -> dict[str, Any]:
    model = _shipped(models.load_scene_classifier, settings.device)
    labels = list(getattr(model, "labels", data.SCENE_CLASSES))
    out = settings.out / "classification"
    out.mkdir(parents=True, exist_ok=True)
    section.add_text(
        "Each scene holds one to four coloured shapes; a class can appear several times. The shipped "
        "multi-label CNN (SceneCNN, sigmoid outputs) is explained for every class it detects, so one "
        "forward pass gives one map per detected class. Grad-CAM++ weights each channel by its positive "
        "gradients with per-position alphas, which is why it tends to light up every instance of a class "
        "where Grad-CAM favours the strongest one."
    )
    scenes = data.make_scenes(settings.show["classification"], settings.data_seed)
    images = scenes.images.to(settings.device)
    explained = explain_images(model, images, methods=METHODS_COMPARED, multi_label=True)
    figures = []
    for i in range(len(scenes)):
        targets = explained["gradcam++"].targets[i].tolist()
        heatmaps, titles = [], []
        for column, cls in enumerate(targets):
            if cls < 0:  # padding of a scene with fewer detected classes
                continue
            count = int(scenes.instance_counts()[i, cls])
            for method, explanation in explained.items():
                heatmaps.append(explanation.maps[i, column])
                titles.append(f"{METHOD_NAMES[method]}: {labels[cls]} " + (f"(x{count})" if count else "(absent)"))
        truth = ", ".join(f"{labels[c]} x{n}" for c, n in enumerate(scenes.instance_counts()[i].tolist()) if n)
        path = out / f"scene_{i}.png"
        save_overlay_grid(path, scenes.images[i], heatmaps, titles, image_title=f"scene {i}", ncols=min(5, 1 + len(heatmaps)),
                          alpha=settings.alpha, colormap=settings.colormap)
        figures.append(Figure(path.relative_to(settings.out), f"Scene {i} (contains {truth}): Grad-CAM++ vs Grad-CAM "
                              "for every detected class"))
    section.add_figures(figures, "Grad-CAM++ and Grad-CAM per detected class")

    n = settings.eval_size["classification"]
    results = evaluate_classification(model, n, settings.data_seed + 1, settings.device)
    add_metrics_table(section, results, f"{n} held-out scenes (seed {settings.data_seed + 1}), each explained for its "
                   "top-scoring present class. Confidences are sigmoid probabilities; the explanation input is the "
                   "map times the image (eq. 25). Masks are the exact pixels of every instance of the class.")
    section.add_settings({"model": "builtin:scene-classifier (SceneCNN)", "layer": "features (16x16)",
                          "figures": f"make_scenes({len(scenes)}, seed={settings.data_seed})",
                          "held-out batch": f"make_scenes({n}, seed={settings.data_seed + 1})",
                          "colormap": settings.colormap, "alpha": settings.alpha})
    return results


# -- distillation ----------------------------------------------------------------------------------
def _distillation(settings: DemoSettings, section: Section) -> dict[str, Any]:
    teacher, student = _shipped(models.load_distillation_pair, settings.device)
    pair = {"teacher": teacher, "student": student}
    names = {"teacher": _arch_name(teacher), "student": _arch_name(student)}
    section.add_text(
        f"The teacher ({names['teacher']}) and the student ({names['student']}) classify the kind of the "
        "largest shape in a 32x32 image with smaller distractor shapes. The explanation loss of the paper "
        "(eq. 27-28) pulls the student's Grad-CAM++ map towards the teacher's; here both maps are shown for "
        "the true class, with Grad-CAM for comparison, and the agreement of the two maps is measured."
    )
    classes = list(data.DISTILL_CLASSES)
    shown = data.make_distill_dataset(settings.show["distillation"], settings.data_seed)
    images = shown.images.to(settings.device)
    labels = shown.labels.to(settings.device)
    explained = {role: explain_request(m, ExplainRequest(images, labels), METHODS_COMPARED) for role, m in pair.items()}
    maps = {(role, method): explained[role][method].maps for role in pair for method in METHOD_NAMES}
    layer = {role: explained[role]["gradcam++"].layer for role in pair}
    with torch.no_grad():
        predicted = {role: m(images).argmax(1) for role, m in pair.items()}
    out = settings.out / "distillation"
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for i in range(len(shown)):
        heatmaps, titles = [], []
        for role in pair:
            for method in METHOD_NAMES:
                heatmaps.append(maps[(role, method)][i])
                titles.append(f"{role} {METHOD_NAMES[method]} (says {classes[int(predicted[role][i])]})")
        path = out / f"pair_{i}.png"
        save_overlay_grid(path, shown.images[i], heatmaps, titles, image_title=f"true: {classes[int(labels[i])]}",
                          ncols=5, alpha=settings.alpha, colormap=settings.colormap, wrap=20)
        figures.append(Figure(path.relative_to(settings.out), f"Image {i}, true class {classes[int(labels[i])]}"))
    section.add_figures(figures, "Teacher vs student, Grad-CAM++ and Grad-CAM (true class)")

    n = settings.eval_size["distillation"]
    results, errors = evaluate_distillation(teacher, student, n, settings.data_seed + 1, settings.device)
    add_metrics_table(section, results, f"{n} held-out images (seed {settings.data_seed + 1}), explained for the true class.")
    section.add_table(["model", "test error %"], [[f"teacher ({names['teacher']})", errors["teacher"]],
                                                  [f"student ({names['student']})", errors["student"]]],
                      f"Top-1 error on the same {n} held-out images.")
    section.add_settings({"model": "builtin:distill-pair", "teacher layer": layer["teacher"],
                          "student layer": layer["student"], "colormap": settings.colormap, "alpha": settings.alpha})
    return {**results, "test error %": errors}


def _arch_name(model: torch.nn.Module) -> str:
    depth, width = getattr(model, "depth", None), getattr(model, "widen_factor", None)
    return f"WRN-{depth}-{width}" if depth is not None else type(model).__name__


# -- captioning ----------------------------------------------------------------------------------------
def _captioning(settings: DemoSettings, section: Section) -> dict[str, Any]:
    model, vocabulary = _shipped(models.load_show_and_tell, settings.device)
    section.add_text(
        "A Show-Attend-Tell captioner (CNN encoder + LSTM decoder) writes a caption for each scene; every "
        "word is then scored by its log-probability given the image and the words before it, and all word "
        "maps come from one teacher-forced forward pass. The last panel explains the whole caption (its "
        "log-probability), which is what the paper explains. Count words should cover every object of "
        "their group, colour and shape words the objects they name."
    )
    out = settings.out / "captioning"
    out.mkdir(parents=True, exist_ok=True)
    scenes = data.make_captioned_scenes(settings.show["captioning"], settings.data_seed)
    figures, views = [], []
    for i in _progress(range(len(scenes)), settings, "captions"):
        both = explain_caption(model, scenes.images[i], tokenizer=vocabulary, methods=METHODS_COMPARED)
        for method, explanation in both.items():
            path = out / f"scene_{i}_{method.replace('+', 'p')}.png"
            explanation.save_figure(str(path), alpha=settings.alpha, colormap=settings.colormap)
            figures.append(Figure(path.relative_to(settings.out),
                                  f"Scene {i}, {METHOD_NAMES[method]}: generated \"{explanation.caption}\" "
                                  f"(ground truth \"{scenes.captions[i]}\")"))
            overlays = explanation.save_word_overlays(str(out / "words"), f"scene_{i}_{method.replace('+', 'p')}",
                                                      alpha=settings.alpha, colormap=settings.colormap)
            views.append(WordMaps([(label, Path(p).relative_to(settings.out)) for label, p in overlays],
                                  f"Scene {i}, {METHOD_NAMES[method]}: select a word", width=256))
    section.add_word_maps(views, "Select a word of a caption: its map over the scene")
    section.add_figures(figures, "Per-word maps of generated captions (Grad-CAM++ and Grad-CAM)")

    n = settings.eval_size["captioning"]
    results, words, exact = evaluate_captioning(model, vocabulary, n, settings.data_seed + 1, settings.device)
    add_metrics_table(section, results, f"{words} content words (count, colour, shape) of {n} held-out scenes "
                   f"(seed {settings.data_seed + 1}); ground truth = the pixels of the objects each word names. "
                   f"Generated captions match the ground truth exactly for {exact:.0f}% of these scenes.")
    section.add_settings({"model": "builtin:show-and-tell (ShowAttendTell)", "layer": explanation.layer,
                          "score": "log p(word | image, previous words)", "decoding": "greedy",
                          "colormap": settings.colormap, "alpha": settings.alpha})
    return {**results, "exact caption match %": exact}


# -- video ----------------------------------------------------------------------------------------------
def _video(settings: DemoSettings, section: Section) -> dict[str, Any]:
    model, class_names = _shipped(models.load_action_c3d, settings.device)
    section.add_text(
        "A small C3D (3x3x3 convolutions throughout) recognises the action of one shape among distractors, "
        "one of which drifts through the whole clip. The map of its last convolutional layer has a time "
        "axis: Grad-CAM++ sums the activations over T', H' and W' in its alpha denominator, and the map is "
        "upsampled trilinearly to the 16 frames. Each animation shows the frame and its overlay side by side "
        "(played at 8 frames per second; the colour scale is the one of the bars above, 0 to 1); strips mark the "
        "frames where the action happens with *."
    )
    out = settings.out / "video"
    out.mkdir(parents=True, exist_ok=True)
    clips = data.make_action_clips(settings.show["video"], settings.data_seed)
    fps = 8.0
    animations, strips = [], []
    for i in range(len(clips)):
        clip = clips.clips[i].to(settings.device)
        truth = class_names[int(clips.labels[i])]
        for method, explanation in explain_clip(model, clip, methods=METHODS_COMPARED).items():
            said = class_names[int(explanation.targets[0])]
            stem = out / f"clip_{i}_{method.replace('+', 'p')}"
            maps = explanation.maps[0]
            write_gif(f"{stem}.gif", clip, maps, fps, alpha=settings.alpha, colormap=settings.colormap, scale=3)
            write_mp4(f"{stem}.mp4", clip, maps, fps, alpha=settings.alpha, colormap=settings.colormap, scale=3)
            write_strip(f"{stem}_strip.png", clip, maps, alpha=settings.alpha, colormap=settings.colormap,
                                active=clips.active[i], title=f"{METHOD_NAMES[method]}: {said} (true: {truth})")
            caption = f"Clip {i}, {METHOD_NAMES[method]}, predicted {said}, true {truth}"
            animations.append(Figure(Path(f"{stem}.gif").relative_to(settings.out), caption,
                                     links={"MP4": Path(f"{stem}.mp4").relative_to(settings.out)}))
            strips.append(Figure(Path(f"{stem}_strip.png").relative_to(settings.out), caption + " (8 of 16 frames)"))
    section.add_figures(animations, "Space-time maps: animations (frame | overlay), Grad-CAM++ and Grad-CAM")
    section.add_figures(strips, "Frame strips (frames on top, overlays below; * = action frames)")

    n = settings.eval_size["video"]
    results = evaluate_video(model, n, settings.data_seed + 1, settings.device)
    add_metrics_table(section, results, f"{n} held-out clips (seed {settings.data_seed + 1}), explained for the true "
                   "action. Confidences are softmax probabilities; the explanation input multiplies each voxel by "
                   "its map value. Localisation uses the actor's pixels in every frame (T x H x W).")
    section.add_settings({"model": "builtin:action-c3d (C3D)", "layer": explanation.layer, "clip": "16 x 64 x 64",
                          "animation": f"{fps:g} fps, scaled x3", "colormap": settings.colormap, "alpha": settings.alpha})
    return results


BUILDERS: dict[str, Callable[[DemoSettings, Section], dict[str, Any]]] = {
    "classification": _classification,
    "captioning": _captioning,
    "video": _video,
    "distillation": _distillation,
}


def run_demo(settings: DemoSettings) -> DemoResult:
    """Run every task in ``settings.tasks`` and write ``settings.out/index.html``.

    A task that is unavailable (missing checkpoint or adapter) or fails gets a note in its section
    instead of stopping the others; ``DemoResult.status`` says which (``ok`` / ``unavailable`` /
    ``failed``).
    """
    unknown = [t for t in settings.tasks if t not in BUILDERS]
    if unknown:
        raise ValueError(f"unknown demo task(s) {unknown}; choose from {list(BUILDERS)}")
    settings.out = Path(settings.out)
    settings.out.mkdir(parents=True, exist_ok=True)
    report = Report(
        "multiexplain demo: Grad-CAM++ vs Grad-CAM on four tasks",
        intro="Shipped models, freshly generated synthetic data (exact ground-truth masks), one Grad-CAM++ core. "
              f"Overlays: the {settings.colormap} colormap blended at alpha {settings.alpha} over the input "
              "(pixel = (1 - alpha) * image + alpha * colour(map)); maps are min-max normalised per map.",
    )
    status, results, seconds = {}, {}, {}
    started = time.perf_counter()
    for task in settings.tasks:
        section = report.section(task, TITLES[task], nav=task.capitalize())
        begin = time.perf_counter()
        _say(settings, f"demo: {task} ...")
        try:
            results[task] = BUILDERS[task](settings, section)
            status[task] = "ok"
        except Unavailable as reason:
            section.add_note(f"This task is not available here: {reason}")
            status[task] = "unavailable"
        except Exception as error:  # noqa: BLE001 - one broken task must not lose the others' report
            traceback.print_exc(file=sys.stderr)
            section.add_note(f"This task failed: {type(error).__name__}: {error}")
            status[task] = "failed"
        seconds[task] = time.perf_counter() - begin
        _say(settings, f"demo: {task} {status[task]} in {seconds[task]:.1f} s")
    seconds["total"] = time.perf_counter() - started
    report.settings = {
        "device": str(settings.device), "seed": settings.seed, "data stream seed": settings.data_seed,
        "torch threads": torch.get_num_threads(), "colormap": settings.colormap, "alpha": settings.alpha,
        **{f"time {task} (s)": round(value, 1) for task, value in seconds.items()},
    }
    report.sections.insert(0, _summary(status, results, seconds))
    index = write_report(report, settings.out)
    _write_json(settings.out / "metrics.json", {"status": status, "metrics": results, "seconds": seconds})
    return DemoResult(index, status, results, seconds)


#: The metrics shown in the report's at-a-glance table, per task (full tables are in each section).
HEADLINES: dict[str, tuple[str, ...]] = {
    "classification": ("Average Drop % (lower is better)", "Win % (higher is better)", "Loc(0.25) (higher is better)",
                       "Instances covered % (higher is better)"),
    "captioning": ("Pointing game % (higher is better)", "Energy inside the region % (higher is better)"),
    "video": ("Average Drop % (lower is better)", "Win % (higher is better)", "Energy inside the region % (higher is better)",
              "Energy in the action frames % (higher is better)"),
    "distillation": ("Student-teacher map correlation (higher is better)",),
}


def _summary(status: dict[str, str], results: dict[str, Any], seconds: dict[str, float]) -> Section:
    """The first section: one row per headline metric of every task that ran, and the timings."""
    section = Section("summary", "At a glance", nav="Summary")
    rows, best = [], []
    for task, state in status.items():
        if state != "ok":
            rows.append([task, f"({state})", "", "", ""])
            best.append(None)
            continue
        for name in HEADLINES[task]:
            pp, gc = results[task]["gradcam++"].get(name), results[task]["gradcam"].get(name)
            if pp is None or gc is None:
                continue
            rows.append([task, name, pp, gc, "Grad-CAM++" if (pp < gc) == ("lower is better" in name) and pp != gc
                         else ("tie" if pp == gc else "Grad-CAM")])
            best.append(None if pp == gc else (2 if rows[-1][4] == "Grad-CAM++" else 3))
    section.add_table(["task", "metric", "Grad-CAM++", "Grad-CAM", "better"], rows,
                      "Held-out batches of freshly generated data; every task's section has the full table.",
                      highlight=best)
    timing = ", ".join(f"{task} {value:.1f} s" for task, value in seconds.items())
    section.add_text(f"Wall time: {timing}.")
    return section


def _say(settings: DemoSettings, message: str) -> None:
    if settings.progress:
        print(message, file=sys.stderr, flush=True)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    import json

    path.write_text(json.dumps(payload, indent=2, default=float))
