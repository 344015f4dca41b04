"""The metric tables the demo and ``multiexplain evaluate`` print (``multiexplain.evaluation``),
checked on a model whose confidences are known in closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from multiexplain import evaluation


class MeanLogit(nn.Module):
    """Two logits ``(-m, 0)`` with ``m`` the input's mean: dimming a positive input (the explanation
    input ``E = L * I`` with a map below 1) raises the class-0 softmax confidence, dimming a negative
    input lowers it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([-m, torch.zeros_like(m)], dim=1)


def test_win_percent_ranks_methods_by_their_signed_drops():
    """Both methods *raise* the confidence on three of four samples: only the signed drops rank them
    there (clipped drops are 0 for both, a tie), so Win % must be 75 / 25 (clipped: 37.5 / 62.5)."""
    inputs = torch.full((4, 3, 4, 4), 2.0)
    inputs[3] = -2.0  # on this sample dimming lowers the confidence: Grad-CAM++'s darker map loses
    maps = {"gradcam++": torch.full((4, 4, 4), 0.2), "gradcam": torch.full((4, 4, 4), 0.8)}
    targets = torch.zeros(4, dtype=torch.long)
    results = evaluation.faithfulness_metrics(MeanLogit(), inputs, maps, targets, "softmax")

    def confidence(m: float) -> float:
        return torch.softmax(torch.tensor([-m, 0.0], dtype=torch.float64), 0)[0].item()

    full = [confidence(2.0)] * 3 + [confidence(-2.0)]
    explained = {method: [confidence(2.0 * level)] * 3 + [confidence(-2.0 * level)]
                 for method, level in (("gradcam++", 0.2), ("gradcam", 0.8))}
    signed = {method: [100 * (y - o) / y for y, o in zip(full, values)] for method, values in explained.items()}
    assert all(a < b < 0 for a, b in zip(signed["gradcam++"][:3], signed["gradcam"][:3]))  # both raise it
    assert 0 < signed["gradcam"][3] < signed["gradcam++"][3]
    assert results["gradcam++"]["Win % (higher is better)"] == pytest.approx(75.0)
    assert results["gradcam"]["Win % (higher is better)"] == pytest.approx(25.0)
    # Average Drop clips (the paper's definition): only the fourth sample counts.
    for method in maps:
        assert results[method]["Average Drop % (lower is better)"] == pytest.approx(signed[method][3] / 4, rel=1e-5)
        assert results[method]["Increase in Confidence % (higher is better)"] == pytest.approx(75.0)
