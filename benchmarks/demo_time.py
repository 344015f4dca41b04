"""Time ``multiexplain demo`` end to end and collect its headline metrics.

    python benchmarks/demo_time.py [--threads 2] [--out /tmp/demo-bench]

Runs the demo in a fresh process (as a user would: ``python -m multiexplain.cli demo``), limited to
``--threads`` torch threads, and records its wall time, its CPU time (user + system, from the child's
resource usage: a fairer number than wall time on a shared machine), the per-task wall times the
demo reports, and the machine's load average before and after. Every task's metrics are printed
Grad-CAM++ next to Grad-CAM with their ratio. Results go to ``benchmarks/results/demo.md`` and
``benchmarks/results/demo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

BUDGET_S = 180.0  # the limit: under 3 minutes on 2 CPU cores
RESULTS = Path(__file__).resolve().parent / "results"


def _trim_bottom(path: Path) -> None:
    """Cut the empty band headless Chromium leaves below the viewport's content."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
        background = pixels[-1, pixels.shape[1] // 2]
        busy = np.nonzero((np.abs(pixels - background).sum(axis=2) > 12).any(axis=1))[0]
        if len(busy) and busy[-1] + 1 < image.height:
            image.crop((0, 0, image.width, busy[-1] + 8)).save(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="/tmp/multiexplain-demo-bench")
    parser.add_argument("--screenshot", help="also write a headless-Chromium screenshot of the report (e.g. docs/report.png)")
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    load_before = os.getloadavg()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    completed = subprocess.run(
        [sys.executable, "-c", f"import torch; torch.set_num_threads({args.threads}); "
         f"from multiexplain.cli import main; raise SystemExit(main(['demo', '--out', {args.out!r}, '--device', 'cpu']))"],
        env=env, capture_output=True, text=True,
    )
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_after = os.getloadavg()
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if completed.returncode != 0:
        print(completed.stdout, completed.stderr, sep="\n")
        return completed.returncode
    demo = json.loads((Path(args.out) / "metrics.json").read_text())

    lines = ["# `multiexplain demo` timing and headline metrics", "",
             f"CPU run, {args.threads} torch threads, on a machine shared with other jobs (load average "
             f"{load_before[0]:.1f} before, {load_after[0]:.1f} after): wall time depends on the load, the "
             "process's CPU time (user + system) much less.", "",
             "| measure | seconds | budget (s) | ratio to budget |", "|---|---|---|---|",
             f"| wall time, whole command (start-up included) | {wall:.1f} | {BUDGET_S:.0f} | {wall / BUDGET_S:.2f} |",
             f"| CPU time, whole command | {cpu:.1f} | {BUDGET_S * args.threads:.0f} (2 cores x 180 s) | "
             f"{cpu / (BUDGET_S * args.threads):.2f} |"]
    for task, seconds in demo["seconds"].items():
        lines.append(f"| wall time, {task} ({demo['status'].get(task, 'all tasks')}) | {seconds:.1f} | | |")
    for task, results in demo["metrics"].items():
        lines += ["", f"## {task}", "", "| metric | Grad-CAM++ | Grad-CAM | ratio (GC++ / GC) |", "|---|---|---|---|"]
        for name, value in results["gradcam++"].items():
            other = results["gradcam"][name]
            ratio = f"{value / other:.2f}" if other else "n/a"
            lines.append(f"| {name} | {value:.2f} | {other:.2f} | {ratio} |")
        extras = {k: v for k, v in results.items() if k not in ("gradcam++", "gradcam")}
        for name, value in extras.items():
            lines.append(f"\n{name}: {json.dumps(value)}")
    if args.screenshot:
        from multiexplain.report import render_in_chromium

        probe = render_in_chromium(Path(args.out) / "index.html", screenshot=args.screenshot, window=(1280, 2000))
        _trim_bottom(Path(args.screenshot))
        broken = [i["src"] for i in probe["images"] if not i["naturalWidth"]]
        lines += ["", f"Screenshot: {args.screenshot} ({len(probe['images'])} images, {len(broken)} broken)."]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "demo.md").write_text(text)
    (RESULTS / "demo.json").write_text(json.dumps({
        "threads": args.threads, "wall_s": wall, "cpu_s": cpu, "budget_s": BUDGET_S,
        "load_average_before": load_before, "load_average_after": load_after, **demo}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
