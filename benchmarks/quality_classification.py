"""Grad-CAM vs Grad-CAM++ on held-out generated scenes with exact masks (the shipped SceneCNN).

    python benchmarks/quality_classification.py            # 600 scenes (ROAD on 200), ~10-15 minutes on 2 cores
    python benchmarks/quality_classification.py --scenes 100 --steps 8 --road-pairs 32   # quick look

Each scene is explained for one class, the present class (that the model predicts, sigmoid >= 0.5)
with the most instances, so scenes with repeated shapes are explained for the repeated class
(``--every-label``: every present, predicted class). Both methods explain it at the model's
``features`` layer (16x16 for 64x64 inputs); maps are upsampled bilinearly
and min-max normalised. Metrics (multiexplain.metrics):

* Average Drop %, % Increase in Confidence, Win % (paper section 4, eq. 25): confidence is the
  class's sigmoid (the model is multi-label); Win compares the signed relative fall ``(Y - O) / Y``,
  ties counted half, so the two methods' Win add to 100 as in the paper's tables.
* Loc(delta) at 0 / 0.25 / 0.5 (eq. 26) against the class's exact mask (the paper used boxes).
* Pointing game, energy-based pointing game, deletion AUC (black baseline) and insertion AUC
  (from a blurred image), ``--steps`` steps.
* Multi-instance coverage: share of the class's instances whose mask holds at least 50% of the
  map's peak, averaged over pairs with >= 2 instances of the class.
* Pointing game as Zhang et al. (2016) report it: the class mean (each class's hit rate, averaged
  over the 6 classes), exactly and at 2 px (their 15 px on VOC/COCO images is 2-4% of a side; 2 px
  is 3% of ours).
* ROAD (Rong et al. 2022, no retraining) on the first ``--road-pairs`` pairs: the class's sigmoid
  after the most (MoRF) / least (LeRF) relevant 10%, ..., 90% of the pixels are removed and filled
  by noisy linear imputation (noise 0.01, pixels in [0, 1]), averaged over the fractions, and
  (LeRF - MoRF) / 2.
* Sanity check (Adebayo et al. 2018): cascading randomisation of the model's 13 parameterised
  layers from the classifier down (each layer's default initialisation, seeded); the Spearman rank
  correlation and SSIM of each pair's map with the trained model's, once the classifier is random
  and once every layer is (lower: the map depends on the weights, as it should).

Writes benchmarks/results/classification.md and .json. The paper's VGG-16 numbers are printed
beside ours for orientation only: they are on ImageNet / VOC with a different model and data.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from multiexplain import metrics
from multiexplain.adapters.classification import explain_images
from multiexplain.data.scenes import Scenes, make_scenes
from multiexplain.models import load_scene_classifier

BENCHMARK_STREAM = 2  # training uses stream 0, the training script's held-out split stream 1
RESULTS = Path(__file__).resolve().parent / "results" / "classification"
METHODS = ("gradcam++", "gradcam")

# docs/GRADCAMPP.md: ImageNet val, VGG-16 (Avg Drop / Incr. Conf. / Win) and VOC12 mLoc.
PAPER = {
    "gradcam++": {"average_drop": 36.84, "increase_in_confidence": 17.05, "win": 70.72, "loc_0": 0.34, "loc_0.25": 0.38, "loc_0.5": 0.28},
    "gradcam": {"average_drop": 46.56, "increase_in_confidence": 13.42, "win": 29.28, "loc_0": 0.33, "loc_0.25": 0.28, "loc_0.5": 0.16},
}

ROWS = [
    # key, label, better, decimals
    ("average_drop", "Average Drop % (lower better)", "lower", 2),
    ("increase_in_confidence", "% Increase in Confidence (higher better)", "higher", 2),
    ("win", "Win % (higher better)", "higher", 2),
    ("loc_0", "Loc(0) (higher better)", "higher", 3),
    ("loc_0.25", "Loc(0.25) (higher better)", "higher", 3),
    ("loc_0.5", "Loc(0.5) (higher better)", "higher", 3),
    ("pointing_game", "Pointing game % (higher better)", "higher", 2),
    ("pointing_game_4px", "Pointing game %, 4 px tolerance (higher better)", "higher", 2),
    ("energy_pointing_game", "Energy pointing game (higher better)", "higher", 3),
    ("deletion_auc", "Deletion AUC (lower better)", "lower", 3),
    ("insertion_auc", "Insertion AUC (higher better)", "higher", 3),
    ("multi_instance_coverage", "Multi-instance coverage, >= 2 instances (higher better)", "higher", 3),
    ("pointing_game_class_mean", "Pointing game %, class mean (higher better)", "higher", 2),
    ("pointing_game_2px_class_mean", "Pointing game %, class mean, 2 px (Zhang et al.'s 15 px scaled) (higher better)", "higher", 2),
    ("road_morf", "ROAD MoRF sigmoid, mean over 10-90% removed (lower better)", "lower", 3),
    ("road_lerf", "ROAD LeRF sigmoid, mean over 10-90% removed (higher better)", "higher", 3),
    ("road_combined", "ROAD (LeRF - MoRF) / 2 (higher better)", "higher", 3),
    ("sanity_spearman_top", "Sanity: Spearman with trained maps, classifier random (lower better)", "lower", 3),
    ("sanity_spearman_all", "Sanity: Spearman with trained maps, all layers random (lower better)", "lower", 3),
    ("sanity_ssim_all", "Sanity: SSIM with trained maps, all layers random (lower better)", "lower", 3),
]
CLASS_MEANS = {"pointing_game_class_mean": "pointing_game", "pointing_game_2px_class_mean": "pointing_game_2px"}
ROAD_KEYS = ("road_morf", "road_lerf", "road_combined")
SANITY_KEYS = ("sanity_spearman_top", "sanity_spearman_all", "sanity_ssim_all")


def explained_pairs(model: torch.nn.Module, scenes: Scenes, every_label: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scene index (M,), class (M,))`` to explain.

    Default: one class per scene, the present-and-predicted class with the most instances (ties:
    the higher logit), so multi-instance scenes are explained for their repeated class. With
    ``every_label`` every present class the model also predicts (about 2.2 pairs per scene).
    Scenes where the model predicts none of the present classes are skipped.
    """
    with torch.no_grad():
        logits = model(scenes.images)
    hits = (logits.sigmoid() >= 0.5) & scenes.labels.bool()
    if every_label:
        pairs = hits.nonzero()
        return pairs[:, 0], pairs[:, 1]
    # Instance count dominates, the logit (squashed into (0, 1)) only breaks ties.
    priority = scenes.instance_counts().double() + logits.double().sigmoid() * 0.5
    priority = torch.where(hits, priority, torch.full_like(priority, -1.0))
    best = priority.argmax(dim=1)
    keep = hits.any(dim=1)
    return keep.nonzero().flatten(), best[keep]


