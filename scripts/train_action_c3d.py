"""Train the small C3D-style network shipped as multiexplain/checkpoints/action_c3d.pt.

Data: :func:`multiexplain.data.action_clips.make_action_clips` (16 frames of 64x64, 8 actions), train
seed 1, validation seed 2 (the quality benchmark uses seed 3). Model: ``c3d(8, stages=
ACTION_C3D_STAGES, input_pool=(1, 2, 2), batch_norm=True, global_pool=True)`` (46k parameters,
last conv 8 x 8 x 8). Fixed torch seed, 2 CPU threads. The shipped checkpoint came from the
defaults below on CPU: 95.5% validation accuracy (96.3% on the benchmark's 300 held-out clips).
A rerun reproduced it bit for bit in 4 min 39 s on 2 shared cores (load ~5; 69 s of it draw the
clips); under heavier load (8-10) it took 17 min. Run from the repo root:

    python scripts/train_action_c3d.py [--train 2000] [--epochs 6] [--out multiexplain/checkpoints/action_c3d.pt]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F

from multiexplain.data.action_clips import ACTIONS, make_action_clips
from multiexplain.models import ACTION_C3D_STAGES, c3d, save_checkpoint

MEAN, STD = (0.4, 0.4, 0.4), (0.25, 0.25, 0.25)


def to_uint8(clips: torch.Tensor) -> torch.Tensor:
    return (clips * 255).round().to(torch.uint8)


def build_model() -> torch.nn.Module:
    return c3d(len(ACTIONS), stages=ACTION_C3D_STAGES, hidden=(), clip_size=(16, 64, 64), global_pool=True, batch_norm=True, input_pool=(1, 2, 2), mean=MEAN, std=STD)


@torch.no_grad()
def accuracy(model: torch.nn.Module, clips_u8: torch.Tensor, labels: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        device = next(model.parameters()).device
        logits = model(clips_u8[i : i + batch].to(device).float() / 255)
        correct += (logits.argmax(1).cpu() == labels[i : i + batch]).sum().item()
    return correct / len(labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--val", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda, or auto")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "multiexplain", "checkpoints", "action_c3d.pt"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))

    start = time.time()
    train = make_action_clips(args.train, seed=1)
    val = make_action_clips(args.val, seed=2)
    train_x, train_y = to_uint8(train.clips), train.labels
    val_x, val_y = to_uint8(val.clips), val.labels
    del train, val
    print(f"data: {len(train_y)} train / {len(val_y)} val clips in {time.time() - start:.0f}s", flush=True)

    model = build_model().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps = args.epochs * (len(train_y) // args.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=steps, pct_start=0.15)
    order_gen = torch.Generator().manual_seed(0)
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(train_y), generator=order_gen)
        total = 0.0
        for i in range(0, len(order) - args.batch + 1, args.batch):
            index = order[i : i + args.batch]
            clips = train_x[index].float() / 255
            # Mirror left-right half the time, swapping move_left/move_right to keep labels true.
            labels = train_y[index].clone()
            flip = torch.rand(len(index), generator=order_gen) < 0.5
            clips[flip] = clips[flip].flip(-1)
            left, right = ACTIONS.index("move_left"), ACTIONS.index("move_right")
            swapped = labels.clone()
            swapped[flip & (labels == left)] = right
            swapped[flip & (labels == right)] = left
            loss = F.cross_entropy(model(clips.to(device)), swapped.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
            if (i // args.batch) % 25 == 0:
                print(f"  epoch {epoch + 1} step {i // args.batch}: loss {loss.item():.3f} ({time.time() - start:.0f}s)", flush=True)
        val_acc = accuracy(model, val_x, val_y)
        print(f"epoch {epoch + 1}/{args.epochs} loss {total / len(order):.3f} val acc {val_acc:.3f} ({time.time() - start:.0f}s)", flush=True)

    out = os.path.abspath(args.out)
    save_checkpoint(out, model.cpu(), labels=list(ACTIONS), meta={"val_accuracy": val_acc, "clip_size": [16, 64, 64]})
    print(f"trained on {device} in {time.time() - start:.0f}s; saved {out} ({os.path.getsize(out) / 1e3:.0f} kB), val accuracy {val_acc:.3f}")


if __name__ == "__main__":
    main()
