"""Student test error with and without the explanation loss (the paper's Table 4, on our data).

No CIFAR-10 here, so the student learns the project's 32x32 synthetic shapes set
(:func:`make_distill_dataset`, 6 classes, distractors) from the shipped WRN-16-2 teacher
(``scripts/train_distillation_pair.py``, trained on the same training images). The student is a
WRN-10-1. Seven objectives x several seeds x two regimes (all training images, and a
class-balanced 10% of them, drawn per seed and shared by the methods):

    CE | CE+expl(GC++) | CE+expl(GC) | CE+KD | CE+KD+expl(GC++) | CE+KD+expl(GC) | CE+AT

The explanation loss is the paper's: a = 0.01, raw (unnormalised) layer-resolution maps of the
ground-truth class; KD at T = 4 (weight 1); attention transfer with beta/2 = 500 on the three
group outputs. Besides the error, the held-out maps are compared: the Pearson correlation of the
student's and the teacher's Grad-CAM++ maps, and the energy-based pointing game (share of map
energy on the target shape, :func:`multiexplain.metrics.energy_pointing_game`).

    python benchmarks/quality_distillation.py                       # preset "full" (GPU: a few minutes)
    python benchmarks/quality_distillation.py --preset cpu          # smaller, for 2 CPU cores
Writes benchmarks/results/distillation.{md,json}.
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

from multiexplain import GradCAMPlusPlus
from multiexplain.data.distill_data import make_distill_dataset
from multiexplain.metrics import energy_pointing_game, map_correlation
from multiexplain.models import load_distillation_pair, wide_resnet
from multiexplain.train import Trainer, evaluate_student

RESULTS = Path(__file__).resolve().parent / "results"

EXPL = {"weight": 0.01, "normalize": "none"}
METHODS: dict[str, dict] = {
    "CE": {"ce": 1.0},
    "CE+expl(GC++)": {"ce": 1.0, "expl": {**EXPL, "method": "gradcam++"}},
    "CE+expl(GC)": {"ce": 1.0, "expl": {**EXPL, "method": "gradcam"}},
    "CE+KD": {"ce": 1.0, "kd": {"weight": 1.0, "temperature": 4.0}},
    "CE+KD+expl(GC++)": {"ce": 1.0, "kd": {"weight": 1.0, "temperature": 4.0}, "expl": {**EXPL, "method": "gradcam++"}},
    "CE+KD+expl(GC)": {"ce": 1.0, "kd": {"weight": 1.0, "temperature": 4.0}, "expl": {**EXPL, "method": "gradcam"}},
    "CE+AT": {"ce": 1.0, "at": {"weight": 500.0}},
    # Not in the paper: the explanation loss on L2-normalised maps at about AT's strength
    # (AT's 500 * mean over the 8x8 grid is ~8 * squared distance of unit maps).
    "CE+expl(GC++, L2, a=8)": {"ce": 1.0, "expl": {"weight": 8.0, "normalize": "l2", "method": "gradcam++"}},
}
#: The paper's Table 4 (CIFAR-10, WRN-40-2 teacher 5.8% -> WRN-16-2 student), test error %.
PAPER_CIFAR10 = {"CE": 6.78, "CE+expl(GC++)": 6.74, "CE+expl(GC)": 6.86, "CE+KD": 5.68, "CE+KD+expl(GC++)": 5.56, "CE+KD+expl(GC)": 5.80, "CE+AT": None,
                 "CE+expl(GC++, L2, a=8)": None}

PRESETS = {
    # "full" uses the teacher's own training images (scripts/train_distillation_pair.py, seed 0)
    "full": {"train_size": 8000, "test_size": 1000, "seeds": 5,
             "regimes": {"full": {"fraction": 1.0, "epochs": 10, "batch_size": 128},
                         "10%": {"fraction": 0.1, "epochs": 40, "batch_size": 64}}},
    "cpu": {"train_size": 3000, "test_size": 500, "seeds": 3,
            "regimes": {"full": {"fraction": 1.0, "epochs": 4, "batch_size": 64},
                        "10%": {"fraction": 0.1, "epochs": 20, "batch_size": 32}}},
}
#: For smoke tests of this script only (seconds on a CPU): numbers mean nothing.
PRESETS["smoke"] = {"train_size": 96, "test_size": 48, "seeds": 2,
                    "regimes": {"full": {"fraction": 1.0, "epochs": 1, "batch_size": 32},
                                "10%": {"fraction": 0.25, "epochs": 1, "batch_size": 12}}}
STUDENT = (10, 1)


def map_agreement(student: torch.nn.Module, teacher: torch.nn.Module, test_set, device: torch.device) -> dict[str, float]:
    """Held-out map agreement for the ground-truth class (both models in eval mode)."""
    correlations, student_energy, teacher_energy = [], [], []
    was_training = student.training
    student.eval()
    try:
        s_cam, t_cam = GradCAMPlusPlus(student, "relu"), GradCAMPlusPlus(teacher, "relu")
        for start in range(0, len(test_set), 250):
            x = test_set.images[start:start + 250].to(device)
            y = test_set.labels[start:start + 250].to(device)
            masks = test_set.masks[start:start + 250].to(device)
            s_exp, t_exp = s_cam(x, y), t_cam(x, y)
            correlations.append(map_correlation(s_exp.raw, t_exp.raw))
            student_energy.append(energy_pointing_game(s_exp.maps, masks))
            teacher_energy.append(energy_pointing_game(t_exp.maps, masks))
    finally:
        student.train(was_training)
    return {
        "map_correlation": float(torch.cat(correlations).mean()),
        "energy_in_mask": float(torch.cat(student_energy).mean()),
        "teacher_energy_in_mask": float(torch.cat(teacher_energy).mean()),
    }


def run_one(job: dict) -> dict:
    """Train one student (one method, regime and seed) and measure it."""
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    preset = PRESETS[job["preset"]]
    regime = preset["regimes"][job["regime"]]
    train_set = make_distill_dataset(preset["train_size"], seed=0)
    if regime["fraction"] < 1:
        train_set = train_set.subset(regime["fraction"], seed=job["seed"])
    test_set = make_distill_dataset(preset["test_size"], seed=1)
    teacher, _ = load_distillation_pair(device)
    torch.manual_seed(job["seed"])
    student = wide_resnet(*STUDENT)
    config = {"epochs": regime["epochs"], "batch_size": regime["batch_size"], "lr": 0.05, "seed": job["seed"], "device": str(device), "progress": False}
    start = time.perf_counter()
    history = Trainer(student, teacher, METHODS[job["method"]], train_set, config).fit()
    seconds = time.perf_counter() - start
    result = {**{k: job[k] for k in ("method", "regime", "seed")}, "test_error": evaluate_student(student, test_set), "train_seconds": seconds,
              "final_terms": {k: v for k, v in history[-1].items() if k != "epoch"}}
    result.update(map_agreement(student, teacher, test_set, device))
    print(f"{job['regime']:>5} {job['method']:<17} seed {job['seed']}: error {result['test_error']:.2f}%  "
          f"corr {result['map_correlation']:.3f}  energy {result['energy_in_mask']:.3f}  ({seconds:.0f} s)", flush=True)
    return result


def summarise(results: list[dict], preset_name: str, device: str, teacher_error: float, teacher_energy: float, wall: float) -> tuple[str, dict]:
    preset = PRESETS[preset_name]
    table: dict = {}
    for regime in preset["regimes"]:
        for method in METHODS:
            rows = [r for r in results if r["regime"] == regime and r["method"] == method]
            if not rows:
                continue

            def stats(key: str) -> dict:
                values = [r[key] for r in rows]
                return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}

            table.setdefault(regime, {})[method] = {k: stats(k) for k in ("test_error", "map_correlation", "energy_in_mask")}
    seeds = len({r["seed"] for r in results})
    lines = [
        "# Distillation with an explanation loss (paper section 5, Table 4)",
        "",
        f"Student WRN-{STUDENT[0]}-{STUDENT[1]} learns the 32x32 synthetic shapes set (6 classes, 3-4 distractors, pixel noise; "
        f"{preset['train_size']} training / {preset['test_size']} test images) from the shipped WRN-16-2 teacher "
        f"(test error **{teacher_error:.2f}%**). Mean ± std over {seeds} seeds; preset `{preset_name}`, run on {device}, "
        f"{wall / 60:.1f} min wall clock. Explanation loss as in the paper: a = 0.01, unnormalised layer-resolution "
        "maps of the true class; KD at T = 4; AT with beta/2 = 500 on the three group outputs. "
        "Map columns (held-out set): Pearson correlation of student vs teacher Grad-CAM++ maps, and the share of the "
        f"student's map energy on the target shape (teacher: {teacher_energy:.3f}).",
        "",
    ]
    for regime, methods in table.items():
        spec = preset["regimes"][regime]
        title = "All training images" if spec["fraction"] >= 1 else f"Low data: {spec['fraction']:.0%} of the training images"
        count = len({r["seed"] for r in results if r["regime"] == regime})
        lines += [
            f"## {title} ({spec['epochs']} epochs, batch {spec['batch_size']}, {count} seeds)",
            "",
            "| objective | student test error % | map corr. with teacher | energy in mask | paper: CIFAR-10, all data, error % |",
            "|---|---|---|---|---|",
        ]
        base = methods.get("CE", {}).get("test_error", {}).get("mean")
        for method, s in methods.items():
            paper = PAPER_CIFAR10[method]
            delta = "" if base is None or method == "CE" else f" ({s['test_error']['mean'] - base:+.2f})"
            lines.append(
                f"| {method} | {s['test_error']['mean']:.2f} ± {s['test_error']['std']:.2f}{delta} | "
                f"{s['map_correlation']['mean']:.3f} ± {s['map_correlation']['std']:.3f} | "
                f"{s['energy_in_mask']['mean']:.3f} ± {s['energy_in_mask']['std']:.3f} | {'—' if paper is None else f'{paper:.2f}'} |"
            )
        lines.append("")
    payload = {
        "preset": preset_name,
        "preset_settings": preset,
        "device": device,
        "student": f"WRN-{STUDENT[0]}-{STUDENT[1]}",
        "teacher": {"arch": "WRN-16-2", "test_error": teacher_error, "energy_in_mask": teacher_energy},
        "paper_cifar10_table4": PAPER_CIFAR10,
        "summary": table,
        "runs": results,
        "wall_seconds": wall,
    }
    return "\n".join(lines), payload


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=1, help="parallel training processes")
    parser.add_argument("--seeds", type=int, default=None)
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--regimes", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS / "distillation")
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    if args.seeds is not None:
        preset["seeds"] = args.seeds
    regimes = args.regimes or list(preset["regimes"])
    preset["regimes"] = {k: v for k, v in preset["regimes"].items() if k in regimes}
    threads = max(1, (os.cpu_count() or 2) // max(args.workers, 1)) if args.device != "cpu" or args.workers > 1 else 2
    jobs = [
        {"preset": args.preset, "regime": regime, "method": method, "seed": seed, "device": args.device, "threads": threads}
        for seed in range(preset["seeds"]) for regime in preset["regimes"] for method in args.methods
    ]
    start = time.perf_counter()
    teacher, _ = load_distillation_pair(args.device)
    test_set = make_distill_dataset(preset["test_size"], seed=1)
    teacher_error = evaluate_student(teacher, test_set)
    teacher_energy = map_agreement(teacher, teacher, test_set, torch.device(args.device))["teacher_energy_in_mask"]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({platform.processor() or platform.machine()})"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []

    def record(result: dict) -> str:
        # Rewritten after every run, so a run cut short still leaves every finished seed's numbers.
        results.append(result)
        markdown, payload = summarise(results, args.preset, device, teacher_error, teacher_energy, time.perf_counter() - start)
        args.out.with_suffix(".md").write_text(markdown + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        return markdown

    markdown = ""
    if args.workers > 1:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(args.workers) as pool:
            for result in pool.imap_unordered(run_one, jobs, chunksize=1):
                markdown = record(result)
    else:
        for job in jobs:
            markdown = record(run_one(job))
    print(markdown)


if __name__ == "__main__":
    main()
