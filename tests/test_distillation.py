"""Distillation with an explanation loss: gradients, alignment, losses, trainer, DDP."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import warnings
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from multiexplain import losses, metrics, models, train
from multiexplain.adapters.distillation import ExplanationLoss
from multiexplain.data.distill_data import DISTILL_CLASSES, make_distill_dataset
from multiexplain.models import wrn
from repo_scripts import load_repo_module
REPO = Path(__file__).resolve().parent.parent


def _pair(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    teacher = models.wide_resnet(10, 2).to(dtype).eval()
    student = models.wide_resnet(10, 1).to(dtype).train()
    return teacher, student


def _reference_gradcampp(model, layer, x, classes, method="gradcam++"):
    """Independent float64 Grad-CAM(++) at ``layer`` (paper eq. 19/20), written out here."""
    store = {}
    handle = layer.register_forward_hook(lambda m, a, out: store.__setitem__("a", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = store["a"]
    score = logits.gather(1, classes.view(-1, 1)).sum()
    (g,) = torch.autograd.grad(score, a, create_graph=True)
    a, g = a.double(), g.double()
    if method == "gradcam":
        w = g.mean(dim=(2, 3))
    else:
        sums = a.sum(dim=(2, 3), keepdim=True)
        denominator = 2 * g**2 + sums * g**3
        alpha = torch.where(denominator != 0, g**2 / torch.where(denominator != 0, denominator, torch.ones_like(denominator)), torch.zeros_like(g))
        w = (alpha * torch.relu(g)).sum(dim=(2, 3))
    return torch.relu((w[:, :, None, None] * a).sum(dim=1))


# -- data and models ------------------------------------------------------------------------
def test_dataset_is_seeded_balanced_and_masks_lie_on_the_target():
    first, second = make_distill_dataset(60, seed=3), make_distill_dataset(60, seed=3)
    assert first.images.shape == (60, 3, 32, 32) and first.masks.shape == (60, 32, 32)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)
    assert not torch.equal(first.images, make_distill_dataset(60, seed=4).images)
    assert torch.bincount(first.labels, minlength=len(DISTILL_CLASSES)).tolist() == [10] * 6
    assert first.images.min() >= 0 and first.images.max() <= 1
    # every target is visible and covers a sizeable part of the image
    assert (first.masks.flatten(1).sum(1) >= 12).all()
    low = first.subset(0.5, seed=0)
    assert len(low) == 30 and torch.bincount(low.labels).tolist() == [5] * 6
    with pytest.raises(ValueError, match="fraction"):
        first.subset(0.0)


def test_wide_resnet_shapes_and_depth_check():
    model = models.wide_resnet(16, 2, num_classes=10)
    assert sum(isinstance(m, wrn._WideBlock) for m in model.modules()) == 6
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)
    assert len(model.block1) == 2 and model.block3[0].conv1.out_channels == 128
    with pytest.raises(ValueError, match="6n \\+ 4"):
        models.wide_resnet(12, 1)


# -- the explanation loss -----------------------------------------------------------------------
def test_explanation_loss_matches_an_independent_float64_reference_and_aligns_resolutions():
    teacher, student = _pair(torch.float64)
    student.eval()  # deterministic maps for the comparison
    x = torch.rand(4, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    # student explained at block2 (16x16) against the teacher's final layer (8x8)
    loss = ExplanationLoss(teacher, student, student_layer="block2", weight=0.5, normalize="none")
    student_ref = _reference_gradcampp(student, student.block2, x, y)
    teacher_ref = _reference_gradcampp(teacher, teacher.relu, x, y).detach()
    assert student_ref.shape == (4, 16, 16) and teacher_ref.shape == (4, 8, 8)
    resized = F.interpolate(student_ref[:, None], size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    expected = 0.5 * (resized - teacher_ref).pow(2).sum(dim=(1, 2)).mean()
    torch.testing.assert_close(loss(x, y), expected, rtol=1e-9, atol=1e-12)
    maps_s, maps_t, _, _ = loss.explain_pair(x, y)
    assert maps_s.shape == maps_t.shape == (4, 8, 8)

    # both resized to a given size, L2-normalised per map
    sized = ExplanationLoss(teacher, student, student_layer="block2", size=(32, 32), normalize="l2")
    maps_s, maps_t, _, _ = sized.explain_pair(x, y)
    assert maps_s.shape == maps_t.shape == (4, 32, 32)
    up = lambda m: F.interpolate(m[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    unit = lambda m: m / m.flatten(1).norm(dim=1).view(-1, 1, 1)
    torch.testing.assert_close(maps_s, unit(up(student_ref)), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(maps_t, unit(up(teacher_ref)), rtol=1e-9, atol=1e-12)

    # min-max normalisation, as Explanation.maps (but at layer resolution)
    minmax = ExplanationLoss(teacher, student, normalize="minmax")
    maps_s, maps_t, _, _ = minmax.explain_pair(x, y)
    scale = lambda m: (m - m.flatten(1).amin(1).view(-1, 1, 1)) / (m.flatten(1).amax(1) - m.flatten(1).amin(1)).view(-1, 1, 1)
    torch.testing.assert_close(maps_t, scale(teacher_ref), rtol=1e-9, atol=1e-12)

    # Grad-CAM variant and "max" normalisation
    gc = ExplanationLoss(teacher, student, method="gradcam", normalize="max", weight=1.0)
    s_ref = _reference_gradcampp(student, student.relu, x, y, "gradcam")
    t_ref = _reference_gradcampp(teacher, teacher.relu, x, y, "gradcam").detach()
    peak = lambda m: m / m.flatten(1).amax(1).view(-1, 1, 1)
    torch.testing.assert_close(gc(x, y), (peak(s_ref) - peak(t_ref)).pow(2).sum(dim=(1, 2)).mean(), rtol=1e-9, atol=1e-12)


def test_gradient_wrt_student_parameters_matches_finite_differences():
    teacher, student = _pair(torch.float64, seed=1)
    x = torch.rand(3, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 4, 2])
    loss = ExplanationLoss(teacher, student, weight=1.0)  # student in train mode, as in training
    value = loss(x, y)
    assert value.item() > 0
    params = dict(student.named_parameters())
    names = ["conv1.weight", "block1.0.conv2.weight", "block3.0.conv1.weight", "bn.weight", "fc.weight"]
    grads = torch.autograd.grad(value, [params[n] for n in names])
    generator = torch.Generator().manual_seed(1)
    eps = 1e-6
    for name, grad in zip(names, grads):
        flat = params[name].data.view(-1)
        # the entry with the largest analytic gradient plus two random ones
        picks = [int(grad.abs().view(-1).argmax())] + torch.randint(flat.numel(), (2,), generator=generator).tolist()
        for index in picks:
            original = flat[index].item()
            with torch.no_grad():
                flat[index] = original + eps
                plus = loss(x, y).item()
                flat[index] = original - eps
                minus = loss(x, y).item()
                flat[index] = original
            numeric = (plus - minus) / (2 * eps)
            analytic = grad.view(-1)[index].item()
            assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(analytic)), (name, index, numeric, analytic)
    # the analytic gradient is not trivially zero
    assert max(g.abs().max().item() for g in grads) > 1e-4


def test_teacher_gets_no_gradient_and_models_are_left_as_they_were():
    teacher, student = _pair()
    teacher_modes = [m.training for m in teacher.modules()]
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for config in ({"ce": 1, "expl": 0.01}, {"ce": 1, "kd": 1, "expl": {"weight": 0.01, "method": "gradcam"}}, {"ce": 1, "at": 500}):
        loss = losses.build_loss(config, student, teacher)
        total, terms, logits = loss(x, y)
        total.backward()
        assert all(p.grad is None for p in teacher.parameters()), config
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters()), config
        assert logits.shape == (4, 6) and set(terms) == set(config)
        student.zero_grad(set_to_none=True)
    assert [m.training for m in teacher.modules()] == teacher_modes
    assert not any(m._forward_hooks for m in list(teacher.modules()) + list(student.modules()))
    assert list(loss.parameters()) == []  # the loss does not own (and so cannot train) the models


def test_a_few_steps_reduce_the_map_distance_on_a_fixed_batch():
    teacher, student = _pair(seed=2)
    data = make_distill_dataset(16, seed=0)
    x, y = data.images, data.labels
    loss = ExplanationLoss(teacher, student, weight=1.0, normalize="l2")
    optimizer = torch.optim.Adam(student.parameters(), lr=3e-3)
    distances = []
    for _ in range(10):
        value = loss(x, y)
        distances.append(value.item())
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
    assert distances[-1] < 0.6 * distances[0], distances


def test_losses_match_their_definitions_and_the_registry():
    assert set(losses.LOSSES) == {"ce", "kd", "at", "expl"}
    student_logits, teacher_logits = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    labels = torch.tensor([0, 1, 2, 3, 4])
    step = losses.StepOutputs(labels, student_logits, teacher_logits)
    t = 4.0
    p_t = torch.softmax(teacher_logits / t, 1)
    expected_kd = (p_t * (p_t.log() - torch.log_softmax(student_logits / t, 1))).sum(1).mean() * t * t
    torch.testing.assert_close(losses.HintonKDLoss().value(step), expected_kd)
    torch.testing.assert_close(losses.CrossEntropyLoss().value(step), F.cross_entropy(student_logits, labels))
    fs, ft = torch.rand(2, 3, 4, 4, dtype=torch.float64), torch.rand(2, 5, 4, 4, dtype=torch.float64)
    at = lambda f: (f.pow(2).mean(1).flatten(1) / f.pow(2).mean(1).flatten(1).norm(dim=1, keepdim=True))
    step = losses.StepOutputs(labels, student_logits, teacher_logits, student_features=[fs], teacher_features=[ft])
    torch.testing.assert_close(losses.AttentionTransferLoss().value(step), (at(fs) - at(ft)).pow(2).mean())

    teacher, student = _pair()
    loss = losses.build_loss({"ce": 2.0, "kd": {"weight": 0.5, "temperature": 2}}, student, teacher)
    assert loss.terms["kd"].temperature == 2 and loss.terms["ce"].weight == 2.0
    x, y = torch.rand(3, 3, 32, 32), torch.tensor([0, 1, 2])
    total, terms, _ = loss(x, y)
    torch.testing.assert_close(total, 2.0 * terms["ce"] + 0.5 * terms["kd"])


def test_bad_configs_raise_clear_errors():
    teacher, student = _pair()
    with pytest.raises(ValueError, match="unknown loss 'mse'"):
        losses.build_loss({"mse": 1}, student, teacher)
    with pytest.raises(ValueError, match="need a teacher"):
        losses.build_loss({"ce": 1, "kd": 1}, student, None)
    with pytest.raises(ValueError, match="normalisation"):
        ExplanationLoss(teacher, student, normalize="zscore")
    with pytest.raises(ValueError, match="unknown method"):
        ExplanationLoss(teacher, student, method="scorecam")
    with pytest.raises(ValueError, match="no layer named"):
        ExplanationLoss(teacher, student, student_layer="layer4")(torch.rand(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="unknown train option"):
        train.TrainConfig.from_dict({"epochs": 1, "learning_rate": 0.1})
    with pytest.raises(ValueError, match="weight"):
        losses.CrossEntropyLoss(weight=float("nan"))


# -- trainer ------------------------------------------------------------------------------------
def test_trainer_checkpoints_every_epoch_and_resumes_to_the_same_weights(tmp_path):
    data = make_distill_dataset(24, seed=0)
    losses = {"ce": 1.0, "kd": 1.0, "expl": 0.01}
    config = {"epochs": 2, "batch_size": 12, "lr": 0.05, "progress": False, "seed": 5}

    def make():
        teacher, _ = _pair(seed=9)
        torch.manual_seed(0)
        return teacher, models.wide_resnet(10, 1)

    teacher, student = make()
    history = train.Trainer(student, teacher, losses, data, {**config, "checkpoint_dir": str(tmp_path / "a")}, eval_set=data).fit()
    assert [h["epoch"] for h in history] == [1.0, 2.0] and {"loss", "ce", "kd", "expl", "eval_error"} <= set(history[0])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["epoch_001.pt", "epoch_002.pt", "last.pt"]

    # stop after one epoch, then resume from the checkpoint: same final weights as one straight run
    teacher, resumed = make()
    train.Trainer(resumed, teacher, losses, data, {**config, "checkpoint_dir": str(tmp_path / "b")}).fit(max_epochs=1)
    teacher, resumed = make()
    trainer = train.Trainer(resumed, teacher, losses, data, {**config, "checkpoint_dir": str(tmp_path / "b"), "resume": True})
    assert trainer.fit()[0]["epoch"] == 1.0 and trainer.epoch == 2
    for (name, a), b in zip(student.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)



@pytest.mark.parametrize("optimizer, momentum", [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)])
def test_trainer_takes_one_optimizer_step_per_batch(optimizer, momentum):
    """Two full-batch epochs move the weights exactly as torch's own optimizer does from the same start
    on the same loss (an independent loop): a trainer that never steps, steps before the backward pass or
    drops the gradients fails this by value, not only by a looser 'the loss went down'."""
    torch.manual_seed(0)
    images, labels = torch.randn(16, 3, 8, 8), torch.arange(16) % 4
    data = torch.utils.data.TensorDataset(images, labels)
    start = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(4, 4))
    config = {"epochs": 2, "batch_size": 16, "lr": 0.5, "optimizer": optimizer, "momentum": momentum,
              "weight_decay": 1e-3, "schedule": "none", "progress": False}
    student = copy.deepcopy(start)
    history = train.Trainer(student, None, {"ce": 1.0}, data, config).fit()
    reference = copy.deepcopy(start)
    if optimizer == "sgd":
        opt = torch.optim.SGD(reference.parameters(), lr=0.5, momentum=momentum, weight_decay=1e-3, nesterov=momentum > 0)
    else:
        opt = torch.optim.AdamW(reference.parameters(), lr=0.5, weight_decay=1e-3)
    losses_seen = []
    for _ in range(2):  # a full batch: the shuffled order does not change the mean loss
        opt.zero_grad()
        loss = F.cross_entropy(reference(images), labels)
        loss.backward()
        opt.step()
        losses_seen.append(loss.item())
    for (name, ours), theirs in zip(student.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)
    assert not torch.equal(student[4].weight, start[4].weight)
    assert [h["loss"] for h in history] == pytest.approx(losses_seen, rel=1e-5)


def test_train_from_config_saves_a_loadable_student_and_the_pair_loader_reads_it(tmp_path):
    teacher = models.wide_resnet(10, 2)
    models.save_checkpoint(tmp_path / "distill_teacher.pt", teacher)
    config = {
        "seed": 1,
        "data": {"train_size": 36, "test_size": 12, "fraction": 0.5},
        "teacher": {"checkpoint": str(tmp_path / "distill_teacher.pt")},
        "student": {"depth": 10, "widen_factor": 1},
        "losses": {"ce": 1, "expl": {"weight": 0.01, "target": "teacher"}},
        "train": {"epochs": 1, "batch_size": 6, "progress": False},
        "output": str(tmp_path / "distill_student.pt"),
    }
    result = train.train_from_config(config)
    assert 0 <= result["test_error"] <= 100 and len(result["history"]) == 1
    loaded_teacher = models.load_checkpoint(tmp_path / "distill_teacher.pt").model
    loaded_student = models.load_checkpoint(tmp_path / "distill_student.pt").model
    assert loaded_student.depth == 10 and not loaded_student.training
    torch.testing.assert_close(loaded_teacher.fc.weight, teacher.fc.weight)


def test_map_correlation():
    a = torch.rand(3, 8, 8)
    torch.testing.assert_close(metrics.map_correlation(a, 2 * a + 1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(metrics.map_correlation(a, -a), -torch.ones(3, dtype=torch.float64))
    assert metrics.map_correlation(a, torch.zeros(3, 8, 8)).eq(0).all()


@pytest.mark.slow
@pytest.mark.parametrize("conflict", ["project", "none"])
def test_torchrun_ddp_with_two_gloo_processes_ends_with_equal_weights(tmp_path, conflict):
    """Both ways gradients are averaged: DDP's own (a plain sum) and the Trainer's all-reduce
    before the projection (DDP does not see ``autograd.grad``): ranks that did not average diverge."""
    config = {
        "seed": 3,
        "data": {"train_size": 48, "test_size": 12},
        "teacher": {"depth": 10, "widen_factor": 1},
        "student": {"depth": 10, "widen_factor": 1},
        "losses": {"ce": 1, "kd": 1, "expl": {"weight": 0.01, "conflict": conflict}},
        "train": {"epochs": 2, "batch_size": 8, "progress": False, "device": "cpu"},
        "output": str(tmp_path / "student_rank{rank}.pt"),
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "multiexplain.train", "--config", str(path)]
    run = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    states = [torch.load(tmp_path / f"student_rank{r}.pt", weights_only=True)["state_dict"] for r in (0, 1)]
    untrained = (torch.manual_seed(3), models.wide_resnet(10, 1))[1].state_dict()
    assert any(not torch.equal(states[0][k], untrained[k]) for k in untrained)  # it did train
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], rtol=0, atol=0, msg=name)


def test_config_files_in_json_yaml_and_toml_load_to_the_same_dict(tmp_path):
    expected = {"seed": 2, "student": {"depth": 10, "widen_factor": 1}, "losses": {"ce": 1.0, "expl": {"weight": 0.01, "method": "gradcam"}}}
    (tmp_path / "c.json").write_text(json.dumps(expected))
    (tmp_path / "c.yaml").write_text("seed: 2\nstudent: {depth: 10, widen_factor: 1}\nlosses:\n  ce: 1.0\n  expl: {weight: 0.01, method: gradcam}\n")
    (tmp_path / "c.toml").write_text('seed = 2\n[student]\ndepth = 10\nwiden_factor = 1\n[losses]\nce = 1.0\n[losses.expl]\nweight = 0.01\nmethod = "gradcam"\n')
    for name in ("c.json", "c.yaml", "c.toml"):
        assert train.load_config_file(tmp_path / name) == expected, name
    (tmp_path / "c.ini").write_text("")
    with pytest.raises(ValueError, match="config format"):
        train.load_config_file(tmp_path / "c.ini")


# -- presets, schedules, the teacher cache, the cross-family student ------------------------------
def test_the_default_explanation_term_and_the_papers_preset():
    teacher, student = _pair()
    default_loss = losses.build_loss({"ce": 1.0, "expl": {}}, student, teacher)
    default = default_loss.terms["expl"]
    assert (default.weight, default.normalize, default.method) == (2.0, "l2", "gradcam++")
    assert default_loss.projected == ("expl",)  # the default projects the term off the rest's gradient
    bare = ExplanationLoss(teacher, student)  # the class's own defaults are the same term
    assert (bare.weight, bare.normalize, bare.method) == (default.weight, default.normalize, default.method)
    paper_loss = losses.build_loss({"ce": 1.0, "expl": {"preset": "paper"}}, student, teacher)
    assert paper_loss.projected == ()  # the paper's is a plain weighted sum
    paper = paper_loss.terms["expl"]
    assert (paper.weight, paper.normalize, paper.method) == (0.01, "none", "gradcam++")
    tuned = losses.build_loss({"expl": {"preset": "paper", "method": "gradcam"}}, student, teacher).terms["expl"]
    assert (tuned.weight, tuned.normalize, tuned.method) == (0.01, "none", "gradcam")
    assert losses.build_loss({"expl": 2.0}, student, teacher).terms["expl"].weight == 2.0  # a number: the weight
    with pytest.raises(ValueError, match="unknown explanation preset 'cifar'"):
        losses.build_loss({"expl": {"preset": "cifar"}}, student, teacher)


def test_weight_schedules_follow_training_progress():
    assert losses.schedule_factor("constant", 0.7) == 1.0
    assert losses.schedule_factor("linear", 0.25) == pytest.approx(0.75)
    assert losses.schedule_factor("cosine", 0.5) == pytest.approx(0.5) and losses.schedule_factor("cosine", 1.0) == pytest.approx(0.0)
    assert losses.schedule_factor("constant", 0.05, warmup=0.2) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="schedule"):
        losses.schedule_factor("exp", 0.5)
    teacher, student = _pair()
    loss = losses.build_loss({"ce": 1.0, "expl": {"weight": 4.0, "schedule": "cosine"}}, student, teacher)
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    loss.set_progress(0.5)
    assert loss.weights() == {"ce": 1.0, "expl": pytest.approx(2.0)}
    total, terms, _ = loss(x, y)
    torch.testing.assert_close(total, terms["ce"] + 2.0 * terms["expl"])
    loss.set_progress(1.0)
    total, terms, _ = loss(x, y)
    torch.testing.assert_close(total, terms["ce"])


@pytest.mark.parametrize("config", [{"ce": 1, "kd": 1, "expl": {}}, {"ce": 1, "at": 500}, {"ce": 1, "kd": 1, "expl": {"preset": "paper"}, "at": 500}])
def test_the_teacher_cache_gives_the_same_loss_and_gradients_without_running_the_teacher(config, one_torch_thread):
    teacher, student = _pair(seed=3)
    data = make_distill_dataset(8, seed=0)
    x, y = data.images, data.labels
    plain = losses.build_loss(config, student, teacher)
    cached = losses.build_loss(config, student, teacher, cache_teacher=True)
    cached(x, y)  # fills the cache
    calls = []
    handle = teacher.register_forward_hook(lambda *args: calls.append(1))
    try:
        results = []
        for loss in (plain, cached):
            student.zero_grad(set_to_none=True)
            total, terms, _ = loss(x, y)
            total.backward()
            results.append((total.detach(), [p.grad.clone() for p in student.parameters()]))
    finally:
        handle.remove()
    assert len(calls) == 1  # the plain loss ran the teacher, the cached one did not
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert len(cached.cache) == 8
    # another batch (or another label for the same image) is a miss: the teacher runs again
    cached(x[:4], (y[:4] + 1) % 6)
    assert len(cached.cache) == 12


def test_the_mobilenet_student_explains_distils_and_checkpoints(tmp_path, one_torch_thread):
    teacher = models.wide_resnet(10, 2).eval()
    torch.manual_seed(0)
    student = models.mobilenet_v2()
    assert sum(p.numel() for p in student.parameters()) < 60_000
    x, y = torch.rand(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    assert student(x).shape == (4, 6)
    loss = losses.build_loss({"ce": 1, "kd": 1, "at": 500, "expl": {}}, student, teacher)
    assert loss.student_feature_layers == ("stage1", "stage2", "stage3") and loss.teacher_feature_layers == ("block1", "block2", "block3")
    step = loss.compute_step(x, y)
    assert step.student_maps.shape == step.teacher_maps.shape == (4, 8, 8)  # the "auto" layer: its relu, 8x8
    assert [f.shape[-1] for f in step.student_features] == [16, 8, 8]
    total, terms, _ = loss(x, y)
    total.backward()
    assert all(p.grad is not None for p in student.parameters()) and all(torch.isfinite(v) for v in terms.values())
    models.save_checkpoint(tmp_path / "mb.pt", student)
    loaded = models.load_checkpoint(tmp_path / "mb.pt").model
    student.eval()
    torch.testing.assert_close(loaded(x), student(x))
    with pytest.raises(ValueError, match="widths"):
        models.MobileNetV2(widths=(8, 16))
    assert isinstance(train._model_from_config({"arch": "mobilenet_v2"}, "student"), models.MobileNetV2)
    with pytest.raises(ValueError, match="unknown student arch 'vgg'"):
        train._model_from_config({"arch": "vgg"}, "student")


# -- the quality benchmark's bookkeeping (no training) -----------------------------------------

def _quality_benchmark():
    return load_repo_module("benchmarks/quality_distillation.py")


def _fake_run(pair, row, regime, seed, error):
    return {"stage": "table", "pair": pair, "row": row, "regime": regime, "seed": seed, "error": error,
            "train_error": 0.0, "map_correlation": 0.5, "energy_in_mask": 0.2}


def test_quality_benchmark_judges_the_target_as_written_and_names_missing_cells(tmp_path):
    bench = _quality_benchmark()
    pair = next(iter(bench.PAIRS))
    errors = {  # equal means pass with all the data (<=) and fail with 10% (<, "better than")
        ("all", "CE"): [10, 12, 14], ("all", "CE+expl"): [12, 12, 12], ("all", "CE+KD"): [8, 8, 8], ("all", "CE+KD+expl"): [8, 8],
        ("10%", "CE"): [50, 50, 50], ("10%", "CE+expl"): [40, 40, 40], ("10%", "CE+KD"): [45, 45, 45], ("10%", "CE+KD+expl"): [44, 46, 45],
    }
    runs = [_fake_run(pair, row, regime, seed, e) for (regime, row), values in errors.items() for seed, e in enumerate(values)]
    preset = {**bench.PRESETS["smoke"], "seeds": 3, "regimes": {"all": {}, "10%": {}}}
    table = bench.summarise(runs, list(preset["regimes"]))
    checks = {condition: met for p, condition, met, _ in bench.target_checks(table, 3) if p == pair}
    assert checks == {"all: CE+expl <= CE": True, "all: CE+KD+expl <= CE+KD": None,  # 2 of 3 seeds: not judged
                      "10%: CE+expl < CE": True, "10%: CE+KD+expl < CE+KD": False,
                      "10%: CE+expl < CE+KD (stricter reading)": True}
    payload = {"preset_settings": preset, "runs": runs}
    short = bench.incomplete_cells(payload)
    assert (pair, "CE+KD+expl", "all", 2) in short and (pair, "CE+AT", "10%", 0) in short
    assert not any(cell[:3] == (pair, "CE", "all") for cell in short)

    path = tmp_path / "distillation.json"
    path.write_text(json.dumps({"preset": "smoke", "preset_settings": bench.PRESETS["smoke"], "candidates": bench.CANDIDATES,
                                "study_seed": bench.STUDY_SEED, "device": "CPU (test)", "runs": runs, "wall_seconds": 1.0}))
    assert bench.resumed_payload(path, "smoke", bench.PRESETS["smoke"], "CPU (test)")["sessions"] == 2
    with pytest.raises(SystemExit, match="preset settings"):
        bench.resumed_payload(path, "smoke", {**bench.PRESETS["smoke"], "seeds": 5}, "CPU (test)")
    assert bench.job_key(runs[0]) == ("table", pair, "CE", "all", 0)


def test_the_table_calls_its_explanation_rows_the_default_only_when_the_study_chose_it():
    """Both committed results files: the cpu study chose the library default, the cpu-long study did not."""
    bench = _quality_benchmark()
    for name, role in (("distillation", "default"), ("distillation_cpu_long", "study winner, not the library default")):
        payload = json.loads((bench.RESULTS / f"{name}.json").read_text())
        text = bench.render(payload)
        assert f"| CE+expl ({role}: {payload['winner']}) |" in text
        assert f"| CE+KD+expl ({role}: {payload['winner']}) |" in text
        assert ("NOT the study winner" in text) == (role != "default")


def test_when_the_study_picks_another_term_the_library_default_is_run_and_judged_too():
    bench = _quality_benchmark()
    default = bench.default_candidate()
    assert bench.CANDIDATES[default]["weight"] == losses.EXPLANATION_PRESETS["default"]["weight"]
    assert bench.library_default_rows(default) == {}  # the winner is the default: nothing extra
    other = next(name for name in bench.CANDIDATES if name != default)
    extra = bench.library_default_rows(other)
    assert set(extra) == {f"CE+expl [{default}]", f"CE+KD+expl [{default}]"}
    assert extra[f"CE+expl [{default}]"]["expl"] == bench.CANDIDATES[default]
    # Both pairs run them (the second pair runs "CE+expl" and "CE+KD+expl").
    jobs = bench.table_jobs({"preset": "smoke"}, bench.PRESETS["smoke"], extra)
    assert {job["pair"] for job in jobs} == set(bench.PAIRS)

    pair = next(iter(bench.PAIRS))
    errors = {"CE": 20, "CE+KD": 10, "CE+expl": 25, "CE+KD+expl": 12, f"CE+expl [{default}]": 18, f"CE+KD+expl [{default}]": 9}
    runs = [_fake_run(pair, row, regime, seed, e) for row, e in errors.items() for regime in ("all", "10%") for seed in range(3)]
    table = bench.summarise(runs, ["all", "10%"])
    as_winner = {c: met for _, c, met, _ in bench.target_checks(table, 3)}
    as_default = {c: met for _, c, met, _ in bench.target_checks(bench.as_judged(table, {row: row.split(" [")[0] for row in extra}), 3)}
    assert as_winner["all: CE+expl <= CE"] is False and as_default["all: CE+expl <= CE"] is True
    assert as_winner["all: CE+KD+expl <= CE+KD"] is False and as_default["all: CE+KD+expl <= CE+KD"] is True


# -- projecting a term's gradient off the rest of the objective's ---------------------------------
def _reference_projection(main, auxiliary):
    """Float64, flattened: ``a - (a.m / |m|^2) m`` where ``a.m < 0``, else ``a`` (written out here)."""
    m = torch.cat([g.double().flatten() for g in main])
    a = torch.cat([g.double().flatten() for g in auxiliary])
    dot = a @ m
    return (a - dot / (m @ m) * m if dot < 0 else a), bool(dot < 0)


def test_projection_removes_only_the_part_that_opposes_the_main_gradient():
    gen = torch.Generator().manual_seed(0)
    main = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    noise = [torch.randn(4, 3, generator=gen), torch.randn(5, generator=gen)]
    for scale, conflicts in ((-2.0, True), (0.5, False)):
        auxiliary = [scale * m + 0.3 * n for m, n in zip(main, noise)]
        projected, conflicted = losses.project_conflicting(main, auxiliary)
        reference, expected = _reference_projection(main, auxiliary)
        assert conflicted is conflicts is expected
        assert [p.shape for p in projected] == [m.shape for m in main]
        flat = torch.cat([p.double().flatten() for p in projected])
        torch.testing.assert_close(flat, reference, rtol=1e-6, atol=1e-6)
        m = torch.cat([g.double().flatten() for g in main])
        # After the projection the sum descends the main loss at least as fast as the main gradient alone.
        assert float((m + flat) @ m) >= float(m @ m) - 1e-6
        if conflicts:
            assert abs(float(flat @ m)) < 1e-5 and float(flat.norm()) > 0.1  # orthogonal, not dropped
    zero = [torch.zeros(4, 3), torch.zeros(5)]
    projected, conflicted = losses.project_conflicting(zero, noise)  # no main direction: unchanged
    assert not conflicted and all(torch.equal(p, n) for p, n in zip(projected, noise))


def _term_gradients(weighted, names, parameters):
    total = sum(weighted[name] for name in names)
    grads = torch.autograd.grad(total, parameters, retain_graph=True, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(parameters, grads)]


def test_a_projected_term_gets_exactly_the_reference_gradient_and_conflict_none_is_a_plain_sum():
    # The shipped, trained pair: at a random initialisation the two gradients rarely conflict.
    teacher, student = models.load_distillation_pair("cpu")
    student.train()
    parameters = list(student.parameters())
    data = make_distill_dataset(24, seed=3)
    seen = set()
    for batch in range(6):
        x, y = data.images[4 * batch:4 * batch + 4], data.labels[4 * batch:4 * batch + 4]
        projected = losses.build_loss({"ce": 1.0, "kd": 1.0, "expl": {"weight": 8.0, "conflict": "project"}}, student, teacher)
        assert projected.projected == ("expl",)
        weighted, _, _ = projected.weighted_terms(x, y)
        main = _term_gradients(weighted, ("ce", "kd"), parameters)
        auxiliary = _term_gradients(weighted, ("expl",), parameters)
        reference, conflicts = _reference_projection(main, auxiliary)
        reference = reference + torch.cat([g.double().flatten() for g in main])
        student.zero_grad(set_to_none=True)
        report = projected.backward(weighted, parameters)
        assert report == {"expl_conflict": float(conflicts)}
        got = torch.cat([p.grad.double().flatten() for p in parameters])
        torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-7)
        seen.add(conflicts)
        if batch == 0:  # conflict="none" (the preset's): the same as backpropagating the sum
            plain = losses.build_loss({"ce": 1.0, "kd": 1.0, "expl": {"weight": 8.0, "conflict": "none"}}, student, teacher)
            weighted, _, _ = plain.weighted_terms(x, y)
            expected = torch.autograd.grad(sum(weighted.values()), parameters, retain_graph=True)
            student.zero_grad(set_to_none=True)
            assert plain.backward(weighted, parameters) == {}
            for p, g in zip(parameters, expected):
                torch.testing.assert_close(p.grad, g)
    assert seen == {True, False}, "the batches should exercise both branches"
    # A parameter no term reaches keeps no gradient, as after a plain backward (so SGD does not decay it).
    unused = torch.nn.Parameter(torch.ones(3))
    weighted, _, _ = projected.weighted_terms(x, y)
    projected.backward(weighted, [*parameters, unused])
    assert unused.grad is None


def test_the_conflict_option_is_checked():
    teacher, student = _pair()
    with pytest.raises(ValueError, match="unknown conflict rule 'pcgrad'"):
        losses.build_loss({"ce": 1.0, "expl": {"conflict": "pcgrad"}}, student, teacher)
    assert losses.build_loss({"expl": {"conflict": "project"}}, student, teacher).projected == ()  # nothing to project off
    assert losses.build_loss({"ce": 1.0, "kd": {"weight": 1.0, "conflict": "project"}}, student, teacher).projected == ("kd",)
    with pytest.raises(ValueError, match="unknown term"):
        losses.DistillationLoss(student, teacher, {"ce": losses.CrossEntropyLoss()}, projected=("kd",))


def test_backpropagating_the_total_of_a_projecting_loss_warns_once():
    teacher, student = _pair()
    x, y = torch.rand(2, 3, 32, 32), torch.tensor([0, 1])
    projecting = losses.build_loss({"ce": 1.0, "expl": {}}, student, teacher)
    with pytest.warns(UserWarning, match="sums the terms plainly.*loss.backward"):
        projecting(x, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        projecting(x, y)  # once per loss
        losses.build_loss({"ce": 1.0, "expl": {"conflict": "none"}}, student, teacher)(x, y)


def test_the_example_fine_tunes_with_and_without_the_term_and_writes_its_figure(tmp_path, monkeypatch, capsys):
    import re
    import runpy

    from PIL import Image

    example = Path(__file__).resolve().parents[1] / "examples" / "distill_with_explanation_loss.py"
    monkeypatch.setattr(sys, "argv", [example.name, "--out", str(tmp_path), "--epochs", "1", "--train-size", "100", "--device", "cpu"])
    threads = torch.get_num_threads()
    try:
        runpy.run_path(str(example), run_name="__main__")
    finally:
        torch.set_num_threads(threads)  # the example sets its own
    printed = capsys.readouterr().out
    rows = dict(re.findall(r"^(student before|after CE\+KD|after CE\+KD\+expl): test error [\d.]+%, map correlation with the teacher (-?[\d.]+)$",
                           printed, flags=re.M))
    assert set(rows) == {"student before", "after CE+KD", "after CE+KD+expl"}, printed
    assert all(-1 <= float(r) <= 1 for r in rows.values())
    epochs = re.findall(r"^epoch=1 .*$", printed, flags=re.M)  # one fine-tune without the term, one with it
    assert len(epochs) == 2 and "expl=" not in epochs[0] and "expl=" in epochs[1] and "kd=" in epochs[0], epochs
    with Image.open(tmp_path / "teacher_vs_student_maps.png") as image:  # 5 examples x (input, teacher, 3 students)
        assert image.size[0] > 800 and image.size[1] > 800
