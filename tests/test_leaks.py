"""Leaks and state: many explanations keep memory flat and leave the model exactly as it was.

* 1,000 consecutive explanations of a small model: resident memory (RSS) and Python allocations
  (tracemalloc) stay within stated bounds, the number of live tensors does not grow, and no hook,
  ``.grad`` or flag is left behind.
* The explainer works as a context manager and as a plain object, with the same maps.
* An exception inside the model's forward (on purpose), inside a target callable, or from bad
  targets leaves training flags, ``requires_grad``, grad mode, buffers and hooks as they were.
* Two explainers on one model at once (interleaved, nested, and in two threads) do not interfere.
* ``torch.no_grad()`` works and gives the same maps; ``torch.inference_mode()`` raises a clear error;
  inputs created under inference mode are still explained outside it.
"""

from __future__ import annotations

import gc
import threading
import tracemalloc

import pytest
import torch
from torch import nn

from multiexplain import GradCAM, GradCAMPlusPlus

RSS_BOUND_MB = 25.0  # growth allowed over 1,000 explanations after warm-up (allocator noise)
TRACEMALLOC_BOUND_KB = 256.0  # Python-object growth allowed over the same calls
EXPLANATIONS = 1000


pytestmark = pytest.mark.usefixtures("one_torch_thread")

