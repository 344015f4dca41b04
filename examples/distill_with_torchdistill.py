"""Train a student with torchdistill's DistillationBox and multiexplain's explanation loss.

Reads a torchdistill YAML (``examples/torchdistill_explanation_loss.yaml``: datasets, models and
the ``train`` section torchdistill documents), registers multiexplain's losses and teacher
forward process in torchdistill's registries, trains, and prints the student's held-out error.

    pip install "multiexplain[distill]"
    python examples/distill_with_torchdistill.py --config examples/torchdistill_explanation_loss.yaml [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torchdistill.common.yaml_util import load_yaml_file
from torchdistill.core.distillation import get_distillation_box

import multiexplain.torchdistill_losses  # noqa: F401 - registers the losses and the forward process
from multiexplain.train import evaluate_student


def train(config: dict, device: torch.device, epochs: int | None = None, max_batches: int | None = None) -> dict:
    """Run torchdistill's distillation loop; returns the per-epoch mean loss and the test error."""
    teacher, student = config["models"]["teacher_model"], config["models"]["student_model"]
    train_config = config["train"]
    if epochs is not None:
        train_config["num_epochs"] = epochs
    box = get_distillation_box(teacher.to(device), student.to(device), config["datasets"], train_config, device,
                               None, False, lr_factor=1)
    history = []
    for epoch in range(train_config["num_epochs"]):
        box.pre_epoch_process(epoch=epoch)
        losses = []
        for index, (sample_batch, targets, supp_dict) in enumerate(box.train_data_loader):
            if max_batches is not None and index >= max_batches:
                break
            loss = box.forward_process(sample_batch.to(device), targets.to(device), supp_dict)
            box.post_forward_process(loss=loss)
            losses.append(float(loss.detach()))
        box.post_epoch_process()
        history.append(sum(losses) / max(len(losses), 1))
        print(f"epoch {epoch + 1}/{train_config['num_epochs']}: mean loss {history[-1]:.4f}", flush=True)
    box.clean_modules()
    return {"loss": history, "test_error": evaluate_student(student, config["datasets"]["test"], device=device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("torchdistill_explanation_loss.yaml"))
    parser.add_argument("--epochs", type=int, default=None, help="override train.num_epochs")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    start = time.perf_counter()
    result = train(load_yaml_file(str(args.config)), torch.device(args.device), args.epochs)
    print(json.dumps({**result, "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
