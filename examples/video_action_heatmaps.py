"""Space-time Grad-CAM++ heat maps for an action-recognition C3D.

Without arguments: the shipped C3D (trained on synthetic action clips) explains a generated
clip of each of a few actions. With a video path: the same model explains 16 frames read from
your file (it only knows the 8 synthetic actions, so read its prediction as a demo of the
pipeline, not as a real label); its animations keep the file's timing (16 frames sampled from a
6 s video play for 6 s). Writes, per clip, an animated GIF and an MP4 of
``frame | heat-map overlay`` side by side and a PNG strip of sampled frames.

    python examples/video_action_heatmaps.py [VIDEO.mp4] [--out examples/output/video] [--start SECONDS]
        [--method gradcam++|gradcam] [--per-slice]
"""

from __future__ import annotations

import argparse
import os

import torch

from multiexplain.adapters.video import explain_clip
from multiexplain.data.action_clips import ACTIONS, draw_action_clip
from multiexplain.io import VideoReader, write_gif, write_mp4
from multiexplain.models import load_action_c3d
from multiexplain.viz import write_strip


def explain_and_write(model, names, clip, out_dir, stem, method, per_slice, active=None, truth=None, timing=None):
    """``timing``: ``{"times": [...], "end": s}`` (a read clip's source times) or ``None`` (8 fps)."""
    result = explain_clip(model, clip, method=method, per_slice=per_slice)  # top-1 class
    predicted = names[int(result.targets[0])]
    title = f"{method}{' (per-slice)' if per_slice else ''}: predicted {predicted}"
    if truth is not None:
        title += f", true {truth} (* = action frames)"
    paths = [
        write_gif(os.path.join(out_dir, f"{stem}.gif"), clip, result.maps[0], fps=8.0, scale=3, **(timing or {})),
        write_mp4(os.path.join(out_dir, f"{stem}.mp4"), clip, result.maps[0], fps=8.0, scale=3, **(timing or {})),
        write_strip(os.path.join(out_dir, f"{stem}_strip.png"), clip, result.maps[0], num_frames=8, title=title, active=active),
    ]
    print(f"{stem}: {title}; layer {result.layer}, raw map {tuple(result.raw.shape[1:])}")
    for path in paths:
        print("  wrote", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("video", nargs="?", help="a video file to explain (optional)")
    parser.add_argument("--out", default=os.path.join("examples", "output", "video"))
    parser.add_argument("--start", type=float, default=None, help="read 16 frames from this time (s); default: uniform")
    parser.add_argument("--method", default="gradcam++", choices=["gradcam++", "gradcam"])
    parser.add_argument("--per-slice", action="store_true", help="channel weights per time slice")
    args = parser.parse_args()
    torch.set_num_threads(2)
    os.makedirs(args.out, exist_ok=True)

    model, names = load_action_c3d()
    if args.video:
        with VideoReader(args.video, size=64) as reader:  # decodes only the 16 frames, resized while decoding
            clip = reader.clip(16, start=args.start)
        stem = os.path.splitext(os.path.basename(args.video))[0]
        timing = {"times": clip.display_times(), "end": clip.display_end}
        explain_and_write(model, names, clip.frames, args.out, stem, args.method, args.per_slice, timing=timing)
        return
    for action in ("move_right", "shrink", "blink"):
        label = ACTIONS.index(action)
        clip, mask, active, _, shape = draw_action_clip(seed=2024 + label, label=label)
        explain_and_write(model, names, clip, args.out, f"synthetic_{action}", args.method, args.per_slice, active=active, truth=action)


if __name__ == "__main__":
    main()
