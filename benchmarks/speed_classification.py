"""Speed of one explanation vs a plain forward, ours and the peers side by side in one run.

torchvision resnet50 (random weights), batch 8, 224x224, CPU, layer4. Every method is timed
round-robin (one call of each per round, so machine noise hits all of them alike) and the
median is reported as a ratio to the plain forward pass. Absolute times mean little here.

    python benchmarks/speed_classification.py [--rounds 5] [--batch 8] [--size 224] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torchvision

from multiexplain import GradCAMPlusPlus

warnings.filterwarnings("ignore")


def build_methods(model: torch.nn.Module, x: torch.Tensor, targets: list[int], k: int) -> dict[str, Callable[[], object]]:
    layer = model.layer4
    methods: dict[str, Callable[[], object]] = {}

    def plain_forward():
        with torch.no_grad():
            return model(x)

    methods["plain forward (no_grad)"] = plain_forward
    ours = GradCAMPlusPlus(model, "layer4")
    methods["multiexplain GradCAMPlusPlus"] = lambda: ours(x, targets)
    multi = [[(t + j) % 1000 for j in range(k)] for t in targets]
    methods[f"multiexplain GradCAMPlusPlus, K={k} targets"] = lambda: ours(x, multi)

    try:
        from pytorch_grad_cam import GradCAMPlusPlus as PeerGradCAMPlusPlus
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        peer = PeerGradCAMPlusPlus(model=model, target_layers=[layer])
        peer_targets = [ClassifierOutputTarget(t) for t in targets]
        methods["pytorch-grad-cam GradCAMPlusPlus"] = lambda: peer(input_tensor=x, targets=peer_targets)
    except ImportError:
        print("pytorch-grad-cam not installed: pip install -e .[bench]")
    try:
        from torchcam.methods import GradCAMpp

        def torchcam_run():
            extractor = GradCAMpp(model, target_layer="layer4", enable_hooks=True)
            try:
                scores = model(x)
                return extractor(class_idx=targets, scores=scores)
            finally:
                extractor.remove_hooks()
                model.zero_grad(set_to_none=True)

        methods["torchcam GradCAMpp"] = torchcam_run
    except ImportError:
        print("torchcam not installed: pip install -e .[bench]")
    try:
        from captum.attr import LayerGradCam

        captum = LayerGradCam(model, layer)
        methods["captum LayerGradCam (Grad-CAM)"] = lambda: captum.attribute(x, target=targets)
    except ImportError:
        print("captum not installed: pip install -e .[bench]")
    return methods


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the ratios here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = torchvision.models.resnet50().eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    targets = [int(t) for t in torch.randint(0, 1000, (args.batch,))]
    methods = build_methods(model, x, targets, args.k)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for run in methods.values():  # warm-up
        run()
    times: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(args.rounds):
        for name, run in methods.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["plain forward (no_grad)"]
    ours = medians["multiexplain GradCAMPlusPlus"]
    print(f"resnet50, batch {args.batch}, {args.size}x{args.size}, {device}, {args.threads} threads, median of {args.rounds} rounds")
    print(f"{'method':45s} {'median s':>9s} {'x forward':>10s} {'x ours':>8s}")
    for name, value in medians.items():
        print(f"{name:45s} {value:9.3f} {value / base:10.2f} {value / ours:8.2f}")
    k_ratio = medians[f"multiexplain GradCAMPlusPlus, K={args.k} targets"] / ours
    print(f"\nours / forward = {ours / base:.2f} (target <= 1.3)")
    if "pytorch-grad-cam GradCAMPlusPlus" in medians:
        print(f"pytorch-grad-cam / ours = {medians['pytorch-grad-cam GradCAMPlusPlus'] / ours:.2f} (target >= 2.5)")
    print(f"K={args.k} targets / 1 target = {k_ratio:.2f} (target <= 2)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": str(device), "batch": args.batch, "size": args.size,
                                         "median_seconds": medians, "ratio_to_forward": {n: v / base for n, v in medians.items()}}, indent=2))


if __name__ == "__main__":
    main()
