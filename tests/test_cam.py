"""The explainer classes: peers, multi-target, differentiable mode, hygiene and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from multiexplain import GradCAM, GradCAMPlusPlus, TokenReshape, core
from multiexplain.explain import BaseCAM
from multiexplain.explain import explainer as explainer_module
from vjp_batches import record_vjp_batches

_GRAD = torch.autograd.grad  # restored between recordings of the batches a call ran


def _all_hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules()
    )


class TinyNet(nn.Module):
    """conv -> ReLU(inplace) -> conv -> ReLU(inplace) -> pool -> fc; all piecewise linear."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1, stride=2)
        self.act2 = nn.ReLU(inplace=True)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, classes)

    def forward(self, x):
        x = self.act2(self.conv2(self.act1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def independent_gradcampp(model: TinyNet, x: torch.Tensor, target: int) -> torch.Tensor:
    """The same map from a hand-split forward in float64: A = conv2 output (pre-ReLU)."""
    model = model.double()
    a = model.conv2(torch.relu(model.conv1(x.double()))).detach().requires_grad_(True)
    score = model.fc(model.pool(torch.relu(a)).flatten(1))[:, target].sum()
    (g,) = torch.autograd.grad(score, a)
    model.float()
    _, cam = core.class_activation_map(a.detach(), g)
    return cam


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return TinyNet().eval()


def test_inplace_relu_after_layer_does_not_corrupt_activations(tiny):
    x = torch.randn(3, 3, 16, 16)
    explanation = GradCAMPlusPlus(tiny, "conv2")(x, targets=[0, 2, 4])
    for i, target in enumerate([0, 2, 4]):
        reference = independent_gradcampp(tiny, x[i : i + 1], target)
        torch.testing.assert_close(explanation.raw[i : i + 1].double(), reference, rtol=1e-4, atol=1e-6)
    assert explanation.maps.shape == (3, 16, 16)
    assert explanation.maps.min() >= 0 and explanation.maps.max() <= 1
    assert explanation.targets.tolist() == [0, 2, 4]
    torch.testing.assert_close(explanation.scores, tiny(x)[torch.arange(3), torch.tensor([0, 2, 4])])


def _peer_layer_maps(model: nn.Module, layer: nn.Module, x: torch.Tensor, targets: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """pytorch-grad-cam's Grad-CAM++ final maps and its layer-resolution maps (its own capture)."""
    from pytorch_grad_cam import GradCAMPlusPlus as PeerGradCAMPlusPlus
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    peer_targets = [ClassifierOutputTarget(t) for t in targets]
    with PeerGradCAMPlusPlus(model=model, target_layers=[layer]) as cam:
        final = cam(input_tensor=x, targets=peer_targets)
        activations = cam.activations_and_grads.activations[0].numpy()
        gradients = cam.activations_and_grads.gradients[0].numpy()
        raw = cam.get_cam_image(x, layer, peer_targets, activations, gradients, eigen_smooth=False)
    return final, np.maximum(raw, 0)


@pytest.mark.parametrize(
    "arch, layer_name",
    [("resnet18", "layer4"), ("vgg11", "features.20"), ("mobilenet_v2", "features")],
)
def test_matches_pytorch_grad_cam_where_its_epsilon_is_negligible(arch, layer_name):
    """pytorch-grad-cam adds 1e-6 to the alpha denominator (and 1e-7 in its min-max); scaling
    the classifier up makes gradients large enough for the alpha epsilon to vanish, and then the
    maps must agree after the same normalisation."""
    torch.manual_seed(1)
    model = getattr(torchvision.models, arch)(num_classes=10).eval()
    classifier = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        classifier.weight.mul_(1e4)
    x = torch.randn(2, 3, 64, 64)
    targets = [3, 7]
    ours = GradCAMPlusPlus(model, layer_name)(x, targets)
    peer_final, peer_raw = _peer_layer_maps(model, model.get_submodule(layer_name), x, targets)
    same = lambda maps: core.normalize_maps(torch.as_tensor(maps, dtype=torch.float64), 2)  # noqa: E731
    assert (same(ours.raw) - same(peer_raw)).abs().max() < 1e-4
    # End to end (upsampled maps) where the peer's 1e-7 in its min-max is negligible too.
    if ours.raw.amax() > 1e-2:
        from pytorch_grad_cam.utils.image import scale_cam_image

        assert np.abs(scale_cam_image(ours.raw.numpy(), target_size=(64, 64)) - peer_final).max() < 1e-4


def test_auto_layer_picks_last_spatial_block():
    resnet = torchvision.models.resnet18(num_classes=3).eval()
    assert GradCAMPlusPlus(resnet)(torch.randn(1, 3, 64, 64)).layer == "layer4"
    vgg = torchvision.models.vgg11(num_classes=3).eval()
    assert GradCAMPlusPlus(vgg)(torch.randn(1, 3, 64, 64)).layer == "features"


def test_multi_target_from_one_forward_equals_separate_calls(tiny):
    x = torch.randn(2, 3, 16, 16)
    targets = [[0, 1, 4], [3, 3, 2]]
    calls = []
    handle = tiny.register_forward_hook(lambda *_: calls.append(1))
    try:
        explanation = GradCAMPlusPlus(tiny, "conv2")(x, targets)
    finally:
        handle.remove()
    assert len(calls) == 1, "K targets must come from one forward pass"
    assert explanation.maps.shape == (2, 3, 16, 16) and explanation.weights.shape == (2, 3, 6)
    for k in range(3):
        single = GradCAMPlusPlus(tiny, "conv2")(x, [row[k] for row in targets])
        torch.testing.assert_close(explanation.maps[:, k], single.maps)
        torch.testing.assert_close(explanation.raw[:, k], single.raw)
        torch.testing.assert_close(explanation.scores[:, k], single.scores)


class _ReadsItsGradient(torch.autograd.Function):
    """Identity whose backward reads a gradient value with ``.item()``: no vmap can batch it."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * (1.0 if grad.abs().sum().item() >= 0 else 0.0)


def test_targets_vmap_cannot_batch_fall_back_to_one_pass_each_with_the_same_maps(tiny):
    x = torch.randn(2, 3, 16, 16)
    targets = [[0, 1, 4], [3, 3, 2]]
    batched = GradCAMPlusPlus(tiny, "conv2")(x, targets)
    wrapped = nn.Sequential(tiny.conv1, tiny.act1, tiny.conv2, tiny.act2, tiny.pool, nn.Flatten(), tiny.fc)
    original = wrapped[-1].forward
    wrapped[-1].forward = lambda h: original(_ReadsItsGradient.apply(h))
    with pytest.warns(RuntimeWarning, match="falling back to one pass per target"):
        fallback = GradCAMPlusPlus(wrapped, "2")(x, targets)
    torch.testing.assert_close(fallback.raw, batched.raw)
    torch.testing.assert_close(fallback.maps, batched.maps)


class TinyTokenLM(nn.Module):
    """conv feature map -> tokens -> a causal running mean (positions mix, as in a decoder) ->
    a position-wise token head of ``vocabulary`` outputs: the shape of a captioner's scores."""

    def __init__(self, vocabulary: int = 400, head_calls: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, stride=2)
        self.mix = nn.Linear(6, 8)
        self.head = nn.Linear(8, vocabulary)
        self.head_calls = head_calls

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)  # (N, P, 6)
        running = tokens.cumsum(1) / torch.arange(1, tokens.shape[1] + 1, dtype=x.dtype).view(1, -1, 1)
        hidden = torch.tanh(self.mix(running))
        logits = self.head(hidden)  # (N, P, vocabulary)
        for _ in range(self.head_calls - 1):
            self.head(hidden.flip(1))  # a later use of the head on another input (an auxiliary output)
        return logits


def _token_targets(model: nn.Module, n: int, k: int, shift: int = 0):
    """A PositionScores target (each target a random set of positions' log-probabilities) and the
    same scores as a plain callable; ``shift`` drops the first positions (misaligned with the head)."""
    from multiexplain.explain import PositionScores

    generator = torch.Generator().manual_seed(3)
    positions = 16 - shift
    ids = torch.randint(0, model.head.out_features, (n, positions), generator=generator)
    weights = (torch.rand(n, k, positions, generator=generator) < 0.3).double()

    def position_scores(logits):
        return logits[:, shift:].log_softmax(-1).gather(-1, ids[..., None])[..., 0], weights

    return PositionScores(model.head, position_scores), (lambda logits: PositionScores.combine(*position_scores(logits)))


def test_position_scores_cross_the_head_once_and_equal_the_plain_gradients():
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = TinyTokenLM().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    factored, plain = _token_targets(model, n=2, k=5)
    flops = {}
    for name, target in (("factored", factored), ("plain", plain)):
        with FlopCounterMode(display=False) as counter:
            flops[name] = (GradCAMPlusPlus(model, "conv")(x, target), counter.get_total_flops())
    (ours, ours_flops), (reference, reference_flops) = flops["factored"], flops["plain"]
    assert ours.raw.shape == (2, 5, 4, 4) and ours.raw.abs().amax() > 0
    torch.testing.assert_close(ours.raw, reference.raw, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ours.weights, reference.weights, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(ours.scores, reference.scores, atol=0, rtol=0)
    # The head's input-gradient product (N*P rows x vocabulary x width) runs once instead of K times.
    saved = 2 * (5 - 1) * 2 * 16 * model.head.out_features * model.head.in_features
    assert reference_flops - ours_flops >= 0.9 * saved, (reference_flops, ours_flops, saved)


@pytest.mark.parametrize("case", ["head runs twice", "positions misaligned with the head"])
def test_position_scores_the_head_cannot_carry_are_differentiated_plainly_with_the_same_maps(case):
    torch.manual_seed(0)
    model = TinyTokenLM(head_calls=2 if case == "head runs twice" else 1).double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    factored, plain = _token_targets(model, n=2, k=4, shift=3 if "misaligned" in case else 0)
    ours, reference = GradCAMPlusPlus(model, "conv")(x, factored), GradCAMPlusPlus(model, "conv")(x, plain)
    assert ours.raw.abs().amax() > 0
    torch.testing.assert_close(ours.raw, reference.raw, atol=1e-12, rtol=1e-10)
    assert _all_hooks(model) == 0


def test_auto_max_batch_chunks_by_gradient_bytes_per_device_and_keeps_the_maps(monkeypatch):
    from multiexplain.explain import AUTO_CHUNK_BYTES, auto_chunk

    # K = 7 float64 cotangents at a (2, 16, 8) head input, 2 KiB each, into a 1 KiB layer: 2 KiB a target.
    cotangents, layer = torch.zeros(7, 2, 16, 8, dtype=torch.float64), torch.zeros(2, 8, 8)
    monkeypatch.setitem(AUTO_CHUNK_BYTES, "cpu", 4096)
    assert auto_chunk(cotangents, layer) == 2
    assert auto_chunk(cotangents, torch.zeros(2, 8, 64)) == 1  # a 4 KiB gradient at the layer counts instead
    monkeypatch.setitem(AUTO_CHUNK_BYTES, "cpu", 100)  # smaller than one target: still one per pass
    assert auto_chunk(cotangents, layer) == 1
    monkeypatch.setitem(AUTO_CHUNK_BYTES, "cpu", 1 << 30)  # never more than K
    assert auto_chunk(cotangents, layer) == 7
    monkeypatch.setitem(AUTO_CHUNK_BYTES, "cpu", 4096)
    assert auto_chunk(cotangents.to("meta"), layer) == 7  # a device type without its own entry: the default
    monkeypatch.setitem(AUTO_CHUNK_BYTES, "default", 6144)
    assert auto_chunk(cotangents.to("meta"), layer) == 3
    monkeypatch.delitem(AUTO_CHUNK_BYTES, "cpu")
    assert auto_chunk(cotangents, layer) == 3
    monkeypatch.undo()
    # The shipped budgets: a 16-word caption into a 7B LLaVA's CLIP-L features (half precision) batches
    # whole on a GPU; on a CPU a 257-token tower of width 256 goes 3 words at a time.
    assert AUTO_CHUNK_BYTES == {"cpu": 1 << 20, "default": 256 << 20}
    assert auto_chunk(torch.zeros(16, 1, 16, 256, device="meta"), torch.zeros(1, 577, 1024, dtype=torch.float16)) == 16
    assert auto_chunk(torch.zeros(16, 1, 16, 256), torch.zeros(1, 257, 256)) == 3

    torch.manual_seed(0)
    model = TinyTokenLM().double().eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    factored, _ = _token_targets(model, n=2, k=7)
    everything = GradCAMPlusPlus(model, "conv")(x, factored)  # all at once, the explainer's default
    # Three targets: the head-input cotangents (2, 16, 8) are larger than the gradients at "conv" (2, 6, 4, 4).
    monkeypatch.setitem(AUTO_CHUNK_BYTES, "cpu", 3 * 2 * 16 * 8 * 8)
    # "auto" times one target alone, a batch of three, one alone, then runs the other two the faster
    # way; a fake clock decides which (seconds of each pass: alone, batched, alone).
    for passes, expected in (((1.0, 2.9, 1.2), [1, 3, 1, 2]),  # 0.97 s a target batched: batches
                             ((1.0, 3.3, 1.2), [1, 3, 1, 1, 1]),  # 1.1 s a target batched: alone
                             ((1.5, 3.3, 1.0), [1, 3, 1, 1, 1])):  # the faster single pass is the yardstick
        ticks = iter(value for seconds in passes for value in (0.0, seconds))
        monkeypatch.setattr(explainer_module, "_clock", lambda device: next(ticks))
        batches = record_vjp_batches(monkeypatch)
        chunked = GradCAMPlusPlus(model, "conv", max_batch="auto")(x, factored)
        assert batches == expected
        torch.testing.assert_close(chunked.raw, everything.raw, atol=1e-12, rtol=1e-10)
        monkeypatch.setattr(torch.autograd, "grad", _GRAD)
    # Too few targets to time both ways and profit (K < chunk + 3): plain batches, no clock read.
    monkeypatch.setattr(explainer_module, "_clock", lambda device: pytest.fail("timed although K < chunk + 3"))
    few, _ = _token_targets(model, n=2, k=5)
    batches = record_vjp_batches(monkeypatch)
    chunked = GradCAMPlusPlus(model, "conv", max_batch="auto")(x, few)
    assert batches == [3, 2]
    torch.testing.assert_close(chunked.raw, GradCAMPlusPlus(model, "conv")(x, few).raw, atol=1e-12, rtol=1e-10)
    for wrong in (0, -2, 2.5, True, "all"):
        with pytest.raises(ValueError, match="max_batch must be a positive int"):
            GradCAMPlusPlus(model, "conv", max_batch=wrong)


def test_position_scores_stay_differentiable_for_a_loss():
    torch.manual_seed(0)
    model = TinyTokenLM().double().train()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    grads = []
    for target in _token_targets(model, n=2, k=3):
        maps = GradCAMPlusPlus(model, "conv", create_graph=True)(x, target).raw
        (grad,) = torch.autograd.grad((maps ** 2).sum(), model.mix.weight)
        grads.append(grad)
    assert grads[0].abs().amax() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-12, rtol=1e-10)


def test_several_methods_from_one_forward_equal_separate_calls(tiny):
    x = torch.randn(2, 3, 16, 16)
    calls = []
    handle = tiny.register_forward_hook(lambda *_: calls.append(1))
    try:
        both = GradCAMPlusPlus(tiny, "conv2").explain_methods(x, [[0, 2], [1, 4]], methods=("gradcam++", "gradcam"))
    finally:
        handle.remove()
    assert len(calls) == 1 and list(both) == ["gradcam++", "gradcam"]
    for name, cls in (("gradcam++", GradCAMPlusPlus), ("gradcam", GradCAM)):
        alone = cls(tiny, "conv2")(x, [[0, 2], [1, 4]])
        assert both[name].method == name
        torch.testing.assert_close(both[name].raw, alone.raw)
        torch.testing.assert_close(both[name].maps, alone.maps)
    assert not torch.allclose(both["gradcam++"].raw, both["gradcam"].raw)

    class PositiveGradients(BaseCAM):  # a user's own method: only its channel weights
        method = "positive-gradients"

        def channel_weights(self, activations, gradients, spatial_ndim):
            return gradients.clamp(min=0).flatten(3).mean(dim=3)

    mine = PositiveGradients(tiny, "conv2").explain_methods(x, 1, methods=("positive-gradients", "gradcam"))
    assert mine["positive-gradients"].maps.shape == (2, 16, 16)
    torch.testing.assert_close(mine["gradcam"].raw, GradCAM(tiny, "conv2")(x, 1).raw)
    with pytest.raises(ValueError, match=r"unknown method\(s\) \['scorecam'\]"):
        GradCAMPlusPlus(tiny, "conv2").explain_methods(x, 1, methods=("gradcam++", "scorecam"))


def test_target_callable_and_model_output_types(tiny):
    x = torch.randn(2, 3, 16, 16)

    class DictOut(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return {"hidden": pixel_values.mean(), "logits": self.inner(pixel_values)}

    wrapped = DictOut(tiny)
    from_dict = GradCAMPlusPlus(wrapped, "inner.conv2")({"pixel_values": x}, targets=1)
    plain = GradCAMPlusPlus(tiny, "conv2")(x, targets=1)
    torch.testing.assert_close(from_dict.maps, plain.maps)
    # A callable target: the log-softmax of two classes as K=2 scores per sample.
    scores_fn = lambda out: torch.log_softmax(out["logits"], dim=1)[:, [1, 2]]  # noqa: E731
    multi = GradCAMPlusPlus(wrapped, "inner.conv2")({"pixel_values": x}, targets=scores_fn)
    assert multi.maps.shape == (2, 2, 16, 16) and multi.targets is None
    tuple_model = nn.Sequential()  # tuple inputs are unpacked as positional arguments

    class TwoInputs(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, a, b):
            return (self.inner(a + b), None)

    two = GradCAMPlusPlus(TwoInputs(tiny), "inner.conv2")((x, torch.zeros_like(x)), targets=1)
    torch.testing.assert_close(two.maps, plain.maps)
    del tuple_model


def test_gradcam_differs_from_gradcampp_and_matches_reference(tiny):
    x = torch.randn(2, 3, 16, 16)
    explanation = GradCAM(tiny, "conv2")(x, targets=[1, 2])
    a = tiny.conv2(torch.relu(tiny.conv1(x))).detach().requires_grad_(True)
    score = tiny.fc(tiny.pool(torch.relu(a)).flatten(1)).gather(1, torch.tensor([[1], [2]])).sum()
    (g,) = torch.autograd.grad(score, a)
    torch.testing.assert_close(explanation.weights, g.mean(dim=(2, 3)))
    assert explanation.method == "gradcam"


def test_differentiable_mode_backpropagates_to_parameters_below_the_layer(tiny):
    tiny.train()
    x = torch.randn(2, 3, 16, 16)
    explanation = GradCAMPlusPlus(tiny, "conv2", create_graph=True)(x, targets=[0, 1])
    assert explanation.maps.requires_grad
    loss = (explanation.maps - 0.5).pow(2).mean()
    grads = torch.autograd.grad(loss, [tiny.conv1.weight, tiny.conv2.weight])
    for grad in grads:
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert tiny.training, "the explainer must not switch the model to eval"
    assert all(p.grad is None for p in tiny.parameters())


def test_inference_mode_records_no_graph_below_the_layer(tiny):
    x = torch.randn(1, 3, 16, 16, requires_grad=True)
    seen = {}
    handles = [
        getattr(tiny, name).register_forward_hook(
            lambda m, i, o, name=name: seen.__setitem__(name, (o.requires_grad, o.grad_fn is not None)))
        for name in ("conv1", "conv2", "fc")
    ]
    try:
        explanation = GradCAMPlusPlus(tiny, "conv2")(x)
    finally:
        for handle in handles:
            handle.remove()
    # Below the layer: no graph even though x and the weights require grad. The layer's output, as
    # the capture hands it on (its hook runs first), is where the graph starts. Above: a graph.
    assert seen["conv1"] == (False, False) and seen["conv2"][0] and seen["fc"] == (True, True)
    assert not explanation.maps.requires_grad
    assert x.grad is None and all(p.grad is None for p in tiny.parameters())


def test_hooks_removed_and_state_restored_after_success_and_exception(tiny):
    tiny.train()
    flags = [p.requires_grad for p in tiny.parameters()]
    explainer = GradCAMPlusPlus(tiny, "conv2")
    explainer(torch.randn(1, 3, 16, 16))
    assert _all_hooks(tiny) == 0 and tiny.training

    class Boom(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    tiny.pool = Boom()
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            explainer(torch.randn(1, 3, 16, 16))
        assert not torch.is_grad_enabled(), "grad mode must be restored after a failing forward"
    assert torch.is_grad_enabled()
    assert _all_hooks(tiny) == 0 and tiny.training
    assert [p.requires_grad for p in tiny.parameters()] == flags
    assert all(p.grad is None for p in tiny.parameters())


def test_explaining_under_no_grad_works_and_inference_mode_says_why(tiny):
    x = torch.randn(1, 3, 16, 16)
    expected = GradCAMPlusPlus(tiny, "conv2")(x).maps
    with torch.no_grad():
        torch.testing.assert_close(GradCAMPlusPlus(tiny, "conv2")(x).maps, expected)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="inference_mode"):
            GradCAMPlusPlus(tiny, "conv2")(x)
    assert _all_hooks(tiny) == 0


def test_zero_gradient_sample_gets_zero_map_and_flag():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    with torch.no_grad():
        model[0].weight.fill_(-1.0)
        model[0].bias.fill_(-1.0)  # conv output < 0 everywhere for non-negative input: ReLU kills all gradients
    x = torch.rand(2, 1, 8, 8)
    explanation = GradCAMPlusPlus(model, "0")(x, targets=0)
    assert explanation.zero_gradient.all()
    assert torch.equal(explanation.maps, torch.zeros_like(explanation.maps))
    assert torch.isfinite(explanation.raw).all()


def test_layer_called_twice_needs_layer_call():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 4)

        def forward(self, x):
            return self.fc(self.conv(torch.relu(self.conv(x))).mean(dim=(2, 3)))

    model = Shared()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(RuntimeError, match="more than once.*layer_call"):
        GradCAMPlusPlus(model, "conv")(x)
    assert _all_hooks(model) == 0
    first = GradCAMPlusPlus(model, "conv", layer_call=0)(x, targets=1)
    second = GradCAMPlusPlus(model, "conv", layer_call=1)(x, targets=1)
    assert not torch.allclose(first.raw, second.raw)
    with pytest.raises(RuntimeError, match="out of range"):
        GradCAMPlusPlus(model, "conv", layer_call=2)(x)


def test_token_reshape_for_vit_style_tokens():
    class TokenNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.block = nn.Linear(8, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, 16, 8)
            cls = tokens.mean(dim=1, keepdim=True)
            tokens = torch.relu(self.block(torch.cat([cls, tokens], dim=1)))  # (N, 17, 8)
            return self.head(tokens[:, 1:].mean(dim=1))

    model = TokenNet()
    x = torch.randn(2, 3, 16, 16)
    explanation = GradCAMPlusPlus(model, "block", reshape=TokenReshape(num_prefix_tokens=1))(x)
    assert explanation.raw.shape == (2, 4, 4) and explanation.maps.shape == (2, 16, 16)
    with pytest.raises(ValueError, match="no spatial axes|spatial"):
        GradCAMPlusPlus(model, "head")(x)
    with pytest.raises(ValueError, match="grid"):
        GradCAMPlusPlus(model, "block", reshape=TokenReshape(grid=(3, 5)))(x)


def test_clear_errors(tiny):
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="no layer named 'conv3'.*conv2"):
        GradCAMPlusPlus(tiny, "conv3")
    with pytest.raises(ValueError, match="no spatial axes"):
        GradCAMPlusPlus(tiny, "fc")(x)
    with pytest.raises(ValueError, match="out of range.*5 classes"):
        GradCAMPlusPlus(tiny, "conv2")(x, targets=[0, 5])
    with pytest.raises(ValueError, match="out of range"):
        GradCAMPlusPlus(tiny, "conv2")(x, targets=-1)
    with pytest.raises(ValueError, match="3 targets for a batch of 2"):
        GradCAMPlusPlus(tiny, "conv2")(x, targets=[0, 1, 2])
    with pytest.raises(ValueError, match=r"batched channels-first input"):
        GradCAMPlusPlus(tiny, "conv2")(torch.randn(16, 16))
    with pytest.raises(TypeError, match="class indices"):
        GradCAMPlusPlus(tiny, "conv2")(x, targets=torch.tensor([0.5, 1.0]))
    for max_batch in (None, "auto", 2):  # no targets: no empty chunking of zero products
        with pytest.raises(ValueError, match=r"returned no scores \(shape \(2, 0\)\).*K >= 1"):
            GradCAMPlusPlus(tiny, "conv2", max_batch=max_batch)(x, lambda logits: logits[:, :0])
    assert _all_hooks(tiny) == 0


def test_context_manager_use(tiny):
    with GradCAMPlusPlus(tiny, "conv2") as explainer:
        explanation = explainer(torch.randn(1, 3, 16, 16), targets=2)
    assert explanation.maps.shape == (1, 16, 16) and _all_hooks(tiny) == 0


# -- bad numbers: refused, flagged or warned about, never a NaN map -------------------------------

class PoisonSample(nn.Module):
    """Identity, except that it writes ``value`` into one sample's output (NaN or inf from the model)."""

    def __init__(self, sample: int, value: float):
        super().__init__()
        self.sample, self.value = sample, value

    def forward(self, x):
        x = x.clone()
        x[self.sample, :, 0, 0] = self.value
        return x


class NaNGradient(torch.autograd.Function):
    """Identity forward; the backward pass returns NaN for one sample (a model's numerics failing there)."""

    @staticmethod
    def forward(ctx, x, sample):
        ctx.sample = sample
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        grad[ctx.sample] = float("nan")
        return grad, None


def test_non_finite_input_is_an_error_that_names_the_input_and_samples(tiny):
    x = torch.randn(4, 3, 16, 16)
    x[2, 1, 3, 3] = float("nan")
    with pytest.raises(ValueError, match=r"the input holds NaN or inf values in sample\(s\) 2 of 4.*nan_to_num"):
        GradCAMPlusPlus(tiny, "conv2")(x)
    x[2] = 0
    x[0, 0, 0, 0] = float("inf")

    class Keyword(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, pixel_values):
            return self.inner(pixel_values)

    with pytest.raises(ValueError, match=r"input 'pixel_values' holds NaN or inf values in sample\(s\) 0 of 4"):
        GradCAMPlusPlus(Keyword(tiny), "inner.conv2")({"pixel_values": x})
    assert _all_hooks(tiny) == 0


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_layer_output_flags_that_sample_and_leaves_the_others_exact(tiny, value):
    model = nn.Sequential()
    model.add_module("body", nn.Sequential(tiny.conv1, tiny.act1, tiny.conv2))
    model.add_module("poison", PoisonSample(1, value))
    model.add_module("head", nn.Sequential(nn.ReLU(), tiny.pool, nn.Flatten(), tiny.fc))
    model.eval()
    x = torch.randn(3, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match=r"NaN or inf \(the layer's output.*at layer 'poison' for sample\(s\) 1 of 3"):
        explanation = GradCAMPlusPlus(model, "poison")(x)
    assert explanation.non_finite.tolist() == [False, True, False]
    assert explanation.targets[1].item() == -1, "no top-1 class can be ranked from non-finite logits"
    for field in (explanation.maps, explanation.raw, explanation.weights):
        assert torch.isfinite(field).all() and not field[1].any()
    assert not explanation.zero_gradient[1], "a NaN gradient is not a zero gradient"
    clean = GradCAMPlusPlus(tiny, "conv2")(x)
    for i in (0, 2):
        assert explanation.targets[i] == clean.targets[i]
        torch.testing.assert_close(explanation.maps[i], clean.maps[i])
    # Targets the caller gave are kept, and every target of the flagged sample is flagged.
    with pytest.warns(RuntimeWarning, match="NaN or inf"):
        given = GradCAM(model, "poison")(x, [[0, 4]] * 3)
    assert given.targets.tolist() == [[0, 4]] * 3
    assert given.non_finite.tolist() == [[False, False], [True, True], [False, False]]


def test_non_finite_gradient_flags_only_that_sample(tiny):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.tiny = tiny

        def forward(self, x):
            a = self.tiny.conv2(self.tiny.act1(self.tiny.conv1(x)))
            a = NaNGradient.apply(a, 0)
            return self.tiny.fc(self.tiny.pool(torch.relu(a)).flatten(1))

    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match=r"\(its gradient\).*sample\(s\) 0 of 2"):
        explanation = GradCAMPlusPlus(Model(), "tiny.conv2")(x, targets=[1, 1])
    assert explanation.non_finite.tolist() == [True, False]
    assert explanation.targets.tolist() == [1, 1] and torch.isfinite(explanation.maps).all()
    assert not explanation.maps[0].any() and explanation.maps[1].max() == 1
    torch.testing.assert_close(explanation.raw[1], GradCAMPlusPlus(tiny, "conv2")(x, [1, 1]).raw[1])


