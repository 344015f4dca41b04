"""Speed of one explanation vs a plain forward, ours and the peers side by side in one run.

torchvision resnet50 (random weights), batch 8, 224x224, CPU, layer4. Every method is timed
round-robin (one call of each per round, so machine noise hits all of them alike) and the
median is reported as a ratio to the plain forward pass. Absolute times mean little here.

    python benchmarks/speed_classification.py [--rounds 5] [--batch 8] [--size 224] [--threads 2]

Writes ``benchmarks/results/speed_classification.json`` and ``.md`` (whole files, every run), with the
machine's load average before and after: one run on a shared machine is noisy, so read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
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
    parser.add_argument("--out", type=Path, default=RESULTS, help="results stem (.json and .md are written)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = torchvision.models.resnet50().eval().to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    targets = [int(t) for t in torch.randint(0, 1000, (args.batch,))]
    methods = build_methods(model, x, targets, args.k)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    load_before = os.getloadavg()
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
    results = {
        "model": "torchvision resnet50 (random weights), layer4", "device": str(device), "batch": args.batch,
        "size": args.size, "threads": args.threads, "rounds": args.rounds, "k": args.k,
        "load_average_before": list(load_before), "load_average_after": list(os.getloadavg()),
        "median_seconds": medians, "ratio_to_forward": {name: value / medians[FORWARD] for name, value in medians.items()},
        "targets": targets_met(medians, args.k),
        "environment": {"torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()},
    }
    markdown = render(results)
    print(markdown)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown + "\n")
    print(f"wrote {args.out.with_suffix('.md')}")


FORWARD = "plain forward (no_grad)"
OURS = "multiexplain GradCAMPlusPlus"
PEER = "pytorch-grad-cam GradCAMPlusPlus"
RESULTS = Path(__file__).resolve().parent / "results" / "speed_classification"


def targets_met(medians: dict[str, float], k: int) -> dict[str, dict[str, float | bool]]:
    """The issue's targets, each as ``{"value", "target", "met"}``: ours <= 1.3x a forward, pytorch-grad-cam
    >= 2.5x ours, K targets <= 2x one target."""
    ours = medians[OURS]
    checks = {"ours / forward": (ours / medians[FORWARD], 1.3, "<="),
              f"K={k} targets / 1 target": (medians[f"{OURS}, K={k} targets"] / ours, 2.0, "<=")}
    if PEER in medians:
        checks["pytorch-grad-cam / ours"] = (medians[PEER] / ours, 2.5, ">=")
    return {name: {"value": value, "target": target, "met": value <= target if op == "<=" else value >= target,
                   "rule": op} for name, (value, target, op) in checks.items()}


def render(results: dict) -> str:
    ratios, medians = results["ratio_to_forward"], results["median_seconds"]
    ours = medians[OURS]
    load = results["load_average_before"][0], results["load_average_after"][0]
    lines = [
        "# Speed: one explanation vs a plain forward (classification)",
        "",
        f"{results['model']}, batch {results['batch']}, {results['size']}x{results['size']}, {results['device']}, "
        f"{results['threads']} torch threads; median of {results['rounds']} round-robin rounds (one call of every "
        f"method per round). One run on a shared machine (load average {load[0]:.2f} before, {load[1]:.2f} after): "
        "absolute times depend on the load, read the ratios.",
        "",
        "| method | median s | x plain forward | x ours |",
        "|---|---|---|---|",
    ]
    for name, value in medians.items():
        lines.append(f"| {name} | {value:.3f} | {ratios[name]:.2f} | {value / ours:.2f} |")
    lines += ["", "| target | value | rule | met |", "|---|---|---|---|"]
    for name, check in results["targets"].items():
        lines.append(f"| {name} | {check['value']:.2f} | {check['rule']} {check['target']} | {'yes' if check['met'] else 'no'} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
