"""Training a student under a distillation objective: :class:`Trainer`, its config, and the
``torchrun`` entry point (``torchrun --nproc_per_node 2 -m multiexplain.train --config run.yaml``).

Under ``torchrun`` the student is wrapped in DistributedDataParallel (gloo on CPU, NCCL on GPU),
each rank reads its shard, only rank 0 prints and writes checkpoints.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import sys
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data.distill_data import DISTILL_CLASSES, make_distill_dataset
from .explain import model_logits
from .losses import build_loss
from .models import load_checkpoint, load_shipped, mobilenet_v2, save_checkpoint, wide_resnet

__all__ = [
    "RESUME_FORMAT", "ResumeError", "TrainConfig", "Trainer", "evaluate_student", "find_resume_state", "load_config_file",
    "main", "seed_everything", "train_from_config",
]

#: The ``format`` entry of a Trainer checkpoint (``epoch_NNN.pt`` / ``last.pt``).
RESUME_FORMAT = "multiexplain-trainer/1"


@dataclass
class TrainConfig:
    """Trainer settings (all keys of the ``"train"`` section of :func:`train_from_config`).

    ``optimizer``: "sgd" (momentum, Nesterov) or "adam"; ``schedule``: "cosine", "step" (x0.1 at
    50% and 75% of the epochs) or "none"; ``checkpoint_dir``: where ``epoch_NNN.pt`` and
    ``last.pt`` go each epoch, each written atomically (``None``: no checkpoints); ``resume``:
    continue from the newest checkpoint there that loads (see :func:`find_resume_state`);
    ``on_config_change``: what resuming does when ``lr``, ``momentum``, ``weight_decay`` or
    ``epochs`` differ from the checkpoint's: ``"error"`` (refuse) or ``"warn"`` (warn, then
    continue with the new values); any other difference (optimizer, schedule, batch size, seed,
    losses) is always refused. ``cache_teacher``: compute the frozen teacher's logits and maps once
    per training image (:class:`multiexplain.losses.TeacherCache`; un-augmented data only);
    ``device``: "cpu", "cuda", ... or ``None`` (the student's device; under torchrun with CUDA,
    ``cuda:LOCAL_RANK``).
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    checkpoint_dir: str | None = None
    resume: bool = False
    on_config_change: str = "error"
    cache_teacher: bool = False
    progress: bool = True
    device: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown train option(s) {unknown}; known: {sorted(known)}")
        config = cls(**values)
        if config.on_config_change not in ("error", "warn"):
            raise ValueError(f"on_config_change must be 'error' or 'warn', got {config.on_config_change!r}")
        return config


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency
        pass


