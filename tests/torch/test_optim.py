"""The executor's AdamW: torch's fused kernel on CPU, the same update as the default loop, and
no optimizer-step temporaries (the analytic optimizer_transient term is 0 for it)."""

import pytest
import torch

from estimator.executor.optim import adamw

pytestmark = pytest.mark.torch


def test_fused_adamw_equals_the_default_loop() -> None:
    torch.manual_seed(0)
    a = [torch.nn.Parameter(torch.randn(64, 48)) for _ in range(3)]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    fused = adamw(a, lr=1e-3, weight_decay=0.1)
    plain = torch.optim.AdamW(b, lr=1e-3, weight_decay=0.1)
    assert fused.defaults["fused"] is True
    for _ in range(4):
        for x, y in zip(a, b, strict=True):
            g = torch.randn_like(x)
            x.grad, y.grad = g, g.clone()
        fused.step()
        plain.step()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)