class Net(nn.Module):
    """Small CNN with batch-norm, in-place ReLUs, dropout and a switch that raises inside forward."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.block = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1, stride=2), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout(0.5)
        self.fc = nn.Linear(12, classes)
        self.explode = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.stem(x))
        if self.explode:
            raise RuntimeError("exploded on purpose after the explained layer")
        return self.fc(self.dropout(x.mean(dim=(2, 3))))


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def _state(model: nn.Module) -> dict:
    """Everything an explainer could leave changed on a model."""
    return {
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [p.grad is None for p in model.parameters()],
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "hooks": _hooks(model),
        "grad_mode": torch.is_grad_enabled(),
    }


def _assert_same_state(before: dict, after: dict) -> None:
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["grads"] == before["grads"] and all(after["grads"])
    assert after["hooks"] == before["hooks"] == 0
    assert after["grad_mode"] == before["grad_mode"]
    for key, value in before["tensors"].items():
        assert torch.equal(after["tensors"][key], value), f"{key} changed"


def _rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    import resource

    return resident_pages * resource.getpagesize() / 2**20


def _live_tensors() -> int:
    return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@pytest.fixture
def model() -> Net:
    torch.manual_seed(0)
    return Net().eval()


@pytest.mark.slow
def test_thousand_explanations_keep_memory_flat_and_leave_nothing_behind(model):
    x = torch.randn(2, 3, 16, 16)
    before = _state(model)
    explainer = GradCAMPlusPlus(model, "auto")
    for _ in range(50):  # warm-up: allocator pools, autograd caches, the one-off auto pick
        explainer(x, targets=[[0, 1], [2, 3]])
    gc.collect()
    tensors_start, rss_start = _live_tensors(), _rss_mb()
    tracemalloc.start()
    snapshot_start = tracemalloc.take_snapshot()
    for i in range(EXPLANATIONS):
        explanation = explainer(x, targets=[[0, 1], [2, 3]] if i % 2 else None)
    gc.collect()
    snapshot_end = tracemalloc.take_snapshot()
    tracemalloc.stop()
    python_growth_kb = sum(stat.size_diff for stat in snapshot_end.compare_to(snapshot_start, "filename")) / 1024
    rss_growth_mb = _rss_mb() - rss_start
    del explanation
    gc.collect()
    print(f"\n{EXPLANATIONS} explanations: RSS +{rss_growth_mb:.2f} MB, Python allocations +{python_growth_kb:.1f} KB, "
          f"live tensors {tensors_start} -> {_live_tensors()}")
    assert rss_growth_mb < RSS_BOUND_MB
    assert python_growth_kb < TRACEMALLOC_BOUND_KB
    assert _live_tensors() <= tensors_start
    _assert_same_state(before, _state(model))


def test_differentiable_explanations_free_their_graphs(model):
    x = torch.randn(2, 3, 16, 16)
    explainer = GradCAMPlusPlus(model, "block", create_graph=True)
    for _ in range(10):
        explainer(x).maps.sum().backward()
    model.zero_grad(set_to_none=True)
    gc.collect()
    start = _live_tensors()
    for _ in range(100):
        explanation = explainer(x)
        assert explanation.maps.requires_grad
        explanation.maps.sum().backward()
    del explanation
    model.zero_grad(set_to_none=True)
    gc.collect()
    assert _live_tensors() <= start
    assert _hooks(model) == 0


def test_context_manager_and_plain_object_give_the_same_maps(model):
    x = torch.randn(3, 3, 16, 16)
    plain = GradCAMPlusPlus(model, "block")(x, targets=[0, 1, 2])
    with GradCAMPlusPlus(model, "block") as explainer:
        managed = explainer(x, targets=[0, 1, 2])
        assert _hooks(model) == 0, "no hook outlives a call, even inside the with block"
        again = explainer(x, targets=[0, 1, 2])
    torch.testing.assert_close(managed.maps, plain.maps)
    torch.testing.assert_close(again.maps, plain.maps)
    explainer.close()  # closing twice is harmless
    assert _hooks(model) == 0


@pytest.mark.parametrize("layer", ["auto", "block"])
@pytest.mark.parametrize("grad_context", ["enabled", "no_grad"])
def test_exception_inside_forward_leaves_the_model_as_it_was(layer, grad_context):
    torch.manual_seed(0)
    model = Net().train()
    model.stem[1].eval()  # mixed flags must come back exactly
    model.fc.weight.requires_grad_(False)
    x = torch.randn(2, 3, 16, 16)
    explainer = GradCAMPlusPlus(model, layer)
    if layer == "auto":
        explainer.resolve(x)  # pick once while the model works; the failing call is the explanation
    model.explode = True
    context = torch.no_grad() if grad_context == "no_grad" else torch.enable_grad()
    with context:
        before = _state(model)
        with pytest.raises(RuntimeError, match="exploded on purpose"):
            explainer(x)
        _assert_same_state(before, _state(model))
    # ... and in the auto pick's traced forward as well.
    with context:
        before = _state(model)
        with pytest.raises(RuntimeError, match="exploded on purpose"):
            GradCAMPlusPlus(model, "auto")(x)
        _assert_same_state(before, _state(model))
    model.explode = False
    assert explainer(x).maps.shape == (2, 16, 16)


def test_exceptions_from_targets_leave_the_model_as_it_was(model):
    x = torch.randn(2, 3, 16, 16)
    before = _state(model)

    def broken_target(_output):
        raise KeyError("no such score")

    with pytest.raises(KeyError, match="no such score"):
        GradCAMPlusPlus(model, "block")(x, targets=broken_target)
    with pytest.raises(ValueError, match="out of range"):
        GradCAMPlusPlus(model, "auto")(x, targets=[0, 99])
    with pytest.raises(RuntimeError, match="inference_mode"):
        with torch.inference_mode():
            GradCAMPlusPlus(model, "block")(x)
    _assert_same_state(before, _state(model))


def test_two_explainers_on_one_model_interleaved_and_nested(model):
    x = torch.randn(2, 3, 16, 16)
    plus_plus = GradCAMPlusPlus(model, "block")
    grad_cam = GradCAM(model, "stem")
    solo_pp, solo_gc = plus_plus(x, [1, 2]), grad_cam(x, [3, 4])
    for _ in range(3):  # interleaved
        torch.testing.assert_close(plus_plus(x, [1, 2]).maps, solo_pp.maps)
        torch.testing.assert_close(grad_cam(x, [3, 4]).maps, solo_gc.maps)
    inner = {}

    def score_that_explains_too(output):
        inner["explanation"] = grad_cam(x, [3, 4])  # a whole explanation in the middle of another
        return output.gather(1, torch.tensor([[1], [2]])).squeeze(1)

    nested = plus_plus(x, score_that_explains_too)
    torch.testing.assert_close(nested.maps, solo_pp.maps)
    torch.testing.assert_close(inner["explanation"].maps, solo_gc.maps)
    assert _hooks(model) == 0


def test_two_explainers_in_two_threads_do_not_capture_each_others_forward(model):
    x_a, x_b = torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)
    solo_a = GradCAMPlusPlus(model, "block")(x_a, [0, 1])
    solo_b = GradCAM(model, "block")(x_b, [2, 3])
    results: dict[str, list] = {"a": [], "b": []}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def work(key, explainer, x, targets):
        try:
            barrier.wait()
            for _ in range(40):
                results[key].append(explainer(x, targets).maps)
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [
        threading.Thread(target=work, args=("a", GradCAMPlusPlus(model, "block"), x_a, [0, 1])),
        threading.Thread(target=work, args=("b", GradCAM(model, "block"), x_b, [2, 3])),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for maps in results["a"]:
        torch.testing.assert_close(maps, solo_a.maps)
    for maps in results["b"]:
        torch.testing.assert_close(maps, solo_b.maps)
    assert _hooks(model) == 0


def test_no_grad_works_and_inference_mode_raises_a_clear_error(model):
    x = torch.randn(2, 3, 16, 16)
    reference = GradCAMPlusPlus(model, "auto")(x)
    with torch.no_grad():
        inside = GradCAMPlusPlus(model, "auto")(x)
        assert not torch.is_grad_enabled()
    torch.testing.assert_close(inside.maps, reference.maps)
    assert inside.layer == reference.layer == "block"
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match=r"inference_mode\(\).*torch.no_grad\(\) is fine"):
            GradCAMPlusPlus(model, "block")(x)
        with pytest.raises(RuntimeError, match=r"inference_mode"):
            GradCAMPlusPlus(model, "auto")(x)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("layer", ["auto", "block"])
def test_inputs_made_under_inference_mode_are_explained_outside_it(model, layer):
    with torch.inference_mode():
        x = torch.randn(2, 3, 16, 16)
    assert x.is_inference()
    explanation = GradCAMPlusPlus(model, layer)(x)
    reference = GradCAMPlusPlus(model, "block")(x.clone())
    torch.testing.assert_close(explanation.maps, reference.maps)


@pytest.mark.parametrize("fails", [False, True])
def test_a_generated_caption_leaves_mixed_training_flags_as_they_were(fails):
    """explain_caption(caption=None) on a captioner whose generate() switches to eval (as many do) and
    may raise: every submodule's own flag comes back, not one flag for the whole model."""
    from multiexplain.adapters.captioning import explain_caption
    from multiexplain.data.captioned_scenes import make_captioned_scenes
    from multiexplain.models import ShowAttendTell, load_show_and_tell

    shipped, vocabulary = load_show_and_tell()

    class SwitchesToEval(ShowAttendTell):
        def generate(self, images, **kwargs):
            self.eval()
            if fails:
                raise RuntimeError("generation failed")
            return super().generate(images, **kwargs)

    model = SwitchesToEval(**shipped.config)
    model.load_state_dict(shipped.state_dict())
    model.train()
    model.encoder.eval()  # mixed: a frozen, eval-mode encoder under a training decoder
    flags = {name: module.training for name, module in model.named_modules()}
    assert len(set(flags.values())) == 2
    image = make_captioned_scenes(1, seed=2).images[0]
    if fails:
        with pytest.raises(RuntimeError, match="generation failed"):
            explain_caption(model, image, tokenizer=vocabulary)
    else:
        assert explain_caption(model, image, tokenizer=vocabulary).words
    assert {name: module.training for name, module in model.named_modules()} == flags
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
