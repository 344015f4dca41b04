"""Tests for the video adapter (adapters/video.py) and the synthetic action clips."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from multiexplain.adapters.video import WindowBlend, explain_clip, slowfast_pathways, window_starts
from multiexplain.data.action_clips import ACTIONS, draw_action_clip, make_action_clips
from multiexplain.data.synthetic import COLOURS
from multiexplain.explain.layers import probe_layer
from multiexplain.io import AnimationWriter, VideoReader, read_clip, write_gif, write_mp4
from multiexplain.models import C3D, c3d, load_action_c3d, load_c3d_weights
from multiexplain.viz import write_strip
from repo_scripts import load_repo_module

SMALL_STAGES = ((1, 4, (1, 2, 2)), (1, 8, (2, 2, 2)), (2, 8, (1, 2, 2)), (2, 8, None))


def small_c3d(num_classes: int = 5, seed: int = 0) -> C3D:
    torch.manual_seed(seed)
    return c3d(num_classes, stages=SMALL_STAGES, hidden=(), global_pool=True).eval()


# -- independent float64 reference (paper eq. 19, 5, 20), written without the core -------------

def reference_gradcampp(acts: torch.Tensor, grads: torch.Tensor, per_slice: bool = False) -> torch.Tensor:
    """acts, grads: (C, T, H, W) float64 -> map (T, H, W). Loops over channels on purpose."""
    maps = torch.zeros(acts.shape[1:], dtype=torch.float64)
    for k in range(acts.shape[0]):
        a, g = acts[k], grads[k]
        if per_slice:
            for t in range(a.shape[0]):
                total = a[t].sum()
                den = 2 * g[t] ** 2 + total * g[t] ** 3
                alpha = torch.where(den != 0, g[t] ** 2 / torch.where(den != 0, den, 1.0), 0.0)
                maps[t] += (alpha * g[t].clamp(min=0)).sum() * a[t]
        else:
            total = a.sum()
            den = 2 * g**2 + total * g**3
            alpha = torch.where(den != 0, g**2 / torch.where(den != 0, den, 1.0), 0.0)
            maps += (alpha * g.clamp(min=0)).sum() * a
    return maps.clamp(min=0)


def reference_gradcam(acts: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    weights = grads.mean(dim=(1, 2, 3))
    return (weights.view(-1, 1, 1, 1) * acts).sum(0).clamp(min=0)


def activations_and_gradients(model: nn.Module, layer: nn.Module, clip: torch.Tensor, target: int):
    """Layer output and dS/dA in float64 (a float64 copy of the model), independent of the core."""
    model64 = C3D(**{**model.config, "stages": [(c, w, tuple(p) if p else None) for c, w, p in model.config["stages"]]}).double().eval()
    model64.load_state_dict(model.state_dict())
    store = {}
    handle = model64.features.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    logits = model64(clip.double())
    handle.remove()
    (grad,) = torch.autograd.grad(logits[0, target], store["a"])
    return store["a"][0].detach(), grad[0]


# -- synthetic clips ------------------------------------------------------------------------

def test_action_clips_are_seeded_balanced_and_masks_are_exact():
    data = make_action_clips(16, seed=5)
    again = make_action_clips(16, seed=5)
    assert torch.equal(data.clips, again.clips) and torch.equal(data.masks, again.masks)
    assert data.clips.shape == (16, 3, 16, 64, 64) and data.masks.shape == (16, 16, 64, 64)
    assert data.labels.tolist() == [i % len(ACTIONS) for i in range(16)]
    assert len(ACTIONS) >= 6
    # The action happens in a window that is never the whole clip.
    lengths = data.active.sum(1)
    assert ((lengths >= 8) & (lengths <= 12)).all()
    # Masked pixels carry the actor's colour (up to paint jitter and sensor noise): it is painted last.
    palette = torch.tensor(list(COLOURS.values()))
    for i in range(16):
        pixels = data.clips[i].permute(1, 2, 3, 0)[data.masks[i]]  # (P, 3)
        if len(pixels) == 0:
            continue
        distance = (pixels[:, None, :] - palette[None]).abs().amax(-1).amin(-1)
        assert (distance < 0.1).float().mean() > 0.97


def test_actions_do_what_their_names_say():
    def centroid(mask):
        ys, xs = torch.nonzero(mask, as_tuple=True)
        return ys.float().mean().item(), xs.float().mean().item()

    for label, (axis, sign) in {0: (1, -1), 1: (1, 1), 2: (0, -1), 3: (0, 1)}.items():
        _, mask, active, _, _ = draw_action_clip(100 + label, label)
        frames = torch.nonzero(active).flatten()
        first, last = frames[0].item(), frames[-1].item()
        shift = centroid(mask[last])[axis] - centroid(mask[max(first - 1, 0)])[axis]
        assert sign * shift > 10, (ACTIONS[label], shift)
        # Outside the window the actor stands still.
        if last + 1 < mask.shape[0]:
            assert torch.equal(mask[last], mask[-1])
    _, grow, active, _, _ = draw_action_clip(7, ACTIONS.index("grow"))
    assert grow[-1].sum() > 2 * grow[0].sum()
    _, blink, active, _, _ = draw_action_clip(8, ACTIONS.index("blink"))
    visible = blink.flatten(1).any(1)
    assert (~visible).any() and visible[~active].all()


# -- C3D builder ----------------------------------------------------------------------------

def test_paper_c3d_architecture_on_meta_device():
    with torch.device("meta"):
        model = c3d()
    names = [name for name, _ in model.features.named_children() if name.startswith("conv")]
    assert names == ["conv1", "conv2", "conv3a", "conv3b", "conv4a", "conv4b", "conv5a", "conv5b"]
    assert model.classifier.fc6.in_features == 8192  # pool5 with (0, 1, 1) padding: 512 x 1 x 4 x 4
    assert model.classifier.fc8.out_features == 487
    # conv1..conv5b 27.66M + fc6 33.56M + fc7 16.78M + fc8 2.00M (the Sports-1M C3D)
    assert sum(p.numel() for p in model.parameters()) == 79_991_015


def test_c3d_loads_the_c3d_pytorch_port_names(tmp_path):
    stages = ((1, 4, (1, 2, 2)), (1, 4, (2, 2, 2)), (2, 4, (2, 2, 2)), (2, 4, (2, 2, 2)), (2, 4, (2, 2, 2)))
    torch.manual_seed(1)
    source = c3d(7, stages=stages, hidden=(8, 8), clip_size=(16, 32, 32)).eval()
    port = {}
    for key, value in source.state_dict().items():
        port["module." + key.split(".", 1)[1]] = value  # conv1.weight, fc6.weight, with a DataParallel prefix
    path = tmp_path / "c3d_port.pth"
    torch.save({"state_dict": port}, path)
    loaded = c3d(7, stages=stages, hidden=(8, 8), clip_size=(16, 32, 32), weights=path).eval()
    clip = torch.rand(1, 3, 16, 32, 32)
    torch.testing.assert_close(loaded(clip), source(clip))
    with pytest.raises(ValueError, match="do not fit"):
        load_c3d_weights(c3d(7, stages=stages, hidden=(8,), clip_size=(16, 32, 32)), path)
    with pytest.raises(FileNotFoundError):
        load_c3d_weights(loaded, tmp_path / "missing.pth")


# -- maps against the float64 reference -----------------------------------------------------

@pytest.mark.parametrize("per_slice", [False, True])
def test_gradcampp_maps_match_float64_reference(per_slice):
    model = small_c3d()
    clip = torch.rand(1, 3, 16, 32, 32)
    result = explain_clip(model, clip, target=3, per_slice=per_slice)
    acts, grads = activations_and_gradients(model, model.features, clip, 3)
    expected = reference_gradcampp(acts, grads, per_slice)
    assert result.layer == "features" and result.raw.shape == (1, 8, 4, 4)
    torch.testing.assert_close(result.raw[0].double(), expected, rtol=1e-4, atol=1e-6 * expected.max().item())
    assert result.maps.shape == (1, 16, 32, 32)
    assert result.maps.min() >= 0 and math.isclose(result.maps.max().item(), 1.0, rel_tol=1e-6)
    assert result.weights.shape == ((1, 8, 8) if per_slice else (1, 8))
    # Trilinear upsampling of the raw map, normalised over the whole volume.
    up = torch.nn.functional.interpolate(expected[None, None].float(), size=(16, 32, 32), mode="trilinear", align_corners=False)[0, 0]
    up = (up - up.min()) / (up.max() - up.min())
    torch.testing.assert_close(result.maps[0], up, atol=1e-4, rtol=1e-4)


def test_gradcam_matches_reference_and_differs_from_gradcampp():
    model = small_c3d(seed=2)
    clip = torch.rand(2, 3, 16, 32, 32)
    result = explain_clip(model, clip, target=[0, 4], method="gradcam")
    acts, grads = activations_and_gradients(model, model.features, clip[:1], 0)
    torch.testing.assert_close(result.raw[0].double(), reference_gradcam(acts, grads), rtol=1e-4, atol=1e-7)
    assert result.targets.tolist() == [0, 4] and result.scores.shape == (2,)
    plus = explain_clip(model, clip, target=[0, 4])
    assert not torch.allclose(plus.raw, result.raw)


def test_peers_disagree_with_eq19_on_5d_activations():
    """pytorch-grad-cam (eps in the alpha denominator) and torchcam (sum(A g^3), and an in-place
    division on a copy) against the float64 reference on the same 5-D activations/gradients."""
    from pytorch_grad_cam import GradCAMPlusPlus as PGCPlusPlus
    from torchcam.methods import GradCAMpp

    model = small_c3d(seed=3)
    clip = torch.rand(1, 3, 16, 32, 32)
    acts, grads = activations_and_gradients(model, model.features, clip, 1)
    ours = explain_clip(model, clip, target=1).raw[0].double()
    reference = reference_gradcampp(acts, grads)
    assert torch.allclose(ours, reference, rtol=1e-4, atol=1e-6 * reference.max().item())

    def normalised(m):
        m = m.clamp(min=0)
        return m / m.max()

    pgc = PGCPlusPlus(model, target_layers=[model.features])
    weights = pgc.get_cam_weights(None, None, None, acts[None].numpy(), grads[None].numpy())
    pgc_map = (torch.from_numpy(weights).view(-1, 1, 1, 1) * acts).sum(0)
    pgc_error = (normalised(pgc_map) - normalised(reference)).abs().max().item()
    # Large gradients (the score scaled by 1000) make eps negligible: then pytorch-grad-cam agrees
    # with eq. 19 on the same scaled gradients, so the disagreement above is the eps alone.
    weights_big = pgc.get_cam_weights(None, None, None, acts[None].numpy(), 1e3 * grads[None].numpy())
    big_map = (torch.from_numpy(weights_big).view(-1, 1, 1, 1) * acts).sum(0)
    assert (normalised(big_map) - normalised(reference_gradcampp(acts, 1e3 * grads))).abs().max() < 1e-4
    assert pgc_error > 1e-3

    extractor = GradCAMpp(model, target_layer=model.features, input_shape=(3, 16, 32, 32))
    scores = model(clip)
    tc_map = extractor(1, scores, normalized=False)[0][0].double()
    extractor.remove_hooks()
    assert (normalised(tc_map) - normalised(reference)).abs().max() > 1e-2


# -- model zoo: "auto" picks the last block before the head, maps align with the frames ------

def _pytorchvideo(name):
    from pytorchvideo.models import csn, r2plus1d, resnet, x3d

    return {
        "x3d": lambda: x3d.create_x3d(input_clip_length=4, input_crop_size=32, model_num_class=5, head_dim_out=32),
        "slow_r50": lambda: resnet.create_resnet(model_depth=50, model_num_class=5, stem_dim_out=4, head_pool_kernel_size=(4, 1, 1)),
        "r2plus1d": lambda: r2plus1d.create_r2plus1d(model_num_class=5, stem_dim_out=4, head_pool_kernel_size=(1, 1, 1)),
        "csn": lambda: csn.create_csn(model_num_class=5, stem_dim_out=4, head_pool_kernel_size=(1, 1, 1)),
        # C2D and I3D: the same ResNet with 2D (1 x k x k) and inflated (3 x 1 x 1) temporal kernels.
        "c2d": lambda: resnet.create_resnet(model_depth=50, model_num_class=5, stem_dim_out=4, stem_conv_kernel_size=(1, 7, 7),
                                            stage_conv_a_kernel_size=((1, 1, 1),) * 4, head_pool_kernel_size=(4, 1, 1)),
        "i3d": lambda: resnet.create_resnet(
            model_depth=50, model_num_class=5, stem_dim_out=4, stem_conv_kernel_size=(5, 7, 7),
            stage_conv_a_kernel_size=((3, 1, 1), [(3, 1, 1), (1, 1, 1)], [(3, 1, 1), (1, 1, 1)], [(1, 1, 1), (3, 1, 1)]),
            head_pool_kernel_size=(4, 1, 1)),
    }[name]()


@pytest.mark.parametrize(
    "name, size",
    [("x3d", (4, 32, 32)), ("slow_r50", (4, 32, 32)), ("r2plus1d", (8, 64, 64)), ("csn", (16, 32, 32)),
     ("c2d", (4, 64, 64)), ("i3d", (4, 64, 64))],
)
def test_pytorchvideo_models_auto_layer_and_maps(name, size):
    torch.manual_seed(0)
    model = _pytorchvideo(name).eval()
    clip = torch.rand(2, 3, *size)
    result = explain_clip(model, clip, target=[1, 2])
    assert result.layer == "blocks.4"  # the last ResStage; blocks.5 is the head
    assert result.raw.shape[1:].numel() > 1
    assert result.maps.shape == (2, *size) and torch.isfinite(result.maps).all()
    assert result.maps.amax(dim=(1, 2, 3)).gt(0.99).any()  # not all-zero maps
    # Scores are pre-softmax logits even where the head ends in a Softmax (and it is put back).
    with torch.no_grad():
        head = model.blocks[-1]
        saved = head.activation
        head.activation = None
        logits = model(clip)
        head.activation = saved
    torch.testing.assert_close(result.scores, logits.gather(1, torch.tensor([[1], [2]])).squeeze(1))
    assert head.activation is saved


def test_slowfast_fast_slow_and_both():
    from pytorchvideo.models import slowfast

    torch.manual_seed(0)
    model = slowfast.create_slowfast(model_num_class=5, stem_dim_outs=(16, 2), head_pool_kernel_sizes=((2, 1, 1), (8, 1, 1))).eval()
    clip = torch.rand(1, 3, 8, 32, 32)
    inputs = slowfast_pathways(clip, alpha=4)
    assert inputs[0].shape[2] == 2 and inputs[1] is not None
    kept = list(inputs)
    fast = explain_clip(model, inputs, pathway="fast")
    slow = explain_clip(model, inputs, pathway="slow")
    both = explain_clip(model, inputs, pathway="both")
    assert inputs == kept  # the caller's list is not overwritten by MultiPathWayWithFuse
    assert fast.layer == "blocks.4.multipathway_blocks.1" and slow.layer == "blocks.4.multipathway_blocks.0"
    assert fast.raw.shape[1] == 8 and slow.raw.shape[1] == 2
    for result in (fast, slow, both):
        assert result.maps.shape == (1, 8, 32, 32)
    fused = (fast.maps + slow.maps) / 2
    fused = (fused - fused.min()) / (fused.max() - fused.min())
    torch.testing.assert_close(both.maps, fused)
    with pytest.raises(ValueError, match="SlowFast"):
        explain_clip(small_c3d(), torch.rand(1, 3, 16, 32, 32), pathway="slow")
    # A plain clip is packed into the pathways by the adapter (alpha read off the fusion conv).
    for pathway, expected in (("fast", fast), ("slow", slow)):
        packed = explain_clip(model, clip, pathway=pathway)
        torch.testing.assert_close(packed.maps, expected.maps)
        assert packed.layer == expected.layer


@pytest.mark.slow
@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_torchvision_video_resnets(name):
    import torchvision.models.video as tv

    torch.manual_seed(0)
    model = getattr(tv, name)(num_classes=5).eval()
    clip = torch.rand(1, 3, 16, 32, 32)  # layer4 keeps 2 (r3d, r(2+1)d) or 16 (mc3) time slices
    result = explain_clip(model, clip)
    assert result.layer == "layer4" and result.raw.shape[1] == (16 if name == "mc3_18" else 2)
    # The family rule and the probe agree.
    assert probe_layer(model, lambda m: m(clip), tuple(clip.shape), lambda out: out[:, 0]).module is model.layer4
    if name != "mc3_18":
        # With 8 frames layer4 has one time slice: every frame would get the same map, so it says so.
        with pytest.warns(RuntimeWarning, match="one time slice"):
            explain_clip(model, clip[:, :, :8])
    assert result.maps.shape == (1, 16, 32, 32) and torch.isfinite(result.maps).all()


@pytest.mark.slow
def test_torchvision_s3d():
    import torchvision.models.video as tv

    torch.manual_seed(0)
    model = tv.s3d(num_classes=5).eval()
    result = explain_clip(model, torch.rand(1, 3, 16, 224, 224), per_slice=True)
    assert result.layer == "features" and result.raw.shape == (1, 2, 7, 7)
    assert result.maps.shape == (1, 16, 224, 224)


# -- memory: nothing below the layer keeps autograd state -----------------------------------

def test_inference_mode_records_no_graph_below_the_layer():
    model = small_c3d()
    seen = []
    handles = [
        model.features.conv1.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad)),
        model.features.conv4b.register_forward_hook(lambda m, i, o: seen.append(o.requires_grad)),
    ]
    explain_clip(model, torch.rand(2, 3, 16, 32, 32))
    for handle in handles:
        handle.remove()
    assert seen == [False, False]
    assert all(p.grad is None for p in model.parameters()) and not model.training
    # create_graph=True keeps the maps differentiable w.r.t. the parameters (double backprop).
    result = explain_clip(model, torch.rand(1, 3, 16, 32, 32), create_graph=True)
    (grad,) = torch.autograd.grad(result.maps.sum(), model.features.conv1.weight)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


# -- bad input ------------------------------------------------------------------------------

def test_bad_clips_get_clear_errors():
    model = small_c3d()
    with pytest.raises(ValueError, match=r"\(N, T, C, H, W\).*permute"):
        explain_clip(model, torch.rand(1, 16, 3, 32, 32))
    with pytest.raises(ValueError, match="needs at least 2"):
        explain_clip(model, torch.rand(1, 3, 1, 32, 32))
    with pytest.raises(TypeError, match="float"):
        explain_clip(model, torch.zeros(1, 3, 16, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"\(C, T, H, W\)"):
        explain_clip(model, torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        explain_clip(model, torch.full((1, 3, 16, 32, 32), float("nan")))
    # A model whose temporal kernel is longer than the clip (no temporal padding).
    strict = nn.Sequential(nn.Conv3d(3, 4, (5, 3, 3)), nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="needs at least 5"):
        explain_clip(strict, torch.rand(1, 3, 3, 16, 16))


def test_bad_video_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_clip(tmp_path / "nope.mp4")
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_clip(empty)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError, match="cannot read .*garbage.mp4 as a video"):
        read_clip(garbage)
    # A still image opens in FFmpeg as a one-frame "video": refused, not padded.
    from PIL import Image

    still = tmp_path / "still.png"
    Image.new("RGB", (16, 16)).save(still)
    with pytest.raises(ValueError, match="still image"):
        read_clip(still)
    with pytest.raises(IsADirectoryError, match="is a directory"):
        read_clip(tmp_path)


# -- video in and out -----------------------------------------------------------------------

def _write_test_mp4(path, frames=24, height=48, width=64, fps=12, gop=None):
    """A real MP4 written with PyAV: a white square moving right over a grey background."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if gop is not None:
            stream.codec_context.gop_size = gop
        for t in range(frames):
            image = np.full((height, width, 3), 60, np.uint8)
            x = 2 * t
            image[16:32, x : x + 16] = 250
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def test_read_explain_and_write_video(tmp_path):
    import av
    from PIL import Image

    source = tmp_path / "moving.mp4"
    _write_test_mp4(source)
    clip, fps = read_clip(source, num_frames=16, size=32)
    assert clip.shape == (3, 16, 32, 32) and clip.dtype == torch.float32
    assert 0 <= clip.min() and clip.max() <= 1 and fps == pytest.approx(12)
    # Uniform sampling covers the whole video: the square moves right from first to last frame.
    bright = (clip.mean(0) > 0.7).float().sum(1)  # (T, W): columns covered by the white square
    xs = torch.arange(32.0)
    centre = (bright * xs).sum(1) / bright.sum(1)
    assert centre[-1] > centre[0] + 15
    # From a start time: consecutive frames (1 s at 12 fps = frame 12).
    later, _ = read_clip(source, num_frames=4, size=None, start=1.0)
    assert later.shape == (3, 4, 48, 64)
    first_full, _ = read_clip(source, num_frames=24, size=None)
    torch.testing.assert_close(later[:, 0], first_full[:, 12], atol=0.02, rtol=0)
    with pytest.raises(ValueError, match="no decodable frames after"):
        read_clip(source, start=100.0)

    model = small_c3d()
    result = explain_clip(model, clip)
    gif = write_gif(tmp_path / "out.gif", clip, result.maps[0], fps=fps)
    mp4 = write_mp4(tmp_path / "out.mp4", clip, result.maps[0], fps=fps)
    png = write_strip(tmp_path / "strip.png", clip, result.maps, num_frames=6, title="test")
    with Image.open(gif) as image:
        assert image.n_frames == 16 and image.size == (64, 32)
        assert image.info["duration"] == pytest.approx(1000 / 12, abs=10)  # GIF stores centiseconds
    with av.open(mp4) as container:
        decoded = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    assert len(decoded) == 16 and decoded[0].shape == (32, 64, 3)
    # The left half of each decoded frame is the input frame.
    original = (clip[:, 5].permute(1, 2, 0).numpy() * 255).astype(np.float32)
    assert np.abs(decoded[5][:, :32].astype(np.float32) - original).mean() < 12
    with Image.open(png) as image:
        assert image.size[0] > image.size[1] > 50
    with pytest.raises(ValueError, match="frames"):
        write_gif(tmp_path / "bad.gif", clip, result.maps[0, :8])


