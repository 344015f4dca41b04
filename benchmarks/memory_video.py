"""Peak memory of a space-time explanation vs plain inference (torchvision r3d_18, CPU).

Each measurement runs in a fresh subprocess: build r3d_18 (random weights, eval mode) and a
batch of 4 clips of 16 x 112 x 112, read the resident set size, run one thing, and report the
peak resident set size (``resource.getrusage(...).ru_maxrss``) minus the size before it: the
memory the step itself needed. Steps:

* inference: ``model(x)`` under ``torch.no_grad()``;
* ours: ``explain_clip(model, x)`` (Grad-CAM++ at ``layer4``; nothing below the layer records a graph);
* ours, per-slice weights;
* pytorch-grad-cam ``GradCAMPlusPlus`` at ``layer4`` (its forward records the whole graph);
* inference with autograd on (the graph of a training step's forward, for scale).

Run: ``python benchmarks/memory_video.py``. Writes the "memory" section of
benchmarks/results/video.md and video.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

CHILD = r"""
import json, resource, sys, torch, torchvision
torch.set_num_threads(2)
torch.manual_seed(0)
step = sys.argv[1]
model = torchvision.models.video.r3d_18(num_classes=400).eval()
x = torch.rand(4, 3, 16, 112, 112)
if step.startswith("ours"):
    from multiexplain.adapters.video import explain_clip
elif step == "pytorch-grad-cam":
    from pytorch_grad_cam import GradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    cam = GradCAMPlusPlus(model, target_layers=[model.layer4])
def rss_kib():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
before = rss_kib()
# ru_maxrss is the process's lifetime peak: the step must push it above 'before' to count,
# which it does since every step allocates at least the first conv's output (4x64x16x56x56 floats).
if step == "inference":
    with torch.no_grad():
        model(x)
elif step == "inference-with-grad":
    model(x).sum()
elif step == "ours":
    explain_clip(model, x)
elif step == "ours-per-slice":
    explain_clip(model, x, per_slice=True)
elif step == "pytorch-grad-cam":
    cam(x, targets=[ClassifierOutputTarget(0)] * 4)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"step": step, "before_mib": before / 1024, "peak_mib": peak / 1024, "step_mib": (peak - before) / 1024}))
"""

STEPS = ["inference", "ours", "ours-per-slice", "pytorch-grad-cam", "inference-with-grad"]


def measure(step: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, step], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    rows = {}
    for step in STEPS:
        rows[step] = measure(step)
        print(rows[step], flush=True)
    base = rows["inference"]["step_mib"]
    lines = [
        "## Peak memory: r3d_18, batch 4 x 16 x 112 x 112, CPU",
        "",
        "Peak RSS of the step minus RSS before it (fresh subprocess each; model and clips already built).",
        "",
        "| step | step peak MiB | ratio vs inference | process peak MiB |",
        "|---|---|---|---|",
    ]
    for step, r in rows.items():
        lines.append(f"| {step} | {r['step_mib']:.0f} | {r['step_mib'] / base:.2f}x | {r['peak_mib']:.0f} |")
    ours = rows["ours"]["step_mib"] / base
    lines += [
        "",
        f"Ours needs {ours:.2f}x the memory of plain inference (target <= 1.5x); pytorch-grad-cam "
        f"{rows['pytorch-grad-cam']['step_mib'] / base:.2f}x.",
        "",
        "Command: `python benchmarks/memory_video.py`.",
    ]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quality_video import write_section

    write_section("memory", "\n".join(lines), {name: r for name, r in rows.items()} | {"ours_ratio": ours})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
