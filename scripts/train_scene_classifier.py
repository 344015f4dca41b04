"""Train the shipped multi-label scene classifier (multiexplain/checkpoints/scene_cnn.pt).

    python scripts/train_scene_classifier.py            # ~5-8 minutes on 2 CPU cores

Fixed seeds: training scenes are stream 0 of :func:`multiexplain.data.scenes.make_scenes`, the held-out
split stream 1 (the benchmark uses stream 2, the tests others). Loss: binary cross-entropy per
label. The script stops early once the held-out per-label accuracy passes ``--target`` after an
epoch, and refuses to write a checkpoint below 95%.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from multiexplain.data.scenes import make_scenes
from multiexplain.models import SceneCNN, save_checkpoint
from multiexplain.models.checkpoints import CHECKPOINT_DIR

SCENE_CHECKPOINT = CHECKPOINT_DIR / "scene_cnn.pt"

TRAIN_STREAM, HELD_OUT_STREAM = 0, 1


def per_label_accuracy(model: SceneCNN, images: torch.Tensor, labels: torch.Tensor, batch: int = 256) -> tuple[float, float]:
    """(per-label accuracy, exact-match accuracy) of ``sigmoid(logits) >= 0.5``."""
    model.eval()
    predictions = []
    with torch.no_grad():
        for start in range(0, images.shape[0], batch):
            predictions.append(model(images[start : start + batch]).sigmoid() >= 0.5)
    predicted = torch.cat(predictions)
    correct = predicted == labels.bool()
    return correct.float().mean().item(), correct.all(dim=1).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=10000, help="training scenes")
    parser.add_argument("--held-out", type=int, default=2000, help="held-out scenes")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--target", type=float, default=0.99, help="stop once held-out per-label accuracy reaches this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="1 is faster than 2 on a shared machine (small convs)")
    parser.add_argument("--out", type=Path, default=SCENE_CHECKPOINT)
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    train = make_scenes(args.train, seed=TRAIN_STREAM)
    held_out = make_scenes(args.held_out, seed=HELD_OUT_STREAM)
    images, labels = train.images, train.labels
    print(f"generated {args.train} + {args.held_out} scenes in {time.time() - started:.0f} s", flush=True)

    model = SceneCNN()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    steps_per_epoch = -(-args.train // args.batch)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, total_steps=args.epochs * steps_per_epoch)
    shuffle = torch.Generator().manual_seed(args.seed)
    accuracy = exact = 0.0
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(args.train, generator=shuffle)
        total = 0.0
        for start in range(0, args.train, args.batch):
            batch = order[start : start + args.batch]
            x = images[batch]
            # Horizontal flips: every shape class is mirror-symmetric, so labels and masks stay valid.
            flip = torch.rand(x.shape[0], generator=shuffle) < 0.5
            x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            loss = F.binary_cross_entropy_with_logits(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total += loss.item() * x.shape[0]
        accuracy, exact = per_label_accuracy(model, held_out.images, held_out.labels)
        print(
            f"epoch {epoch + 1}: loss {total / args.train:.4f}, held-out per-label accuracy {accuracy:.4f}, "
            f"exact match {exact:.4f}, {time.time() - started:.0f} s",
            flush=True,
        )
        if accuracy >= args.target:
            break
    if accuracy < 0.95:
        raise SystemExit(f"held-out per-label accuracy {accuracy:.4f} < 0.95: not writing a checkpoint")
    model.eval()
    meta = dict(
        seed=args.seed, train_scenes=args.train, train_stream=TRAIN_STREAM, held_out_stream=HELD_OUT_STREAM,
        held_out_scenes=args.held_out, epochs=epoch + 1, held_out_per_label_accuracy=round(accuracy, 4),
        held_out_exact_match=round(exact, 4), seconds=round(time.time() - started),
    )
    save_checkpoint(args.out, model, meta=meta)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
