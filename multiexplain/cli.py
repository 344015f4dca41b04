"""The ``multiexplain`` command line.

Subcommands (each has ``--help``)::

    multiexplain demo     [--out DIR]                                  all four tasks, shipped models, index.html
    multiexplain classify IMAGE... --model SPEC [--layer NAME] [--target CLASS | --topk K]
    multiexplain caption  IMAGE... [--model SPEC] [--caption TEXT | --prompt TEXT] [--layer L] [--num-beams N]
                          [--max-new-tokens N] [--min-new-tokens N]     per-word maps
    multiexplain video    FILE.mp4 [--model SPEC] [--frames T] [--class C]   GIF + MP4 + strip
    multiexplain evaluate --task TASK [--model SPEC] [--data DIR|synthetic] [--road-samples K]
                          [--pointing-tolerance PX]                  metrics table + JSON
    multiexplain distill  --config FILE.yaml|toml                     explanation distillation

A model SPEC is ``torchvision:NAME[@WEIGHTS|@none]``, ``timm:NAME[@none]``, ``hf:NAME-or-DIR``,
``pytorchvideo:NAME[@none]``, ``builtin:NAME`` or a ``.pt`` state dict with ``--arch SPEC`` (see
:mod:`multiexplain.zoo`).
Every command writes its figures and an ``index.html`` report into ``--out`` and prints where.
Unreadable inputs are reported by name, one line each; the others are still processed. Exit
status: 0 done; 2 a user error (a bad option, SPEC, file or config: one ``multiexplain CMD: error:``
line, the traceback only with ``--debug``); 1 nothing could be processed for another reason (e.g.
the model's output was NaN for every image). Warnings are one ``multiexplain CMD: warning:`` line.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from contextlib import contextmanager
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


def each_input(command: str, items: Sequence[Any], work: Any, *, debug: bool = False, name: Any = str,
               fatal: Any = None) -> tuple[list, list]:
    """Run ``work(item)`` for every item; a user error on one is reported as one line and the others
    still run. ``fatal(error) -> bool`` marks errors that would fail every item alike (a bad option):
    those stop the command with one line instead. Returns ``(results, [(item, message)])``."""
    results, failed = [], []
    for item in items:
        try:
            results.append(work(item))
        except USER_ERRORS as error:
            if debug or (fatal is not None and fatal(error)):
                raise
            _log(error_line(command, error, name(item)))
            failed.append((item, cap_message(str(error))))
    return results, failed


# -- shared helpers ------------------------------------------------------------------------------
def _log(message: str) -> None:
    tqdm_module = sys.modules.get("tqdm.auto")
    if tqdm_module is not None:  # a progress bar may be on stderr: clear it, so the message is a line of its own
        tqdm_module.tqdm.write(message, file=sys.stderr)
        sys.stderr.flush()
        return
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


def _named_layer(model, name: str | None) -> None:
    """Check a ``--layer`` name before any image is processed (one line naming what exists)."""
    if not name or name == "auto":
        return
    from .explain import resolve_layer

    try:
        resolve_layer(model, name)
    except ValueError as error:
        raise CommandError(f"--layer {name!r}: {error}") from None


def cmd_classify(args: argparse.Namespace) -> int:
    import torch

    from .explain import model_logits
    from .report import Report

    if args.target is not None and args.topk != 1:
        raise CommandError("give either --target or --topk, not both")
    if args.topk < 1:
        raise CommandError(f"--topk must be at least 1 (how many top classes to explain per image), got {args.topk}")
    loaded = _load(args.model, args.arch, "classification", args.device)
    if loaded.preprocess is None:
        from .zoo import plain_preprocess

        size = args.size or 64
        loaded.preprocess = lambda image: plain_preprocess(image, size, loaded.mean, loaded.std)
    _named_layer(loaded.model, args.layer)
    images, failed = read_images(args.images)
    # A file the preprocessing cannot take is reported by name; the others still run.
    prepared, bad = each_input("classify", images, lambda item: (item[0], loaded.preprocess(item[1])),
                               debug=args.debug, name=lambda item: item[0])
    failed += [(path, message) for (path, _), message in bad]
    if not prepared:
        _log("multiexplain: no readable image")
        return EXIT_USAGE
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    layer = args.layer or loaded.layer
    report = Report("multiexplain classify", intro=f"Model {args.model}: Grad-CAM++ and Grad-CAM for each image.")
    section = report.section("classification", "Classification")
    figures, results = [], []
    batches = [prepared[i : i + args.batch_size] for i in range(0, len(prepared), args.batch_size)]
    layer_name = layer
    for batch in _progress(batches, len(batches), "classify"):
        inputs = torch.stack([tensor for _, tensor in batch]).to(loaded.device)
        with torch.no_grad():
            logits = model_logits(loaded.model(inputs))
        num_classes = logits.shape[1]
        if args.target is not None:
            targets = [[_parse_class(args.target, loaded.labels, num_classes)] for _ in batch]
        else:
            targets = logits.topk(min(args.topk, num_classes), dim=1).indices.tolist()
        try:
            explained = _explain_batch(loaded, inputs, targets, layer)
        except ValueError as error:
            if not args.layer:
                raise
            raise CommandError(f"--layer {args.layer!r}: {error} (omit --layer to let 'auto' choose)") from None
        layer_name = explained["gradcam++"].layer
        # Multi-label models (the shipped scene classifier) score each class with its own sigmoid.
        probabilities = logits.sigmoid() if getattr(loaded.model, "multi_label", False) else logits.softmax(dim=1)
        for row, (path, _) in enumerate(batch):
            if bool(explained["gradcam++"].non_finite[row].any()) or not bool(torch.isfinite(logits[row]).all()):
                _log(error_line("classify", "the model's output is NaN or inf for this image; no map was drawn", path))
                failed.append((path, "the model's output is NaN or inf"))
                continue
            entry, figure = _classify_figure(args, loaded, out, path, len(results), inputs[row], targets[row],
                                             probabilities[row], {m: e.maps[row] for m, e in explained.items()})
            results.append(entry)
            figures.append(figure)
    section.add_figures(figures, "Grad-CAM++ vs Grad-CAM")
    if failed:
        section.add_note("Skipped files: " + "; ".join(f"{p} ({r})" for p, r in failed))
    settings = {"model": args.model, "layer": layer_name, "device": str(loaded.device),
                "colormap": args.colormap, "alpha": args.alpha}
    section.add_settings(settings)
    (out / "predictions.json").write_text(json.dumps({"settings": settings, "results": results,
                                                      "skipped": [p for p, _ in failed]}, indent=2))
    for entry in results:
        print(f"{entry['image']}: " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in entry["targets"]))
    _finish(report, out)
    return EXIT_OK if results else EXIT_FAILED


_METHOD_TITLES = {"gradcam++": "Grad-CAM++", "gradcam": "Grad-CAM"}


def _explain_batch(loaded, inputs, targets: list[list[int]], layer: str) -> dict:
    """Grad-CAM++ and Grad-CAM of a batch from one forward pass and one set of gradients."""
    from .adapters.classification import explain_images

    return explain_images(loaded.model, inputs, targets=targets, methods=tuple(_METHOD_TITLES), layer=layer,
                          reshape=loaded.reshape)


def _classify_figure(args: argparse.Namespace, loaded, out: Path, path: str, index: int, image, classes: list[int],
                     probabilities, maps: dict) -> tuple[dict, Any]:
    """One image's overlay grid (every target, both methods) and its ``predictions.json`` entry."""
    from .report import Figure
    from .viz import save_overlay_grid, to_rgb_array

    heatmaps, titles = [], []
    entry: dict[str, Any] = {"image": path, "targets": []}
    for column, cls in enumerate(classes):
        label = loaded.labels[cls] if loaded.labels and cls < len(loaded.labels) else str(cls)
        p = float(probabilities[cls])
        entry["targets"].append({"class": cls, "label": label, "probability": p})
        for method, name in _METHOD_TITLES.items():
            heatmaps.append(maps[method][column])
            titles.append(f"{name}: {label} (p={p:.2f})")
    figure = out / f"{_stem(path, index)}.png"
    save_overlay_grid(figure, to_rgb_array(image, loaded.mean, loaded.std), heatmaps, titles,
                      ncols=min(len(heatmaps) + 1, 5), alpha=args.alpha, colormap=args.colormap,
                      image_title=Path(path).name)
    entry["figure"] = figure.name
    caption = f"{Path(path).name}: " + ", ".join(f"{t['label']} ({t['probability']:.2f})" for t in entry["targets"])
    return entry, Figure(figure.name, caption)


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


