"""Teacher-student distillation with an explanation loss (Grad-CAM++ paper, section 5).

Public entry points (stable; the CLI's ``multiexplain distill`` calls :func:`train_from_config`):

- :class:`ExplanationLoss` -- ``a * ||L_student - L_teacher||^2`` (paper eq. 27-28, ``a = 0.01``):
  the teacher's map without a graph, the student's with ``create_graph=True`` so the loss
  backpropagates into the student's weights (double backpropagation).
- :data:`LOSSES` (name -> loss-term class) and :func:`build_loss` -- ``"ce"``, ``"kd"`` (Hinton,
  temperature 4), ``"at"`` (attention transfer, Zagoruyko & Komodakis) and ``"expl"``, combined by
  weights into one :class:`DistillationLoss` that runs each model forward once per step.
- :class:`Trainer` / :class:`TrainConfig` -- epochs, optimiser, schedule, seed, progress bar with
  the loss terms, a checkpoint per epoch, resume; under ``torchrun`` it trains with
  DistributedDataParallel (gloo on CPU, nccl on GPU).
- :func:`train_from_config` -- everything from one dict (keys documented on the function).
- :func:`wide_resnet` -- WRN-depth-k for 32x32 inputs: ``wide_resnet(40, 2)`` -> ``wide_resnet(16, 2)``
  is the paper's pair.
- :func:`load_distillation_pair` -- the shipped small teacher (WRN-16-2) and student (WRN-10-1),
  trained on :func:`make_distill_dataset` by ``scripts/train_distillation_pair.py``.
- :func:`make_distill_dataset` -- re-exported from :mod:`multiexplain.distill_data`.

Run as a module for multi-process training:
``torchrun --nproc_per_node 2 -m multiexplain.adapters.distillation --config run.json``.

No CAM math lives here: maps come from :class:`multiexplain.GradCAMPlusPlus` /
:class:`multiexplain.GradCAM` and resizing / min-max normalisation from :mod:`multiexplain.core`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import multiexplain
from multiexplain import core
from multiexplain.cam import METHODS, BaseCAM, Inputs, call_model, model_logits, primary_input
from multiexplain.distill_data import DISTILL_CLASSES, make_distill_dataset
from multiexplain.layers import find_auto_layer, resolve_layer

__all__ = [
    "ExplanationLoss",
    "CrossEntropyLoss",
    "HintonKDLoss",
    "AttentionTransferLoss",
    "DistillationLoss",
    "StepOutputs",
    "LOSSES",
    "build_loss",
    "TrainConfig",
    "Trainer",
    "train_from_config",
    "WideResNet",
    "wide_resnet",
    "load_distillation_pair",
    "make_distill_dataset",
    "map_correlation",
    "evaluate_student",
    "save_wide_resnet",
    "load_config_file",
    "attention_map",
]

NORMALIZATIONS = ("none", "l2", "max", "minmax")
#: Where the shipped checkpoints live: ``multiexplain/checkpoints`` inside the installed package.
CHECKPOINT_DIR = Path(multiexplain.__file__).resolve().parent / "checkpoints"


# ---------------------------------------------------------------------------------------------
# Wide ResNets for 32x32 inputs (Zagoruyko & Komodakis 2016, pre-activation blocks)
# ---------------------------------------------------------------------------------------------
class _WideBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a (projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = (
            nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)
            if stride != 1 or in_channels != out_channels
            else None
        )

    def forward(self, x: Tensor) -> Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + (self.shortcut(pre) if self.shortcut is not None else x)


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor`` for ``(N, 3, 32, 32)`` inputs -> logits ``(N, num_classes)``.

    Layout: ``conv1`` (16 channels, 32x32) -> ``block1`` (16k, 32x32) -> ``block2`` (32k, 16x16) ->
    ``block3`` (64k, 8x8) -> ``bn`` -> ``relu`` -> ``pool`` -> ``fc``. Attention transfer uses the
    three group outputs (:attr:`group_layers`); Grad-CAM++ uses :attr:`cam_layer` = ``"relu"``,
    the last activation before pooling. It sits *after* the final batch norm, so in train mode
    nothing between the explained layer and the scores couples samples (a train-mode batch norm
    after the layer would make one sample's score depend on the others' activations).
    """

    group_layers: ClassVar[tuple[str, ...]] = ("block1", "block2", "block3")
    cam_layer: ClassVar[str] = "relu"

    def __init__(self, depth: int = 16, widen_factor: int = 2, num_classes: int = len(DISTILL_CLASSES), in_channels: int = 3) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"a WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be a positive integer, got {widen_factor}")
        self.depth, self.widen_factor, self.num_classes = depth, widen_factor, num_classes
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)

        def group(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
            return nn.Sequential(*(_WideBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(blocks_per_group)))

        self.block1 = group(widths[0], widths[1], 1)
        self.block2 = group(widths[1], widths[2], 2)
        self.block3 = group(widths[2], widths[3], 2)
        self.bn = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        x = self.relu(self.bn(x))
        return self.fc(self.pool(x).flatten(1))

    def extra_repr(self) -> str:
        return f"WRN-{self.depth}-{self.widen_factor}, {self.num_classes} classes"


def wide_resnet(depth: int, widen_factor: int, num_classes: int = len(DISTILL_CLASSES)) -> WideResNet:
    """A WRN-``depth``-``widen_factor`` for 32x32 inputs; ``wide_resnet(40, 2, 10)`` is the paper's teacher."""
    return WideResNet(depth, widen_factor, num_classes)


# ---------------------------------------------------------------------------------------------
# What one training step computes, shared by all loss terms
# ---------------------------------------------------------------------------------------------
@dataclass
class StepOutputs:
    """Everything the loss terms read for one batch.

    ``student_logits`` / ``teacher_logits``: ``(N, classes)`` (teacher detached, or ``None``
    when no term needs the teacher); ``labels``: ``(N,)``; ``student_maps`` / ``teacher_maps``:
    aligned, normalised maps ``(N, *map_size)`` (``None`` without an explanation term);
    ``student_features`` / ``teacher_features``: the attention-transfer layers' outputs.
    """

    labels: Tensor
    student_logits: Tensor
    teacher_logits: Tensor | None = None
    student_maps: Tensor | None = None
    teacher_maps: Tensor | None = None
    student_features: list[Tensor] = field(default_factory=list)
    teacher_features: list[Tensor] = field(default_factory=list)


class LossTerm(nn.Module):
    """One weighted term of a distillation objective; ``value(step)`` is the unweighted loss."""

    needs_teacher: ClassVar[bool] = False

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"a loss weight must be a finite number >= 0, got {weight}")
        self.weight = float(weight)

    def value(self, step: StepOutputs) -> Tensor:
        raise NotImplementedError


