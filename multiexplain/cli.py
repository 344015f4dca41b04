"""The ``multiexplain`` command line.

Subcommands (each has ``--help``)::

    multiexplain demo     [--out DIR]                                  all four tasks, shipped models, index.html
    multiexplain classify IMAGE... --model SPEC [--layer NAME] [--target CLASS | --topk K]
    multiexplain caption  IMAGE... [--model SPEC] [--caption TEXT | --prompt TEXT] [--layer L] [--num-beams N]
                          [--max-new-tokens N] [--min-new-tokens N]     per-word maps
    multiexplain video    FILE.mp4 [--model SPEC] [--frames T] [--class C]   GIF + MP4 + strip
    multiexplain evaluate --task TASK [--model SPEC] [--data DIR|synthetic]  metrics table + JSON
    multiexplain distill  --config FILE.yaml|toml                     explanation distillation

A model SPEC is ``torchvision:NAME[@WEIGHTS|@none]``, ``hf:NAME-or-DIR``, ``pytorchvideo:NAME[@none]``,
``builtin:NAME`` or a ``.pt`` state dict with ``--arch SPEC`` (see :mod:`multiexplain.zoo`).
Every command writes its figures and an ``index.html`` report into ``--out`` and prints where.
Unreadable inputs are reported by name; the others are still processed (exit status 1 only
when nothing could be processed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

from . import __version__

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
TASKS = ("classification", "captioning", "video", "distillation")
DEFAULT_MODELS = {
    "classification": "builtin:scene-classifier",
    "captioning": "builtin:show-and-tell",
    "video": "builtin:action-c3d",
    "distillation": "builtin:distill-pair",
}


class CommandError(Exception):
    """A problem the user can fix (bad SPEC, offline, bad file): printed without a traceback."""


#: What the command line reports as one ``multiexplain CMD: error: ...`` line and exit status 2
#: (tracebacks only with ``--debug``): problems with the user's inputs, models and settings.
USER_ERRORS: tuple[type[BaseException], ...] = (CommandError, ValueError, TypeError, KeyError, OSError)
#: Longer messages are cut (a state dict that does not fit prints thousands of key names).
MESSAGE_LIMIT = 600


def cap_message(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """One line of at most ``limit`` characters, saying how much was left out."""
    line = " ".join(str(message).split())
    if len(line) <= limit:
        return line
    return f"{line[:limit].rstrip()} ... ({len(line) - limit} more characters)"


def error_line(command: str, message: Any, item: str | None = None) -> str:
    """``multiexplain CMD: error: [ITEM: ]message``, capped."""
    text = str(message) if not isinstance(message, KeyError) else f"missing key {message}"
    return f"multiexplain {command}: error: " + (f"{item}: " if item else "") + cap_message(text)


def each_input(command: str, items: Sequence[Any], work: Any, *, debug: bool = False, name: Any = str) -> tuple[list, list]:
    """Run ``work(item)`` for every item; a user error on one is reported as one line and the others
    still run. Returns ``(results, [(item, message)])``."""
    results, failed = [], []
    for item in items:
        try:
            results.append(work(item))
        except USER_ERRORS as error:
            if debug:
                raise
            _log(error_line(command, error, name(item)))
            failed.append((item, cap_message(str(error))))
    return results, failed


# -- shared helpers ------------------------------------------------------------------------------
def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _progress(iterable, total: int, desc: str, unit: str = "batch"):
    """A tqdm bar when there is more than one step (to stderr), else the plain iterable."""
    if total <= 1:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, leave=False)


def read_images(paths: Sequence[str]) -> tuple[list[tuple[str, Any]], list[tuple[str, str]]]:
    """:func:`multiexplain.io.read_images`, saying on stderr which files are skipped and why."""
    from .io import read_images as read

    ok, failed = read(paths)
    for path, reason in failed:
        _log(f"multiexplain: skipping {path}: {reason}")
    return ok, failed


def _load(spec: str, arch: str | None, task: str, device: str):
    from . import zoo

    try:
        return zoo.load_model(spec, arch=arch, task=task, device=device)
    except (zoo.SpecError, zoo.OfflineError, FileNotFoundError) as error:
        raise CommandError(str(error)) from None


def _stem(path: str, index: int) -> str:
    name = "".join(c if c.isalnum() or c in "-_" else "_" for c in Path(path).stem)[:40]
    return f"{index:03d}_{name or 'input'}"


def _finish(report, out: Path) -> Path:
    from .report import write_report

    index = write_report(report, out)
    print(f"report: {index}")
    return index


# -- classify ------------------------------------------------------------------------------------
def _parse_class(value: str, labels: list[str] | None, num_classes: int) -> int:
    if value.lstrip("-").isdigit():
        index = int(value)
    elif labels is not None:
        lowered = [label.lower() for label in labels]
        if value.lower() not in lowered:
            import difflib

            close = difflib.get_close_matches(value.lower(), lowered, n=3)
            raise CommandError(f"unknown class {value!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        index = lowered.index(value.lower())
    else:
        raise CommandError(f"class {value!r} is not an index and the model has no class names")
    if not 0 <= index < num_classes:
        raise CommandError(f"class {index} is out of range: the model has {num_classes} classes")
    return index


def cmd_classify(args: argparse.Namespace) -> int:
    import torch

    from .adapters.classification import explain_images
    from .explain import model_logits
    from .report import Figure, Report
    from .viz import save_overlay_grid, to_rgb_array

    if args.target is not None and args.topk != 1:
        raise CommandError("give either --target or --topk, not both")
    loaded = _load(args.model, args.arch, "classification", args.device)
    if loaded.preprocess is None:
        from .zoo import plain_preprocess

        size = args.size or 64
        loaded.preprocess = lambda image: plain_preprocess(image, size, loaded.mean, loaded.std)
    images, failed = read_images(args.images)
    if not images:
        _log("multiexplain: no readable image")
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layer = args.layer or loaded.layer
    method_titles = {"gradcam++": "Grad-CAM++", "gradcam": "Grad-CAM"}
    report = Report("multiexplain classify", intro=f"Model {args.model}: Grad-CAM++ and Grad-CAM for each image.")
    section = report.section("classification", "Classification")
    figures, results = [], []
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    device = loaded.device
    for batch in _progress(batches, len(batches), "classify"):
        inputs = torch.stack([loaded.preprocess(image) for _, image in batch]).to(device)
        with torch.no_grad():
            logits = model_logits(loaded.model(inputs))
        num_classes = logits.shape[1]
        if args.target is not None:
            targets = [[_parse_class(args.target, loaded.labels, num_classes)] for _ in batch]
        else:
            k = min(args.topk, num_classes)
            targets = logits.topk(k, dim=1).indices.tolist()
        # Multi-label models (the shipped scene classifier) score each class with its own sigmoid.
        probabilities = logits.sigmoid() if getattr(loaded.model, "multi_label", False) else logits.softmax(dim=1)
        # Grad-CAM comes from the same forward pass and gradients as Grad-CAM++.
        explained = explain_images(loaded.model, inputs, targets=targets, methods=tuple(method_titles),
                                   layer=layer, reshape=loaded.reshape)
        layer_name = explained["gradcam++"].layer
        maps = {method_titles[method]: explanation.maps for method, explanation in explained.items()}
        for row, (path, _) in enumerate(batch):
            index = len(results)
            heatmaps, titles = [], []
            entry = {"image": path, "targets": []}
            for column, cls in enumerate(targets[row]):
                label = loaded.labels[cls] if loaded.labels and cls < len(loaded.labels) else str(cls)
                p = float(probabilities[row, cls])
                entry["targets"].append({"class": cls, "label": label, "probability": p})
                for name in method_titles.values():
                    heatmaps.append(maps[name][row, column])
                    titles.append(f"{name}: {label} (p={p:.2f})")
            picture = to_rgb_array(inputs[row], loaded.mean, loaded.std)
            figure = out / f"{_stem(path, index)}.png"
            save_overlay_grid(figure, picture, heatmaps, titles, ncols=min(len(heatmaps) + 1, 5),
                              alpha=args.alpha, colormap=args.colormap, image_title=Path(path).name)
            entry["figure"] = figure.name
            results.append(entry)
            figures.append(Figure(figure.name, f"{Path(path).name}: " + ", ".join(
                f"{t['label']} ({t['probability']:.2f})" for t in entry["targets"])))
    section.add_figures(figures, "Grad-CAM++ vs Grad-CAM")
    if failed:
        section.add_note("Skipped unreadable files: " + "; ".join(f"{p} ({r})" for p, r in failed))
    settings = {"model": args.model, "layer": layer_name, "device": str(device),
                "colormap": args.colormap, "alpha": args.alpha}
    section.add_settings(settings)
    (out / "predictions.json").write_text(json.dumps({"settings": settings, "results": results,
                                                      "skipped": [p for p, _ in failed]}, indent=2))
    for entry in results:
        print(f"{entry['image']}: " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in entry["targets"]))
    _finish(report, out)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    import torch

    from .demo import DemoSettings, run_demo

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        raise CommandError(f"unknown task(s) {unknown} in --tasks; choose from {', '.join(TASKS)}")
    settings = DemoSettings(Path(args.out), device=torch.device(args.device), seed=args.seed, tasks=tasks,
                            colormap=args.colormap, alpha=args.alpha)
    if args.eval_size is not None:
        settings.eval_size = {task: args.eval_size for task in settings.eval_size}
    started = time.perf_counter()
    result = run_demo(settings)
    for task, state in result.status.items():
        print(f"{task:>15}: {state} ({result.seconds[task]:.1f} s)")
    print(f"demo finished in {time.perf_counter() - started:.1f} s")
    print(f"report: {result.index}")
    return EXIT_FAILED if "failed" in result.status.values() else EXIT_OK


def _generation_arguments(args: argparse.Namespace) -> dict[str, int]:
    """``num_beams`` / ``max_new_tokens`` / ``min_new_tokens`` the user set (only for generated captions)."""
    given = {name: getattr(args, name) for name in ("num_beams", "max_new_tokens", "min_new_tokens") if getattr(args, name) is not None}
    for name, value in given.items():
        if value < (0 if name == "min_new_tokens" else 1):
            raise CommandError(f"--{name.replace('_', '-')} must be at least {0 if name == 'min_new_tokens' else 1}, got {value}")
    if args.caption is not None:
        if given:
            raise CommandError(f"--{next(iter(given)).replace('_', '-')} applies to generated captions; drop it or drop --caption")
        if not args.caption.strip():
            raise CommandError("--caption is empty; give the caption to explain, or leave --caption out to generate one")
    if args.max_batch is not None and args.max_batch < 1:
        raise CommandError(f"--max-batch must be at least 1, got {args.max_batch}")
    if given.get("min_new_tokens", 0) > given.get("max_new_tokens", 10**9):
        raise CommandError("--min-new-tokens is larger than --max-new-tokens")
    return given


def cmd_caption(args: argparse.Namespace) -> int:
    from .adapters.captioning import explain_caption
    from .report import Figure, Report, WordMaps

    generation = _generation_arguments(args)
    loaded = _load(args.model, args.arch, "captioning", args.device)
    images, unreadable = read_images(args.images)
    if not images:
        _log("multiexplain: no readable image")
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    processor, tokenizer = loaded.extra.get("processor"), loaded.extra.get("tokenizer")
    layer = args.layer or loaded.layer
    method_titles = {"gradcam++": "Grad-CAM++", "gradcam": "Grad-CAM"}
    figures: list = []
    views: list = []

    def explain_one(item: tuple[int, tuple[str, Any]]) -> dict[str, Any]:
        index, (path, image) = item
        both = explain_caption(loaded.model, image, args.caption, prompt=args.prompt, processor=processor, tokenizer=tokenizer,
                               methods=tuple(method_titles), target_layer=layer, max_batch=args.max_batch, **generation)
        explanation = both["gradcam++"]
        entry = {"image": path, "prompt": args.prompt, "caption": explanation.caption, "generated": explanation.generated,
                 "layer": explanation.layer, "words": explanation.words, "tokens": explanation.tokens,
                 "word_log_probabilities": [float(v) for v in explanation.scores],
                 "caption_log_probability": float(explanation.caption_score), "figures": {}, "word_maps": {}}
        stem = _stem(path, index)
        said = f"{args.prompt!r} -> " if args.prompt else ""
        for method, name in method_titles.items():
            figure = out / f"{stem}_{method.replace('+', 'p')}.png"
            both[method].save_figure(str(figure), alpha=args.alpha, colormap=args.colormap)
            entry["figures"][method] = figure.name
            figures.append(Figure(figure.name, f"{Path(path).name}, {name}: {said}\"{explanation.caption}\""))
            folder = out / "words"
            overlays = both[method].save_word_overlays(str(folder), f"{stem}_{method.replace('+', 'p')}",
                                                       alpha=args.alpha, colormap=args.colormap)
            entry["word_maps"][method] = [str(Path(p).relative_to(out)) for _, p in overlays]
            views.append(WordMaps([(label, Path(p).relative_to(out)) for label, p in overlays],
                                  f"{Path(path).name}, {name}: select a word to see its map", width=320))
        print(f"{path}: {explanation.caption}")
        return entry

    items = list(enumerate(images))
    results, failed = each_input("caption", items, explain_one, debug=args.debug, name=lambda item: item[1][0])
    if not results:
        return EXIT_USAGE
    report = Report("multiexplain caption", intro=f"Model {args.model}: one Grad-CAM++ (and Grad-CAM) map per word.")
    section = report.section("captioning", "Captioning")
    section.add_word_maps(views, "Select a word: its map over the image")
    section.add_figures(figures, "Per-word maps")
    skipped = [(p, r) for p, r in unreadable] + [(item[1][0], reason) for item, reason in failed]
    if skipped:
        section.add_note("Skipped: " + "; ".join(f"{p} ({r})" for p, r in skipped))
    settings = {"model": args.model, "prompt": args.prompt, "caption": args.caption or "generated", "layer": results[0]["layer"],
                "device": args.device, "colormap": args.colormap, "alpha": args.alpha, **generation}
    section.add_settings(settings)
    (out / "captions.json").write_text(json.dumps({"settings": settings, "results": results,
                                                   "skipped": [p for p, _ in skipped]}, indent=2))
    _finish(report, out)
    return EXIT_OK


def _video_geometry(loaded, frames: int | None) -> tuple[int, int, Any]:
    """Frames, frame side and the normalisation the model needs: the shipped C3D takes 16 x 64 x 64
    clips in [0, 1] (it normalises inside); pytorchvideo models take Kinetics-normalised clips."""
    if loaded.spec.source == "pytorchvideo" or "frames" in loaded.extra:
        clip_frames, side = int(loaded.extra.get("frames", 16)), int(loaded.extra.get("size", 224))
        return frames or clip_frames, side, (loaded.mean, loaded.std)
    clip_size = list(getattr(loaded.model, "config", {}).get("clip_size", (16, 112, 112)))
    return frames or int(clip_size[0]), int(clip_size[1]), None


def _read_videos(paths: Sequence[str], frames: int, side: int) -> tuple[list, list[tuple[str, str]]]:
    from .io import read_clip

    ok, failed = [], []
    for path in paths:
        try:
            clip, fps = read_clip(path, num_frames=frames, size=side)
            ok.append((path, clip, fps))
        except (FileNotFoundError, ValueError, OSError) as error:
            failed.append((path, str(error)))
            _log(f"multiexplain: skipping {path}: {error}")
    return ok, failed


def cmd_video(args: argparse.Namespace) -> int:
    import torch

    from .adapters import video as adapter
    from .io import write_gif, write_mp4
    from .report import Figure, Report
    from .viz import write_strip

    loaded = _load(args.model, args.arch, "video", args.device)
    frames, side, normalisation = _video_geometry(loaded, args.frames)
    videos, failed = _read_videos(args.videos, frames, side)
    if not videos:
        _log("multiexplain: no readable video")
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report("multiexplain video", intro=f"Model {args.model}: space-time Grad-CAM++ and Grad-CAM maps.")
    section = report.section("video", "Video")
    animations, strips, results = [], [], []
    labels = loaded.labels
    for index, (path, clip, fps) in enumerate(_progress(videos, len(videos), "video", "clip")):
        model_input = clip if normalisation is None else adapter.normalize_clip(clip, *normalisation)
        model_input = model_input.to(loaded.device)
        target = None
        if args.target is not None:
            with torch.no_grad():
                num_classes = loaded.model(model_input.unsqueeze(0)).shape[-1]
            target = _parse_class(args.target, labels, num_classes)
        entry = {"video": path, "fps": fps, "frames": frames, "outputs": {}}
        both = adapter.explain_clip(loaded.model, model_input, target, layer=args.layer or "auto",
                                    methods=("gradcam++", "gradcam"))
        for method, name in (("gradcam++", "Grad-CAM++"), ("gradcam", "Grad-CAM")):
            explanation = both[method]
            cls = int(explanation.targets[0])
            label = labels[cls] if labels and cls < len(labels) else str(cls)
            stem = out / f"{_stem(path, index)}_{method.replace('+', 'p')}"
            maps = explanation.maps[0]
            scale = max(1, 256 // side)
            kwargs = {"alpha": args.alpha, "colormap": args.colormap}
            # The animations keep the clip's frame rate (as read from the file).
            write_gif(f"{stem}.gif", clip, maps, fps, scale=scale, **kwargs)
            write_mp4(f"{stem}.mp4", clip, maps, fps, scale=scale, **kwargs)
            write_strip(f"{stem}_strip.png", clip, maps, title=f"{name}: {label}", **kwargs)
            entry["outputs"][method] = {"class": cls, "label": label, "score": float(explanation.scores[0]),
                                        "layer": explanation.layer, "gif": f"{stem.name}.gif",
                                        "mp4": f"{stem.name}.mp4", "strip": f"{stem.name}_strip.png"}
            caption = f"{Path(path).name}, {name}: {label}"
            animations.append(Figure(f"{stem.name}.gif", caption, links={"MP4": f"{stem.name}.mp4"}))
            strips.append(Figure(f"{stem.name}_strip.png", caption))
        results.append(entry)
        print(f"{path}: {entry['outputs']['gradcam++']['label']}")
    section.add_figures(animations, "Animations (frame | overlay)")
    section.add_figures(strips, "Frame strips")
    if failed:
        section.add_note("Skipped unreadable files: " + "; ".join(f"{p} ({r})" for p, r in failed))
    settings = {"model": args.model, "frames": frames, "frame size": side, "device": args.device,
                "colormap": args.colormap, "alpha": args.alpha}
    section.add_settings(settings)
    (out / "video.json").write_text(json.dumps({"settings": settings, "results": results,
                                                "skipped": [p for p, _ in failed]}, indent=2))
    _finish(report, out)
    return EXIT_OK


def _format_table(results: dict[str, dict[str, float]]) -> str:
    """Metrics as a text table: one row per metric, Grad-CAM++ and Grad-CAM side by side."""
    names = list(results["gradcam++"])
    width = max(len(n) for n in names)
    lines = [f"{'metric':<{width}}  {'Grad-CAM++':>10}  {'Grad-CAM':>10}", "-" * (width + 24)]
    for name in names:
        lines.append(f"{name:<{width}}  {results['gradcam++'][name]:>10.2f}  {results['gradcam'][name]:>10.2f}")
    return "\n".join(lines)


def _folder_files(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    from .io import folder_files

    files = folder_files(folder, suffixes)
    if not files:
        raise CommandError(f"no {'/'.join(suffixes)} files under {folder}")
    return files


def _evaluate_image_folder(loaded, folder: Path, batch_size: int, device: str) -> tuple[dict, int]:
    """Faithfulness metrics (no masks in a plain folder) for each image's top-1 class."""
    import torch

    from .adapters.classification import explain_images
    from .evaluation import METHODS_COMPARED, faithfulness_metrics
    from .explain import model_logits
    from .io import IMAGE_SUFFIXES

    images, _ = read_images(_folder_files(folder, IMAGE_SUFFIXES))
    if not images:
        raise CommandError(f"no readable image under {folder}")
    if loaded.preprocess is None:
        raise CommandError(f"{loaded.spec} has no image preprocessing; evaluate it on --data synthetic")
    methods = METHODS_COMPARED
    score = "sigmoid" if getattr(loaded.model, "multi_label", False) else "softmax"
    inputs_all, maps_all, targets_all = [], {m: [] for m in methods}, []
    batches = [images[i : i + batch_size] for i in range(0, len(images), batch_size)]
    for batch in _progress(batches, len(batches), "evaluate"):
        inputs = torch.stack([loaded.preprocess(image) for _, image in batch]).to(device)
        with torch.no_grad():
            targets = model_logits(loaded.model(inputs)).argmax(dim=1)
        explained = explain_images(loaded.model, inputs, targets=targets, methods=methods, layer=loaded.layer,
                                   reshape=loaded.reshape)
        for method, explanation in explained.items():
            maps_all[method].append(explanation.maps)
        inputs_all.append(inputs)
        targets_all.append(targets)
    maps = {m: torch.cat(v) for m, v in maps_all.items()}
    # The explanation input E = L * I multiplies the *normalised* input, as the paper does.
    return faithfulness_metrics(loaded.model, torch.cat(inputs_all), maps, torch.cat(targets_all), score), len(images)


