"""multiexplain's distillation losses in torchdistill's registries (``pip install "multiexplain[distill]"``).

Importing this module registers, under these keys:

* mid-level losses (``criterion: {key: ...}`` in a torchdistill YAML):
  ``MultiExplainKDLoss`` (:class:`multiexplain.losses.HintonKDLoss`, ``T^2 * KL``),
  ``MultiExplainATLoss`` (:class:`multiexplain.losses.AttentionTransferLoss`) and
  ``MultiExplainExplanationLoss`` (the Grad-CAM++ explanation term, :data:`EXPLANATION_PRESETS`);
* the teacher forward process ``multiexplain_explain_teacher`` (``teacher: {forward_proc: ...}``):
  torchdistill runs a frozen teacher under ``torch.no_grad()``, but a Grad-CAM++ map needs the
  gradient at the teacher's layer, so this process runs the teacher through multiexplain's
  explainer (one forward, gradients at the layer only) and returns
  ``{"logits": (N, classes), "cams": {"gradcam++": (N, h, w), "gradcam": (N, h, w)}}``, all
  detached, for the true classes (``targets``).

The student's map is built from torchdistill's own I/O dict: the student's explained layer
output (hooked with ``forward_hook: {output: [relu]}``) and its logits are on the live graph,
so ``MultiExplainExplanationLoss`` takes the gradient at that layer with ``create_graph=True``
(no second student forward) and the loss backpropagates into the student's weights.
``examples/torchdistill_explanation_loss.yaml`` is a full configuration.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor, nn

from . import core
from .adapters.distillation import align_maps, map_distance
from .explain import METHODS, model_logits
from .losses import EXPLANATION_PRESETS, AttentionTransferLoss, HintonKDLoss, StepOutputs

try:
    from torchdistill.core.interfaces.registry import register_forward_proc_func
    from torchdistill.losses.registry import register_mid_level_loss
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError('multiexplain.torchdistill_losses needs torchdistill: pip install "multiexplain[distill]"') from error

__all__ = ["MultiExplainATLoss", "MultiExplainExplanationLoss", "MultiExplainKDLoss", "TEACHER_FORWARD_PROC", "explain_teacher"]

#: The key of the teacher forward process in torchdistill's registry.
TEACHER_FORWARD_PROC = "multiexplain_explain_teacher"
_TEACHER_METHODS = ("gradcam++", "gradcam")
#: One explainer per teacher (its layer is resolved on the first batch), dropped with the model.
_EXPLAINERS: "weakref.WeakKeyDictionary[nn.Module, Any]" = weakref.WeakKeyDictionary()


def _io(io_dict: dict, path: str, io: str = "output") -> Any:
    try:
        return io_dict[path][io]
    except KeyError:
        raise KeyError(f"torchdistill's I/O dict has no {io!r} of module {path!r} (it has {sorted(io_dict)}); "
                       f"add it to the model's forward_hook {io} list") from None


@register_forward_proc_func(key=TEACHER_FORWARD_PROC)
def explain_teacher(model: nn.Module, sample_batch: Tensor, targets: Tensor | None = None, supp_dict: Any = None, **kwargs: Any) -> dict:
    """The teacher's logits and Grad-CAM++ / Grad-CAM raw maps of ``targets`` (the labels) at its
    "auto" layer, from one forward; gradients are enabled inside (torchdistill calls a frozen
    teacher under ``no_grad``) and taken w.r.t. the layer only, so no parameter gets a ``.grad``."""
    if targets is None:
        raise ValueError(f"{TEACHER_FORWARD_PROC} explains the true classes: the data loader must give targets")
    if model not in _EXPLAINERS:
        _EXPLAINERS[model] = METHODS["gradcam++"](model, "auto")
    with torch.enable_grad():
        captured: dict[str, Tensor] = {}

        def score(output: Any) -> Tensor:
            logits = model_logits(output)
            captured["logits"] = logits
            return logits.gather(1, targets.view(-1, 1).to(logits.device).long()).squeeze(1)

        explained = _EXPLAINERS[model].explain_methods(sample_batch, score, methods=_TEACHER_METHODS)
    return {"logits": captured["logits"].detach(), "cams": {name: e.raw.detach() for name, e in explained.items()}}


def _teacher_logits(output: Any) -> Tensor:
    return output["logits"] if isinstance(output, dict) and "logits" in output else model_logits(output)


@register_mid_level_loss
class MultiExplainKDLoss(nn.Module):
    """Hinton KD as :class:`~multiexplain.losses.HintonKDLoss` (``T^2 * KL``, batch mean) on the
    logits at ``student_module_path`` / ``teacher_module_path`` (``"."``: the model's output;
    the teacher's may be the dict of ``multiexplain_explain_teacher``). Unweighted: give the
    weight in the YAML term."""

    def __init__(self, student_module_path: str = ".", teacher_module_path: str = ".", temperature: float = 4.0,
                 student_module_io: str = "output", teacher_module_io: str = "output", **kwargs: Any) -> None:
        super().__init__()
        self.term = HintonKDLoss(temperature=temperature)
        self.paths = ((student_module_path, student_module_io), (teacher_module_path, teacher_module_io))

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, targets: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        (s_path, s_io), (t_path, t_io) = self.paths
        student = model_logits(_io(student_io_dict, s_path, s_io))
        teacher = _teacher_logits(_io(teacher_io_dict, t_path, t_io))
        return self.term.value(StepOutputs(labels=targets, student_logits=student, teacher_logits=teacher))  # type: ignore[arg-type]


@register_mid_level_loss
class MultiExplainATLoss(nn.Module):
    """Attention transfer as :class:`~multiexplain.losses.AttentionTransferLoss` (sum over layer
    pairs of ``mean((at(s) - at(t))^2)``; a student map of another size is resized) on hooked
    layer outputs. ``pairs``: ``[[student_path, teacher_path], ...]``. Unweighted (the usual
    ``beta/2 = 500`` goes in the YAML term's weight)."""

    def __init__(self, pairs: list, **kwargs: Any) -> None:
        super().__init__()
        if not pairs:
            raise ValueError("MultiExplainATLoss needs at least one [student_path, teacher_path] pair")
        self.pairs = [(str(s), str(t)) for s, t in pairs]
        self.term = AttentionTransferLoss(weight=1.0)

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, targets: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        students = [_io(student_io_dict, s) for s, _ in self.pairs]
        teachers = [_io(teacher_io_dict, t).detach() for _, t in self.pairs]
        step = StepOutputs(labels=targets, student_logits=students[0], student_features=students, teacher_features=teachers)  # type: ignore[arg-type]
        return self.term.value(step)


@register_mid_level_loss
class MultiExplainExplanationLoss(nn.Module):
    """The explanation term ``weight * mean ||L_s - L_t||^2`` inside a torchdistill run.

    Args:
        student_layer_path: the student's explained layer, hooked for its output (e.g. ``"relu"``).
        student_logits_path: where the student's logits are (``"."``: its output).
        teacher_output_path: where ``multiexplain_explain_teacher``'s dict is (``"."``).
        preset: :data:`~multiexplain.losses.EXPLANATION_PRESETS` name (``"default"``, ``"paper"``);
            ``weight``, ``method`` ("gradcam++" | "gradcam"), ``normalize`` and ``size`` override it.

    The weight is applied here (the preset's), so give the YAML term weight 1.0. Two things of a
    preset cannot run inside torchdistill and are refused rather than dropped: a non-constant
    schedule (torchdistill does not tell a loss where training is) and ``conflict="project"``
    (torchdistill backpropagates the sum of its terms itself, so no term's gradient can be
    projected off the others'). The default preset projects: pass ``conflict: 'none'`` to use its
    weight and maps as a plain term of torchdistill's sum (or train with
    :class:`multiexplain.train.Trainer`, which projects).
    """

    def __init__(self, student_layer_path: str = "relu", student_logits_path: str = ".", teacher_output_path: str = ".",
                 preset: str = "default", weight: float | None = None, method: str | None = None,
                 normalize: str | None = None, size: list | None = None, conflict: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        if preset not in EXPLANATION_PRESETS:
            raise ValueError(f"unknown explanation preset {preset!r}; choose one of {sorted(EXPLANATION_PRESETS)}")
        settings = dict(EXPLANATION_PRESETS[preset])
        settings.update({k: v for k, v in {"weight": weight, "method": method, "normalize": normalize, "conflict": conflict}.items() if v is not None})
        if settings.get("conflict", "none") != "none":
            raise ValueError(f"preset {preset!r} has conflict={settings['conflict']!r}: torchdistill sums the loss terms and "
                             "backpropagates the sum itself, so this term's gradient cannot be projected off the others'; "
                             "pass conflict: 'none' (a plain weighted term) or train with multiexplain.train.Trainer")
        if settings.get("schedule", "constant") != "constant" or float(settings.get("warmup", 0.0)) > 0:
            raise ValueError(f"preset {preset!r} has a weight schedule, which torchdistill's losses cannot follow; "
                             "give weight= for a constant weight")
        if settings["method"] not in _TEACHER_METHODS:
            raise ValueError(f"method must be one of {_TEACHER_METHODS}, got {settings['method']!r}")
        if settings["normalize"] not in core.MAP_SCALINGS:
            raise ValueError(f"unknown map normalisation {settings['normalize']!r}; choose one of {core.MAP_SCALINGS}")
        self.weight, self.method, self.normalize = float(settings["weight"]), settings["method"], settings["normalize"]
        self.size = tuple(int(v) for v in size) if size is not None else None
        self.paths = (student_layer_path, student_logits_path, teacher_output_path)

    def student_maps(self, activation: Tensor, logits: Tensor, classes: Tensor) -> Tensor:
        """Raw maps ``(N, h, w)`` from the hooked activation ``(N, C, h, w)`` and the logits, with a
        graph to the student's parameters (double backpropagation)."""
        if not activation.requires_grad:
            raise RuntimeError("the student's hooked layer output carries no graph; is the student trained (requires_grad)?")
        score = logits.gather(1, classes.view(-1, 1).to(logits.device).long()).sum()
        (gradients,) = torch.autograd.grad(score, activation, create_graph=True)
        weight_fn = core.grad_cam_plus_plus_weights if self.method == "gradcam++" else core.grad_cam_weights
        return core.class_activation_map(activation, gradients, weight_fn)[1]

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, targets: Tensor | None = None, *args: Any, **kwargs: Any) -> Tensor:
        if targets is None:
            raise ValueError("the explanation loss explains the true classes: the data loader must give targets")
        layer_path, logits_path, teacher_path = self.paths
        teacher = _io(teacher_io_dict, teacher_path)
        if not isinstance(teacher, dict) or "cams" not in teacher:
            raise ValueError(f"the teacher's output at {teacher_path!r} holds no maps: set the teacher's "
                             f"forward_proc to {TEACHER_FORWARD_PROC!r}")
        maps = self.student_maps(_io(student_io_dict, layer_path), model_logits(_io(student_io_dict, logits_path)), targets)
        student, teacher_maps = align_maps(maps, teacher["cams"][self.method], self.normalize, self.size)
        return self.weight * map_distance(student, teacher_maps)
