"""Distillation objectives: loss terms registered by name and built from a config.

``"ce"`` (cross-entropy), ``"kd"`` (Hinton et al. 2015, temperature 4), ``"at"`` (attention
transfer, Zagoruyko & Komodakis 2017) and ``"expl"`` (the explanation loss of
:class:`multiexplain.adapters.distillation.ExplanationLoss`) combine by weights into one
:class:`DistillationLoss` that runs each model forward once per step: with an explanation term the
student's forward is the explainer's differentiable forward, and the other terms reuse its logits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import core
from .adapters.distillation import ExplanationLoss, unwrap
from .explain import Inputs, LayerCapture, call_model, model_logits, resolve_layer
from .models.wrn import WideResNet

__all__ = [
    "AttentionTransferLoss", "CrossEntropyLoss", "DistillationLoss", "ExplanationLoss", "HintonKDLoss", "LOSSES",
    "LossTerm", "StepOutputs", "attention_map", "build_loss",
]


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



#: Loss terms by name; ``build_loss`` instantiates them from a config.
LOSSES: dict[str, type[LossTerm]] = {
    "ce": CrossEntropyLoss,
    "kd": HintonKDLoss,
    "at": AttentionTransferLoss,
    "expl": ExplanationLoss,
}


@contextmanager
def _capture_outputs(model: nn.Module, names: Sequence[str], into: list[Tensor]) -> Iterator[None]:
    """Append the outputs of the named layers of ``model`` to ``into`` during the block (the one
    capture, observing: the forward is left untouched)."""
    inner = unwrap(model)
    captures = []
    for name in names:
        choice = resolve_layer(inner, name)
        captures.append(LayerCapture(choice.module, choice.name, observe=True))
    with ExitStack() as stack:
        for capture in captures:
            stack.enter_context(capture.attached())
        yield
    into.extend(capture.require() for capture in captures)


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