def _distributed() -> tuple[bool, int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return True, dist.get_rank(), dist.get_world_size()
    return False, 0, 1


class Trainer:
    """A compact training loop for a student under a :class:`DistillationLoss`.

    Args:
        student: the model to train (its parameters only; the teacher is frozen and put in eval).
        teacher: the frozen teacher or ``None`` (plain training, e.g. of the teacher itself).
        losses: the loss config for :func:`build_loss` (``{"ce": 1.0}`` trains without a teacher).
        train_set: a dataset of ``(image, label)`` pairs.
        config: a :class:`TrainConfig` or a mapping of its fields.
        eval_set: optional held-out set; its error % is logged each epoch.

    When ``torch.distributed`` is initialised (``torchrun``), the student is wrapped in
    DistributedDataParallel, each rank reads its shard through a DistributedSampler, only rank 0
    prints and writes checkpoints, and the buffers (batch-norm statistics) are broadcast from
    rank 0 at the end so every rank holds the same state.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        losses: Mapping[str, Any],
        train_set: torch.utils.data.Dataset,
        config: TrainConfig | Mapping[str, Any] | None = None,
        eval_set: torch.utils.data.Dataset | None = None,
    ) -> None:
        if config is None:
            config = TrainConfig()
        self.config = config if isinstance(config, TrainConfig) else TrainConfig.from_dict(config)
        if self.config.epochs < 1 or self.config.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        self.distributed, self.rank, self.world_size = _distributed()
        device = self.config.device
        if device is None:
            if self.distributed and torch.cuda.is_available():
                device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
            else:
                device = str(next(student.parameters()).device)
        self.device = torch.device(device)
        self.student = student.to(self.device)
        self.teacher = teacher.to(self.device).eval() if teacher is not None else None
        if self.teacher is not None:
            for parameter in self.teacher.parameters():
                parameter.requires_grad_(False)
        self.model: nn.Module = self.student
        if self.distributed:
            # find_unused_parameters stays False: every student parameter is used by the scores.
            self.model = nn.parallel.DistributedDataParallel(
                self.student, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self.loss = build_loss(losses, self.model, self.teacher, cache_teacher=self.config.cache_teacher)
        self.losses_config = _plain(losses)
        self.train_set, self.eval_set = train_set, eval_set
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.epoch = 0
        self.history: list[dict[str, float]] = []

    @property
    def _projects_under_ddp(self) -> bool:
        """Whether gradients come from ``autograd.grad`` under DistributedDataParallel: DDP does not
        see those, so the step runs under ``no_sync()`` and :meth:`_all_reduce_mean` averages both
        gradients before the projection (which must see the global main gradient)."""
        return self.distributed and bool(self.loss.projected)

    def _all_reduce_mean(self, gradients: list[torch.Tensor]) -> list[torch.Tensor]:
        import torch.distributed as dist

        flat = torch.cat([g.reshape(-1) for g in gradients])
        dist.all_reduce(flat)
        flat /= self.world_size
        return [piece.view_as(g) for piece, g in zip(flat.split([g.numel() for g in gradients]), gradients)]

    def _make_optimizer(self) -> torch.optim.Optimizer:
        c = self.config
        if c.optimizer == "sgd":
            return torch.optim.SGD(self.student.parameters(), lr=c.lr, momentum=c.momentum, weight_decay=c.weight_decay, nesterov=c.momentum > 0)
        if c.optimizer == "adam":
            return torch.optim.AdamW(self.student.parameters(), lr=c.lr, weight_decay=c.weight_decay)
        raise ValueError(f"unknown optimizer {c.optimizer!r}; choose 'sgd' or 'adam'")

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        c = self.config
        if c.schedule == "cosine":
            return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=c.epochs)
        if c.schedule == "step":
            milestones = [max(1, c.epochs // 2), max(1, (3 * c.epochs) // 4)]
            return torch.optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=milestones, gamma=0.1)
        if c.schedule == "none":
            return None
        raise ValueError(f"unknown schedule {c.schedule!r}; choose 'cosine', 'step' or 'none'")

    def _loader(self, epoch: int) -> torch.utils.data.DataLoader:
        if self.distributed:
            sampler = torch.utils.data.distributed.DistributedSampler(
                self.train_set, num_replicas=self.world_size, rank=self.rank, shuffle=True, seed=self.config.seed, drop_last=True
            )
            sampler.set_epoch(epoch)
            return torch.utils.data.DataLoader(self.train_set, batch_size=self.config.batch_size, sampler=sampler, drop_last=True)
        gen = torch.Generator().manual_seed(self.config.seed * 1000 + epoch)
        # drop_last: a batch of one would break batch norm in train mode.
        return torch.utils.data.DataLoader(self.train_set, batch_size=self.config.batch_size, shuffle=True, generator=gen, drop_last=len(self.train_set) > self.config.batch_size)

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training, as tensors, numbers, strings, lists and dicts
        only (``torch.load(..., weights_only=True)`` reads it, so loading it runs no code)."""
        return {
            "format": RESUME_FORMAT,
            "epoch": self.epoch,
            "student": {key: value.detach().cpu() for key, value in self.student.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "history": [dict(record) for record in self.history],
            "config": asdict(self.config),
            "losses": self.losses_config,
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = [dict(record) for record in state.get("history", [])]
        if "rng" in state:
            _set_rng_state(state["rng"])

    def _save_checkpoint(self) -> None:
        if self.config.checkpoint_dir is None or self.rank != 0:
            return
        directory = Path(self.config.checkpoint_dir)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        # Each file is written to a temporary name and renamed into place: a crash leaves the old
        # file or the new one, never a truncated one under the final name.
        _save_atomic(state, directory / f"epoch_{self.epoch:03d}.pt")
        _save_atomic(state, directory / "last.pt")

    def _maybe_resume(self) -> None:
        if not self.config.resume or self.config.checkpoint_dir is None:
            return
        found = find_resume_state(self.config.checkpoint_dir)
        if found is None:
            return
        path, state, skipped = found
        if skipped:
            warnings.warn(
                f"resuming from {path}; skipped newer checkpoint(s) that do not load: "
                + "; ".join(f"{name} ({reason})" for name, reason in skipped),
                RuntimeWarning, stacklevel=3,
            )
        adjust = self._check_resume_config(path, state)
        try:
            self.load_state_dict(state)
        except (KeyError, RuntimeError, ValueError) as error:
            raise ResumeError(f"{path} does not fit this student or optimizer ({type(error).__name__}: "
                              f"{str(error).splitlines()[0][:300]}); use another checkpoint_dir or resume: false") from None
        adjust()

    def _check_resume_config(self, path: Path, state: Mapping[str, Any]) -> Any:
        """Refuse a checkpoint made under other settings (or, for the adjustable ones with
        ``on_config_change="warn"``, warn); returns the adjustment to apply after loading."""
        saved = dict(state.get("config") or {})
        current = asdict(self.config)
        changed = {key: (saved.get(key), current[key]) for key in _RESUME_CHECKED if saved.get(key) != current[key]}
        if _plain(state.get("losses")) != self.losses_config:
            changed["losses"] = (state.get("losses"), self.losses_config)
        if not changed:
            return lambda: None
        described = ", ".join(f"{key}: checkpoint {old!r}, now {new!r}" for key, (old, new) in changed.items())
        fixed = sorted(set(changed) - set(_RESUME_ADJUSTABLE))
        if fixed or self.config.on_config_change == "error":
            hint = ("these cannot change in the middle of a run" if fixed else
                    "restore them, or set on_config_change: warn to continue with the new values")
            raise ResumeError(f"cannot resume from {path}: the settings differ ({described}); {hint}, "
                              "or use a new checkpoint_dir")
        warnings.warn(f"resuming from {path} with changed settings ({described}); the new values apply from "
                      f"epoch {int(state['epoch']) + 1} on", RuntimeWarning, stacklevel=4)
        return lambda: self._apply_new_hyperparameters(saved)

    def _apply_new_hyperparameters(self, saved: Mapping[str, Any]) -> None:
        """After loading a checkpoint made with other lr / momentum / weight decay / epochs:
        keep the schedule's progress, at the new values."""
        c = self.config
        old_lr = float(saved.get("lr", c.lr))
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * c.lr / old_lr if old_lr > 0 else c.lr
            group["initial_lr"] = c.lr
            group["weight_decay"] = c.weight_decay
            if "momentum" in group:
                group["momentum"] = c.momentum
        if isinstance(self.scheduler, torch.optim.lr_scheduler.CosineAnnealingLR):
            self.scheduler.base_lrs = [c.lr for _ in self.scheduler.base_lrs]
            self.scheduler.T_max = c.epochs
        elif isinstance(self.scheduler, torch.optim.lr_scheduler.MultiStepLR):
            from collections import Counter

            self.scheduler.base_lrs = [c.lr for _ in self.scheduler.base_lrs]
            self.scheduler.milestones = Counter([max(1, c.epochs // 2), max(1, (3 * c.epochs) // 4)])

    # -- loop ---------------------------------------------------------------------------------
    def fit(self, max_epochs: int | None = None) -> list[dict[str, float]]:
        """Train for the remaining epochs (at most ``max_epochs`` of them in this call, e.g. to
        split a run across jobs); returns one dict of mean loss terms (+ eval error) per epoch."""
        seed_everything(self.config.seed)
        self._maybe_resume()
        show = self.config.progress and self.rank == 0
        if show:
            from tqdm.auto import tqdm
        stop = self.config.epochs if max_epochs is None else min(self.config.epochs, self.epoch + max_epochs)
        projects_under_ddp = self._projects_under_ddp
        average = self._all_reduce_mean if projects_under_ddp else None
        while self.epoch < stop:
            self.student.train()
            sums: dict[str, float] = {}
            batches = 0
            loader = self._loader(self.epoch)
            iterator = tqdm(loader, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False) if show else loader
            steps = max(len(loader), 1)
            for index, (images, labels) in enumerate(iterator):
                images, labels = images.to(self.device), labels.to(self.device)
                self.loss.set_progress((self.epoch + index / steps) / self.config.epochs)
                with self.model.no_sync() if projects_under_ddp else contextlib.nullcontext():
                    weighted, terms, _ = self.loss.weighted_terms(images, labels)
                    total = sum(weighted.values())
                    if not torch.isfinite(total):
                        raise FloatingPointError(f"non-finite loss {total.item()} at epoch {self.epoch + 1} (terms {terms})")
                    self.optimizer.zero_grad(set_to_none=True)
                    terms.update(self.loss.backward(weighted, list(self.student.parameters()), average=average))
                self.optimizer.step()
                batches += 1
                for name, value in {"loss": total.detach(), **terms}.items():
                    sums[name] = sums.get(name, 0.0) + float(value)
                if show:
                    iterator.set_postfix({k: f"{v / batches:.4g}" for k, v in sums.items()})
            if self.scheduler is not None:
                self.scheduler.step()
            self.epoch += 1
            record = {"epoch": float(self.epoch), **{k: v / max(batches, 1) for k, v in sums.items()}}
            if self.eval_set is not None:
                record["eval_error"] = evaluate_student(self.student, self.eval_set, device=self.device)
            self.history.append(record)
            if show:
                print(" ".join(f"{k}={v:.4g}" for k, v in record.items()), flush=True)
            self._save_checkpoint()
        if self.distributed:
            import torch.distributed as dist

            for buffer in self.student.buffers():
                dist.broadcast(buffer, src=0)
        return self.history


class ResumeError(ValueError):
    """A checkpoint directory the Trainer cannot (or must not) resume from (a ``ValueError``, so
    ``multiexplain distill`` reports it as one line)."""


#: Settings a resumed run must share with its checkpoint (the others are where files go and how
#: much is printed); the adjustable ones may change with ``on_config_change="warn"``.
_RESUME_CHECKED = ("epochs", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "schedule", "seed")
_RESUME_ADJUSTABLE = ("lr", "momentum", "weight_decay", "epochs")
_EPOCH_FILE = re.compile(r"^epoch_(\d+)\.pt$")


def _plain(value: Any) -> Any:
    """``value`` with every leaf a number, string, bool or None (others by their ``repr``), so a
    loss config can be stored in a weights-only checkpoint and compared."""
    if isinstance(value, Mapping):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return repr(value)


def _rng_state() -> dict[str, Any]:
    import numpy as np

    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype("int64")), "position": int(position),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
    }


def _set_rng_state(state: Any) -> None:
    import numpy as np

    if isinstance(state, torch.Tensor):  # checkpoints of multiexplain 0.2 kept the torch state only
        torch.set_rng_state(state)
        return
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype("uint32"), n["position"], n["has_gauss"], n["cached_gaussian"]))


def _save_atomic(state: Mapping[str, Any], path: Path) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        torch.save(dict(state), handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def _read_state(path: Path) -> tuple[dict[str, Any] | None, str]:
    """A Trainer checkpoint read with ``weights_only=True``, or ``None`` and why it does not load.

    A file that needs code to load (pickled objects other than tensors and plain containers) is
    refused with :class:`ResumeError`, never skipped in silence: it was not written by this
    Trainer, and loading it would run its code.
    """
    from .models.checkpoints import CheckpointCodeError, CheckpointReadError, read_weights_only

    try:
        state = read_weights_only(path)
    except CheckpointCodeError as error:
        raise ResumeError(
            f"refusing to resume from {path}: it holds pickled objects that would run code when loaded "
            f"({error}); a Trainer checkpoint holds tensors and plain values only. Delete the file if you did not "
            "write it, or use a new checkpoint_dir"
        ) from None
    except CheckpointReadError as error:
        return None, f"{'empty file' if path.stat().st_size == 0 else 'unreadable'}: {error}"
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT or "epoch" not in state or "student" not in state:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        return None, f"not a {RESUME_FORMAT} checkpoint (format {found!r})"
    return state, ""


def find_resume_state(directory: str | os.PathLike) -> tuple[Path, dict[str, Any], list[tuple[str, str]]] | None:
    """The newest Trainer checkpoint in ``directory`` that loads: ``(path, state, skipped)``.

    Candidates are ``last.pt`` and every ``epoch_NNN.pt``; the one with the highest epoch that
    loads wins (``last.pt`` on a tie). ``skipped`` names each newer file that did not load and
    why (truncated, empty, another format). ``None`` when the directory has no candidate at all;
    :class:`ResumeError` when candidates exist but none loads, or one holds code.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    numbered = sorted(((int(m.group(1)), path) for path in directory.iterdir() if (m := _EPOCH_FILE.match(path.name))), reverse=True)
    last = directory / "last.pt"
    if not numbered and not last.exists():
        return None
    skipped: list[tuple[str, str]] = []
    best: tuple[Path, dict[str, Any]] | None = None
    if last.exists():
        state, reason = _read_state(last)
        if state is None:
            skipped.append((last.name, reason))
        else:
            best = (last, state)
    for epoch, path in numbered:
        if best is not None and int(best[1]["epoch"]) >= epoch:
            break
        state, reason = _read_state(path)
        if state is None:
            skipped.append((path.name, reason))
            continue
        best = (path, state)
        break
    if best is None:
        raise ResumeError(f"no checkpoint in {directory} loads: " + "; ".join(f"{name} ({reason})" for name, reason in skipped)
                          + "; remove them or set resume: false to start over")
    return best[0], best[1], skipped


@torch.no_grad()
def evaluate_student(model: nn.Module, dataset: torch.utils.data.Dataset, batch_size: int = 256, device: torch.device | str | None = None) -> float:
    """Top-1 error % of ``model`` (in eval mode; its train/eval mode is restored) on ``(image, label)`` pairs."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    wrong = total = 0
    try:
        for images, labels in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
            logits = model_logits(model(images.to(device)))
            wrong += int((logits.argmax(1).cpu() != labels).sum())
            total += len(labels)
    finally:
        model.train(was_training)
    return 100.0 * wrong / max(total, 1)


def _model_from_config(spec: Mapping[str, Any] | None, role: str) -> nn.Module | None:
    if spec is None:
        return None
    spec = dict(spec)
    checkpoint = spec.pop("checkpoint", None)
    if checkpoint == "shipped":
        return load_shipped(f"distill-{role}").model
    if checkpoint is not None:
        return load_checkpoint(checkpoint).model
    arch = spec.pop("arch", "wide_resnet")
    classes = int(spec.pop("num_classes", len(DISTILL_CLASSES)))
    if arch == "mobilenet_v2":
        return mobilenet_v2(classes, **spec)
    if arch != "wide_resnet":
        raise ValueError(f"unknown {role} arch {arch!r}; choose 'wide_resnet' or 'mobilenet_v2'")
    unknown = sorted(set(spec) - {"depth", "widen_factor"})
    if unknown:
        raise ValueError(f"unknown {role} option(s) {unknown}; use arch, depth, widen_factor, num_classes, checkpoint")
    return wide_resnet(int(spec.get("depth", 16)), int(spec.get("widen_factor", 2)), classes)


def train_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Train a student from one config dict (what ``multiexplain distill --config FILE`` loads).

    Keys (all optional except ``student``):

    - ``seed`` (int, 0): seeds the student's initialisation and the training order.
    - ``data``: ``train_size`` (5000), ``test_size`` (1000), ``seed`` (0; the test set uses
      ``seed + 1``), ``fraction`` (1.0; a class-balanced subset of the training set).
    - ``teacher``: ``{"checkpoint": "shipped" | PATH}`` or ``{"depth": 16, "widen_factor": 2}``;
      omit for plain training.
    - ``student``: same form, e.g. ``{"depth": 10, "widen_factor": 1}``, or
      ``{"arch": "mobilenet_v2"}`` (the MobileNetV2-style student).
    - ``losses``: for :func:`build_loss` (default ``{"ce": 1.0}``).
    - ``train``: :class:`TrainConfig` fields (``epochs``, ``batch_size``, ``lr``, ``optimizer``,
      ``schedule``, ``checkpoint_dir``, ``resume``, ``progress``, ``device``); ``seed`` defaults
      to the top-level one.
    - ``output``: path for the trained student (a :func:`multiexplain.models.save_checkpoint` file); rank 0 writes
      it, or every rank its own copy when the path contains ``{rank}``.

    Under ``torchrun`` the process group is initialised here (gloo on CPU, nccl with CUDA).
    Returns ``{"history", "test_error", "output"}``.
    """
    import torch.distributed as dist

    seed = int(config.get("seed", 0))
    created_group = False
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        created_group = True
    try:
        data = dict(config.get("data", {}))
        train_set = make_distill_dataset(int(data.get("train_size", 5000)), int(data.get("seed", 0)))
        if float(data.get("fraction", 1.0)) < 1.0:
            train_set = train_set.subset(float(data["fraction"]), seed=int(data.get("seed", 0)))
        test_set = make_distill_dataset(int(data.get("test_size", 1000)), int(data.get("seed", 0)) + 1)
        if "student" not in config:
            raise ValueError("the config needs a 'student' section, e.g. {'depth': 10, 'widen_factor': 1}")
        # Seeded before each build, so every rank creates the same randomly initialised models.
        torch.manual_seed(seed + 1)
        teacher = _model_from_config(config.get("teacher"), "teacher")
        torch.manual_seed(seed)
        student = _model_from_config(config["student"], "student")
        assert student is not None
        train = {"seed": seed, **dict(config.get("train", {}))}
        trainer = Trainer(student, teacher, config.get("losses", {"ce": 1.0}), train_set, train)
        history = trainer.fit()
        test_error = evaluate_student(student, test_set, device=trainer.device)
        output = config.get("output")
        if output is not None and ("{rank}" in output or trainer.rank == 0):
            output = output.replace("{rank}", str(trainer.rank))
            Path(output).parent.mkdir(parents=True, exist_ok=True)
            save_checkpoint(output, student, meta={"test_error": test_error, "history": history})
        if trainer.distributed:
            dist.barrier()
        return {"history": history, "test_error": test_error, "output": output}
    finally:
        if created_group:
            dist.destroy_process_group()


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``.json``, ``.yaml``/``.yml`` or ``.toml`` config file into a dict."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            return yaml.safe_load(text)  # plain values only: a python tag is refused, never run
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            tags = " (tags such as !!python/object are refused: a config holds plain values)" if "tag" in problem else ""
            raise ValueError(f"not a plain YAML config{where}: {problem}{tags}") from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib

        return tomllib.loads(text)
    raise ValueError(f"unknown config format {path.suffix!r}; use .json, .yaml or .toml")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train a student with distillation losses (torchrun-ready).")
    parser.add_argument("--config", required=True, help="a .json / .yaml / .toml file for train_from_config")
    args = parser.parse_args(argv)
    result = train_from_config(load_config_file(args.config))
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps({"test_error": result["test_error"], "output": result["output"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