def explain_pairs(model: torch.nn.Module, images: torch.Tensor, classes: torch.Tensor, batch_size: int,
                  shape: dict[str, dict[str, float]] | None = None) -> dict[str, torch.Tensor]:
    """Both methods' maps ``{method: (M, H, W)}``, from one forward pass per batch. ``shape``, when
    given, receives why the maps differ: the share of layer-resolution cells a map is > 0 on and of
    negative channel weights, per method."""
    batches = [explain_images(model, images[s : s + batch_size], methods=METHODS, targets=classes[s : s + batch_size].tolist())
               for s in range(0, images.shape[0], batch_size)]
    if shape is not None and batches:
        for m in METHODS:
            shape[m] = {"map_positive_%": 100 * _mean(torch.cat([(b[m].raw > 0).flatten() for b in batches]).double()),
                        "negative_weights_%": 100 * _mean(torch.cat([(b[m].weights < 0).flatten() for b in batches]).double())}
    return {m: torch.cat([b[m].maps for b in batches]) if batches else torch.zeros(0, *images.shape[2:]) for m in METHODS}


def road_values(model: torch.nn.Module, images: torch.Tensor, maps: dict[str, torch.Tensor], classes: torch.Tensor,
                batch_size: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, dict[str, list[float]]]]:
    """ROAD per pair (MoRF mean, LeRF mean, combined) and the mean curves, for both methods."""
    per_pair, curves = {}, {}
    for method in METHODS:
        road = metrics.road(model, images, maps[method], classes, score="sigmoid", batch_size=batch_size)
        per_pair[method] = {"road_morf": road.morf_mean(), "road_lerf": road.lerf_mean(), "road_combined": road.combined()}
        curves[method] = {"fractions": list(road.fractions), "morf": road.morf.mean(0).tolist(), "lerf": road.lerf.mean(0).tolist()}
    return per_pair, curves


