"""Distillation with an explanation loss (Grad-CAM++ paper, section 5): ``multiexplain.adapters.distillation``.

:class:`ExplanationLoss` turns a teacher, a student and a batch into two explanations of the same
class -- the teacher's without a graph, the student's with ``create_graph=True`` -- and their
distance ``a * ||L_student - L_teacher||^2`` (eq. 27-28), which backpropagates into the student's
weights (double backpropagation). The layers are the one resolver's, the maps the shared
explainer's; the other loss terms (CE, KD, attention transfer) and the trainer live in
:mod:`multiexplain.losses` and :mod:`multiexplain.train`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar, Sequence

from torch import Tensor, nn

from multiexplain import core
from multiexplain.explain import METHODS, BaseCAM, Inputs, call_model, method_names, model_logits, primary_input, resolve_layer
from multiexplain.explain.layers import LayerSpec

__all__ = ["DEFAULT_MAP_SETTINGS", "ExplanationLoss", "align_maps", "map_distance", "unwrap"]

#: The explanation term's own defaults (the study in ``benchmarks/quality_distillation.py``):
#: weight 2 on L2-normalised Grad-CAM++ maps. :data:`multiexplain.losses.EXPLANATION_PRESETS`
#: adds the objective's settings (schedule, conflict rule) to these; the one place they are set.
DEFAULT_MAP_SETTINGS: dict[str, Any] = {"weight": 2.0, "method": "gradcam++", "normalize": "l2"}


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel / DataParallel wrapper (its layers live there)."""
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


def align_maps(student_maps: Tensor, teacher_maps: Tensor, normalize: str, size: Sequence[int] | None = None) -> tuple[Tensor, Tensor]:
    """Raw layer-resolution maps ``(N, *spatial)`` of both models resized to ``size`` (default the
    teacher's grid) and scaled per ``normalize`` (:func:`multiexplain.core.scale_maps`); the
    teacher's detached and moved to the student's device."""
    size = tuple(size) if size is not None else tuple(teacher_maps.shape[1:])
    prepare = lambda maps: core.scale_maps(core.upsample_maps(maps, size), len(size), normalize)
    return prepare(student_maps), prepare(teacher_maps.detach()).to(student_maps.device)