def _max_batch(text: str | None) -> int | str | None:
    """``--max-batch``: a positive count, ``all`` (one batched pass, ``None``) or ``auto`` (the default)."""
    if text is None or text == "auto":
        return "auto"
    if text == "all":
        return None
    if not text.isdigit() or int(text) < 1:
        raise CommandError(f"--max-batch takes a whole number of words of at least 1, 'all' or 'auto', got {text!r}")
    return int(text)


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
            raise CommandError(f"--caption {args.caption!r} is empty; give the text to explain, or omit --caption to "
                               "explain the caption the model generates")
    if given.get("min_new_tokens", 0) > given.get("max_new_tokens", 10**9):
        raise CommandError("--min-new-tokens is larger than --max-new-tokens")
    return given


def cmd_caption(args: argparse.Namespace) -> int:
    from .adapters.captioning import explain_caption
    from .report import Figure, Report, WordMaps

    generation = _generation_arguments(args)
    max_batch = _max_batch(args.max_batch)
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
                               methods=tuple(method_titles), target_layer=layer,
                               max_batch=max_batch, **generation)
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
    # A --caption the tokenizer cannot take fails every image alike: one line for the option.
    bad_caption = (lambda error: repr(args.caption) in str(error)) if args.caption is not None else None
    results, failed = each_input("caption", items, explain_one, debug=args.debug, name=lambda item: item[1][0],
                                 fatal=bad_caption)
    if not results:
        return EXIT_FAILED
    report = Report("multiexplain caption", intro=f"Model {args.model}: one Grad-CAM++ (and Grad-CAM) map per word.")
    section = report.section("captioning", "Captioning")
    section.add_word_maps(views, "Select a word: its map over the image")
    section.add_figures(figures, "Per-word maps")
    skipped = [(p, r) for p, r in unreadable] + [(item[1][0], reason) for item, reason in failed]
    if skipped:
        section.add_note("Skipped: " + "; ".join(f"{p} ({r})" for p, r in skipped))
    settings = {"model": args.model, "prompt": args.prompt, "caption": args.caption or "generated", "layer": results[0]["layer"],
                "device": args.device, "colormap": args.colormap, "alpha": args.alpha,
                "max_batch": "all" if max_batch is None else max_batch, **generation}
    section.add_settings(settings)
    (out / "captions.json").write_text(json.dumps({"settings": settings, "results": results,
                                                   "skipped": [p for p, _ in skipped]}, indent=2))
    _finish(report, out)
    return EXIT_OK if results else EXIT_FAILED


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