def sanity_values(model: torch.nn.Module, images: torch.Tensor, classes: torch.Tensor,
                  batch_size: int) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, Any]]:
    """The cascading randomisation test per pair and its per-layer means, both methods' maps from
    one explanation per randomisation step (stacked, then split)."""
    result = metrics.model_randomisation(
        model, lambda m: torch.cat(list(explain_pairs(m, images, classes, batch_size).values())), seed=0)
    n = images.shape[0]
    per_pair, curves = {}, {"layers": list(result.layers)}
    for i, method in enumerate(METHODS):
        spearman, ssim = result.spearman[:, i * n : (i + 1) * n], result.ssim[:, i * n : (i + 1) * n]
        per_pair[method] = {"sanity_spearman_top": spearman[0], "sanity_spearman_all": spearman[-1], "sanity_ssim_all": ssim[-1]}
        curves[method] = {"spearman": spearman.mean(1).tolist(), "ssim": ssim.mean(1).tolist()}
    return per_pair, curves


def evaluate(
    model: torch.nn.Module, scenes: Scenes, *, steps: int = 12, batch_size: int = 128, every_label: bool = False,
    road_pairs: int = 200,
) -> dict[str, Any]:
    """All metrics for both methods on the explained pairs of ``scenes`` (:func:`explained_pairs`);
    ROAD on the first ``road_pairs`` of them."""
    started = time.time()
    index, classes = explained_pairs(model, scenes, every_label)
    images = scenes.images[index]
    masks = scenes.class_masks[index, classes]
    instances = scenes[index].instances_of(classes)
    per_method: dict[str, dict[str, torch.Tensor]] = {}
    shape: dict[str, dict[str, float]] = {}
    all_maps = explain_pairs(model, images, classes, batch_size, shape)
    road_count = min(road_pairs, images.shape[0])
    road, road_curves = road_values(model, images[:road_count], {m: v[:road_count] for m, v in all_maps.items()},
                                    classes[:road_count], batch_size=64)
    sanity, sanity_curves = sanity_values(model, images, classes, batch_size)
    for method in METHODS:
        maps = all_maps[method]
        full, explained = metrics.confidences(model, images, maps, classes, score="sigmoid", batch_size=batch_size)
        coverage, count = metrics.multi_instance_coverage(maps, instances)
        per_method[method] = {
            "drop": metrics.per_sample_drop(full, explained),
            "signed_drop": metrics.per_sample_drop(full, explained, clip=False),
            "full": full,
            "explained": explained,
            "loc_0": metrics.localization(maps, masks, 0.0),
            "loc_0.25": metrics.localization(maps, masks, 0.25),
            "loc_0.5": metrics.localization(maps, masks, 0.5),
            "pointing_game": metrics.pointing_game(maps, masks).double() * 100,
            # One feature-map cell is 4 pixels: a peak that close to the shape (a ring's hole, a cross's notch) counts.
            "pointing_game_4px": metrics.pointing_game(maps, masks, tolerance=4).double() * 100,
            "pointing_game_2px": metrics.pointing_game(maps, masks, tolerance=2).double() * 100,
            "energy_pointing_game": metrics.energy_pointing_game(maps, masks),
            "deletion_auc": metrics.deletion_auc(model, images, maps, classes, steps=steps, score="sigmoid", baseline="zero", batch_size=batch_size),
            "insertion_auc": metrics.insertion_auc(model, images, maps, classes, steps=steps, score="sigmoid", baseline="blur", batch_size=batch_size),
            "coverage": coverage,
            "instances": count,
            **road[method],
            **sanity[method],
        }
    with torch.no_grad():
        predicted = model(scenes.images).sigmoid() >= 0.5
    accuracy = 100 * float((predicted == scenes.labels.bool()).double().mean())
    methods: dict[str, dict[str, float]] = {}
    for method, other in zip(METHODS, reversed(METHODS)):
        values = per_method[method]
        multi = values["instances"] >= 2
        methods[method] = {
            "average_drop": metrics.average_drop(values["full"], values["explained"]),
            "increase_in_confidence": metrics.increase_in_confidence(values["full"], values["explained"]),
            "win": metrics.win_percent(values["signed_drop"], per_method[other]["signed_drop"]),
            **{key: _mean(values[key]) for key in AVERAGED},
            "multi_instance_coverage": _mean(values["coverage"][multi]),
            **{key: metrics.class_mean(values[source], classes) for key, source in CLASS_MEANS.items()},
        }
    multi_pairs = int((per_method[METHODS[0]]["instances"] >= 2).sum())
    return {
        "paired_difference": _paired_differences(per_method, classes),
        "scenes": len(scenes),
        "pairs": int(index.numel()),
        "multi_instance_pairs": multi_pairs,
        "steps": steps,
        "pairs_per_scene": "every predicted present class" if every_label else "the present class with most instances",
        "layer": "features",
        "road_pairs": road_count,
        "road_curves": road_curves,
        "sanity_curves": sanity_curves,
        "seconds": round(time.time() - started, 1),
        "methods": methods,
        "map_shape": shape,
        "model_per_label_accuracy_%": accuracy,
        "paper_vgg16": PAPER,
    }


