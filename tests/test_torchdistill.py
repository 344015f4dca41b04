"""torchdistill interop: our KD and AT against torchdistill's on the same tensors, our losses in
its registries, and the example YAML training for one short epoch with the explanation loss."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

torchdistill = pytest.importorskip("torchdistill")  # the [distill] extra; [test] installs it

from torchdistill.common.yaml_util import load_yaml_file  # noqa: E402
from torchdistill.core.interfaces.registry import FORWARD_PROC_FUNC_DICT  # noqa: E402
from torchdistill.losses.mid_level import ATLoss, KDLoss  # noqa: E402
from torchdistill.losses.registry import MIDDLE_LEVEL_LOSS_DICT, get_mid_level_loss  # noqa: E402

from multiexplain import losses, models  # noqa: E402
from multiexplain import torchdistill_losses as td  # noqa: E402
from multiexplain.data.distill_data import make_distill_dataset  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _logits(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(7, 6, generator=gen, dtype=torch.float64), torch.randn(7, 6, generator=gen, dtype=torch.float64), torch.arange(7) % 6


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_our_kd_equals_torchdistills_on_the_same_tensors(temperature):
    student, teacher, labels = _logits()
    ours = losses.HintonKDLoss(temperature=temperature).value(losses.StepOutputs(labels, student, teacher))
    io = lambda logits: {"fc": {"output": logits}}
    # torchdistill with alpha = 0 returns the bare KL (no T^2); otherwise alpha CE + beta T^2 KL
    bare = KDLoss("fc", "output", "fc", "output", temperature=temperature, alpha=0.0, beta=1.0)(io(student), io(teacher), labels)
    torch.testing.assert_close(ours, temperature**2 * bare)
    mixed = KDLoss("fc", "output", "fc", "output", temperature=temperature, alpha=0.3, beta=1.0)(io(student), io(teacher), labels)
    torch.testing.assert_close(0.3 * F.cross_entropy(student, labels) + ours, mixed)
    registered = get_mid_level_loss({"key": "MultiExplainKDLoss", "kwargs": {"student_module_path": "fc", "teacher_module_path": "fc", "temperature": temperature}})
    torch.testing.assert_close(registered(io(student), io(teacher), labels), ours)


def test_our_attention_transfer_equals_torchdistills_on_the_same_tensors():
    gen = torch.Generator().manual_seed(1)
    feats = {name: (torch.rand(3, c, s, s, generator=gen, dtype=torch.float64), torch.rand(3, 2 * c, s, s, generator=gen, dtype=torch.float64))
             for name, c, s in (("block1", 4, 8), ("block2", 8, 4))}
    ours = losses.AttentionTransferLoss().value(losses.StepOutputs(
        torch.zeros(3), torch.zeros(3, 6), student_features=[s for s, _ in feats.values()], teacher_features=[t for _, t in feats.values()]))
    pairs = {name: {"student": {"io": "output", "path": name}, "teacher": {"io": "output", "path": name}, "weight": 1} for name in feats}
    student_io = {name: {"output": s} for name, (s, _) in feats.items()}
    teacher_io = {name: {"output": t} for name, (_, t) in feats.items()}
    theirs = ATLoss(pairs, mode="code")(student_io, teacher_io)
    torch.testing.assert_close(ours, theirs)
    registered = get_mid_level_loss({"key": "MultiExplainATLoss", "kwargs": {"pairs": [[n, n] for n in feats]}})
    torch.testing.assert_close(registered(student_io, teacher_io), theirs)


def test_our_names_are_in_torchdistills_registries():
    for key in ("MultiExplainKDLoss", "MultiExplainATLoss", "MultiExplainExplanationLoss"):
        assert MIDDLE_LEVEL_LOSS_DICT[key] is getattr(td, key)
    assert FORWARD_PROC_FUNC_DICT[td.TEACHER_FORWARD_PROC] is td.explain_teacher


@pytest.mark.parametrize("preset", ["default", "paper"])
def test_the_io_dict_explanation_loss_equals_ours_in_value_and_gradient(preset):
    """The torchdistill form (student map from the hooked layer output + the logits, teacher map
    from the forward process) gives the same loss and student gradients as ExplanationLoss."""
    torch.manual_seed(0)
    teacher, student = models.wide_resnet(10, 2).double().eval(), models.wide_resnet(10, 1).double().train()
    data = make_distill_dataset(6, seed=0)
    x, y = data.images.double(), data.labels
    reference_loss = losses.build_loss({"expl": {"preset": preset}}, student, teacher).terms["expl"]
    expected = reference_loss.weight * reference_loss.distance(*reference_loss.explain_pair(x, y)[:2])
    expected_grads = torch.autograd.grad(expected, list(student.parameters()), allow_unused=True)

    store = {}
    handle = student.relu.register_forward_hook(lambda m, a, out: store.__setitem__("relu", out))
    try:
        logits = student(x)
    finally:
        handle.remove()
    with torch.no_grad():  # as torchdistill calls a frozen teacher
        teacher_out = td.explain_teacher(teacher, x, y)
    loss = get_mid_level_loss({"key": "MultiExplainExplanationLoss", "kwargs": {"preset": preset, "conflict": "none"}})
    value = loss({"relu": {"output": store["relu"]}, ".": {"output": logits}}, {".": {"output": teacher_out}}, y)
    torch.testing.assert_close(value, expected, rtol=1e-9, atol=1e-12)
    grads = torch.autograd.grad(value, list(student.parameters()), allow_unused=True)
    for name, a, b in zip([n for n, _ in student.named_parameters()], grads, expected_grads):
        if b is None:
            assert a is None or a.abs().max() == 0, name
        else:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=name)
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="forward_proc"):
        loss({"relu": {"output": store["relu"]}, ".": {"output": logits}}, {".": {"output": teacher_out["logits"]}}, y)


def test_a_projecting_preset_is_refused_in_torchdistill_not_silently_summed():
    assert losses.EXPLANATION_PRESETS["default"]["conflict"] == "project"
    with pytest.raises(ValueError, match="conflict='project'.*pass conflict: 'none'"):
        get_mid_level_loss({"key": "MultiExplainExplanationLoss", "kwargs": {"preset": "default"}})
    with pytest.raises(ValueError, match="conflict='project'"):
        get_mid_level_loss({"key": "MultiExplainExplanationLoss", "kwargs": {"preset": "paper", "conflict": "project"}})


@pytest.mark.slow
def test_the_example_yaml_trains_a_student_for_one_short_epoch_with_the_explanation_loss(tmp_path):
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import distill_with_torchdistill as example
    finally:
        sys.path.remove(str(REPO / "examples"))
    text = (REPO / "examples" / "torchdistill_explanation_loss.yaml").read_text()
    assert "MultiExplainExplanationLoss" in text and "multiexplain_explain_teacher" in text
    small = text.replace("{n: 1500, seed: 0}", "{n: 48, seed: 0}").replace("{n: 500, seed: 1}", "{n: 24, seed: 1}").replace("batch_size: 64", "batch_size: 16")
    assert small != text
    path = tmp_path / "small.yaml"
    path.write_text(small)
    config = load_yaml_file(str(path))
    student = config["models"]["student_model"]
    before = {k: v.clone() for k, v in student.state_dict().items() if k.endswith("weight")}
    result = example.train(config, torch.device("cpu"), epochs=1)
    assert len(result["loss"]) == 1 and torch.isfinite(torch.tensor(result["loss"])).all() and result["loss"][0] > 0
    assert 0 <= result["test_error"] <= 100
    changed = [k for k, v in before.items() if not torch.equal(v, student.state_dict()[k])]
    assert "conv1.weight" in changed and "fc.weight" in changed  # the optimizer stepped the student
    teacher = config["models"]["teacher_model"]
    assert all(p.grad is None for p in teacher.parameters())
