"""Explain the shipped multi-label scene classifier on generated scenes and write a figure.

    python examples/classify_scenes.py                      # -> classify_scenes.png
    python examples/classify_scenes.py --out fig.png --seed 5 --scenes 3

For every scene it explains each label the model predicts (``multi_label=True``: K maps from one
forward pass) with Grad-CAM++ and with Grad-CAM, so the two can be compared on scenes that hold
several instances of one class. The same two lines work for any torchvision / Hugging Face
classifier; with internet access, e.g.::

    model = load_classifier("resnet50", weights="DEFAULT")          # torchvision, ImageNet weights
    explanation = explain_images(model, batch, topk=3)              # batch: (N, 3, 224, 224) normalised

(``load_classifier("google/vit-base-patch16-224")`` for a Hugging Face model, or a local
``save_pretrained`` directory; ``load_classifier("resnet50", checkpoint="resnet50.pt")`` offline.)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from multiexplain.adapters.classification import explain_images
from multiexplain.data import make_scenes
from multiexplain.models import load_scene_classifier
from multiexplain.viz import save_overlay_grid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("classify_scenes.png"))
    parser.add_argument("--seed", type=int, default=2)
    parser.add_argument("--scenes", type=int, default=2, help="scenes with a repeated class to show")
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = load_scene_classifier()
    pool = make_scenes(64, seed=args.seed)
    # Prefer scenes where one class appears more than once: the multi-instance case.
    repeated = (pool.instance_counts().max(dim=1).values >= 2).nonzero().flatten()[: args.scenes]
    scenes = pool[repeated]
    # Both methods from one forward pass, for every label the model predicts.
    both = explain_images(model, scenes.images, multi_label=True, methods=("gradcam++", "gradcam"))
    plus, plain = both["gradcam++"], both["gradcam"]

    written = []
    for i in range(len(scenes)):
        heatmaps, titles = [], []
        counts = scenes.instance_counts()[i]
        for slot, target in enumerate(plus.targets[i].tolist()):
            if target < 0:  # padding: this scene has fewer positive labels than the batch's maximum
                continue
            label = f"{model.labels[target]} x{int(counts[target])}"
            heatmaps += [plus.maps[i, slot], plain.maps[i, slot]]
            titles += [f"Grad-CAM++: {label}", f"Grad-CAM: {label}"]
        path = args.out if len(scenes) == 1 else args.out.with_name(f"{args.out.stem}_{i}{args.out.suffix}")
        written.append(save_overlay_grid(
            path, scenes.images[i], heatmaps, titles, ncols=5,
            suptitle="Shipped SceneCNN, every predicted label (xN = instances of that class)",
        ))
    print("\n".join(written))


if __name__ == "__main__":
    main()