VIDEO_METHODS = (("gradcam++", "Grad-CAM++"), ("gradcam", "Grad-CAM"))


class _VideoJob:
    """What every video of one ``multiexplain video`` run shares: the model, how clips are read
    and fed to it, the target, and where the outputs go."""

    def __init__(self, args: argparse.Namespace, loaded: Any, out: Path) -> None:
        from .explain.families import clip_frames, pathway_alpha

        self.args, self.loaded, self.out = args, loaded, out
        requested = args.window if args.window else args.frames  # --window alone (0): the model's frames
        self.frames, self.side, self.normalisation = loaded.video_geometry(requested)
        self.side = args.size or self.side
        fixed = clip_frames(loaded.model)
        if fixed is not None and self.frames != fixed:
            raise CommandError(f"{args.model} takes clips of exactly {fixed} frames; drop --frames/--window or give {fixed}")
        self.slowfast = pathway_alpha(loaded.model) is not None
        if args.pathway is not None and not self.slowfast:
            raise CommandError(f"--pathway is for SlowFast models; {args.model} has one pathway")
        self.pathway = args.pathway or "fast"
        self.layer = args.layer or loaded.layer
        self.labels = loaded.labels
        self._num_classes: int | None = None
        self.scale = max(1, 256 // self.side)
        self.style = {"alpha": args.alpha, "colormap": args.colormap, "scale": self.scale}

    def model_input(self, frames: Any) -> Any:
        """``(3, T, H, W)`` frames in [0, 1] -> the normalised batch of one clip on the model's device."""
        from .adapters.video import normalize_clip

        clip = frames if self.normalisation is None else normalize_clip(frames, *self.normalisation)
        return clip.unsqueeze(0).to(self.loaded.device)

    def num_classes(self, batch: Any) -> int:
        if self._num_classes is None:
            import torch

            from .adapters.video import model_inputs
            from .explain import call_model, model_logits

            inputs, _ = model_inputs(self.loaded.model, batch)
            with torch.no_grad():
                self._num_classes = int(model_logits(call_model(self.loaded.model, inputs)).shape[-1])
            if self.labels is not None and len(self.labels) != self._num_classes:
                raise CommandError(f"{len(self.labels)} class names (--labels or the weights' metadata) for a model "
                                   f"with {self._num_classes} outputs")
        return self._num_classes

    def target(self, batch: Any) -> int | None:
        classes = self.num_classes(batch)
        return None if self.args.target is None else _parse_class(self.args.target, self.labels, classes)

    def label(self, cls: int) -> str:
        return self.labels[cls] if self.labels and cls < len(self.labels) else str(cls)

    def explain(self, batch: Any) -> dict:
        from .adapters.video import explain_clip

        return explain_clip(self.loaded.model, batch, self.target(batch), layer=self.layer,
                            methods=tuple(m for m, _ in VIDEO_METHODS),
                            pathway=self.pathway if self.slowfast else "fast")


def _video_clip(job: _VideoJob, path: str, index: int) -> dict:
    """One clip of ``--frames`` frames sampled over the whole video: animations (the source's
    duration), strip and (``--save-maps``) the maps."""
    from .io import MapWriter, VideoReader, write_gif, write_mp4
    from .viz import write_strip

    with VideoReader(path, size=job.side) as reader:
        clip = reader.clip(job.frames)
    both = job.explain(job.model_input(clip.frames))
    entry = {"video": path, "fps": clip.info.fps, "frames": job.frames, "source_frames": clip.info.num_frames,
             "duration": clip.info.duration, "frame_indices": clip.indices, "padded": clip.padded, "outputs": {}}
    times, end = clip.display_times(), clip.display_end
    for method, name in VIDEO_METHODS:
        explanation = both[method]
        cls = int(explanation.targets[0])
        stem = job.out / f"{_stem(path, index)}_{method.replace('+', 'p')}"
        maps = explanation.maps[0]
        kwargs = {"alpha": job.args.alpha, "colormap": job.args.colormap}
        write_gif(f"{stem}.gif", clip.frames, maps, clip.info.fps, times=times, end=end, scale=job.scale, **kwargs)
        write_mp4(f"{stem}.mp4", clip.frames, maps, clip.info.fps, times=times, end=end, scale=job.scale, **kwargs)
        write_strip(f"{stem}_strip.png", clip.frames, maps, title=f"{name}: {job.label(cls)}", frame_numbers=clip.indices, **kwargs)
        files = {"gif": f"{stem.name}.gif", "mp4": f"{stem.name}.mp4", "strip": f"{stem.name}_strip.png"}
        if job.args.save_maps:
            writer = MapWriter(f"{stem}_maps.npy", maps.shape[0], tuple(maps.shape[1:]))
            for frame_map in maps:
                writer.add(frame_map)
            files["maps"] = Path(writer.close()).name
        entry["outputs"][method] = {"class": cls, "label": job.label(cls), "score": float(explanation.scores[0]),
                                    "layer": explanation.layer, **files}
    return entry


class _WholeVideoOutputs:
    """The per-method outputs of a whole video, written frame by frame as windows finish them."""

    def __init__(self, job: _VideoJob, path: str, index: int, num_frames: int, fps: float) -> None:
        import torch

        from .adapters.video import WindowBlend
        from .io import AnimationWriter, MapWriter

        self.job, self.blends, self.writers, self.files = job, {}, {}, {}
        self.strip_at = set(torch.linspace(0, max(num_frames - 1, 0), min(8, num_frames)).round().long().tolist())
        self.strip: dict[str, list] = {}
        for method, _ in VIDEO_METHODS:
            stem = job.out / f"{_stem(path, index)}_{method.replace('+', 'p')}"
            style = {"alpha": job.args.alpha, "colormap": job.args.colormap, "scale": job.scale}
            writers = [AnimationWriter([f"{stem}.gif", f"{stem}.mp4"], fps, **style)]  # each frame drawn once
            self.files[method] = {"gif": f"{stem.name}.gif", "mp4": f"{stem.name}.mp4", "strip": f"{stem.name}_strip.png"}
            if job.args.save_maps:
                writers.append(MapWriter(f"{stem}_maps.npy", num_frames, (job.side, job.side)))
                self.files[method]["maps"] = f"{stem.name}_maps.npy"
            self.blends[method], self.writers[method], self.strip[method] = WindowBlend(), writers, []
        self.first_time: float | None = None

    def emit(self, frames: dict, before: int | None) -> None:
        """Write every frame before ``before`` (all for ``None``) that no later window covers."""
        from .io import MapWriter

        for method, blend in self.blends.items():
            for frame_index, frame_map in blend.pop(before):
                time, image = frames[frame_index]
                if self.first_time is None:
                    self.first_time = time
                for writer in self.writers[method]:
                    if isinstance(writer, MapWriter):
                        writer.add(frame_map)
                    else:
                        writer.add(image.float().div(255), frame_map, time - self.first_time)
                if frame_index in self.strip_at:
                    self.strip[method].append((frame_index, image, frame_map))

    def close(self, end: float) -> None:
        from .io import MapWriter

        for writers in self.writers.values():
            for writer in writers:
                writer.close() if isinstance(writer, MapWriter) else writer.close(end - (self.first_time or 0.0))

    def write_strips(self, titles: dict[str, str]) -> None:
        import torch

        from .viz import write_strip

        for method, picked in self.strip.items():
            if not picked:
                continue
            clip = torch.stack([image for _, image, _ in picked], dim=1).float().div(255)
            maps = torch.stack([m for _, _, m in picked])
            write_strip(self.job.out / self.files[method]["strip"], clip, maps, num_frames=len(picked), title=titles[method],
                        alpha=self.job.args.alpha, colormap=self.job.args.colormap,
                        frame_numbers=[index for index, _, _ in picked])


def _video_windows(job: _VideoJob, path: str, index: int) -> dict:
    """The whole video, ``--window`` frames at a time every ``--stride`` frames: one map per frame
    (overlapping windows blended, see :class:`~multiexplain.adapters.video.WindowBlend`), written
    as the windows finish, with each window's class and score."""
    import torch

    from .adapters.video import window_starts
    from .io import VideoReader

    window, stride = job.frames, job.args.stride or max(1, job.frames // 2)
    with VideoReader(path, size=job.side) as reader:
        info = reader.info
        if info.num_frames < window:
            return _video_clip(job, path, index)  # one padded window (the reader warns how)
        starts = window_starts(info.num_frames, window, stride)
        outputs = _WholeVideoOutputs(job, path, index, info.num_frames, info.fps)
        frames: dict[int, tuple[float, Any]] = {}
        windows, layer, done, last = [], None, 0, -1

        def run(start: int) -> None:
            nonlocal layer
            picked = [frames[max(i for i in frames if i <= f)] for f in range(start, start + window)]
            clip = torch.stack([image for _, image in picked], dim=1).float().div(255)
            both = job.explain(job.model_input(clip))
            first = both["gradcam++"]
            cls, layer = int(first.targets[0]), first.layer
            windows.append({"start_frame": start, "end_frame": start + window - 1, "start_time": picked[0][0],
                            "end_time": picked[-1][0] + 1 / info.fps, "class": cls, "label": job.label(cls),
                            "score": float(first.scores[0])})
            for method, _ in VIDEO_METHODS:
                outputs.blends[method].add(start, both[method].maps[0])

        try:
            for frame_index, time, image in reader.frames():
                frames[frame_index], last = (time, image), frame_index
                while done < len(starts) and frame_index >= starts[done] + window - 1:
                    run(starts[done])
                    done += 1
                    before = starts[done] if done < len(starts) else None
                    outputs.emit(frames, before)
                    for stale in [i for i in frames if before is not None and i < before]:
                        del frames[stale]
            if done < len(starts) and frames:  # the stream ended before its header's frame count
                run(max(min(frames), last - window + 1))
                outputs.emit(frames, None)
        finally:
            outputs.close(end=(last + 1) / info.fps)
    counts: dict[str, int] = {}
    for entry in windows:
        counts[entry["label"]] = counts.get(entry["label"], 0) + 1
    top = max(counts, key=counts.get) if counts else None
    outputs.write_strips({method: f"{name}: per-window maps ({top} in {counts.get(top, 0)}/{len(windows)} windows)"
                          for method, name in VIDEO_METHODS})
    return {"video": path, "fps": info.fps, "frames": window, "source_frames": last + 1, "duration": info.duration,
            "window": window, "stride": stride, "windows": windows,
            "outputs": {method: {"label": top, "layer": layer, **outputs.files[method]} for method, _ in VIDEO_METHODS}}


def cmd_video(args: argparse.Namespace) -> int:
    import warnings

    from .report import Figure, Report

    if args.stride is not None and args.window is None:
        raise CommandError("--stride needs --window (the whole video, window by window)")
    if args.window is not None and args.frames is not None:
        raise CommandError("give --window (the whole video) or --frames (one clip), not both")
    for name in ("frames", "window", "stride", "size"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "window" else 1):
            raise CommandError(f"--{name} must be a positive number of frames, got {value}")
    loaded = _load(args.model, args.arch, "video", args.device)
    if args.labels:
        from .zoo import read_labels

        loaded.labels = read_labels(args.labels)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    job = _VideoJob(args, loaded, out)
    explain_one = _video_windows if args.window is not None else _video_clip
    counter = iter(range(len(args.videos)))

    def work(path: str) -> dict:
        index = next(counter)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            entry = explain_one(job, path, index)
        entry["warnings"] = [str(w.message) for w in caught]
        for message in entry["warnings"]:
            _log(f"multiexplain video: warning: {path}: {cap_message(message)}")
        return entry

    results, failed = each_input("video", list(args.videos), work, debug=args.debug)
    if not results:
        _log("multiexplain: no readable video")
        return EXIT_USAGE
    report = Report("multiexplain video", intro=f"Model {args.model}: space-time Grad-CAM++ and Grad-CAM maps.")
    section = report.section("video", "Video")
    animations, strips = [], []
    for entry in results:
        for method, name in VIDEO_METHODS:
            files = entry["outputs"][method]
            caption = f"{Path(entry['video']).name}, {name}: {files['label']}"
            animations.append(Figure(files["gif"], caption, links={"MP4": files["mp4"]}))
            strips.append(Figure(files["strip"], caption))
        print(f"{entry['video']}: {entry['outputs']['gradcam++']['label']}")
    section.add_figures(animations, "Animations (frame | overlay, the source's timing)")
    section.add_figures(strips, "Frame strips")
    if failed:
        section.add_note("Skipped unreadable files: " + "; ".join(f"{p} ({r})" for p, r in failed))
    settings = {"model": args.model, "frames": job.frames, "frame size": job.side, "device": args.device,
                "colormap": args.colormap, "alpha": args.alpha}
    if args.window is not None:
        settings.update({"window": job.frames, "stride": args.stride or max(1, job.frames // 2),
                         "window blending": "weighted mean, triangular weights peaking at each window's centre"})
    if job.slowfast:
        settings["pathway"] = job.pathway
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
        lines.append(f"{name:<{width}}  {results['gradcam++'][name]:>10.3f}  {results['gradcam'][name]:>10.3f}")
    return "\n".join(lines)


def _folder_files(folder: Path, suffixes: tuple[str, ...]) -> list[str]:
    from .io import folder_files

    files = folder_files(folder, suffixes)
    if not files:
        raise CommandError(f"no {'/'.join(suffixes)} files under {folder}")
    return files


def _evaluate_image_folder(loaded, folder: Path, batch_size: int, device: str, args: argparse.Namespace) -> tuple[dict, int, dict]:
    """Faithfulness metrics (no masks in a plain folder) for each image's top-1 class: the paper's,
    ROAD on the first ``--road-samples`` images and the randomisation sanity check. Returns
    ``(results, images, extra settings)``."""
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
    inputs, targets = torch.cat(inputs_all), torch.cat(targets_all)
    # The explanation input E = L * I multiplies the *normalised* input, as the paper does.
    results = faithfulness_metrics(loaded.model, inputs, maps, targets, score)

    def explain(model, x, t):
        return explain_images(model, x, targets=t, methods=methods, layer=loaded.layer, reshape=loaded.reshape)

    extra = _road_and_sanity(loaded.model, results, inputs, maps, targets, score, _road_samples(args, len(images)),
                             batch_size, explain, std=loaded.std)
    return results, len(images), extra


def _road_and_sanity(model, results: dict, inputs, maps: dict, targets, score: str, road_samples: int, batch_size: int,
                     explain, *, std: Sequence[float] | None = None, fractions: Sequence[float] | None = None) -> dict:
    """Adds ROAD on the first ``road_samples`` inputs and the randomisation sanity check to
    ``results``; returns the settings they used. The imputation noise is the paper's 0.01 of a
    [0, 1] pixel, divided by ``std`` for inputs normalised with it."""
    import torch

    from . import metrics
    from .evaluation import METHODS_COMPARED, randomisation_layers, randomisation_metrics, road_metrics

    noise = [0.01 / s for s in std] if std is not None and len(std) == inputs.shape[1] else 0.01
    fractions = tuple(fractions or metrics.ROAD_FRACTIONS)
    k = min(road_samples, inputs.shape[0])
    if k > 0:
        road = road_metrics(model, inputs[:k], {m: v[:k] for m, v in maps.items()}, targets[:k], score, noise=noise,
                            fractions=fractions, batch_size=batch_size)
        for method in METHODS_COMPARED:
            results[method].update(road[method])

    def explain_all(model):
        parts = [explain(model, inputs[i : i + batch_size], targets[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
        return {m: torch.cat([part[m].maps for part in parts]) for m in METHODS_COMPARED}

    layers = randomisation_layers(model)
    sanity, steps = randomisation_metrics(model, explain_all, layers=layers)
    for method in METHODS_COMPARED:
        results[method].update(sanity[method])
    return {"ROAD samples": k, "ROAD fractions": list(fractions) if k else None,
            "randomisation steps": f"{steps} ({'per layer' if layers is None else 'per child module'}, cascading from the output)"}


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
            raise CommandError(f"--model for distillation must be a student written by `multiexplain distill`: {error}") from None
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
    if args.road_samples is not None and args.road_samples < 0:  # checked before any model runs
        raise CommandError(f"--road-samples must be >= 0, got {args.road_samples}")
    if not args.pointing_tolerance >= 0:  # also refuses NaN
        raise CommandError(f"--pointing-tolerance must be >= 0 pixels, got {args.pointing_tolerance}")
    n, extra = args.num_samples, {}
    if task == "distillation":
        teacher, student = _distillation_models(args)
        results, errors = evaluation.evaluate_distillation(teacher, student, n, args.seed, args.device)
        extra["test error %"] = errors
    else:
        loaded = _load(spec, args.arch, task, args.device)
        if folder is not None and task == "classification":
            results, n, more = _evaluate_image_folder(loaded, folder, 16, args.device, args)
            extra.update(more)
        elif folder is not None:
            results, n, more = _evaluate_video_folder(loaded, folder, args)
            extra.update(more)
        elif task == "classification":
            classes = getattr(getattr(loaded.model, "classifier", None), "out_features", None)
            if classes != 6 or not getattr(loaded.model, "multi_label", False):
                raise CommandError("synthetic classification data are the shipped shape scenes: evaluate "
                                   "builtin:scene-classifier (or a .pt with --arch builtin:scene-classifier), "
                                   "or give --data FOLDER for other models")
            road = _road_samples(args, n, default=None)
            results = evaluation.evaluate_classification(loaded.model, n, args.seed, args.device, road_samples=road, sanity=True,
                                                         pointing_tolerance=args.pointing_tolerance)
            extra.update({"ROAD samples": road, "randomisation": "every parameterised layer, cascading from the output",
                          "pointing tolerance px": args.pointing_tolerance})
        elif task == "captioning":
            if "tokenizer" not in loaded.extra or not hasattr(loaded.model, "generate"):
                raise CommandError("synthetic captioning data need the shipped captioner (builtin:show-and-tell)")
            results, words, exact = evaluation.evaluate_captioning(loaded.model, loaded.extra["tokenizer"], n, args.seed, args.device)
            extra.update({"words scored": words, "exact caption match %": exact})
        else:
            road = _road_samples(args, n)
            results = evaluation.evaluate_video(loaded.model, n, args.seed, args.device, road_samples=road, sanity=True,
                                                pointing_tolerance=args.pointing_tolerance)
            extra.update({"ROAD samples": road, "ROAD fractions": list(evaluation.VIDEO_ROAD_FRACTIONS),
                          "randomisation": "every parameterised layer, cascading from the output",
                          "pointing tolerance px": args.pointing_tolerance})
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


def _evaluate_video_folder(loaded, folder: Path, args: argparse.Namespace) -> tuple[dict, int, dict]:
    """Faithfulness metrics (no masks in a plain folder) for each video's top-1 class, space-time
    ROAD on the first ``--road-samples`` clips and the randomisation sanity check."""
    import torch

    from .adapters import video as adapter
    from .evaluation import METHODS_COMPARED, VIDEO_ROAD_FRACTIONS, faithfulness_metrics
    from .io import VIDEO_SUFFIXES

    frames, side, normalisation = loaded.video_geometry()
    videos, _ = _read_videos(_folder_files(folder, VIDEO_SUFFIXES), frames, side)
    if not videos:
        raise CommandError(f"no readable video under {folder}")
    clips = torch.stack([clip if normalisation is None else adapter.normalize_clip(clip, *normalisation)
                         for _, clip, _ in videos]).to(loaded.device)
    explained = [adapter.explain_clip(loaded.model, clips[i : i + 4], methods=METHODS_COMPARED) for i in range(0, len(clips), 4)]
    maps = {method: torch.cat([e[method].maps for e in explained]) for method in METHODS_COMPARED}
    targets = torch.cat([e["gradcam++"].targets for e in explained])
    results = faithfulness_metrics(loaded.model, clips, maps, targets, "softmax")

    def explain(model, x, t):
        return adapter.explain_clip(model, x, t, methods=METHODS_COMPARED)

    extra = _road_and_sanity(loaded.model, results, clips, maps, targets, "softmax", _road_samples(args, len(videos)),
                             4, explain, std=None if normalisation is None else normalisation[1], fractions=VIDEO_ROAD_FRACTIONS)
    return results, len(videos), extra


#: ROAD samples unless --road-samples says otherwise: every imputation solves a sparse system per
#: sample and removal fraction (1-3 s per 224 x 224 image on a CPU core), so folders and clips get 16.
ROAD_DEFAULT_SAMPLES = 16


def _road_samples(args: argparse.Namespace, n: int, default: int | None = ROAD_DEFAULT_SAMPLES) -> int:
    """``--road-samples``, else ``default`` (``None``: all ``n``), at most ``n``."""
    if args.road_samples is not None:  # >= 0: cmd_evaluate checks it first
        return min(args.road_samples, n)
    return n if default is None else min(n, default)


def cmd_explain_dataset(args: argparse.Namespace) -> int:
    from .dataset_run import explain_dataset

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    result = explain_dataset(
        args.task, args.model, args.data, args.out, arch=args.arch, images=args.images, methods=methods,
        layer=args.layer, boxes=args.boxes, masks=args.masks, target=args.target, tolerance=args.tolerance,
        batch_size=args.batch_size, chunk_size=args.chunk_size, workers=args.workers, device=args.device,
        upsample=args.upsample, dtype=args.dtype, frames=args.frames, size=args.size, window=args.window,
        stride=args.stride, progress=not args.quiet,
    )
    if result.rank == 0:
        for entry in result.skipped:
            _log(error_line("explain-dataset", entry["error"], entry["path"]))
        for entry in result.metrics["warnings"]:
            _log(f"multiexplain explain-dataset: warning: {entry['path']}: {cap_message(entry['warning'])}")
        print(f"explained {result.explained} of {result.items} items ({len(result.skipped)} skipped) in "
              f"{result.seconds:.1f} s with {result.world_size} process(es)")
        for method, values in result.metrics["methods"].items():
            print(f"{method}: " + ", ".join(f"{k} {v:.4g}" for k, v in values.items()))
        print(f"store: {result.out}  (index.jsonl, chunk-*.safetensors, metrics.json, index.html)")
    return EXIT_OK


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
    caption.add_argument("--max-batch", metavar="K", help="at most K words' gradients per backward pass (bounds memory); "
                         "'all': one pass; default 'auto': the model family's choice")
    _common(caption, "multiexplain-caption")
    caption.set_defaults(handler=cmd_caption)

    video = commands.add_parser(
        "video", help="space-time maps of a clip or a whole video (GIF + MP4 + strip)",
        description="Explain an action-recognition model on video files: one clip of T frames sampled over "
        "each video, or with --window the whole video window by window (a map for every frame). Animations keep "
        "the source's duration; torchvision, pytorchvideo (SlowFast: --pathway), Hugging Face VideoMAE / "
        "TimeSformer / ViViT (hf:DIR) and .pt files with --arch.")
    video.add_argument("videos", nargs="+", metavar="FILE")
    _model(video, DEFAULT_MODELS["video"])
    video.add_argument("--frames", type=int, default=None, metavar="T",
                       help="frames per clip, sampled uniformly over the video (default: the model's)")
    video.add_argument("--window", type=int, nargs="?", const=0, default=None, metavar="T",
                       help="explain the whole video, T consecutive frames at a time (T omitted: the model's clip length)")
    video.add_argument("--stride", type=int, default=None, metavar="S",
                       help="frames between window starts (default T/2); overlapping windows' maps are blended "
                       "with weights peaking at each window's centre")
    video.add_argument("--size", type=int, default=None, metavar="S",
                       help="frame side: the short side is scaled to S, then a centred S x S crop (default: the model's)")
    video.add_argument("--class", dest="target", metavar="C", help="explain this class (index or name; default: top-1)")
    video.add_argument("--labels", metavar="FILE", help="class names: one per line, or a JSON list (for models "
                       "whose weights carry none, e.g. pytorchvideo hub models)")
    video.add_argument("--pathway", choices=("slow", "fast", "both"), default=None,
                       help="SlowFast models: explain the fast (default), the slow or both pathways")
    video.add_argument("--layer", help="dotted layer name to explain (default: the one resolver's layer for the model)")
    video.add_argument("--save-maps", action="store_true", help="also write each method's maps as float16 (T, H, W) .npy")
    _common(video, "multiexplain-video")
    video.set_defaults(handler=cmd_video)

    evaluate = commands.add_parser("evaluate", help="the paper's metrics for Grad-CAM++ vs Grad-CAM",
                                   description="Average Drop, Increase in Confidence, Win %%, ROAD, the model-"
                                   "randomisation sanity check and localisation metrics (pointing game, also as a "
                                   "class mean) for Grad-CAM++ and Grad-CAM; prints a table and writes JSON.")
    evaluate.add_argument("--task", required=True, choices=TASKS)
    _model(evaluate, "")
    evaluate.add_argument("--data", default="synthetic", help="'synthetic' (freshly generated, seeded) or a folder")
    evaluate.add_argument("-n", "--num-samples", type=int, default=64, help="samples for synthetic data (default %(default)s)")
    evaluate.add_argument("--seed", type=int, default=1234, help="seed of the synthetic data (default %(default)s)")
    evaluate.add_argument("--road-samples", type=int, default=None, metavar="K",
                          help="ROAD on the first K samples (default: all synthetic scenes, 16 images or clips "
                          "otherwise; 0: no ROAD)")
    evaluate.add_argument("--pointing-tolerance", type=float, default=2.0, metavar="PX",
                          help="synthetic data: also the class-mean pointing game with hits within PX pixels of the "
                          "mask (default %(default)s: Zhang et al.'s 15 px on VOC/COCO images, about 3%% of a side, "
                          "scaled to the 64 px scenes and frames; 0: leave it out)")
    _common(evaluate, "multiexplain-evaluate")
    evaluate.set_defaults(handler=cmd_evaluate)

    dataset = commands.add_parser(
        "explain-dataset", help="explain a whole data set into a resumable store (torchrun-ready)",
        description="Explain every image, video or image-caption pair of a data set, on one process or under "
        "`torchrun --nproc_per_node N -m multiexplain explain-dataset ...`, into a chunked safetensors store with a "
        "JSONL index; rerun the same command to resume. With --boxes or --masks, localisation metrics on your ground truth.")
    dataset.add_argument("--task", required=True, choices=("classification", "video", "captioning"))
    _model(dataset, None)
    dataset.add_argument("--data", required=True, help="an image/video folder (flat or <class>/<file>), a list file "
                         "('path [label]' per line), or for captioning a COCO captions JSON")
    dataset.add_argument("--images", help="captioning: the folder the COCO JSON's file names are relative to")
    dataset.add_argument("--methods", default="gradcam++,gradcam", help="comma-separated methods (default %(default)s)")
    dataset.add_argument("--layer", default="auto", help="layer to explain (default: the resolver's)")
    dataset.add_argument("--boxes", help="ground-truth boxes: a COCO instances JSON or a folder of Pascal VOC XML files")
    dataset.add_argument("--masks", help="ground-truth masks: a folder with one mask image per image (same file stem)")
    dataset.add_argument("--target", default="label", choices=("label", "top1"),
                         help="explain the data's label where it has one (default) or always the top-1 class")
    dataset.add_argument("--tolerance", type=float, default=15.0,
                         help="pointing-game tolerance in input pixels (default 15, Zhang et al.)")
    dataset.add_argument("--batch-size", type=int, default=16)
    dataset.add_argument("--chunk-size", type=int, default=64, help="items per store chunk, the unit of resuming")
    dataset.add_argument("--workers", type=int, default=2, help="DataLoader workers decoding items (default %(default)s)")
    dataset.add_argument("--upsample", action="store_true", help="also store maps at the input resolution")
    dataset.add_argument("--dtype", default="float16", choices=("float16", "float32"), help="stored map precision")
    dataset.add_argument("--frames", type=int, help="video: frames per clip (default: the model's)")
    dataset.add_argument("--window", type=int, nargs="?", const=0, default=None, metavar="T",
                         help="video: the whole video, T consecutive frames at a time (T omitted: the model's clip length)")
    dataset.add_argument("--stride", type=int, default=None, metavar="S",
                         help="video: frames between window starts (default T/2); every window's maps are stored, "
                         "and with --upsample one blended map per frame")
    dataset.add_argument("--size", type=int, help="input side for models without their own preprocessing")
    dataset.add_argument("--quiet", action="store_true", help="no progress bar")
    _common(dataset, "multiexplain-store")
    dataset.set_defaults(handler=cmd_explain_dataset)

    distill = commands.add_parser("distill", help="train a student with the explanation loss",
                                  description="Teacher-student training with CE (+KD) + a*||L_student - L_teacher||^2. "
                                  "The config's paths (output:, train: checkpoint_dir:, a teacher's or student's "
                                  "checkpoint:) are used as written, relative to the current directory, and may point "
                                  "anywhere you can write: run configs you wrote or checked. Loading one runs no code "
                                  "(YAML python tags are refused; checkpoints load with weights_only=True).")
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
        with _one_line_warnings(args.command, args.debug):
            return int(args.handler(args) or 0)
    except USER_ERRORS as error:
        if args.debug:
            raise
        _log(error_line(args.command, error))
        return EXIT_USAGE


@contextmanager
def _one_line_warnings(command: str, debug: bool):
    """Warnings (an alpha channel dropped, scores that look like probabilities, ...) as one
    ``multiexplain CMD: warning: ...`` line each on stderr; Python's own format with ``--debug``."""
    with warnings.catch_warnings():
        if not debug:
            def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
                _log(f"multiexplain {command}: warning: {cap_message(str(message))}")

            warnings.showwarning = show
        yield

if __name__ == "__main__":
    sys.exit(main())