# -- the shipped model ----------------------------------------------------------------------

def test_shipped_action_c3d_is_accurate_and_looks_at_the_actor():
    from multiexplain.metrics import energy_pointing_game

    model, names = load_action_c3d()
    assert names == list(ACTIONS) and not model.training
    data = make_action_clips(40, seed=3)
    with torch.no_grad():
        predictions = model(data.clips).argmax(1)
    # Measured 37 of 40 clips right (92.5%); the floor leaves 2 clips of margin.
    assert (predictions == data.labels).float().mean() >= 0.875
    result = explain_clip(model, data.clips[:16], target=data.labels[:16])
    energy = energy_pointing_game(result.maps, data.masks[:16])
    chance = data.masks[:16].float().mean()
    # 8 x 8 x 8 layer maps are coarse (actor radius ~ one cell): measured 2.37x chance, floor 2.2x (7% margin).
    assert energy.mean() > 2.2 * chance


# -- the quality benchmark's ROAD / sanity-check section -------------------------------------

@pytest.mark.slow
def test_video_benchmark_road_and_sanity_section_on_two_clips(tmp_path, monkeypatch, one_torch_thread):
    """``benchmarks/quality_video.py``'s ``road_sanity`` section, on a small C3D and 2 clips, into
    ``tmp_path`` (the tracked results stay untouched): every row its table prints is in the JSON."""
    import json

    bench = load_repo_module("benchmarks/quality_video.py")
    monkeypatch.setattr(bench, "RESULTS", str(tmp_path))
    (tmp_path / "video.md").write_text("<!-- memory -->\nkept\n<!-- /memory -->\n")
    model = small_c3d(num_classes=len(ACTIONS))
    bench.road_and_sanity(model, make_action_clips(2, seed=4), road_clips=2, batch=2)
    payload = json.loads((tmp_path / "video.json").read_text())["road_sanity"]
    layers = [name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]
    assert payload["clips"] == 2 and payload["road_clips"] == 2 and sorted(payload["layers"]) == sorted(layers)
    for row in payload["methods"].values():
        assert len(row["road_morf"]) == len(row["road_lerf"]) == 5
        assert row["road_combined"] == pytest.approx((row["road_lerf_mean"] - row["road_morf_mean"]) / 2)
        assert len(row["sanity_spearman"]) == len(row["sanity_ssim"]) == len(layers)
        assert all(-1 <= v <= 1 for v in row["sanity_spearman"])
    text = (tmp_path / "video.md").read_text()
    assert "kept" in text and "<!-- road_sanity -->" in text and f"`{payload['layers'][0]}`" in text


