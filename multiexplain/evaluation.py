"""Metrics of Grad-CAM++ against Grad-CAM on held-out data: what ``multiexplain evaluate`` prints
and the demo's report shows. Every explanation here takes both methods' maps from one forward
pass (``methods=``); every metric is :mod:`multiexplain.metrics`'."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from . import metrics
from .adapters.captioning import explain_caption
from .adapters.classification import explain_images
from .adapters.video import explain_clip
from .data import make_action_clips, make_captioned_scenes, make_distill_dataset, make_scenes
from .explain import ExplainRequest, explain_request

__all__ = [
    "METHODS_COMPARED", "METHOD_NAMES", "add_metrics_table", "evaluate_captioning", "evaluate_classification",
    "evaluate_distillation", "evaluate_video", "faithfulness_metrics", "localisation_metrics",
]

#: The two methods every table compares, and how the report names them.
METHOD_NAMES = {"gradcam++": "Grad-CAM++", "gradcam": "Grad-CAM"}
METHODS_COMPARED = tuple(METHOD_NAMES)


def _batches(n: int, size: int) -> list[slice]:
    return [slice(start, min(start + size, n)) for start in range(0, n, size)]


def faithfulness_metrics(model: torch.nn.Module, inputs: Tensor, maps: dict[str, Tensor], targets: Tensor,
                         score: str) -> dict[str, dict[str, float]]:
    """The paper's Average Drop, % Increase in Confidence and Win % for both methods."""
    results: dict[str, dict[str, float]] = {}
    signed: dict[str, Tensor] = {}
    for method, method_maps in maps.items():
        full, explained = metrics.confidences(model, inputs, method_maps, targets, score)
        results[method] = {
            "Average Drop % (lower is better)": metrics.average_drop(full, explained),
            "Increase in Confidence % (higher is better)": metrics.increase_in_confidence(full, explained),
        }
        signed[method] = metrics.per_sample_drop(full, explained, clip=False)
    results["gradcam++"]["Win % (higher is better)"] = metrics.win_percent(signed["gradcam++"], signed["gradcam"])
    results["gradcam"]["Win % (higher is better)"] = metrics.win_percent(signed["gradcam"], signed["gradcam++"])
    return results


def localisation_metrics(maps: dict[str, Tensor], masks: Tensor) -> dict[str, dict[str, float]]:
    """Loc(delta) (paper eq. 26), pointing game and energy pointing game, means over samples."""
    results = {}
    for method, method_maps in maps.items():
        row = {f"Loc({delta}) (higher is better)": float(metrics.localization(method_maps, masks, delta).mean())
               for delta in (0.0, 0.25, 0.5)}
        row["Pointing game % (higher is better)"] = 100 * float(metrics.pointing_game(method_maps, masks).double().mean())
        row["Energy inside the region % (higher is better)"] = 100 * float(metrics.energy_pointing_game(method_maps, masks).mean())
        results[method] = row
    return results