class CrossEntropyLoss(LossTerm):
    """Cross-entropy of the student's logits against the ground-truth labels."""

    def value(self, step: StepOutputs) -> Tensor:
        return F.cross_entropy(step.student_logits, step.labels)


class HintonKDLoss(LossTerm):
    """Hinton et al. 2015: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, batch mean; ``T = 4``."""

    needs_teacher = True

    def __init__(self, weight: float = 1.0, temperature: float = 4.0) -> None:
        super().__init__(weight)
        if temperature <= 0:
            raise ValueError(f"the KD temperature must be > 0, got {temperature}")
        self.temperature = float(temperature)

    def value(self, step: StepOutputs) -> Tensor:
        assert step.teacher_logits is not None
        t = self.temperature
        log_student = F.log_softmax(step.student_logits / t, dim=1)
        log_teacher = F.log_softmax(step.teacher_logits.detach() / t, dim=1)
        return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * t * t


def attention_map(features: Tensor) -> Tensor:
    """Zagoruyko & Komodakis's activation-based attention: mean over channels of ``x^2``,
    L2-normalised per sample. ``(N, C, H, W)`` -> ``(N, H, W)``."""
    energy = features.pow(2).mean(dim=1)
    return F.normalize(energy.flatten(1), dim=1).view_as(energy)


