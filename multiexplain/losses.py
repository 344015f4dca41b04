"""Distillation objectives: loss terms registered by name and built from a config.

``"ce"`` (cross-entropy), ``"kd"`` (Hinton et al. 2015, temperature 4), ``"at"`` (attention
transfer, Zagoruyko & Komodakis 2017) and ``"expl"`` (the explanation loss of
:class:`multiexplain.adapters.distillation.ExplanationLoss`) combine by weights into one
:class:`DistillationLoss` that runs each model forward once per step: with an explanation term the
student's forward is the explainer's differentiable forward, and the other terms reuse its logits.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import core
from .adapters.distillation import DEFAULT_MAP_SETTINGS, ExplanationLoss, unwrap
from .explain import Inputs, LayerCapture, call_model, model_logits, resolve_layer
from .models.wrn import WideResNet

__all__ = [
    "AttentionTransferLoss", "CONFLICT_RULES", "CrossEntropyLoss", "DistillationLoss", "EXPLANATION_PRESETS", "ExplanationLoss",
    "HintonKDLoss", "LOSSES", "LossTerm", "SCHEDULES", "StepOutputs", "TeacherCache", "attention_map", "build_loss",
    "feature_layers_of", "project_conflicting", "schedule_factor",
]


@dataclass
class StepOutputs:
    """Everything the loss terms read for one batch.

    ``student_logits`` / ``teacher_logits``: ``(N, classes)`` (teacher detached, or ``None``
    when no term needs the teacher); ``labels``: ``(N,)``; ``student_maps`` / ``teacher_maps``:
    aligned, normalised maps ``(N, *map_size)`` (``None`` without an explanation term);
    ``student_features`` / ``teacher_features``: the attention-transfer layers' outputs;
    ``teacher_attention``: the teacher's attention maps of those layers (``(N, H, W)`` each) when
    they come from a :class:`TeacherCache` instead of features.
    """

    labels: Tensor
    student_logits: Tensor
    teacher_logits: Tensor | None = None
    student_maps: Tensor | None = None
    teacher_maps: Tensor | None = None
    student_features: list[Tensor] = field(default_factory=list)
    teacher_features: list[Tensor] = field(default_factory=list)
    teacher_attention: list[Tensor] = field(default_factory=list)


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
        teachers = step.teacher_attention or [attention_map(feature.detach()) for feature in step.teacher_features]
        if not step.student_features or len(step.student_features) != len(teachers):
            raise ValueError("attention transfer needs the same number (>= 1) of student and teacher feature layers")
        total = step.student_logits.new_zeros(())
        for student, t in zip(step.student_features, teachers):
            s, t = attention_map(student), t.detach()
            if s.shape[1:] != t.shape[1:]:
                s = F.normalize(core.upsample_maps(s, t.shape[1:]).flatten(1), dim=1).view_as(t)
            total = total + (s - t).pow(2).mean()
        return total



#: Loss terms by name; ``build_loss`` instantiates them from a config.
LOSSES: dict[str, type[nn.Module]] = {
    "ce": CrossEntropyLoss,
    "kd": HintonKDLoss,
    "at": AttentionTransferLoss,
    "expl": ExplanationLoss,
}

#: Named settings of the explanation term (``{"expl": {"preset": NAME, **overrides}}``).
#: ``"default"`` is what ``{"expl": ...}`` gets without a preset (chosen by the study in
#: ``benchmarks/quality_distillation.py``); ``"paper"`` is the Grad-CAM++ paper's eq. 28 exactly:
#: a = 0.01 on raw (unnormalised) maps, a constant weight.
EXPLANATION_PRESETS: dict[str, dict[str, Any]] = {
    "default": {**DEFAULT_MAP_SETTINGS, "schedule": "constant", "warmup": 0.0, "conflict": "project"},
    "paper": {"weight": 0.01, "method": "gradcam++", "normalize": "none", "schedule": "constant", "warmup": 0.0, "conflict": "none"},
}

#: What a term's gradient does where it opposes the rest of the objective's (``conflict=``):
#: ``"none"``: nothing (a plain weighted sum); ``"project"``: its component along the rest's
#: gradient is removed (see :func:`project_conflicting`).
CONFLICT_RULES = ("none", "project")

#: Weight schedules over training progress ``p`` in ``[0, 1]`` (a linear warm-up from 0 comes first).
SCHEDULES = ("constant", "linear", "cosine")


def schedule_factor(schedule: str, progress: float, warmup: float = 0.0) -> float:
    """The multiplier of a term's weight at training progress ``progress`` (0: start, 1: end).

    ``"constant"``: 1; ``"linear"``: ``1 - p``; ``"cosine"``: ``(1 + cos(pi p)) / 2`` (both decay
    to 0 at the end). ``warmup`` (a fraction of training) ramps the factor linearly from 0 first.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown weight schedule {schedule!r}; choose one of {SCHEDULES}")
    if not 0.0 <= warmup < 1.0:
        raise ValueError(f"warmup is a fraction of training in [0, 1), got {warmup}")
    p = min(max(float(progress), 0.0), 1.0)
    factor = {"constant": 1.0, "linear": 1.0 - p, "cosine": 0.5 * (1.0 + math.cos(math.pi * p))}[schedule]
    return factor * (min(1.0, p / warmup) if warmup > 0 else 1.0)


