"""Checks on a CUDA device: maps stay on the model's device and agree with the CPU.

    python benchmarks/device_check.py            # needs a CUDA GPU; exits non-zero on a mismatch

Explains torchvision resnet50 (random weights, batch 8, 224x224) on the GPU and the CPU with
the same weights and compares maps (TF32 off), for one and K=10 targets, Grad-CAM++ and
Grad-CAM, the differentiable mode, and bfloat16 autocast. Not part of the test suite: CI has
no GPU.
"""

from __future__ import annotations

import sys

import torch
import torchvision

from multiexplain import GradCAM, GradCAMPlusPlus


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    cpu_model = torchvision.models.resnet50().eval()
    gpu_model = torchvision.models.resnet50().eval()
    gpu_model.load_state_dict(cpu_model.state_dict())
    gpu_model.cuda()
    x = torch.randn(8, 3, 224, 224)
    targets = [[(7 * i + j) % 1000 for j in range(10)] for i in range(8)]
    failures = 0
    for method in (GradCAMPlusPlus, GradCAM):
        for name, tgt in (("top-1", None), ("K=10", targets)):
            on_cpu = method(cpu_model, "layer4")(x, tgt)
            on_gpu = method(gpu_model, "layer4")(x.cuda(), tgt)
            assert on_gpu.maps.device.type == "cuda" and on_gpu.raw.device.type == "cuda"
            diff = (on_gpu.maps.cpu() - on_cpu.maps).abs().max().item()
            ok = diff < 1e-3
            failures += not ok
            print(f"{method.__name__:16s} {name:6s} maps {tuple(on_gpu.maps.shape)} on {on_gpu.maps.device}, max |gpu - cpu| = {diff:.2e} {'ok' if ok else 'MISMATCH'}")
    gpu_model.train()
    differentiable = GradCAMPlusPlus(gpu_model, "layer4", create_graph=True)(x.cuda(), list(range(8)))
    (grad,) = torch.autograd.grad(differentiable.maps.pow(2).mean(), gpu_model.layer3[0].conv1.weight)
    ok = bool(torch.isfinite(grad).all() and grad.abs().sum() > 0)
    failures += not ok
    print(f"differentiable mode on cuda: finite non-zero gradient below the layer: {ok}")
    gpu_model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        low = GradCAMPlusPlus(gpu_model, "layer4")(x.cuda(), list(range(8)))
    full = GradCAMPlusPlus(gpu_model, "layer4")(x.cuda(), list(range(8)))
    diff = (low.maps.float() - full.maps).abs().mean().item()
    ok = bool(torch.isfinite(low.maps).all()) and diff < 0.1
    failures += not ok
    print(f"bfloat16 autocast: finite, mean |bf16 - fp32| = {diff:.3f} (bound 0.1): {ok}")
    print("ALL OK" if failures == 0 else f"{failures} FAILURE(S)")
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