def _paired_differences(per_method: dict[str, dict[str, torch.Tensor]], classes: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per metric: mean of the per-pair difference Grad-CAM++ minus Grad-CAM and its standard error
    (both methods explain the same pairs, so the paired error is the honest yardstick). Win % is
    itself a comparison: its standard error is the binomial one around 50%. A class mean's
    difference is the class mean of the differences, its error that of a mean of class means."""
    plus, plain = per_method["gradcam++"], per_method["gradcam"]
    multi = plus["instances"] >= 2
    per_pair = {
        "average_drop": (plus["drop"], plain["drop"]),
        "increase_in_confidence": ((plus["explained"] > plus["full"]).double() * 100, (plain["explained"] > plain["full"]).double() * 100),
        **{key: (plus[key], plain[key]) for key in AVERAGED},
        "multi_instance_coverage": (plus["coverage"][multi], plain["coverage"][multi]),
    }
    differences = {}
    for key, (a, b) in per_pair.items():
        diff = a.double() - b.double()
        n = diff.numel()
        se = float(diff.std() / n**0.5) if n > 1 else 0.0
        differences[key] = {"mean": _mean(diff), "se": se}
    for key, source in CLASS_MEANS.items():
        diff = plus[source].double() - plain[source].double()
        errors = []
        for label in classes.unique():
            part = diff[classes == label]
            errors.append(float(part.std() / part.numel() ** 0.5) if part.numel() > 1 else 0.0)
        se = (sum(e * e for e in errors) ** 0.5) / len(errors) if errors else 0.0
        differences[key] = {"mean": metrics.class_mean(diff, classes), "se": se}
    n = plus["signed_drop"].numel()
    wins = metrics.win_percent(plus["signed_drop"], plain["signed_drop"])
    differences["win"] = {"mean": wins - 50.0, "se": 50.0 / n**0.5 if n else 0.0}
    return differences


AVERAGED = (
    "loc_0", "loc_0.25", "loc_0.5", "pointing_game", "pointing_game_4px", "energy_pointing_game",
    "deletion_auc", "insertion_auc", *ROAD_KEYS, *SANITY_KEYS,
)


def _mean(values: torch.Tensor) -> float:
    return float(values.double().mean()) if values.numel() else 0.0


def render(results: dict[str, Any]) -> str:
    """The Markdown table: ours side by side, the ratio, the winner, and the paper's numbers."""
    ours_pp, ours_gc = results["methods"]["gradcam++"], results["methods"]["gradcam"]
    lines = [
        f"Shipped SceneCNN, {results['scenes']} held-out generated scenes (stream {BENCHMARK_STREAM}), "
        f"{results['pairs']} explained (scene, class) pairs ({results['pairs_per_scene']}), "
        f"{results['multi_instance_pairs']} with >= 2 instances "
        f"of the class; layer `{results['layer']}`; deletion/insertion with {results['steps']} steps.",
        "",
        "| metric | ours Grad-CAM++ | ours Grad-CAM | ratio GC++/GC | GC++ - GC (± s.e.) | better here (paired) "
        "| paper GC++ (VGG-16, ImageNet/VOC) | paper GC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, label, better, decimals in ROWS:
        a, b = ours_pp[key], ours_gc[key]
        ratio = f"{a / b:.2f}" if b else "-"
        difference = results.get("paired_difference", {}).get(key)
        if a == b or (difference is not None and abs(difference["mean"]) <= 2 * difference["se"]):
            winner = "tie (within 2 s.e.)"
        else:
            winner = "Grad-CAM++" if (a < b) == (better == "lower") else "Grad-CAM"
        paper_a = results["paper_vgg16"]["gradcam++"].get(key)
        paper_b = results["paper_vgg16"]["gradcam"].get(key)
        paper = (f"{paper_a}", f"{paper_b}") if paper_a is not None else ("-", "-")
        spread = f"{difference['mean']:+.{decimals}f} ± {difference['se']:.{decimals}f}" if difference else "-"
        lines.append(f"| {label} | {a:.{decimals}f} | {b:.{decimals}f} | {ratio} | {spread} | {winner} | {paper[0]} | {paper[1]} |")
    shape = results.get("map_shape")
    if shape:
        lines += [
            "",
            f"Model: {results['model_per_label_accuracy_%']:.1f}% per-label accuracy (sigmoid >= 0.5) on these scenes. "
            "Map shape at the layer (all explained pairs):",
            "",
            "| | Grad-CAM++ | Grad-CAM |",
            "|---|---|---|",
            f"| cells where the map is > 0 % | {shape['gradcam++']['map_positive_%']:.1f} | {shape['gradcam']['map_positive_%']:.1f} |",
            f"| negative channel weights % | {shape['gradcam++']['negative_weights_%']:.1f} | {shape['gradcam']['negative_weights_%']:.1f} |",
        ]
    lines += [
        "",
        "'better here' names a method only where the mean per-pair difference exceeds twice its standard "
        "error (Win %: its distance from 50% exceeds twice the binomial standard error; the difference column "
        "then shows Win - 50).",
        "Paper columns: Average Drop / Increase / Win are ImageNet val with VGG-16, Loc is VOC12 mLoc "
        "(docs/GRADCAMPP.md). They are different data and models: a reference point, not comparable.",
        f"ROAD rows: the first {results['road_pairs']} pairs; sanity rows: all {results['pairs']} pairs.",
        "",
        *render_road(results),
        "",
        *render_sanity(results),
    ]
    return "\n".join(lines)


def render_road(results: dict[str, Any]) -> list[str]:
    """The mean ROAD curves, one row per removed fraction."""
    curves = results["road_curves"]
    lines = [f"ROAD curves (mean sigmoid of the explained class, {results['road_pairs']} pairs):", "",
             "| removed | MoRF GC++ | MoRF GC | LeRF GC++ | LeRF GC |", "|---|---|---|---|---|"]
    plus, plain = curves["gradcam++"], curves["gradcam"]
    for i, fraction in enumerate(plus["fractions"]):
        lines.append(f"| {100 * fraction:.0f}% | {plus['morf'][i]:.3f} | {plain['morf'][i]:.3f} | "
                     f"{plus['lerf'][i]:.3f} | {plain['lerf'][i]:.3f} |")
    return lines


def render_sanity(results: dict[str, Any]) -> list[str]:
    """The cascading randomisation, one row per step (the layers randomised so far, top first)."""
    curves = results["sanity_curves"]
    lines = ["Cascading randomisation (mean over pairs; each row randomises one more layer, from the top):", "",
             "| randomised down to | Spearman GC++ | Spearman GC | SSIM GC++ | SSIM GC |", "|---|---|---|---|---|"]
    plus, plain = curves["gradcam++"], curves["gradcam"]
    for i, layer in enumerate(curves["layers"]):
        lines.append(f"| `{layer}` | {plus['spearman'][i]:.3f} | {plain['spearman'][i]:.3f} | "
                     f"{plus['ssim'][i]:.3f} | {plain['ssim'][i]:.3f} |")
    return lines


def write_results(results: dict[str, Any], stem: Path = RESULTS) -> Path:
    """Write ``stem.md`` and ``stem.json``; returns the Markdown path."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    markdown = stem.with_suffix(".md")
    markdown.write_text("# Classification quality: Grad-CAM++ vs Grad-CAM\n\n" + render(results) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    return markdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenes", type=int, default=600)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every-label", action="store_true", help="explain every predicted present class, not one per scene")
    parser.add_argument("--road-pairs", type=int, default=200, help="ROAD on the first this many pairs (default %(default)s)")
    parser.add_argument("--seed", type=int, default=BENCHMARK_STREAM)
    parser.add_argument("--threads", type=int, default=1, help="1 is as fast as 2 on a busy shared machine")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_scene_classifier()
    results = evaluate(model, make_scenes(args.scenes, seed=args.seed), steps=args.steps, every_label=args.every_label,
                       road_pairs=args.road_pairs)
    results["environment"] = {"torch": torch.__version__, "python": platform.python_version(), "threads": args.threads}
    print(render(results))
    print(f"\nwrote {write_results(results, args.out)} ({results['seconds']} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