def project_conflicting(main: Sequence[Tensor], auxiliary: Sequence[Tensor]) -> tuple[list[Tensor], bool]:
    """The auxiliary gradient with the part that opposes the main gradient removed.

    ``main`` and ``auxiliary`` are per-parameter gradients (same shapes, in the same order) of the
    main objective and of an auxiliary term, taken as one vector each. Where ``g_a . g_m < 0`` the
    auxiliary step would increase the main loss to first order, so ``g_a`` loses its component
    along ``g_m`` (the projection of Yu et al. 2020, "Gradient surgery for multi-task learning",
    applied one way, as auxiliary losses are in Du et al. 2018): the sum then never descends the
    main loss more slowly than ``g_m`` alone. Returns the (projected) auxiliary gradients and
    whether the two conflicted.
    """
    # float64 sums: the dot product of two ~1e5-long float32 vectors decides the branch.
    dot = sum((a.double() * m.double()).sum() for a, m in zip(auxiliary, main))
    norm = sum(m.double().pow(2).sum() for m in main)
    if not (dot < 0 and norm > 0):
        return list(auxiliary), False
    scale = float(dot / norm)
    return [a - scale * m for m, a in zip(main, auxiliary)], True


def feature_layers_of(model: nn.Module) -> tuple[str, ...]:
    """The layers attention transfer reads by default: the model's declared ``group_layers``
    (its stage outputs), else a WRN's three groups."""
    return tuple(getattr(unwrap(model), "group_layers", WideResNet.group_layers))


