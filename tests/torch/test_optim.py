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



@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adamw8bit_chunks_do_not_change_the_update(dtype):
    """AdamW8bit updates large tensors a chunk of whole quantisation blocks at a time (bounded
    temporaries): parameters and 8-bit states equal the one-chunk update bit for bit, including
    a last partial block."""
    from estimator.executor.optim import AdamW8bit

    torch.manual_seed(0)
    start = torch.randn(3, 70_001).to(dtype)
    grads = [torch.randn(3, 70_001).to(dtype) for _ in range(3)]
    results = []
    for chunk in (2**12, 2**20):
        w = torch.nn.Parameter(start.clone())
        opt = AdamW8bit([w], lr=0.01, weight_decay=0.1, chunk_elements=chunk)
        for g in grads:
            w.grad = g.clone()
            opt.step()
        results.append((w.detach(), opt.state[w]))
    (w_a, s_a), (w_b, s_b) = results
    assert torch.equal(w_a, w_b)
    assert s_a.keys() == s_b.keys() == {"step", "m_codes", "m_absmax", "v_codes", "v_absmax"}
    for key in s_a:
        assert torch.equal(s_a[key], s_b[key]), key