def test_a_clean_explanation_has_no_flags_and_no_warning(tiny):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explanation = GradCAMPlusPlus(tiny, "conv2")(torch.randn(2, 3, 16, 16), [[0, 1], [2, 3]])
    assert explanation.non_finite.shape == (2, 2) and not explanation.non_finite.any()


def test_scores_that_are_softmax_probabilities_give_a_warning(tiny):
    probabilities = nn.Sequential(tiny, nn.Softmax(dim=1)).eval()
    x = torch.randn(2, 3, 16, 16)
    with pytest.warns(RuntimeWarning, match="looks like softmax probabilities.*logits="):
        GradCAMPlusPlus(probabilities, "0.conv2")(x)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # logits, and log-probabilities, are fine
        GradCAMPlusPlus(nn.Sequential(tiny, nn.LogSoftmax(dim=1)), "0.conv2")(x)
        GradCAMPlusPlus(probabilities, "0.conv2", logits=lambda out: out.log())(x)


def _negative_activation_net() -> nn.Module:
    """conv -> GELU -> global pool -> head: a negative bias puts most GELU outputs below 0, so the
    activation sums are negative and 2 + sum(A) g crosses 0 for the large positive gradients."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    with torch.no_grad():
        model[0].bias.fill_(-1.0)
        model[4].weight.mul_(200)
    return model.eval()


def test_gradcampp_at_negative_activations_warns_what_it_means_and_what_to_do():
    import warnings

    model = _negative_activation_net()
    x = torch.rand(2, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match=r"layer '1'.*negative.*alpha = 1 / \(2 \+ sum\(A\) g\) leaves \(0, 1\].*"
                                            r"after its ReLU.*method='gradcam'"):
        explanation = GradCAMPlusPlus(model, "1")(x, 0)
    # What the warning is about: at positive gradients alpha leaves (0, 1], and channel weights come
    # out negative, which Grad-CAM++ weights (sums of alpha * ReLU(g) >= 0) never are after a ReLU.
    a = model[1](model[0](x)).detach().requires_grad_(True)
    (g,) = torch.autograd.grad(model[4](model[3](model[2](a)))[:, 0].sum(), a)
    alpha = core.grad_cam_plus_plus_alpha(a.detach(), g)
    assert ((alpha[g > 0] <= 0) | (alpha[g > 0] > 1)).any()
    assert (explanation.weights < -1).any()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GradCAM(model, "1")(x, 0)  # Grad-CAM has no alpha
        relu = nn.Sequential(model[0], nn.ReLU(), model[2], model[3], model[4]).eval()
        GradCAMPlusPlus(relu, "1")(x, 0)  # after a ReLU alpha stays in (0, 1/2]


def test_empty_targets_say_what_to_give(tiny):
    with pytest.raises(ValueError, match="hold no class index; give at least one per sample"):
        GradCAMPlusPlus(tiny, "conv2")(torch.randn(1, 3, 16, 16), [[]])