def map_distance(student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
    """``mean over samples of sum over positions of (L_s - L_t)^2`` (eq. 28 without its weight)."""
    if student_maps.shape != teacher_maps.shape:
        raise ValueError(f"student maps {tuple(student_maps.shape)} and teacher maps {tuple(teacher_maps.shape)} differ in shape")
    return (student_maps - teacher_maps.detach()).pow(2).flatten(1).sum(dim=1).mean()


class ExplanationLoss(nn.Module):
    """``weight * mean over samples of ||L_student - L_teacher||^2`` (paper eq. 27-28), by
    default on L2-normalised maps with ``weight = 2``.

    Args:
        teacher, student: the two models. The student may be wrapped in DistributedDataParallel;
            the teacher is explained in the mode the caller left it in (put it in ``eval()``).
        teacher_layer, student_layer: the layer to explain (module, dotted name or ``"auto"``: the
            one resolver, e.g. a :class:`~multiexplain.models.WideResNet`'s declared ``relu``).
        weight: ``a`` in eq. 28. Default 2 on L2-normalised maps (the study in
            ``benchmarks/quality_distillation.py``); the paper's 0.01 on raw maps is
            ``weight=0.01, normalize="none"`` (``{"expl": {"preset": "paper"}}`` in a loss config).
            The study's default also projects this term's gradient off the rest of the
            objective's where they conflict: that is the objective's business
            (:class:`multiexplain.losses.DistillationLoss`, ``conflict="project"``), not this term's.
        method: a registered method name (``"gradcam++"``: the paper; ``"gradcam"``: its Table 4).
        normalize: how each aligned layer-resolution map is scaled before the distance
            (:func:`multiexplain.core.scale_maps`): ``"l2"`` (default: unit maps, so the term's
            strength does not depend on how large a model's raw maps are; raw Grad-CAM++ maps are
            ~150x larger than Grad-CAM's), ``"none"`` (the paper), ``"max"``, ``"minmax"``.
        size: spatial size both maps are resized to; ``None``: the teacher's layer resolution.
        target: ``"label"`` explains the ground-truth class, ``"teacher"`` the teacher's top-1.

    ``forward(inputs, labels)`` returns the weighted loss (a scalar with a graph to the student's
    parameters only). :meth:`explain_pair` gives the maps and both models' logits (one forward per
    model), which :class:`multiexplain.losses.DistillationLoss` shares with its other terms.
    """

    needs_teacher: ClassVar[bool] = True

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        teacher_layer: LayerSpec = "auto",
        student_layer: LayerSpec = "auto",
        *,
        weight: float = DEFAULT_MAP_SETTINGS["weight"],
        method: str = DEFAULT_MAP_SETTINGS["method"],
        normalize: str = DEFAULT_MAP_SETTINGS["normalize"],
        size: Sequence[int] | None = None,
        target: str = "label",
    ) -> None:
        super().__init__()
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"a loss weight must be a finite number >= 0, got {weight}")
        method_names(method)
        if normalize not in core.MAP_SCALINGS:
            raise ValueError(f"unknown map normalisation {normalize!r}; choose one of {core.MAP_SCALINGS}")
        if target not in ("label", "teacher"):
            raise ValueError(f"target must be 'label' (ground truth) or 'teacher' (teacher's top-1), got {target!r}")
        # Plain attributes, not submodules: the loss must not register the models' parameters
        # (an optimiser over loss.parameters() would otherwise train the teacher).
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "student", student)
        self.weight, self.method, self.normalize, self.target = float(weight), method, normalize, target
        self.size = tuple(int(s) for s in size) if size is not None else None
        self._layers = {"teacher": teacher_layer, "student": student_layer}
        self._explainers: dict[str, BaseCAM] = {}

    def _explainer(self, role: str, inputs: Inputs) -> BaseCAM:
        """The role's explainer. For a wrapped (DDP) model the layer is resolved on the module
        inside (a forward through the wrapper would prepare its reducer for a backward); the
        explanation's forward then runs through the wrapper."""
        if role not in self._explainers:
            model = self.teacher if role == "teacher" else self.student
            inner, layer, options = unwrap(model), self._layers[role], {}
            if inner is not model:
                reference = primary_input(inputs)
                choice = resolve_layer(inner, layer, call=lambda module: call_model(module, inputs),
                                       input_shape=tuple(reference.shape))
                layer, options = choice.module, {"reshape": choice.reshape, "layer_call": choice.layer_call,
                                                 "element": choice.element}
            self._explainers[role] = METHODS[self.method](model, layer, create_graph=role == "student", **options)
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

    def explain_teacher(self, inputs: Inputs, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The teacher's raw layer-resolution maps ``(N, *layer_spatial)`` and logits ``(N, classes)``,
        both detached (what :class:`multiexplain.losses.TeacherCache` stores per sample)."""
        labels = labels.view(-1).long()
        if self.target == "teacher":
            choose: Callable[[Tensor], Tensor] = lambda logits: logits.argmax(dim=1)
        else:
            choose = lambda logits: labels.to(logits.device)
        maps, logits = self._explain("teacher", inputs, choose)
        return maps.detach(), logits.detach()

    def student_classes(self, labels: Tensor, teacher_logits: Tensor) -> Tensor:
        """The classes the student explains: the teacher's (the label, or the teacher's top-1)."""
        return teacher_logits.argmax(dim=1) if self.target == "teacher" else labels.view(-1).long()

    def explain_student(self, inputs: Inputs, classes: Tensor) -> tuple[Tensor, Tensor]:
        """The student's raw maps ``(N, *layer_spatial)`` of ``classes`` with a graph to its
        parameters, and its logits ``(N, classes)`` from the same (differentiable) forward."""
        return self._explain("student", inputs, lambda logits: classes.to(logits.device))

    def align(self, student_maps: Tensor, teacher_maps: Tensor) -> tuple[Tensor, Tensor]:
        """Both raw maps resized to :attr:`size` (default the teacher's grid) and scaled per
        :attr:`normalize`: ``(N, *size)`` each, the teacher's detached."""
        return align_maps(student_maps, teacher_maps, self.normalize, self.size)

    def explain_pair(
        self, inputs: Inputs, labels: Tensor, teacher: tuple[Tensor, Tensor] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(student_maps, teacher_maps, student_logits, teacher_logits)`` for one batch: maps
        aligned to one size and scaled per :attr:`normalize`, ``(N, *size)``; the teacher's detached.
        ``teacher``: the teacher's ``(raw maps, logits)`` when already known (a cache), else computed."""
        teacher_maps, teacher_logits = teacher if teacher is not None else self.explain_teacher(inputs, labels)
        classes = self.student_classes(labels, teacher_logits)
        student_maps, student_logits = self.explain_student(inputs, classes)
        student_maps, teacher_maps = self.align(student_maps, teacher_maps)
        return student_maps, teacher_maps, student_logits, teacher_logits.detach()

    def distance(self, student_maps: Tensor, teacher_maps: Tensor) -> Tensor:
        """Unweighted ``mean over samples of sum over positions of (L_s - L_t)^2``."""
        return map_distance(student_maps, teacher_maps)

    def value(self, step: Any) -> Tensor:
        """The unweighted distance from a training step's maps (``step.student_maps`` / ``teacher_maps``)."""
        if getattr(step, "student_maps", None) is None or getattr(step, "teacher_maps", None) is None:
            raise ValueError("the explanation loss needs student and teacher maps (see explain_pair)")
        return self.distance(step.student_maps, step.teacher_maps)

    def forward(self, inputs: Inputs, labels: Tensor) -> Tensor:
        student_maps, teacher_maps, _, _ = self.explain_pair(inputs, labels)
        return self.weight * self.distance(student_maps, teacher_maps)
