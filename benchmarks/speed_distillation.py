"""Cost of one training step with the explanation loss vs a plain cross-entropy step.

Same WRN-10-1 student, same batch; the explanation step includes the WRN-16-2 teacher's forward
and map (no graph) and the student's differentiable map (double backprop). Also CE+KD (teacher
forward only) and CE+KD+expl for scale. Target: CE+expl(GC++) <= 3x a CE step.

    python benchmarks/speed_distillation.py [--device cuda] [--batch-size 64] [--rounds 20]
Appends its table to benchmarks/results/distillation.md's speed section via --write.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from multiexplain.adapters.distillation import build_loss, wide_resnet

RESULTS = Path(__file__).resolve().parent / "results"
OBJECTIVES = {
    "CE": {"ce": 1.0},
    "CE+KD": {"ce": 1.0, "kd": 1.0},
    "CE+expl(GC++)": {"ce": 1.0, "expl": {"weight": 0.01, "method": "gradcam++"}},
    "CE+expl(GC)": {"ce": 1.0, "expl": {"weight": 0.01, "method": "gradcam"}},
    "CE+KD+expl(GC++)": {"ce": 1.0, "kd": 1.0, "expl": {"weight": 0.01, "method": "gradcam++"}},
}


def time_steps(config: dict, batch_size: int, rounds: int, device: torch.device) -> float:
    """Median seconds of one full step (forward(s), maps, backward, SGD update)."""
    torch.manual_seed(0)
    teacher = wide_resnet(16, 2).to(device).eval()
    student = wide_resnet(10, 1).to(device).train()
    for p in teacher.parameters():
        p.requires_grad_(False)
    loss = build_loss(config, student, teacher)
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    x = torch.rand(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 6, (batch_size,), device=device)
    times = []
    for i in range(rounds + 3):  # 3 warm-up steps
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        total, _, _ = loss(x, y)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the table as OUT.md / OUT.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    seconds = {name: time_steps(config, args.batch_size, args.rounds, device) for name, config in OBJECTIVES.items()}
    base = seconds["CE"]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads ({platform.machine()})"
    lines = [
        f"One training step, WRN-10-1 student (+ WRN-16-2 teacher where used), batch {args.batch_size}, {name}, "
        f"median of {args.rounds} steps:",
        "",
        "| objective | ms / step | ratio to CE |",
        "|---|---|---|",
        *(f"| {k} | {v * 1000:.1f} | {v / base:.2f}x |" for k, v in seconds.items()),
        "",
        f"Target CE+expl(GC++) <= 3x CE: {'met' if seconds['CE+expl(GC++)'] <= 3 * base else 'NOT met'} "
        f"({seconds['CE+expl(GC++)'] / base:.2f}x).",
    ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps({"device": name, "batch_size": args.batch_size, "rounds": args.rounds,
                                                             "seconds_per_step": seconds, "ratio_to_ce": {k: v / base for k, v in seconds.items()}}, indent=1) + "\n")


if __name__ == "__main__":
    main()
