"""Metrics of Grad-CAM++ against Grad-CAM on held-out data: what ``multiexplain evaluate`` prints
and the demo's report shows. Every explanation here takes both methods' maps from one forward
pass (``methods=``); every metric is :mod:`multiexplain.metrics`'."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from . import metrics
from .adapters.captioning import explain_caption
from .adapters.classification import explain_images
from .adapters.video import explain_clip
from .data import make_action_clips, make_captioned_scenes, make_distill_dataset, make_scenes
from .explain import ExplainRequest, explain_request

__all__ = [
    "METHODS_COMPARED", "METHOD_NAMES", "VIDEO_ROAD_FRACTIONS", "add_metrics_table", "evaluate_captioning",
    "evaluate_classification", "evaluate_distillation", "evaluate_video", "faithfulness_metrics",
    "localisation_metrics", "randomisation_layers", "randomisation_metrics", "road_metrics",
]

#: The two methods every table compares, and how the report names them.
METHOD_NAMES = {"gradcam++": "Grad-CAM++", "gradcam": "Grad-CAM"}
METHODS_COMPARED = tuple(METHOD_NAMES)
#: ROAD on clips: five of the paper's fractions (each imputation solves a T x H x W system).
VIDEO_ROAD_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: Models with more parameterised modules than this are randomised block by block (their children).
_LAYERWISE_LIMIT = 24


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


def localisation_metrics(maps: dict[str, Tensor], masks: Tensor, classes: Tensor | None = None,
                         tolerance: float = 0.0) -> dict[str, dict[str, float]]:
    """Loc(delta) (paper eq. 26), pointing game and energy pointing game, means over samples; with
    ``classes`` (N,) also the pointing game's class mean (Zhang et al. 2016), and with a
    ``tolerance`` > 0 (positions, Euclidean over the spatial axes) its class mean at that tolerance
    (Zhang et al.'s 15 px, scaled to the data)."""
    if tolerance < 0:
        raise ValueError(f"the pointing game's tolerance must be >= 0, got {tolerance}")
    results = {}
    for method, method_maps in maps.items():
        row = {f"Loc({delta}) (higher is better)": float(metrics.localization(method_maps, masks, delta).mean())
               for delta in (0.0, 0.25, 0.5)}
        hits = metrics.pointing_game(method_maps, masks)
        row["Pointing game % (higher is better)"] = metrics.pointing_accuracy(hits)
        if classes is not None:
            row["Pointing game %, class mean (higher is better)"] = metrics.pointing_accuracy(hits, classes)
            if tolerance > 0:
                near = metrics.pointing_game(method_maps, masks, tolerance=tolerance)
                name = f"Pointing game %, class mean, within {tolerance:g} px (higher is better)"
                row[name] = metrics.pointing_accuracy(near, classes)
        row["Energy inside the region % (higher is better)"] = 100 * float(metrics.energy_pointing_game(method_maps, masks).mean())
        results[method] = row
    return results


def road_metrics(model: nn.Module, inputs: Tensor, maps: dict[str, Tensor], targets: Tensor, score: str, *,
                 noise: float | Sequence[float] = 0.01, fractions: Sequence[float] = metrics.ROAD_FRACTIONS,
                 batch_size: int = 32) -> dict[str, dict[str, float]]:
    """ROAD (Rong et al. 2022) for both methods: MoRF and LeRF confidence averaged over the removed
    fractions, and ``(LeRF - MoRF) / 2``, means over samples (:func:`multiexplain.metrics.road`).
    ``noise`` is the imputation noise in the inputs' units (``0.01 / std`` for normalised inputs)."""
    span = f"{round(100 * min(fractions))}-{round(100 * max(fractions))}% removed"
    results = {}
    for method, method_maps in maps.items():
        curves = metrics.road(model, inputs, method_maps, targets, fractions=fractions, noise=noise, score=score,
                              batch_size=batch_size)
        results[method] = {
            f"ROAD MoRF confidence, mean over {span} (lower is better)": float(curves.morf_mean().mean()),
            f"ROAD LeRF confidence, mean over {span} (higher is better)": float(curves.lerf_mean().mean()),
            "ROAD (LeRF - MoRF) / 2 (higher is better)": float(curves.combined().mean()),
        }
    return results


def randomisation_layers(model: nn.Module) -> int | None:
    """What :func:`randomisation_metrics` randomises per step: every parameterised module (``None``)
    for small models, the model's children (``1``) for large ones."""
    owners = sum(1 for m in model.modules() if next(m.parameters(recurse=False), None) is not None)
    return None if owners <= _LAYERWISE_LIMIT else 1


def randomisation_metrics(model: nn.Module, explain: Callable[[nn.Module], dict[str, Tensor]], *,
                          layers: Sequence[str] | int | None = None, seed: int = 0) -> tuple[dict[str, dict[str, float]], int]:
    """The cascading model-parameter randomisation test (Adebayo et al. 2018) for both methods.

    ``explain(model) -> {method: maps (N, *spatial)}`` explains fixed inputs and targets; both
    methods' maps come from one explanation per step. Returns ``({method: {metric: value}},
    steps)``: the mean Spearman correlation with the trained model's maps once the top step is
    random and once every step is, and the SSIM then (lower: the map depends on the weights).
    The model is restored afterwards.
    """
    def both(m: nn.Module) -> Tensor:
        maps = explain(m)
        return torch.cat([maps[method] for method in METHODS_COMPARED])

    result = metrics.model_randomisation(model, both, layers=layers, seed=seed)
    n = result.original.shape[0] // len(METHODS_COMPARED)
    results = {}
    for i, method in enumerate(METHODS_COMPARED):
        spearman = result.spearman[:, i * n : (i + 1) * n].mean(dim=1)
        ssim = result.ssim[:, i * n : (i + 1) * n].mean(dim=1)
        results[method] = {
            "Sanity: Spearman with the trained maps, top layer random (lower is better)": float(spearman[0]),
            "Sanity: Spearman with the trained maps, all layers random (lower is better)": float(spearman[-1]),
            "Sanity: SSIM with the trained maps, all layers random (lower is better)": float(ssim[-1]),
        }
    return results, len(result.layers)


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


def evaluate_classification(model: torch.nn.Module, n: int, seed: int, device: torch.device | str = "cpu", *,
                            road_samples: int = 0, sanity: bool = False,
                            pointing_tolerance: float = 0.0) -> dict[str, dict[str, float]]:
    """Metrics of Grad-CAM++ and Grad-CAM for the shipped scene classifier on ``make_scenes(n, seed)``.

    Each scene is explained for its highest-scoring class that is present. Returns
    ``{method: {metric: value}}``: Average Drop / Increase in Confidence / Win % (sigmoid
    confidences, eq. 25 explanation input), Loc(delta), pointing game (sample and class mean; the
    class mean also within ``pointing_tolerance`` px when > 0), energy inside the class's pixels and the share of the class's instances the map covers; ROAD
    on the first ``road_samples`` scenes (0: none) and, with ``sanity``, the cascading
    randomisation test (what ``multiexplain evaluate`` adds; the demo leaves them out for time).
    """
    held_out = make_scenes(n, seed)
    inputs = held_out.images.to(device)
    with torch.no_grad():
        logits = model(inputs)
    present = held_out.labels.to(device) > 0
    targets = torch.where(present, logits, torch.full_like(logits, -torch.inf)).argmax(dim=1)

    def explain(m: nn.Module) -> dict[str, Tensor]:
        return _concat([explain_images(m, inputs[b], methods=METHODS_COMPARED, targets=targets[b]) for b in _batches(n, 128)])

    maps = explain(model)
    masks = held_out.class_masks.to(device)[torch.arange(n, device=device), targets]
    instances = held_out.instances_of(targets.cpu()).to(device)
    coverage = {m: {"Instances covered % (higher is better)": 100 * float(metrics.multi_instance_coverage(maps[m], instances)[0].mean())}
                for m in METHOD_NAMES}
    parts = [faithfulness_metrics(model, inputs, maps, targets, "sigmoid")]
    if road_samples > 0:
        k = min(n, road_samples)
        parts.append(road_metrics(model, inputs[:k], {m: v[:k] for m, v in maps.items()}, targets[:k], "sigmoid"))
    if sanity:
        parts.append(randomisation_metrics(model, explain)[0])
    return _merge(*parts, localisation_metrics(maps, masks, targets, pointing_tolerance), coverage)


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
                   batch_size: int = 16, *, road_samples: int = 0, sanity: bool = False,
                   pointing_tolerance: float = 0.0) -> dict[str, dict[str, float]]:
    """Metrics of Grad-CAM++ and Grad-CAM for the shipped C3D on ``make_action_clips(n, seed)``.

    Each clip is explained for its true action. Returns ``{method: {metric: value}}``: Average
    Drop / Increase in Confidence / Win % (softmax confidences, the explanation input is the map
    times the clip voxel by voxel), space-time Loc(delta), pointing game and energy on the
    actor's pixels in every frame (the pointing game also as a class mean over the actions, and
    within ``pointing_tolerance`` voxels when > 0), the share of the map's energy in the frames
    where the action happens; space-time ROAD (:data:`VIDEO_ROAD_FRACTIONS`) on the first ``road_samples`` clips
    (0: none) and, with ``sanity``, the cascading randomisation test.
    """
    held_out = make_action_clips(n, seed)
    inputs, targets = held_out.clips.to(device), held_out.labels.to(device)

    def explain(m: nn.Module) -> dict[str, Tensor]:
        return _concat([explain_clip(m, inputs[b], targets[b], methods=METHODS_COMPARED) for b in _batches(n, batch_size)])

    maps = explain(model)
    masks = held_out.masks.to(device)
    frames = held_out.active.to(device)[:, :, None, None].expand_as(masks)
    temporal = {m: {"Energy in the action frames % (higher is better)": 100 * float(metrics.energy_pointing_game(maps[m], frames).mean())}
                for m in METHOD_NAMES}
    parts = [faithfulness_metrics(model, inputs, maps, targets, "softmax")]
    if road_samples > 0:
        k = min(n, road_samples)
        parts.append(road_metrics(model, inputs[:k], {m: v[:k] for m, v in maps.items()}, targets[:k], "softmax",
                                  fractions=VIDEO_ROAD_FRACTIONS, batch_size=8))
    if sanity:
        parts.append(randomisation_metrics(model, explain)[0])
    return _merge(*parts, localisation_metrics(maps, masks, targets, pointing_tolerance), temporal)