class AttentionTransferLoss(LossTerm):
    """Attention transfer: ``sum over layer pairs of mean((at(s) - at(t))^2)``, weight ``beta/2 = 500``
    as in the authors' code. Layer pairs come from :class:`DistillationLoss`'s feature layers;
    a student map of another size is resized (bilinear) to the teacher's."""

    needs_teacher = True

    def __init__(self, weight: float = 500.0) -> None:
        super().__init__(weight)

    def value(self, step: StepOutputs) -> Tensor:
        if not step.student_features or len(step.student_features) != len(step.teacher_features):
            raise ValueError("attention transfer needs the same number (>= 1) of student and teacher feature layers")
        total = step.student_logits.new_zeros(())
        for student, teacher in zip(step.student_features, step.teacher_features):
            s, t = attention_map(student), attention_map(teacher.detach())
            if s.shape[1:] != t.shape[1:]:
                s = F.normalize(core.upsample_maps(s, t.shape[1:]).flatten(1), dim=1).view_as(t)
            total = total + (s - t).pow(2).mean()
        return total


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (layers live there)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def _default_layer(model: nn.Module, layer: nn.Module | str) -> nn.Module | str:
    inner = _unwrap(model)
    if layer == "auto" and isinstance(inner, WideResNet):
        return inner.cam_layer
    return layer


