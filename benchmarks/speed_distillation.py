"""Cost of one training step with the explanation loss vs a plain cross-entropy step.

Same WRN-10-1 student, same batch; the explanation step includes the WRN-16-2 teacher's forward
and map (no graph) and the student's differentiable map (double backprop), stepped as the Trainer
steps (the default term's gradient projected off the rest's: two gradient passes). Also CE+KD (teacher
forward only), CE+KD+expl, the paper's setting, and the explanation step with the teacher's
outputs cached (``cache_teacher``: what every epoch after the first costs on un-augmented data).
Target: CE+expl <= 3x a CE step.

    python benchmarks/speed_distillation.py [--device cuda] [--batch-size 64] [--rounds 20]
Writes benchmarks/results/distillation_speed.{md,json} (``--out`` elsewhere); the quality
benchmark's results file includes that table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from multiexplain.losses import build_loss
from multiexplain.models import wide_resnet

RESULTS = Path(__file__).resolve().parent / "results"
OBJECTIVES = {
    "CE": ({"ce": 1.0}, False),
    "CE+KD": ({"ce": 1.0, "kd": 1.0}, False),
    "CE+expl": ({"ce": 1.0, "expl": {}}, False),
    "CE+expl (summed, not projected)": ({"ce": 1.0, "expl": {"conflict": "none"}}, False),
    "CE+expl (Grad-CAM)": ({"ce": 1.0, "expl": {"method": "gradcam"}}, False),
    "CE+expl (paper preset)": ({"ce": 1.0, "expl": {"preset": "paper"}}, False),
    "CE+KD+expl": ({"ce": 1.0, "kd": 1.0, "expl": {}}, False),
    "CE+KD+expl, teacher cached": ({"ce": 1.0, "kd": 1.0, "expl": {}}, True),
}


def time_steps(objectives: dict[str, tuple[dict, bool]], batch_size: int, rounds: int, device: torch.device) -> dict[str, float]:
    """Median seconds of one full step (forward(s), maps, backward, SGD update) per objective.

    Rounds are interleaved (one step of every objective per round), so a machine shared with
    other jobs slows every objective alike instead of whichever happened to run during a spike.
    """
    torch.manual_seed(0)
    teacher = wide_resnet(16, 2).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    setups = {}
    for name, (config, cache) in objectives.items():
        torch.manual_seed(0)
        student = wide_resnet(10, 1).to(device).train()
        optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
        setups[name] = (build_loss(config, student, teacher, cache_teacher=cache), optimizer)
    x = torch.rand(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 6, (batch_size,), device=device)
    times: dict[str, list[float]] = {name: [] for name in objectives}
    for i in range(rounds + 3):  # 3 warm-up rounds
        for name, (loss, optimizer) in setups.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            # As the Trainer steps: the default explanation term is projected off the rest's gradient.
            weighted, _, _ = loss.weighted_terms(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward(weighted, list(loss.student.parameters()))
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "distillation_speed", help="write the table as OUT.md / OUT.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    seconds = time_steps(OBJECTIVES, args.batch_size, args.rounds, device)
    base = seconds["CE"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} thread(s) ({platform.machine()})"
    load = f", load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (shared machine: absolute times are inflated, ratios are the meaningful part)" if device.type == "cpu" else ""
    lines = [
        f"One training step (forward(s), maps, backward, SGD update), WRN-10-1 student (+ WRN-16-2 teacher where used), "
        f"batch {args.batch_size}, {name}, median of {args.rounds} interleaved rounds{load}; one run:",
        "",
        "| objective | ms / step | ratio to CE |",
        "|---|---|---|",
        *(f"| {k} | {v * 1000:.1f} | {v / base:.2f}x |" for k, v in seconds.items()),
        "",
        f"Target CE+expl <= 3x CE: {'met' if seconds['CE+expl'] <= 3 * base else 'NOT met'} "
        f"({seconds['CE+expl'] / base:.2f}x).",
    ]
    print("\n".join(lines))
    if args.out is not None:  # always set: the default is benchmarks/results/distillation_speed
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"device": name, "batch_size": args.batch_size, "rounds": args.rounds,
                                                             "seconds_per_step": seconds, "ratio_to_ce": {k: v / base for k, v in seconds.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