def _merge(*parts: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    merged: dict[str, dict[str, float]] = {method: {} for method in METHOD_NAMES}
    for part in parts:
        for method, row in part.items():
            merged[method].update(row)
    return merged


def add_metrics_table(section: Any, results: dict[str, dict[str, float]], caption: str) -> None:
    """Rows = metrics, columns = Grad-CAM++ | Grad-CAM in a report section; the better value is bold."""
    rows, best = [], []
    for name in results["gradcam++"]:
        pp, gc = results["gradcam++"][name], results["gradcam"][name]
        rows.append([name, pp, gc])
        lower = "lower is better" in name
        best.append(None if pp == gc else (1 if (pp < gc) == lower else 2))
    section.add_table(["metric", "Grad-CAM++", "Grad-CAM"], rows, caption, highlight=best)


def _concat(parts: Sequence[dict[str, Any]]) -> dict[str, Tensor]:
    return {method: torch.cat([part[method].maps for part in parts]) for method in METHODS_COMPARED}


def evaluate_classification(model: torch.nn.Module, n: int, seed: int, device: torch.device | str = "cpu") -> dict[str, dict[str, float]]:
    """Metrics of Grad-CAM++ and Grad-CAM for the shipped scene classifier on ``make_scenes(n, seed)``.

    Each scene is explained for its highest-scoring class that is present. Returns
    ``{method: {metric: value}}``: Average Drop / Increase in Confidence / Win % (sigmoid
    confidences, eq. 25 explanation input), Loc(delta), pointing game, energy inside the class's
    pixels and the share of the class's instances the map covers.
    """
    held_out = make_scenes(n, seed)
    inputs = held_out.images.to(device)
    with torch.no_grad():
        logits = model(inputs)
    present = held_out.labels.to(device) > 0
    targets = torch.where(present, logits, torch.full_like(logits, -torch.inf)).argmax(dim=1)
    maps = _concat([explain_images(model, inputs[b], methods=METHODS_COMPARED, targets=targets[b]) for b in _batches(n, 128)])
    masks = held_out.class_masks.to(device)[torch.arange(n, device=device), targets]
    instances = held_out.instances_of(targets.cpu()).to(device)
    coverage = {m: {"Instances covered % (higher is better)": 100 * float(metrics.multi_instance_coverage(maps[m], instances)[0].mean())}
                for m in METHOD_NAMES}
    return _merge(faithfulness_metrics(model, inputs, maps, targets, "sigmoid"), localisation_metrics(maps, masks), coverage)


def evaluate_distillation(teacher: torch.nn.Module, student: torch.nn.Module, n: int, seed: int,
                          device: torch.device | str = "cpu") -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Map agreement of a teacher/student pair on ``make_distill_dataset(n, seed)`` (true class).

    Returns ``({method: {metric: value}}, {"teacher": error %, "student": error %})``: the mean
    Pearson correlation of the student's and the teacher's maps, and each model's map energy on
    the target shape.
    """
    from .train import evaluate_student

    models = {"teacher": teacher, "student": student}
    held_out = make_distill_dataset(n, seed)
    inputs, targets = held_out.images.to(device), held_out.labels.to(device)
    masks = held_out.masks.to(device)
    errors = {role: evaluate_student(m, held_out, device=device) for role, m in models.items()}
    role_maps = {role: _concat([explain_request(m, ExplainRequest(inputs[b], targets[b]), METHODS_COMPARED)
                                for b in _batches(n, 128)]) for role, m in models.items()}
    results: dict[str, dict[str, float]] = {m: {} for m in METHOD_NAMES}
    for method in METHOD_NAMES:
        results[method]["Student-teacher map correlation (higher is better)"] = float(
            metrics.map_correlation(role_maps["student"][method], role_maps["teacher"][method]).mean())
        for role in models:
            energy = metrics.energy_pointing_game(role_maps[role][method], masks)
            results[method][f"{role.capitalize()} energy on the target % (higher is better)"] = 100 * float(energy.mean())
    return results, errors


def evaluate_captioning(model: torch.nn.Module, vocabulary: Any, n: int, seed: int,
                        device: torch.device | str = "cpu") -> tuple[dict[str, dict[str, float]], int, float]:
    """Per-word localisation of Grad-CAM++ and Grad-CAM on ``make_captioned_scenes(n, seed)``.

    The ground-truth caption of each scene is explained word by word and each content word's
    (count, colour, shape) map is compared with the exact pixels of the objects it names.
    Returns ``({method: {metric: value}}, number of words scored, exact-match % of the greedy
    captions)``.
    """
    held_out = make_captioned_scenes(n, seed)
    explained = explain_caption(model, held_out.images.to(device), list(held_out.captions), tokenizer=vocabulary,
                                methods=METHODS_COMPARED)
    word_maps: dict[str, list[Tensor]] = {m: [] for m in METHOD_NAMES}
    word_masks: list[Tensor] = []
    for i, explanation in enumerate(explained["gradcam++"]):
        if explanation.words != held_out.words[i]:
            continue  # tokenisation differs from the data set's words: nothing to align
        keep = [j for j, kind in enumerate(held_out.word_kinds[i]) if kind != "other" and held_out.word_masks[i][j].any()]
        for method in METHOD_NAMES:
            word_maps[method].append(explained[method][i].maps[keep])
        word_masks.append(held_out.word_masks[i][keep])
    if not word_masks:
        raise RuntimeError("no held-out caption could be aligned with its word masks")
    maps = {m: torch.cat(word_maps[m]) for m in METHOD_NAMES}
    masks = torch.cat(word_masks).to(maps["gradcam++"].device)
    ids = model.generate(held_out.images.to(device))  # greedy, as in the figures
    captions = [vocabulary.decode(row.tolist()) for row in ids]
    exact = 100.0 * sum(c == t for c, t in zip(captions, held_out.captions)) / n
    return localisation_metrics(maps, masks), int(masks.shape[0]), exact


def evaluate_video(model: torch.nn.Module, n: int, seed: int, device: torch.device | str = "cpu",
                   batch_size: int = 16) -> dict[str, dict[str, float]]:
    """Metrics of Grad-CAM++ and Grad-CAM for the shipped C3D on ``make_action_clips(n, seed)``.

    Each clip is explained for its true action. Returns ``{method: {metric: value}}``: Average
    Drop / Increase in Confidence / Win % (softmax confidences, the explanation input is the map
    times the clip voxel by voxel), space-time Loc(delta), pointing game and energy on the
    actor's pixels in every frame, and the share of the map's energy in the frames where the
    action happens.
    """
    held_out = make_action_clips(n, seed)
    inputs, targets = held_out.clips.to(device), held_out.labels.to(device)
    maps = _concat([explain_clip(model, inputs[b], targets[b], methods=METHODS_COMPARED) for b in _batches(n, batch_size)])
    masks = held_out.masks.to(device)
    frames = held_out.active.to(device)[:, :, None, None].expand_as(masks)
    temporal = {m: {"Energy in the action frames % (higher is better)": 100 * float(metrics.energy_pointing_game(maps[m], frames).mean())}
                for m in METHOD_NAMES}
    return _merge(faithfulness_metrics(model, inputs, maps, targets, "softmax"), localisation_metrics(maps, masks), temporal)