def _distillation_models(args: argparse.Namespace):
    """The teacher and student to evaluate: the shipped pair, or the shipped teacher and a student
    checkpoint written by ``multiexplain distill`` (``{"arch", "state_dict"}``)."""
    from .models import load_checkpoint, load_distillation_pair

    try:
        teacher, student = load_distillation_pair(device=args.device)
    except FileNotFoundError as error:
        raise CommandError(str(error)) from None
    if args.model and args.model != DEFAULT_MODELS["distillation"]:
        path = Path(args.model)
        if not path.is_file():
            raise CommandError(f"--model for distillation is builtin:distill-pair or a student .pt written by "
                               f"`multiexplain distill`; {args.model!r} is neither")
        try:
            student = load_checkpoint(path, device=args.device).model
        except ValueError as error:
            raise CommandError(f"{error} (a student written by `multiexplain distill`)") from None
    return teacher, student


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import evaluation
    from .report import Report

    task = args.task
    spec = args.model or DEFAULT_MODELS[task]
    synthetic = args.data == "synthetic"
    folder = None if synthetic else Path(args.data)
    if folder is not None and not folder.is_dir():
        raise CommandError(f"--data must be 'synthetic' or a folder; {args.data!r} is neither")
    if folder is not None and task in ("captioning", "distillation"):
        raise CommandError(f"{task} is evaluated on --data synthetic (its metrics need the generated masks)")
    n, extra = args.num_samples, {}
    if task == "distillation":
        teacher, student = _distillation_models(args)
        results, errors = evaluation.evaluate_distillation(teacher, student, n, args.seed, args.device)
        extra["test error %"] = errors
    else:
        loaded = _load(spec, args.arch, task, args.device)
        if folder is not None and task == "classification":
            results, n = _evaluate_image_folder(loaded, folder, 16, args.device)
        elif folder is not None:
            results, n = _evaluate_video_folder(loaded, folder, args)
        elif task == "classification":
            classes = getattr(getattr(loaded.model, "classifier", None), "out_features", None)
            if classes != 6 or not getattr(loaded.model, "multi_label", False):
                raise CommandError("synthetic classification data are the shipped shape scenes: evaluate "
                                   "builtin:scene-classifier (or a .pt with --arch builtin:scene-classifier), "
                                   "or give --data FOLDER for other models")
            results = evaluation.evaluate_classification(loaded.model, n, args.seed, args.device)
        elif task == "captioning":
            if "tokenizer" not in loaded.extra or not hasattr(loaded.model, "generate"):
                raise CommandError("synthetic captioning data need the shipped captioner (builtin:show-and-tell)")
            results, words, exact = evaluation.evaluate_captioning(loaded.model, loaded.extra["tokenizer"], n, args.seed, args.device)
            extra.update({"words scored": words, "exact caption match %": exact})
        else:
            results = evaluation.evaluate_video(loaded.model, n, args.seed, args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"task": task, "model": spec, "data": args.data, "samples": n,
                "seed": args.seed if synthetic else None, "device": args.device}
    payload = {"settings": settings, "metrics": results, **extra}
    (out / "metrics.json").write_text(json.dumps(payload, indent=2))
    print(_format_table(results))
    for key, value in extra.items():
        print(f"{key}: {value}")
    report = Report(f"multiexplain evaluate: {task}")
    section = report.section(task, f"{task.capitalize()}: Grad-CAM++ vs Grad-CAM")
    evaluation.add_metrics_table(section, results, f"{n} samples from {args.data}")
    section.add_settings({k: v for k, v in {**settings, **extra}.items() if v is not None})
    print(f"metrics: {out / 'metrics.json'}")
    _finish(report, out)
    return EXIT_OK