class TeacherCache:
    """The frozen teacher's outputs (logits, raw explanation maps, attention maps), computed once
    per training sample.

    A frozen teacher in eval mode gives the same outputs for the same image every epoch, so with
    un-augmented data they need computing only in the first epoch. Keys are a digest of each
    sample's bytes and label (inputs are copied to the CPU to hash them); a batch is served from
    the cache only when every sample in it is there with every entry asked for. Do not use it with
    random augmentation (the images then differ every epoch and the cache only grows).
    """

    def __init__(self) -> None:
        self._store: dict[bytes, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return len(self._store)

    @staticmethod
    def keys(inputs: Tensor, labels: Tensor) -> list[bytes]:
        images = inputs.detach().cpu().contiguous()
        classes = labels.view(-1).cpu().tolist()
        return [hashlib.blake2b(image.numpy().tobytes() + str(int(c)).encode(), digest_size=16).digest()
                for image, c in zip(images, classes)]

    def get(self, keys: Sequence[bytes], names: Sequence[str], device: torch.device) -> dict[str, Tensor] | None:
        """``{name: (N, ...)}`` for the batch, or ``None`` unless every sample has every name."""
        if not keys or any(key not in self._store or any(n not in self._store[key] for n in names) for key in keys):
            return None
        return {name: torch.stack([self._store[key][name] for key in keys]).to(device) for name in names}

    def put(self, keys: Sequence[bytes], values: Mapping[str, Tensor]) -> None:
        """Store ``{name: (N, ...)}`` per sample (detached, on the CPU)."""
        values = {name: value.detach().cpu() for name, value in values.items()}
        for i, key in enumerate(keys):
            self._store.setdefault(key, {}).update({name: value[i] for name, value in values.items()})


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

    Args:
        student, teacher: the models (the teacher frozen, or ``None`` without teacher terms).
        terms: name -> term (``value(step)`` gives its unweighted loss, ``weight`` its weight).
        student_feature_layers, teacher_feature_layers: attention transfer's layer pairs
            (default: each model's ``group_layers``, see :func:`feature_layers_of`).
        schedules: name -> ``(schedule, warmup)`` (see :func:`schedule_factor`); a term without
            one keeps its weight. :meth:`set_progress` tells the loss where training is.
        projected: terms whose gradient is projected off the other terms' where they conflict
            (:func:`project_conflicting`); :meth:`backward` applies it, so train with
            ``loss.backward(weighted, parameters)`` rather than ``total.backward()``.
        cache_teacher: keep the teacher's logits and maps per sample (:class:`TeacherCache`).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        terms: Mapping[str, nn.Module],
        student_feature_layers: Sequence[str] | None = None,
        teacher_feature_layers: Sequence[str] | None = None,
        schedules: Mapping[str, tuple[str, float]] | None = None,
        cache_teacher: bool = False,
        projected: Sequence[str] = (),
    ) -> None:
        super().__init__()
        if not terms:
            raise ValueError("a distillation loss needs at least one term")
        needy = [name for name, term in terms.items() if getattr(term, "needs_teacher", False)]
        if needy and teacher is None:
            raise ValueError(f"loss term(s) {needy} need a teacher model")
        object.__setattr__(self, "student", student)
        object.__setattr__(self, "teacher", teacher)
        self.terms = nn.ModuleDict(dict(terms))
        self.student_feature_layers = tuple(student_feature_layers or feature_layers_of(student))
        self.teacher_feature_layers = tuple(teacher_feature_layers or (feature_layers_of(teacher) if teacher is not None else ()))
        self.schedules = dict(schedules or {})
        unknown = sorted(set(self.schedules) - set(self.terms))
        if unknown:
            raise ValueError(f"schedules for unknown term(s) {unknown}")
        for schedule, warmup in self.schedules.values():
            schedule_factor(schedule, 0.0, warmup)  # validates both
        self.projected = tuple(projected)
        unknown = sorted(set(self.projected) - set(self.terms))
        if unknown:
            raise ValueError(f"conflict='project' for unknown term(s) {unknown}")
        if set(self.projected) == set(self.terms):
            # Nothing to conflict with (e.g. the explanation term alone): a plain backward.
            self.projected = ()
        self.progress = 0.0
        self._warned_sum = False
        self.cache = TeacherCache() if cache_teacher else None

    @property
    def explanation(self) -> ExplanationLoss | None:
        found = [term for term in self.terms.values() if isinstance(term, ExplanationLoss)]
        return found[0] if found else None

    def set_progress(self, progress: float) -> None:
        """Where training is, from 0 (start) to 1 (end): scheduled weights follow it."""
        self.progress = float(progress)

    def weights(self) -> dict[str, float]:
        """Every term's weight at the current progress (its schedule applied)."""
        weights = {}
        for name, term in self.terms.items():
            schedule, warmup = self.schedules.get(name, ("constant", 0.0))
            weights[name] = term.weight * schedule_factor(schedule, self.progress, warmup)
        return weights

    def _run_teacher(self, inputs: Inputs, labels: Tensor, explanation: ExplanationLoss | None, use_at: bool) -> dict[str, Tensor]:
        """One teacher forward: its logits, raw maps (with an explanation term) and attention maps (with AT)."""
        assert self.teacher is not None
        features: list[Tensor] = []
        with ExitStack() as stack:
            if use_at:
                stack.enter_context(_capture_outputs(self.teacher, self.teacher_feature_layers, features))
            if explanation is not None:
                maps, logits = explanation.explain_teacher(inputs, labels)
                out = {"logits": logits, "maps": maps}
            else:
                with torch.no_grad():
                    out = {"logits": model_logits(call_model(self.teacher, inputs)).detach()}
        out.update({f"attention{i}": attention_map(feature.detach()) for i, feature in enumerate(features)})
        return out

    def _teacher_outputs(self, inputs: Inputs, labels: Tensor, explanation: ExplanationLoss | None, use_at: bool) -> dict[str, Tensor]:
        """The teacher's outputs for the batch, from the cache when it has them all."""
        names = ["logits"] + (["maps"] if explanation is not None else [])
        names += [f"attention{i}" for i in range(len(self.teacher_feature_layers))] if use_at else []
        keys = None
        if self.cache is not None and isinstance(inputs, Tensor):
            keys = self.cache.keys(inputs, labels)
            hit = self.cache.get(keys, names, inputs.device)
            if hit is not None:
                return hit
        out = self._run_teacher(inputs, labels, explanation, use_at)
        if keys is not None:
            self.cache.put(keys, out)  # type: ignore[union-attr]
        return out

    def compute_step(self, inputs: Inputs, labels: Tensor) -> StepOutputs:
        """Run the models once (the teacher not at all when the cache has the batch) and collect
        what the terms need."""
        use_at = any(isinstance(term, AttentionTransferLoss) for term in self.terms.values())
        needs_teacher = any(getattr(term, "needs_teacher", False) for term in self.terms.values())
        explanation = self.explanation
        teacher = self._teacher_outputs(inputs, labels, explanation, use_at) if needs_teacher else {}
        teacher_logits = teacher.get("logits")
        student_features: list[Tensor] = []
        student_maps = teacher_maps = None
        with ExitStack() as stack:
            if use_at:
                stack.enter_context(_capture_outputs(self.student, self.student_feature_layers, student_features))
            if explanation is not None:
                assert teacher_logits is not None
                student_maps, teacher_maps, student_logits, teacher_logits = explanation.explain_pair(
                    inputs, labels, teacher=(teacher["maps"], teacher_logits))
            else:
                student_logits = model_logits(call_model(self.student, inputs))
        return StepOutputs(
            labels=labels,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            student_maps=student_maps,
            teacher_maps=teacher_maps,
            student_features=student_features,
            teacher_attention=[teacher[f"attention{i}"] for i in range(len(self.teacher_feature_layers))] if use_at else [],
        )

    def weighted_terms(self, inputs: Inputs, labels: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """``(weighted, values, student_logits)``: every term times its current weight (on the
        graph), its unweighted value (detached, for logging) and the student's logits."""
        step = self.compute_step(inputs, labels)
        values = {name: term.value(step) for name, term in self.terms.items()}
        weights = self.weights()
        weighted = {name: weights[name] * value for name, value in values.items()}
        return weighted, {name: value.detach() for name, value in values.items()}, step.student_logits

    def forward(self, inputs: Inputs, labels: Tensor) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """``(total, values, student_logits)``. With projected terms, ``total.backward()`` would sum
        them plainly: train through :meth:`weighted_terms` and :meth:`backward` instead (a warning
        says so, once per loss)."""
        weighted, values, logits = self.weighted_terms(inputs, labels)
        if self.projected and torch.is_grad_enabled() and not self._warned_sum:
            self._warned_sum = True
            warnings.warn(
                f"this loss projects {list(self.projected)} off the other terms' gradient; backpropagating the total it "
                "returns sums the terms plainly. Train with weighted, terms, logits = loss.weighted_terms(x, y); "
                "loss.backward(weighted, student.parameters()) (the Trainer does), or set conflict='none'",
                UserWarning, stacklevel=2)
        return sum(weighted.values()), values, logits  # type: ignore[return-value]

    def backward(
        self,
        weighted: Mapping[str, Tensor],
        parameters: Sequence[nn.Parameter],
        average: Callable[[list[Tensor]], list[Tensor]] | None = None,
    ) -> dict[str, float]:
        """Fill ``parameters``' ``.grad`` with the objective's gradient (the terms of
        :meth:`weighted_terms`), projecting the ``projected`` terms' off the others'.

        ``average`` (data-parallel training) turns this process's gradients into the global ones
        before the projection, which must see the global main gradient. Returns
        ``{"<term>_conflict": 1.0 or 0.0}`` per projected term: whether it conflicted this step.
        """
        if not self.projected:
            sum(weighted.values()).backward()  # type: ignore[union-attr]
            return {}
        parameters = [p for p in parameters if p.requires_grad]
        main = sum(value for name, value in weighted.items() if name not in self.projected)
        names = [name for name in weighted if name in self.projected]
        losses = [main] + [weighted[name] for name in names]
        gradients, used = [], [False] * len(parameters)
        for index, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, parameters, retain_graph=index < len(losses) - 1, allow_unused=True)
            used = [u or g is not None for u, g in zip(used, grads)]
            grads = [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]
            gradients.append(average(grads) if average is not None else grads)
        combined, conflicts = list(gradients[0]), {}
        for name, auxiliary in zip(names, gradients[1:]):
            # Each auxiliary term against the main objective alone, not against the others.
            auxiliary, conflicted = project_conflicting(gradients[0], auxiliary)
            combined = [c + a for c, a in zip(combined, auxiliary)]
            conflicts[f"{name}_conflict"] = float(conflicted)
        for parameter, gradient, reached in zip(parameters, combined, used):
            if not reached:  # as after a plain backward: no gradient, so the optimizer skips it (no decay)
                continue
            parameter.grad = gradient if parameter.grad is None else parameter.grad + gradient
        return conflicts


def _explanation_options(spec: Any) -> dict[str, Any]:
    """The explanation term's options: a preset (``"default"`` unless named) with overrides on top."""
    options = dict(spec) if isinstance(spec, Mapping) else {"weight": float(spec)}
    preset = options.pop("preset", "default")
    if preset not in EXPLANATION_PRESETS:
        raise ValueError(f"unknown explanation preset {preset!r}; choose one of {sorted(EXPLANATION_PRESETS)}")
    return {**EXPLANATION_PRESETS[preset], **options}


def build_loss(
    config: Mapping[str, Any], student: nn.Module, teacher: nn.Module | None = None, *, cache_teacher: bool = False
) -> DistillationLoss:
    """A :class:`DistillationLoss` from ``{name: weight}`` or ``{name: {"weight": w, **options}}``.

    Names are the keys of :data:`LOSSES`. Every term takes ``schedule`` ("constant" | "linear" |
    "cosine", see :func:`schedule_factor`), ``warmup`` (a fraction of training) and ``conflict``
    (:data:`CONFLICT_RULES`: ``"project"`` removes the part of the term's gradient that opposes
    the other terms', see :func:`project_conflicting`). Options:
    ``kd``: ``temperature`` (4); ``at``: ``student_layers`` / ``teacher_layers`` (default each
    model's ``group_layers``); ``expl``: ``preset`` (:data:`EXPLANATION_PRESETS`: ``"default"``
    unless named, ``"paper"`` for eq. 28 as published), then any of ``weight``, ``method``
    ("gradcam++" | "gradcam"), ``normalize`` ("none" | "l2" | "max" | "minmax"), ``size``
    ([h, w] or null), ``target`` ("label" | "teacher"), ``teacher_layer`` / ``student_layer``
    ("auto"). A bare number for ``expl`` is the default preset at that weight. Example:
    ``{"ce": 1, "kd": {"weight": 1, "temperature": 4}, "expl": {"preset": "paper"}}``.
    """
    if not isinstance(config, Mapping) or not config:
        raise ValueError(f"a loss config is a non-empty mapping of loss names to weights/options, got {config!r}")
    terms: dict[str, nn.Module] = {}
    feature_layers: dict[str, Sequence[str]] = {}
    schedules: dict[str, tuple[str, float]] = {}
    projected: list[str] = []
    for name, spec in config.items():
        if name not in LOSSES:
            raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
        options = _explanation_options(spec) if name == "expl" else (dict(spec) if isinstance(spec, Mapping) else {"weight": float(spec)})
        schedule, warmup = options.pop("schedule", "constant"), float(options.pop("warmup", 0.0))
        if schedule != "constant" or warmup > 0:
            schedules[name] = (schedule, warmup)
        conflict = options.pop("conflict", "none")
        if conflict not in CONFLICT_RULES:
            raise ValueError(f"unknown conflict rule {conflict!r} for loss {name!r}; choose one of {CONFLICT_RULES}")
        if conflict == "project":
            projected.append(name)
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
        student, teacher, terms, feature_layers.get("student"), feature_layers.get("teacher"),
        schedules=schedules, cache_teacher=cache_teacher, projected=projected,
    )
