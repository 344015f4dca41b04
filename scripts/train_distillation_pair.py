"""Train the shipped distillation pair: a WRN-16-2 teacher and a WRN-10-1 student (CE only).

Both learn the 32x32 synthetic shapes set (``make_distill_dataset(TRAIN_SIZE, seed=0)``; the test
set is ``seed=1``) with the adapter's own :class:`Trainer`, fixed seeds, and are written to
``multiexplain/checkpoints/distill_teacher.pt`` / ``distill_student.pt`` (about 2.8 MB and 0.3 MB).
The student is the plain cross-entropy baseline: the example fine-tunes it with the explanation
loss and shows its maps before and after.

    python scripts/train_distillation_pair.py                 # GPU if present, else CPU
    python scripts/train_distillation_pair.py --preset cpu    # smaller run for 2 CPU cores (~8 min)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from multiexplain.data.distill_data import make_distill_dataset
from multiexplain.models import CHECKPOINT_DIR, save_checkpoint, wide_resnet
from multiexplain.train import Trainer, evaluate_student

#: The shipped pair's architectures.
SHIPPED_TEACHER = {"depth": 16, "widen_factor": 2}
SHIPPED_STUDENT = {"depth": 10, "widen_factor": 1}

PRESETS = {
    # train images, teacher epochs, student epochs, batch size
    "full": {"train_size": 8000, "teacher_epochs": 20, "student_epochs": 10, "batch_size": 128},
    "cpu": {"train_size": 3000, "teacher_epochs": 8, "student_epochs": 8, "batch_size": 64},
}
TEST_SIZE = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out-dir", type=Path, default=CHECKPOINT_DIR)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    train_set = make_distill_dataset(preset["train_size"], seed=0)
    test_set = make_distill_dataset(TEST_SIZE, seed=1)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"preset": args.preset, "device": args.device, **preset}
    for role, arch, epochs, seed in (
        ("teacher", SHIPPED_TEACHER, preset["teacher_epochs"], 0),
        ("student", SHIPPED_STUDENT, preset["student_epochs"], 1),
    ):
        torch.manual_seed(seed)
        model = wide_resnet(arch["depth"], arch["widen_factor"])
        config = {"epochs": epochs, "batch_size": preset["batch_size"], "lr": 0.05, "seed": seed, "device": args.device, "progress": False}
        start = time.perf_counter()
        history = Trainer(model, None, {"ce": 1.0}, train_set, config).fit()
        seconds = time.perf_counter() - start
        error = evaluate_student(model, test_set)
        model = model.cpu().eval()
        path = args.out_dir / f"distill_{role}.pt"
        save_checkpoint(path, model, meta={"test_error": error, "train_size": preset["train_size"], "epochs": epochs, "seed": seed})
        summary[role] = {"arch": f"WRN-{arch['depth']}-{arch['widen_factor']}", "test_error": error, "seconds": round(seconds, 1), "final_ce": history[-1]["ce"]}
        print(f"{role}: WRN-{arch['depth']}-{arch['widen_factor']} test error {error:.2f}% ({seconds:.0f} s) -> {path}", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
