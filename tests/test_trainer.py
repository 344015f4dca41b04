"""The Trainer: it trains (the optimizer steps), its checkpoints load with weights_only and are
written atomically, and resume picks the newest good checkpoint, refuses code and changed settings."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from multiexplain import models, train
from multiexplain.data.distill_data import DistillDataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _colour_task(n: int, seed: int) -> DistillDataset:
    """A learnable 3-class task: the class is the colour channel that is brighter on average."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = 0.35 * torch.rand(n, 3, 16, 16, generator=gen)
    images[torch.arange(n), labels] += 0.45 + 0.2 * torch.rand(n, 16, 16, generator=gen)
    return DistillDataset(images, labels, torch.zeros(n, 16, 16, dtype=torch.bool))


def _student(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.wide_resnet(10, 1, num_classes=3)


CONFIG = {"epochs": 2, "batch_size": 16, "lr": 0.05, "progress": False, "seed": 3}


def test_training_trains_loss_falls_and_accuracy_rises_well_above_chance():
    """Fails if the optimizer never steps (the parameters would keep their random values)."""
    data, held_out = _colour_task(96, 0), _colour_task(60, 1)
    student = _student()
    before = train.evaluate_student(student, held_out)
    trainer = train.Trainer(student, None, {"ce": 1.0}, data, {**CONFIG, "epochs": 3}, eval_set=held_out)
    history = trainer.fit()
    assert history[-1]["ce"] < 0.5 * history[0]["ce"], history
    assert history[-1]["eval_error"] <= 10.0, history  # chance is 66.7%
    assert before >= 40.0  # the untrained student was not already right
    assert trainer.loss.progress > 0.9  # the schedules saw training progress


def test_a_projected_auxiliary_term_cannot_stop_the_task_from_training():
    """KD towards an untrained teacher pulls against the labels; projected off the CE gradient
    where they conflict, the task still trains, and the Trainer logs how often they conflicted."""
    data, held_out = _colour_task(96, 0), _colour_task(60, 1)
    histories = {}
    for conflict in ("project", "none"):
        teacher = _student(seed=7).eval()
        trainer = train.Trainer(_student(), teacher, {"ce": 1.0, "kd": {"weight": 5.0, "conflict": conflict}}, data,
                                {**CONFIG, "epochs": 3}, eval_set=held_out)
        histories[conflict] = trainer.fit()
        assert trainer.loss.projected == (("kd",) if conflict == "project" else ())
    projected, plain = histories["project"], histories["none"]
    assert all(0.0 <= record["kd_conflict"] <= 1.0 for record in projected)
    assert any(record["kd_conflict"] > 0 for record in projected), projected  # the projection was exercised
    assert "kd_conflict" not in plain[-1]
    assert projected[-1]["ce"] < projected[0]["ce"], projected
    assert projected[-1]["eval_error"] <= 10.0, projected  # chance is 66.7%
    assert plain[-1]["eval_error"] >= 25.0, plain  # the same term summed plainly does hold the task back


def _trained_dir(tmp_path: Path, epochs: int = 2, **overrides) -> Path:
    directory = tmp_path / "ckpt"
    train.Trainer(_student(), None, {"ce": 1.0}, _colour_task(32, 0), {**CONFIG, "epochs": epochs, "checkpoint_dir": str(directory), **overrides}).fit()
    return directory


def _resume(directory: Path, **overrides) -> train.Trainer:
    trainer = train.Trainer(_student(1), None, {"ce": 1.0}, _colour_task(32, 0),
                            {**CONFIG, "checkpoint_dir": str(directory), "resume": True, **overrides})
    trainer.fit(max_epochs=1)
    return trainer


def test_checkpoints_are_weights_only_files_written_atomically(tmp_path):
    directory = _trained_dir(tmp_path)
    assert sorted(p.name for p in directory.iterdir()) == ["epoch_001.pt", "epoch_002.pt", "last.pt"]  # no .tmp left
    state = torch.load(directory / "last.pt", weights_only=True)
    assert state["format"] == train.RESUME_FORMAT and state["epoch"] == 2 and state["config"]["lr"] == 0.05
    assert state["losses"] == {"ce": 1.0} and isinstance(state["rng"]["torch"], torch.Tensor)
    first = torch.load(directory / "epoch_001.pt", weights_only=True)
    assert first["epoch"] == 1 and len(first["history"]) == 1


def test_a_crash_while_saving_leaves_the_previous_file_whole(tmp_path, monkeypatch):
    directory = _trained_dir(tmp_path)
    good = (directory / "last.pt").read_bytes()
    real_save = torch.save

    def crash(obj, f, *args, **kwargs):  # write half a file, then die
        real_save(obj, f, *args, **kwargs)
        f.seek(0)
        f.truncate(100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    trainer = train.Trainer(_student(), None, {"ce": 1.0}, _colour_task(32, 0), {**CONFIG, "checkpoint_dir": str(directory)})
    with pytest.raises(KeyboardInterrupt):
        trainer._save_checkpoint()
    assert (directory / "last.pt").read_bytes() == good
    assert not (directory / "epoch_000.pt").exists()


def test_resume_continues_from_last_and_matches_a_straight_run(tmp_path):
    straight = _student(0)  # the run _trained_dir checkpoints
    train.Trainer(straight, None, {"ce": 1.0}, _colour_task(32, 0), {**CONFIG, "epochs": 3}).fit()
    directory = _trained_dir(tmp_path, epochs=3)
    for name in ("last.pt", "epoch_003.pt"):
        (directory / name).unlink()
    trainer = _resume(directory, epochs=3)  # only epoch_001 and epoch_002 are left: continue at epoch 3, not 0
    assert trainer.epoch == 3 and [h["epoch"] for h in trainer.history] == [1.0, 2.0, 3.0]
    for (name, a), b in zip(straight.state_dict().items(), trainer.student.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_resume_skips_a_truncated_or_empty_newest_file_and_names_it(tmp_path):
    directory = _trained_dir(tmp_path)
    data = (directory / "last.pt").read_bytes()
    (directory / "last.pt").write_bytes(data[: len(data) // 2])
    (directory / "epoch_002.pt").write_bytes(b"")
    with pytest.warns(RuntimeWarning, match=r"epoch_001\.pt.*last\.pt \(unreadable.*epoch_002\.pt \(empty file"):
        trainer = _resume(directory)
    assert trainer.epoch == 2 and trainer.history[0]["epoch"] == 1.0


def test_resume_with_no_loadable_checkpoint_is_an_error_naming_the_files(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "last.pt").write_bytes(b"")
    torch.save({"format": "something else"}, directory / "epoch_004.pt")
    with pytest.raises(train.ResumeError, match=r"no checkpoint in .*last\.pt \(empty file.*epoch_004\.pt \(not a multiexplain-trainer/1"):
        _resume(directory)


class _RunsCode:
    """Pickles to a call of ``exec``: loading it with weights_only=False would run the code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('ran')",))


def test_a_malicious_checkpoint_is_refused_and_runs_no_code(tmp_path):
    directory = _trained_dir(tmp_path)
    marker = tmp_path / "pwned.txt"
    state = torch.load(directory / "last.pt", weights_only=True)
    state["payload"] = _RunsCode(marker)
    torch.save(state, directory / "last.pt")
    # the crafted file really would run code when loaded the unsafe way
    torch.load(directory / "last.pt", weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()
    with pytest.raises(train.ResumeError, match=r"refusing to resume from .*last\.pt: it holds pickled objects that would run code"):
        _resume(directory)
    assert not marker.exists()
    # also a plain pickle (not a torch zip file) that runs code
    (directory / "last.pt").write_bytes(pickle.dumps(_RunsCode(marker)))
    with pytest.raises(train.ResumeError, match="would run code"):
        _resume(directory)
    assert not marker.exists()


def test_resume_refuses_changed_settings_or_applies_them_with_a_loud_warning(tmp_path):
    directory = _trained_dir(tmp_path)
    with pytest.raises(train.ResumeError, match=r"the settings differ \(lr: checkpoint 0\.05, now 0\.1\)"):
        _resume(directory, lr=0.1)
    with pytest.raises(train.ResumeError, match=r"batch_size: checkpoint 16, now 8.*cannot change"):
        _resume(directory, batch_size=8, on_config_change="warn")
    with pytest.raises(train.ResumeError, match="losses"):
        train.Trainer(_student(1), None, {"ce": 2.0}, _colour_task(32, 0),
                      {**CONFIG, "checkpoint_dir": str(directory), "resume": True}).fit(max_epochs=1)
    state = torch.load(directory / "last.pt", weights_only=True)
    lr_then = state["optimizer"]["param_groups"][0]["lr"]
    trainer = train.Trainer(_student(1), None, {"ce": 1.0}, _colour_task(32, 0),
                            {**CONFIG, "lr": 0.1, "checkpoint_dir": str(directory), "resume": True, "on_config_change": "warn"})
    with pytest.warns(RuntimeWarning, match=r"changed settings \(lr: checkpoint 0\.05, now 0\.1.*new values apply"):
        trainer._maybe_resume()
    assert trainer.epoch == 2
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2 * lr_then)  # same point of the schedule, new scale
    assert trainer.scheduler.base_lrs == [0.1]
    with pytest.raises(ValueError, match="on_config_change"):
        train.TrainConfig.from_dict({"on_config_change": "ignore"})


def test_resume_through_the_cli_refuses_a_malicious_checkpoint_in_one_line(tmp_path, capsys):
    from multiexplain import cli

    directory = tmp_path / "ckpt"
    directory.mkdir()
    marker = tmp_path / "pwned.txt"
    torch.save({"format": train.RESUME_FORMAT, "epoch": 1, "student": _RunsCode(marker)}, directory / "last.pt")
    config = tmp_path / "run.yaml"
    config.write_text(f"student: {{depth: 10, widen_factor: 1}}\ndata: {{train_size: 12, test_size: 6}}\n"
                      f"train: {{epochs: 1, batch_size: 6, progress: false, checkpoint_dir: '{directory}', resume: true}}\n")
    assert cli.main(["distill", "--config", str(config), "--out", str(tmp_path / "out"), "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "would run code" in err[0] and "last.pt" in err[0]
    assert not marker.exists()