# -- MViT (tokens, found by the probe) ------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:auto layer")  # the pooled attention's tokens after the pick carry no grid
def test_small_pytorchvideo_mvit_tokens_and_its_fixed_clip_length():
    from pytorchvideo.models.vision_transformers import create_multiscale_vision_transformers

    torch.manual_seed(0)
    model = create_multiscale_vision_transformers(
        spatial_size=32, temporal_size=4, depth=2, head_num_classes=5, embed_dim_mul=[[1, 2.0]], atten_head_mul=[[1, 2.0]],
        pool_q_stride_size=[[1, 1, 2, 2]], pool_kv_stride_adaptive=[1, 4, 4], pool_kvq_kernel=[3, 3, 3],
        patch_embed_dim=8, num_heads=1).eval()
    clip = torch.rand(2, 3, 4, 32, 32)
    result = explain_clip(model, clip, target=[0, 3])
    assert result.layer == "blocks.1.norm1" and result.raw.shape == (2, 2, 8, 8)  # (T', H', W') tokens, time kept
    assert result.maps.shape == (2, 4, 32, 32) and not result.zero_gradient.any()
    # A named token layer takes its reshape (the probe's grid), with the same maps.
    from multiexplain import TokenReshape

    named = explain_clip(model, clip, target=[0, 3], layer="blocks.1.norm1", reshape=TokenReshape(grid=(2, 8, 8)))
    torch.testing.assert_close(named.maps, result.maps)
    with pytest.raises(ValueError, match="exactly 4 frames"):
        explain_clip(model, torch.rand(1, 3, 8, 32, 32))