class ExplanationLoss(LossTerm):
    """``weight * mean over samples of ||L_student - L_teacher||^2`` (paper eq. 27-28).

    Args:
        teacher, student: the two models. The student may be wrapped in DistributedDataParallel;
            the teacher is explained in the mode the caller left it in (put it in ``eval()``).
        teacher_layer, student_layer: layer to explain (module, dotted name or ``"auto"``; for a
            :class:`WideResNet` ``"auto"`` is its ``cam_layer``).
        weight: ``a`` in eq. 28 (0.01 as in the paper).
        method: ``"gradcam++"`` (paper) or ``"gradcam"`` (the comparison of Table 4).
        normalize: applied to each aligned layer-resolution map before the distance:
            ``"none"`` (the paper), ``"l2"`` (unit L2 norm per map, as in attention transfer),
            ``"max"`` (divide by the map's max), ``"minmax"`` (to ``[0, 1]``, like ``Explanation.maps``).
        size: spatial size both maps are resized to; ``None`` resizes the student's map to the
            teacher's resolution (no-op when they agree).
        target: ``"label"`` explains the ground-truth class, ``"teacher"`` the teacher's top-1.

    ``forward(inputs, labels)`` returns the weighted loss (a scalar with a graph to the student's
    parameters only: the teacher's map is computed without one). :meth:`explain_pair` gives the
    maps and logits for callers that also need the logits (one forward per model).
    """

    needs_teacher = True

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        teacher_layer: nn.Module | str = "auto",
        student_layer: nn.Module | str = "auto",
        *,
        weight: float = 0.01,
        method: str = "gradcam++",
        normalize: str = "none",
        size: Sequence[int] | None = None,
        target: str = "label",
    ) -> None:
        super().__init__(weight)
        if method not in METHODS:
            raise ValueError(f"unknown CAM method {method!r}; choose one of {sorted(METHODS)}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"unknown map normalisation {normalize!r}; choose one of {NORMALIZATIONS}")
        if target not in ("label", "teacher"):
            raise ValueError(f"target must be 'label' (ground truth) or 'teacher' (teacher's top-1), got {target!r}")
        # Plain attributes, not submodules: the loss must not register the models' parameters
        # (an optimiser over loss.parameters() would otherwise train the teacher).
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "student", student)
        self.method, self.normalize, self.target = method, normalize, target
        self.size = tuple(int(s) for s in size) if size is not None else None
        self._layers: dict[str, nn.Module | str] = {
            "teacher": _default_layer(teacher, teacher_layer),
            "student": _default_layer(student, student_layer),
        }
        self._explainers: dict[str, BaseCAM] = {}

    def _explainer(self, role: str, inputs: Inputs) -> BaseCAM:
        """The role's explainer, built on first use (``"auto"`` needs one traced forward)."""
        if role not in self._explainers:
            model = self.teacher if role == "teacher" else self.student
            inner = _unwrap(model)
            layer = self._layers[role]
            if layer == "auto":
                # Trace the unwrapped model: a DDP forward would prepare its reducer for a backward.
                reference = primary_input(inputs)
                layer = find_auto_layer(inner, lambda: call_model(inner, inputs), reference.shape[0], input_shape=tuple(reference.shape))
            else:
                layer = resolve_layer(inner, layer)
            self._explainers[role] = METHODS[self.method](model, layer, create_graph=role == "student")
        return self._explainers[role]

    def _explain(self, role: str, inputs: Inputs, choose: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
        """Layer-resolution map ``(N, *layer_spatial)`` and logits ``(N, classes)`` from one forward."""
        captured: dict[str, Tensor] = {}

        def score(output: Any) -> Tensor:
            logits = model_logits(output)
            captured["logits"] = logits
            return logits.gather(1, choose(logits).view(-1, 1)).squeeze(1)

        explanation = self._explainer(role, inputs)(inputs, score)
        return explanation.raw, captured["logits"]

    def _prepare(self, maps: Tensor, size: Sequence[int]) -> Tensor:
        spatial_ndim = len(size)
        maps = core.upsample_maps(maps, size)
        if self.normalize == "l2":
            return F.normalize(maps.flatten(-spatial_ndim), dim=-1).view_as(maps)
        if self.normalize == "max":
            peak = maps.flatten(-spatial_ndim).amax(dim=-1)
            return maps / peak.clamp_min(1e-12).view(*peak.shape, *(1,) * spatial_ndim)
        if self.normalize == "minmax":
            return core.normalize_maps(maps, spatial_ndim)
        return maps

    def explain_pair(self, inputs: Inputs, labels: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(student_maps, teacher_maps, student_logits, teacher_logits)`` for one batch.

        Maps are aligned to one size and normalised per :attr:`normalize`: ``(N, *size)``. The
        teacher's map and logits are detached; the student's carry a graph to its parameters.
        """
        labels = labels.view(-1).long()
        if self.target == "teacher":
            choose_teacher: Callable[[Tensor], Tensor] = lambda logits: logits.argmax(dim=1)
        else:
            choose_teacher = lambda logits: labels.to(logits.device)
        teacher_maps, teacher_logits = self._explain("teacher", inputs, choose_teacher)
        teacher_logits = teacher_logits.detach()
        # The student explains the same class as the teacher: the label, or the teacher's top-1.
        classes = teacher_logits.argmax(dim=1) if self.target == "teacher" else labels
        student_maps, student_logits = self._explain("student", inputs, lambda logits: classes.to(logits.device))
        size = self.size or tuple(teacher_maps.shape[1:])
        return (
            self._prepare(student_maps, size),
            self._prepare(teacher_maps.detach(), size).to(student_maps.device),
            student_logits,
            teacher_logits,
        )

    def distance(self, student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
        """Unweighted ``mean over samples of sum over positions of (L_s - L_t)^2``."""
        if student_maps.shape != teacher_maps.shape:
            raise ValueError(f"student maps {tuple(student_maps.shape)} and teacher maps {tuple(teacher_maps.shape)} differ in shape")
        return (student_maps - teacher_maps.detach()).pow(2).flatten(1).sum(dim=1).mean()

    def value(self, step: StepOutputs) -> Tensor:
        if step.student_maps is None or step.teacher_maps is None:
            raise ValueError("the explanation loss needs student and teacher maps (see explain_pair)")
        return self.distance(step.student_maps, step.teacher_maps)

    def forward(self, inputs: Inputs, labels: Tensor) -> Tensor:
        student_maps, teacher_maps, _, _ = self.explain_pair(inputs, labels)
        return self.weight * self.distance(student_maps, teacher_maps)


#: Loss terms by name; ``build_loss`` instantiates them from a config.
LOSSES: dict[str, type[LossTerm]] = {
    "ce": CrossEntropyLoss,
    "kd": HintonKDLoss,
    "at": AttentionTransferLoss,
    "expl": ExplanationLoss,
}


@contextmanager
def _capture_outputs(model: nn.Module, names: Sequence[str], into: list[Tensor]) -> Iterator[None]:
    """Append the outputs of the named layers of ``model`` to ``into`` during the block."""
    inner = _unwrap(model)
    slots: list[Tensor | None] = [None] * len(names)
    handles = []

    def hook_for(i: int) -> Callable[..., None]:
        def hook(_module: nn.Module, _args: Any, output: Any) -> None:
            slots[i] = output

        return hook

    try:
        for i, name in enumerate(names):
            handles.append(resolve_layer(inner, name).register_forward_hook(hook_for(i)))
        yield
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name, slot in zip(names, slots) if slot is None]
    if missing:
        raise RuntimeError(f"attention-transfer layer(s) {missing} did not run in the forward pass")
    into.extend(slots)  # type: ignore[arg-type]


class DistillationLoss(nn.Module):
    """Weighted sum of named loss terms; one forward of each model per step.

    ``forward(inputs, labels)`` returns ``(total, terms, student_logits)``: the scalar to
    backpropagate, the unweighted value of every term (detached, for logging) and the student's
    logits ``(N, classes)``. With an ``"expl"`` term the student's forward is the explainer's
    (differentiable) forward, so CE / KD / AT reuse it instead of running the student twice.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        terms: Mapping[str, LossTerm],
        student_feature_layers: Sequence[str] = WideResNet.group_layers,
        teacher_feature_layers: Sequence[str] = WideResNet.group_layers,
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a distillation loss needs at least one term")
        needy = [name for name, term in terms.items() if term.needs_teacher]
        if needy and teacher is None:
            raise ValueError(f"loss term(s) {needy} need a teacher model")
        object.__setattr__(self, "student", student)
        object.__setattr__(self, "teacher", teacher)
        self.terms = nn.ModuleDict(dict(terms))
        self.student_feature_layers = tuple(student_feature_layers)
        self.teacher_feature_layers = tuple(teacher_feature_layers)

    @property
    def explanation(self) -> ExplanationLoss | None:
        found = [term for term in self.terms.values() if isinstance(term, ExplanationLoss)]
        return found[0] if found else None

    def compute_step(self, inputs: Inputs, labels: Tensor) -> StepOutputs:
        """Run the models once and collect what the terms need."""
        use_at = any(isinstance(term, AttentionTransferLoss) for term in self.terms.values())
        needs_teacher = any(term.needs_teacher for term in self.terms.values())
        explanation = self.explanation
        student_features: list[Tensor] = []
        teacher_features: list[Tensor] = []
        with ExitStack() as stack:
            if use_at:
                stack.enter_context(_capture_outputs(self.student, self.student_feature_layers, student_features))
                assert self.teacher is not None
                stack.enter_context(_capture_outputs(self.teacher, self.teacher_feature_layers, teacher_features))
            student_maps = teacher_maps = teacher_logits = None
            if explanation is not None:
                student_maps, teacher_maps, student_logits, teacher_logits = explanation.explain_pair(inputs, labels)
            else:
                if needs_teacher:
                    assert self.teacher is not None
                    with torch.no_grad():
                        teacher_logits = model_logits(call_model(self.teacher, inputs))
                student_logits = model_logits(call_model(self.student, inputs))
        return StepOutputs(
            labels=labels,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            student_maps=student_maps,
            teacher_maps=teacher_maps,
            student_features=student_features,
            teacher_features=[feature.detach() for feature in teacher_features],
        )

    def forward(self, inputs: Inputs, labels: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        step = self.compute_step(inputs, labels)
        values = {name: term.value(step) for name, term in self.terms.items()}
        total = sum(self.terms[name].weight * value for name, value in values.items())
        return total, {name: value.detach() for name, value in values.items()}, step.student_logits  # type: ignore[return-value]


def build_loss(config: Mapping[str, Any], student: nn.Module, teacher: nn.Module | None = None) -> DistillationLoss:
    """A :class:`DistillationLoss` from ``{name: weight}`` or ``{name: {"weight": w, **options}}``.

    Names are the keys of :data:`LOSSES`. Options: ``kd``: ``temperature`` (4); ``expl``:
    ``method`` ("gradcam++" | "gradcam"), ``normalize`` ("none" | "l2" | "max" | "minmax"),
    ``size`` ([h, w] or null), ``target`` ("label" | "teacher"), ``teacher_layer`` /
    ``student_layer`` ("auto"); ``at``: ``student_layers`` / ``teacher_layers`` (default the
    WRN group outputs). Example: ``{"ce": 1, "kd": {"weight": 1, "temperature": 4},
    "expl": {"weight": 0.01, "method": "gradcam++"}}``.
    """
    if not isinstance(config, Mapping) or not config:
        raise ValueError(f"a loss config is a non-empty mapping of loss names to weights/options, got {config!r}")
    terms: dict[str, LossTerm] = {}
    feature_layers: dict[str, Sequence[str]] = {}
    for name, spec in config.items():
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
        options = dict(spec) if isinstance(spec, Mapping) else {"weight": float(spec)}
        if name == "expl":
            if teacher is None:
                raise ValueError("the 'expl' loss needs a teacher model")
            terms[name] = ExplanationLoss(teacher, student, **options)
        elif name == "at":
            for role in ("student", "teacher"):
                if f"{role}_layers" in options:
                    feature_layers[role] = tuple(options.pop(f"{role}_layers"))
            terms[name] = AttentionTransferLoss(**options)
        else:
            terms[name] = LOSSES[name](**options)
    return DistillationLoss(
        student,
        teacher,
        terms,
        feature_layers.get("student", WideResNet.group_layers),
        feature_layers.get("teacher", WideResNet.group_layers),
    )


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------
@dataclass
class TrainConfig:
    """Trainer settings (all keys of the ``"train"`` section of :func:`train_from_config`).

    ``optimizer``: "sgd" (momentum, Nesterov) or "adam"; ``schedule``: "cosine", "step" (x0.1 at
    50% and 75% of the epochs) or "none"; ``checkpoint_dir``: where ``epoch_XXX.pt`` and
    ``last.pt`` go each epoch (``None``: no checkpoints); ``resume``: continue from
    ``checkpoint_dir/last.pt`` when it exists; ``device``: "cpu", "cuda", ... or ``None`` (the
    student's device; under torchrun with CUDA, ``cuda:LOCAL_RANK``).
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
    progress: bool = True
    device: str | None = None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown train option(s) {unknown}; known: {sorted(known)}")
        return cls(**values)


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
        self.loss = build_loss(losses, self.model, self.teacher)
        self.train_set, self.eval_set = train_set, eval_set
        self.optimizer = self._make_optimizer()
        self.scheduler = self._make_scheduler()
        self.epoch = 0
        self.history: list[dict[str, float]] = []

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
        return {
            "epoch": self.epoch,
            "student": self.student.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "history": self.history,
            "config": asdict(self.config),
            "rng": torch.get_rng_state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch = int(state["epoch"])
        self.history = list(state.get("history", []))
        if "rng" in state:
            torch.set_rng_state(state["rng"])

    def _save_checkpoint(self) -> None:
        if self.config.checkpoint_dir is None or self.rank != 0:
            return
        directory = Path(self.config.checkpoint_dir)
        directory.mkdir(parents=True, exist_ok=True)
        state = self.state_dict()
        torch.save(state, directory / f"epoch_{self.epoch:03d}.pt")
        # Write-then-rename, so an interrupted save never leaves a broken last.pt to resume from.
        tmp = directory / "last.pt.tmp"
        torch.save(state, tmp)
        os.replace(tmp, directory / "last.pt")

    def _maybe_resume(self) -> None:
        if not self.config.resume or self.config.checkpoint_dir is None:
            return
        path = Path(self.config.checkpoint_dir) / "last.pt"
        if path.exists():
            self.load_state_dict(torch.load(path, map_location=self.device, weights_only=False))

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
        while self.epoch < stop:
            self.student.train()
            sums: dict[str, float] = {}
            batches = 0
            loader = self._loader(self.epoch)
            iterator = tqdm(loader, desc=f"epoch {self.epoch + 1}/{self.config.epochs}", leave=False) if show else loader
            for images, labels in iterator:
                images, labels = images.to(self.device), labels.to(self.device)
                total, terms, _ = self.loss(images, labels)
                if not torch.isfinite(total):
                    raise FloatingPointError(f"non-finite loss {total.item()} at epoch {self.epoch + 1} (terms {terms})")
                self.optimizer.zero_grad(set_to_none=True)
                total.backward()
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


def map_correlation(first: Tensor, second: Tensor) -> Tensor:
    """Pearson correlation of two batches of maps ``(N, *spatial)`` -> ``(N,)``; 0 where a map is constant."""
    a = first.flatten(1).double()
    b = second.flatten(1).double()
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    return torch.where(denominator > 0, (a * b).sum(dim=1) / denominator.clamp_min(1e-300), torch.zeros_like(denominator))


# ---------------------------------------------------------------------------------------------
# Shipped pair and config-driven training
# ---------------------------------------------------------------------------------------------
#: The shipped pair's architectures and data (see scripts/train_distillation_pair.py).
SHIPPED_TEACHER = {"depth": 16, "widen_factor": 2}
SHIPPED_STUDENT = {"depth": 10, "widen_factor": 1}


def _load_checkpoint_model(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> WideResNet:
    state = torch.load(path, map_location=map_location, weights_only=True)
    arch = state["arch"]
    model = WideResNet(int(arch["depth"]), int(arch["widen_factor"]), int(arch["num_classes"]))
    model.load_state_dict(state["state_dict"])
    return model.to(map_location).eval()


def save_wide_resnet(model: WideResNet, path: str | os.PathLike, **meta: Any) -> None:
    """Save a :class:`WideResNet` with its architecture, loadable by :func:`load_distillation_pair`."""
    arch = {"depth": model.depth, "widen_factor": model.widen_factor, "num_classes": model.num_classes}
    torch.save({"arch": arch, "state_dict": model.state_dict(), "meta": meta}, path)


def load_distillation_pair(device: str | torch.device = "cpu", directory: str | os.PathLike | None = None) -> tuple[WideResNet, WideResNet]:
    """The shipped ``(teacher, student)``: WRN-16-2 and WRN-10-1 trained (CE only) on
    :func:`make_distill_dataset`, in eval mode. ``directory`` overrides where the ``.pt`` files are."""
    base = Path(directory) if directory is not None else CHECKPOINT_DIR
    paths = [base / "distill_teacher.pt", base / "distill_student.pt"]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"shipped distillation checkpoint(s) missing: {missing}; run scripts/train_distillation_pair.py")
    teacher, student = (_load_checkpoint_model(p, device) for p in paths)
    return teacher, student


def _model_from_config(spec: Mapping[str, Any] | None, role: str) -> WideResNet | None:
    if spec is None:
        return None
    spec = dict(spec)
    checkpoint = spec.pop("checkpoint", None)
    if checkpoint == "shipped":
        teacher, student = load_distillation_pair()
        return teacher if role == "teacher" else student
    if checkpoint is not None:
        return _load_checkpoint_model(checkpoint)
    unknown = sorted(set(spec) - {"depth", "widen_factor", "num_classes"})
    if unknown:
        raise ValueError(f"unknown {role} option(s) {unknown}; use depth, widen_factor, num_classes, checkpoint")
    return wide_resnet(int(spec.get("depth", 16)), int(spec.get("widen_factor", 2)), int(spec.get("num_classes", len(DISTILL_CLASSES))))


def train_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Train a student from one config dict (what ``multiexplain distill --config FILE`` loads).

    Keys (all optional except ``student``):

    - ``seed`` (int, 0): seeds the student's initialisation and the training order.
    - ``data``: ``train_size`` (5000), ``test_size`` (1000), ``seed`` (0; the test set uses
      ``seed + 1``), ``fraction`` (1.0; a class-balanced subset of the training set).
    - ``teacher``: ``{"checkpoint": "shipped" | PATH}`` or ``{"depth": 16, "widen_factor": 2}``;
      omit for plain training.
    - ``student``: same form, e.g. ``{"depth": 10, "widen_factor": 1}``.
    - ``losses``: for :func:`build_loss` (default ``{"ce": 1.0}``).
    - ``train``: :class:`TrainConfig` fields (``epochs``, ``batch_size``, ``lr``, ``optimizer``,
      ``schedule``, ``checkpoint_dir``, ``resume``, ``progress``, ``device``); ``seed`` defaults
      to the top-level one.
    - ``output``: path for the trained student (:func:`save_wide_resnet` format); rank 0 writes
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
            save_wide_resnet(student, output, test_error=test_error, history=history)
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

        return yaml.safe_load(text)
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
