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

Reading (section "reading"): 16 frames at 112 x 112 sampled from a 300-frame 1280 x 720 file vs
from a 16-frame 1280 x 720 file, each in a fresh subprocess (peak RSS minus RSS before the read):
``read_clip`` (streaming: only the 16 frames are decoded past their key frames and FFmpeg scales each
while converting it) against decoding every frame to a full-size RGB array and resizing after (what
the reader did before). Target: streaming peak, long file / short file <= 1.1.

Whole video (section "sliding window"): ``multiexplain video --window 16 --stride 8`` (the shipped
C3D, 64 x 64 frames, Grad-CAM++ and Grad-CAM, GIF + MP4 written frame by frame) on a 60 s and a
10 s 640 x 360 25 fps video: wall time per source frame and the process's peak RSS.

Run: ``python benchmarks/memory_video.py [--skip-explain] [--skip-reading] [--skip-window]``. Writes
the "memory", "reading" and "sliding window" sections of benchmarks/results/video.md and video.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

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

def write_section(key: str, markdown: str, payload: dict) -> None:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from quality_video import write_section as write

    write(key, markdown, payload)


STEPS = ["inference", "ours", "ours-per-slice", "pytorch-grad-cam", "inference-with-grad"]


def measure(step: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, step], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


READ_CHILD = r"""
import json, resource, sys
import numpy as np, torch
path, mode = sys.argv[1], sys.argv[2]
def rss_kib():
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
import av
from multiexplain.io import read_clip
before = rss_kib()
if mode == "streaming":
    clip, fps = read_clip(path, num_frames=16, size=112)
else:  # every frame decoded to a full-size RGB array, 16 picked and resized after
    with av.open(path) as container:
        frames = [torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)]
    index = torch.linspace(0, len(frames) - 1, 16).round().long().tolist()
    video = torch.stack([frames[i] for i in index]).permute(0, 3, 1, 2).float() / 255
    clip = torch.nn.functional.interpolate(video, size=(112, 112), mode="bilinear", antialias=True)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"step_mib": (peak - before) / 1024, "peak_mib": peak / 1024, "shape": list(clip.shape)}))
"""

WINDOW_CHILD = r"""
import json, resource, sys, time, torch
torch.set_num_threads(2)
from multiexplain import cli
start = time.perf_counter()
code = cli.main(["video", sys.argv[1], "--window", "16", "--stride", "8", "--out", sys.argv[2], "--device", "cpu"])
seconds = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
windows = len(json.load(open(sys.argv[2] + "/video.json"))["results"][0]["windows"])
print(json.dumps({"code": code, "seconds": seconds, "peak_mib": peak / 1024, "windows": windows}))
"""


def write_video(path: str, frames: int, width: int, height: int, fps: int) -> None:
    """A synthetic video (PyAV, MPEG-4 part 2, a key frame every 2 s): a bright square moving over
    noise, so that frames differ and compress like real footage would not matter here."""
    import av
    import numpy as np

    rng = np.random.default_rng(0)
    background = rng.integers(30, 110, (height, width, 3), dtype=np.uint8)
    with av.open(path, "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = 2 * fps
        stream.bit_rate = 2_000_000
        side = height // 4
        for t in range(frames):
            image = background.copy()
            x = (7 * t) % (width - side)
            image[height // 3 : height // 3 + side, x : x + side] = (250, 220, 40)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _child(code: str, *argv: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def reading(folder: str) -> None:
    files = {"300 frames": os.path.join(folder, "long720.mp4"), "16 frames": os.path.join(folder, "short720.mp4")}
    write_video(files["300 frames"], 300, 1280, 720, 30)
    write_video(files["16 frames"], 16, 1280, 720, 30)
    rows = {}
    for mode in ("streaming", "decode all, resize after"):
        for name, path in files.items():
            rows[f"{mode}, {name}"] = _child(READ_CHILD, path, "streaming" if mode == "streaming" else "all")
            print(mode, name, rows[f"{mode}, {name}"], flush=True)
    ratio = rows["streaming, 300 frames"]["step_mib"] / rows["streaming, 16 frames"]["step_mib"]
    old = rows["decode all, resize after, 300 frames"]["step_mib"] / rows["decode all, resize after, 16 frames"]["step_mib"]
    lines = [
        "## Reading: 16 frames at 112 x 112 from a 1280 x 720 file",
        "",
        "Peak RSS of the read minus RSS before it (fresh subprocess each, PyAV imported before).",
        "",
        "| reader | file | read peak MiB |",
        "|---|---|---|",
    ]
    for name, r in rows.items():
        mode, _, file = name.rpartition(", ")
        lines.append(f"| {mode} | {file} | {r['step_mib']:.1f} |")
    lines += [
        "",
        f"Streaming (`read_clip`): 300-frame file / 16-frame file = {ratio:.2f}x (target <= 1.1: "
        f"{'met' if ratio <= 1.1 else 'missed'}). Decoding every frame at full size and resizing after: {old:.2f}x.",
    ]
    write_section("reading", "\n".join(lines), {"rows": rows, "streaming_ratio": ratio, "decode_all_ratio": old,
                                                  "target": 1.1})
    print("\n".join(lines))


def sliding_window(folder: str) -> None:
    rows = {}
    for seconds in (10, 60):
        path = os.path.join(folder, f"video_{seconds}s.mp4")
        write_video(path, 25 * seconds, 640, 360, 25)
        result = _child(WINDOW_CHILD, path, os.path.join(folder, f"out_{seconds}s"))
        result["frames"] = 25 * seconds
        result["ms_per_frame"] = 1000 * result["seconds"] / result["frames"]
        rows[f"{seconds} s"] = result
        print(seconds, result, flush=True)
    lines = [
        "## A whole video through the sliding window: `multiexplain video --window 16 --stride 8`",
        "",
        "Shipped C3D at 64 x 64, Grad-CAM++ and Grad-CAM per window (one pass), maps blended per frame,",
        "GIF + MP4 per method written frame by frame; 640 x 360 MPEG-4 source at 25 fps; 2 CPU threads",
        "on a machine shared with other jobs (one run: times are noisy).",
        "",
        "| video | frames | windows | wall s | ms / frame | process peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['frames']} | {r['windows']} | {r['seconds']:.1f} | {r['ms_per_frame']:.1f} | {r['peak_mib']:.0f} |")
    growth = rows["60 s"]["peak_mib"] / rows["10 s"]["peak_mib"]
    lines += ["", f"Peak memory, 60 s / 10 s video: {growth:.2f}x (bounded: frames and maps are written as windows finish)."]
    write_section("sliding window", "\n".join(lines), {"rows": rows, "peak_ratio_60s_vs_10s": growth})
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-explain", action="store_true")
    parser.add_argument("--skip-reading", action="store_true")
    parser.add_argument("--skip-window", action="store_true")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory() as folder:
        if not args.skip_reading:
            reading(folder)
        if not args.skip_window:
            sliding_window(folder)
    if not args.skip_explain:
        explain_memory()


def explain_memory() -> None:
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
    write_section("memory", "\n".join(lines), {name: r for name, r in rows.items()} | {"ours_ratio": ours})
    print("\n".join(lines))


if __name__ == "__main__":
    main()