# -- Hugging Face video transformers: frames-first pixel values, token layouts ---------------------

def _hf_video(kind: str, **overrides):
    import transformers

    common = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, num_labels=5)
    common.update(overrides)
    torch.manual_seed(0)
    if kind == "videomae":
        return transformers.VideoMAEForVideoClassification(transformers.VideoMAEConfig(
            image_size=32, patch_size=8, num_frames=8, tubelet_size=2, **common)).eval()
    if kind == "timesformer":
        return transformers.TimesformerForVideoClassification(transformers.TimesformerConfig(
            image_size=32, patch_size=8, num_frames=4, **common)).eval()
    return transformers.VivitForVideoClassification(transformers.VivitConfig(
        image_size=32, num_frames=8, tubelet_size=[2, 8, 8], **common)).eval()


def _tokens_to_grid(tokens: torch.Tensor, kind: str, model) -> torch.Tensor:
    """(rows, L, D) tokens of the last block's first norm -> (N, D, T', H', W'), written out per
    family from the models' own reshapes (independent of VideoTokens)."""
    if kind == "videomae":  # Conv3d patches flattened (t, h, w), no class token
        n, _, d = tokens.shape
        return tokens.reshape(n, -1, 4, 4, d).permute(0, 4, 1, 2, 3)
    if kind == "vivit":  # the same after a class token
        n, _, d = tokens.shape
        return tokens[:, 1:].reshape(n, -1, 4, 4, d).permute(0, 4, 1, 2, 3)
    frames = model.config.num_frames  # TimeSformer's spatial attention: one frame per row, class token first
    rows, _, d = tokens.shape
    out = torch.zeros(rows // frames, d, frames, 4, 4, dtype=tokens.dtype)
    for row in range(rows):
        n, t = divmod(row, frames)
        for cell in range(16):
            out[n, :, t, cell // 4, cell % 4] = tokens[row, 1 + cell]
    return out


@pytest.mark.parametrize("kind", ["videomae", "timesformer", "vivit"])
def test_hugging_face_video_maps_match_a_float64_reference(kind):
    model = _hf_video(kind)
    frames = model.config.num_frames
    clip = torch.rand(2, 3, frames, 32, 32)  # (N, C, T, H, W): the adapter gives the model (N, T, C, H, W)
    result = explain_clip(model, clip, target=[1, 4])
    assert result.maps.shape == (2, frames, 32, 32) and result.layer.endswith("1.layernorm_before")
    # Reference: a float64 copy, the layer's tokens and gradients by a plain hook, eq. 19 per clip.
    import copy

    model64 = copy.deepcopy(model).double()
    layer = dict(model64.named_modules())[result.layer]
    store = {}
    handle = layer.register_forward_hook(lambda m, i, o: store.__setitem__("a", o))
    logits = model64(pixel_values=clip.double().permute(0, 2, 1, 3, 4)).logits
    handle.remove()
    (grads,) = torch.autograd.grad(logits[0, 1] + logits[1, 4], store["a"])
    acts, grads = _tokens_to_grid(store["a"].detach(), kind, model), _tokens_to_grid(grads, kind, model)
    for i in range(2):
        expected = reference_gradcampp(acts[i], grads[i])
        torch.testing.assert_close(result.raw[i].double(), expected, rtol=1e-4, atol=1e-6 * expected.max().item() + 1e-12)
    # A processor's output (frames-first pixel values in a mapping) gives the same maps.
    from transformers import BatchFeature

    feature = BatchFeature({"pixel_values": clip.permute(0, 2, 1, 3, 4)})
    torch.testing.assert_close(explain_clip(model, feature, target=[1, 4]).maps, result.maps)
    with pytest.raises(ValueError, match=f"exactly {frames} frames"):
        explain_clip(model, torch.rand(1, 3, frames + 2, 32, 32))
    with pytest.raises(ValueError, match="32x32 frames"):
        explain_clip(model, torch.rand(1, 3, frames, 48, 48))


def test_video_tokens_put_each_patch_where_its_pixels_are():
    """Perturb one frame's patch and find the change at that (t, h, w) cell of the token grid."""
    from multiexplain.explain.families import FAMILY_RULES

    for kind, layout_of in (("videomae", "videomae.embeddings"), ("vivit", "vivit.embeddings"),
                            ("timesformer", "timesformer.embeddings")):
        model = _hf_video(kind, **({"attention_type": "joint_space_time"} if kind == "timesformer" else {}))
        reshape = next(rule.reshape(model) for rule in FAMILY_RULES if rule.recognise(model))
        store = {}
        embeddings = dict(model.named_modules())[layout_of]
        handle = embeddings.register_forward_hook(lambda m, i, o: store.__setitem__("tokens", o))
        pixels = torch.rand(1, model.config.num_frames, 3, 32, 32)
        with torch.no_grad():
            model(pixel_values=pixels)
            before = reshape(store["tokens"])
            changed = pixels.clone()
            changed[0, 2, :, 8:16, 16:24] += 1.0  # frame 2, patch row 1, column 2
            model(pixel_values=changed)
            after = reshape(store["tokens"])
        handle.remove()
        moved = (after - before).abs().sum(1)[0]  # (T', H', W')
        t = 2 // (2 if kind in ("videomae", "vivit") else 1)  # tubelets of 2 frames
        assert moved.argmax().item() == np.ravel_multi_index((t, 1, 2), moved.shape), kind


# -- whole videos: windows ------------------------------------------------------------------------

def test_window_starts_cover_every_frame():
    assert window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert window_starts(41, 16, 8) == [0, 8, 16, 24, 25]
    assert window_starts(10, 16, 8) == [0]
    for frames, window, stride in ((100, 16, 5), (17, 16, 16), (33, 8, 3)):
        starts = window_starts(frames, window, stride)
        covered = set().union(*(range(s, s + window) for s in starts))
        assert covered == set(range(frames)) and starts[-1] + window == frames
    with pytest.raises(ValueError, match="without a map"):
        window_starts(40, 8, 9)


def test_window_blend_is_a_centre_weighted_mean_streamed_in_order():
    torch.manual_seed(0)
    maps = [torch.rand(4, 2, 2) for _ in range(3)]
    blend = WindowBlend()
    blend.add(0, maps[0])
    assert [f for f, _ in blend.pop(before=2)] == [0, 1]  # no later window starts before frame 2
    blend.add(2, maps[1])
    blend.add(4, maps[2])
    rest = dict(blend.pop())
    assert sorted(rest) == [2, 3, 4, 5, 6, 7] and not list(blend.pop())
    w = WindowBlend.weights(4)
    assert w == [1.0, 2.0, 2.0, 1.0]
    # Frame 3 is position 3 of window 0 (weight 1) and position 1 of window 2 (weight 2).
    torch.testing.assert_close(rest[3], (1 * maps[0][3] + 2 * maps[1][1]) / 3)
    torch.testing.assert_close(rest[7], maps[2][3])  # one window covers it: its own map
    assert all(0 <= m.min() and m.max() <= 1 for m in rest.values())


# -- reading streams: the frames asked for, resized while decoding --------------------------------

def test_reader_seeks_to_the_same_frames_sequential_decoding_gives(tmp_path):
    path = tmp_path / "long.mp4"
    _write_test_mp4(path, frames=120, fps=24, gop=12)
    with VideoReader(path, size=32) as reader:
        assert (reader.info.num_frames, reader.info.fps, reader.info.duration) == (120, 24.0, 5.0)
        everything = {index: image for index, _, image in reader.frames()}
        wanted = [100, 5, 6, 50, 119, 5]
        images, times = reader.read(wanted)
    assert sorted(everything) == list(range(120))
    for k, index in enumerate(wanted):
        assert torch.equal(images[k], everything[index]), index
        assert times[k] == pytest.approx(index / 24)
    # Resized while decoding: close to decoding at full size and resizing after (antialiased).
    with VideoReader(path) as full:
        big, _ = full.read([50])
    resized = torch.nn.functional.interpolate(big.float()[:, :, :, 8:56], size=(32, 32), mode="area")
    assert (images[3].float() - resized[0]).abs().mean() < 6  # out of 255


def test_reader_errors_name_the_file_and_frame_and_short_clips_say_how_they_are_padded(tmp_path):
    import av

    path = tmp_path / "damaged.mp4"
    _write_test_mp4(path, frames=24)
    with av.open(str(path)) as container:
        positions = [p.pos for p in container.demux(video=0) if p.pos is not None]
    data = bytearray(path.read_bytes())
    data[positions[2] : positions[-1]] = os.urandom(positions[-1] - positions[2])
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"cannot decode frame 2 \(at 0.17 s\) of .*damaged.mp4"):
        read_clip(path, num_frames=8)
    short = tmp_path / "short.mp4"
    _write_test_mp4(short, frames=2)
    with pytest.warns(UserWarning, match="has 2 frame.*needs 16: each frame is repeated about 8.0 times"):
        clip, _ = read_clip(short, num_frames=16, size=32)
    assert clip.shape == (3, 16, 32, 32)
    with VideoReader(short, size=32) as reader, pytest.warns(UserWarning, match="last frame is repeated 2 time"):
        padded = reader.clip(4, start=0.0)
    assert padded.indices == [0, 1, 1, 1] and padded.padded
    # A padded clip's animation shares the source span it shows (2 frames at 12 fps) evenly.
    assert padded.display_end == pytest.approx(2 / 12)
    assert padded.display_times() == pytest.approx([k * (2 / 12) / 4 for k in range(4)])


def test_animations_keep_irregular_frame_times(tmp_path):
    import av
    from PIL import Image

    frames, maps = torch.rand(3, 3, 16, 16), torch.rand(3, 16, 16)
    times, end = [0.0, 0.1, 1.0], 2.0
    mp4 = write_mp4(tmp_path / "a.mp4", frames, maps, times=times, end=end)
    gif = write_gif(tmp_path / "a.gif", frames, maps, times=times, end=end)
    with av.open(mp4) as container:
        stream = container.streams.video[0]
        decoded = [frame.time for frame in container.decode(stream)]
        assert decoded == pytest.approx(times, abs=1e-3)
        assert float(stream.duration * stream.time_base) == pytest.approx(end, abs=1e-3)
    with Image.open(gif) as image:
        delays = []
        for k in range(image.n_frames):
            image.seek(k)
            delays.append(image.info["duration"])
    assert delays == [100, 900, 1000]
    writer = AnimationWriter(tmp_path / "b.mp4")
    writer.add(frames[:, 0], maps[0], 0.5)
    with pytest.raises(ValueError, match="must increase"):
        writer.add(frames[:, 1], maps[1], 0.5)
    writer.close()
    with pytest.raises(ValueError, match=".gif or .mp4"):
        AnimationWriter(tmp_path / "c.avi")


_PEAK = r"""
import resource, sys
from multiexplain.io import read_clip
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])
before = rss()
read_clip(sys.argv[1], num_frames=16, size=112)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.slow
def test_reading_16_frames_needs_no_more_memory_from_a_long_large_file(tmp_path):
    """Loose check (the benchmark measures it: benchmarks/memory_video.py): 16 frames from a
    240-frame 360x640 file need about what 16 frames from a 16-frame file need."""
    import subprocess
    import sys

    long, short = tmp_path / "long.mp4", tmp_path / "short.mp4"
    _write_test_mp4(long, frames=240, height=360, width=640, fps=24, gop=24)
    _write_test_mp4(short, frames=16, height=360, width=640, fps=24, gop=24)
    peaks = {}
    for name, path in (("long", long), ("short", short)):
        out = subprocess.run([sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, check=True)
        peaks[name] = int(out.stdout.strip().splitlines()[-1])
    # Decoding everything at full size (as before) needed 240 x 360 x 640 x 3 bytes = 166 MB more.
    assert peaks["long"] <= 1.5 * peaks["short"] + 8 * 1024, peaks