def _evaluate_video_folder(loaded, folder: Path, args: argparse.Namespace):
    """Faithfulness metrics (no masks in a plain folder) for each video's top-1 class."""
    import torch

    from .adapters import video as adapter
    from .evaluation import METHODS_COMPARED, faithfulness_metrics
    from .io import VIDEO_SUFFIXES

    frames, side, normalisation = _video_geometry(loaded, None)
    videos, _ = _read_videos(_folder_files(folder, VIDEO_SUFFIXES), frames, side)
    if not videos:
        raise CommandError(f"no readable video under {folder}")
    clips = torch.stack([clip if normalisation is None else adapter.normalize_clip(clip, *normalisation)
                         for _, clip, _ in videos]).to(loaded.device)
    explained = [adapter.explain_clip(loaded.model, clips[i : i + 4], methods=METHODS_COMPARED) for i in range(0, len(clips), 4)]
    maps = {method: torch.cat([e[method].maps for e in explained]) for method in METHODS_COMPARED}
    targets = torch.cat([e["gradcam++"].targets for e in explained])
    return faithfulness_metrics(loaded.model, clips, maps, targets, "softmax"), len(videos)


def cmd_distill(args: argparse.Namespace) -> int:
    from .train import load_config_file, train_from_config

    path = Path(args.config)
    if not path.is_file():
        raise CommandError(f"config file {args.config!r} does not exist")
    try:
        config = load_config_file(path)
    except (ValueError, OSError) as error:
        raise CommandError(f"cannot read {path}: {error}") from None
    if not isinstance(config, dict):
        raise CommandError(f"{path} must hold a mapping of settings, got {type(config).__name__}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config.setdefault("output", str(out / "student.pt"))
    train = dict(config.get("train", {}))
    train.setdefault("device", args.device)
    config["train"] = train
    try:
        result = train_from_config(config)
    except (ValueError, KeyError, TypeError) as error:
        raise CommandError(f"bad config {path}: {error}") from None
    (out / "distill.json").write_text(json.dumps({"config": config, **result}, indent=2, default=str))
    print(f"student test error: {result['test_error']:.2f}%")
    print(f"student: {result['output']}")
    print(f"log: {out / 'distill.json'}")
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------------
def _common(parser: argparse.ArgumentParser, out: str) -> None:
    parser.add_argument("--device", default="auto", choices=("cpu", "cuda", "auto"),
                        help="where to run (auto: CUDA if available; default %(default)s)")
    parser.add_argument("--out", default=out, help="output folder for figures and index.html (default %(default)s)")
    parser.add_argument("--colormap", default="jet", help="matplotlib colormap for overlays: jet, inferno, turbo, ... (default %(default)s)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity over the input, 0..1 (default %(default)s)")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")


def _model(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument("--model", default=default, required=default is None, metavar="SPEC",
                        help="torchvision:NAME[@WEIGHTS|@none], hf:NAME-or-DIR, pytorchvideo:NAME[@none], "
                        "builtin:NAME, or a .pt state dict with --arch" + (f" (default {default})" if default else ""))
    parser.add_argument("--arch", metavar="SPEC", help="architecture SPEC a .pt state dict is loaded into")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multiexplain",
        description="Grad-CAM++ explanations for classification, captioning, video and distillation.",
        epilog="Start with `multiexplain demo`; every subcommand has --help.",
    )
    parser.add_argument("--version", action="version", version=f"multiexplain {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = commands.add_parser("demo", help="explain all four tasks with the shipped models; writes DIR/index.html",
                               description="Explain all four tasks (classification, captioning, video, distillation) "
                               "on freshly generated synthetic data with the shipped models, Grad-CAM++ next to "
                               "Grad-CAM, compute the headline metrics on a small held-out batch and write a static "
                               "report DIR/index.html.")
    _common(demo, "multiexplain-demo")
    demo.add_argument("--seed", type=int, default=0, help="seed of the generated data (default %(default)s)")
    demo.add_argument("--eval-size", type=int, default=None, help="held-out samples per task for the metrics (default: per task)")
    demo.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of %(default)s")
    demo.set_defaults(handler=cmd_demo)

    classify = commands.add_parser("classify", help="class maps for images",
                                   description="Grad-CAM++ and Grad-CAM maps for the top class(es) of each image.")
    classify.add_argument("images", nargs="+", metavar="IMAGE")
    _model(classify, None)
    classify.add_argument("--layer", help="dotted layer name to explain (default: the model's suggested layer or auto)")
    group = classify.add_mutually_exclusive_group()
    group.add_argument("--target", metavar="CLASS", help="explain this class (index or name) in every image")
    group.add_argument("--topk", type=int, default=1, metavar="K", help="explain the K top classes (default 1)")
    classify.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default %(default)s)")
    classify.add_argument("--size", type=int, default=None, help="input side for models without their own preprocessing")
    _common(classify, "multiexplain-classify")
    classify.set_defaults(handler=cmd_classify)

    caption = commands.add_parser("caption", help="per-word maps of a caption",
                                  description="Generate (or score a given) caption and explain every word.")
    caption.add_argument("images", nargs="+", metavar="IMAGE")
    _model(caption, DEFAULT_MODELS["captioning"])
    caption.add_argument("--caption", metavar="TEXT", help="explain this caption instead of the generated one")
    caption.add_argument("--prompt", metavar="TEXT", help="a question or instruction for a vision-language model "
                         "(put in its chat template); its own words are not explained")
    caption.add_argument("--layer", help="dotted layer name to explain (default: the family's vision tokens, or auto)")
    caption.add_argument("--num-beams", type=int, metavar="N", help="beam search with N beams for the generated caption (default greedy)")
    caption.add_argument("--max-new-tokens", type=int, metavar="N", help="at most N generated tokens (default 20)")
    caption.add_argument("--min-new-tokens", type=int, metavar="N", help="at least N generated tokens (e.g. when a model ends at once)")
    caption.add_argument("--max-batch", type=int, metavar="K", help="at most K words' gradients per backward pass (bounds memory)")
    _common(caption, "multiexplain-caption")
    caption.set_defaults(handler=cmd_caption)

    video = commands.add_parser("video", help="space-time maps of a clip (GIF + MP4 + strip)",
                                description="Explain an action-recognition model on a video clip.")
    video.add_argument("videos", nargs="+", metavar="FILE")
    _model(video, DEFAULT_MODELS["video"])
    video.add_argument("--frames", type=int, default=None, metavar="T", help="frames per clip (default: the model's)")
    video.add_argument("--class", dest="target", metavar="C", help="explain this class (index or name; default: top-1)")
    video.add_argument("--layer", help="dotted layer name to explain (default: the last 3D convolutional block)")
    _common(video, "multiexplain-video")
    video.set_defaults(handler=cmd_video)

    evaluate = commands.add_parser("evaluate", help="the paper's metrics for Grad-CAM++ vs Grad-CAM",
                                   description="Average Drop, Increase in Confidence, Win %% and localisation "
                                   "metrics for Grad-CAM++ and Grad-CAM; prints a table and writes JSON.")
    evaluate.add_argument("--task", required=True, choices=TASKS)
    _model(evaluate, "")
    evaluate.add_argument("--data", default="synthetic", help="'synthetic' (freshly generated, seeded) or a folder")
    evaluate.add_argument("-n", "--num-samples", type=int, default=64, help="samples for synthetic data (default %(default)s)")
    evaluate.add_argument("--seed", type=int, default=1234, help="seed of the synthetic data (default %(default)s)")
    _common(evaluate, "multiexplain-evaluate")
    evaluate.set_defaults(handler=cmd_evaluate)

    distill = commands.add_parser("distill", help="train a student with the explanation loss",
                                  description="Teacher-student training with CE (+KD) + a*||L_student - L_teacher||^2.")
    distill.add_argument("--config", required=True, help="a .yaml/.yml/.toml/.json file of trainer settings")
    _common(distill, "multiexplain-distill")
    distill.set_defaults(handler=cmd_distill)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_OK
    if not 0.0 <= getattr(args, "alpha", 0.5) <= 1.0:
        parser.error("--alpha must lie in [0, 1]")
    import matplotlib

    if getattr(args, "colormap", None) is not None and args.colormap not in matplotlib.colormaps:
        parser.error(f"unknown colormap {args.colormap!r} (try jet, inferno, turbo, viridis)")
    from .zoo import resolve_device

    try:
        args.device = str(resolve_device(args.device))
    except (RuntimeError, ValueError) as error:
        parser.error(str(error))
    try:
        return int(args.handler(args) or 0)
    except USER_ERRORS as error:
        if args.debug:
            raise
        _log(error_line(args.command, error))
        return EXIT_USAGE

if __name__ == "__main__":
    sys.exit(main())
