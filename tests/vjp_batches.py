"""Recording how an explanation splits its K vector-Jacobian products into backward passes (tests only)."""

from __future__ import annotations

import pytest
import torch


def record_vjp_batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch ``torch.autograd.grad`` so that every call with cotangents appends how many it carried
    (a batched call's leading size, 1 for an unbatched one) to the returned list, in call order. Calls
    without cotangents (a scalar's backward, as when the head is crossed once) are not recorded.
    ``monkeypatch.undo()`` (or the test's end) restores ``torch.autograd.grad``."""
    sizes: list[int] = []
    grad = torch.autograd.grad

    def recording(outputs, inputs, grad_outputs=None, **kwargs):
        if grad_outputs is not None:
            sizes.append(int(grad_outputs.shape[0]) if kwargs.get("is_grads_batched") else 1)
        return grad(outputs, inputs, grad_outputs, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording)
    return sizes
