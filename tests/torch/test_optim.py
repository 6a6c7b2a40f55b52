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


def _tiny_mlp(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def test_the_step_in_backward_equals_the_step_after_it():
    """BackwardStep applies the same fused AdamW update as optimizer.step() after backward,
    over several steps (so the state is shared across hooks), and leaves no gradient behind."""
    from estimator.executor.optim import BackwardStep, set_lr

    x, y = torch.randn(8, 16), torch.randn(8, 4)
    after, inside = _tiny_mlp(0), _tiny_mlp(0)
    opt_after = adamw(list(after.parameters()), lr=1e-2, weight_decay=0.1)
    opt_inside = adamw(list(inside.parameters()), lr=1e-2, weight_decay=0.1)
    hooks = BackwardStep(opt_inside, list(inside.parameters()))
    for lr in (1e-2, 5e-3, 2e-3):  # the hooks read the learning rate the step is set to
        set_lr(opt_after, lr)
        set_lr(opt_inside, lr)
        torch.nn.functional.mse_loss(after(x), y).backward()
        opt_after.step()
        opt_after.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(inside(x), y).backward()
        assert all(p.grad is None for p in inside.parameters())
    for a, b in zip(after.parameters(), inside.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert hooks.largest_gradient_bytes == 32 * 16 * 4  # the [32, 16] fp32 weight
    assert opt_inside.state_dict()["state"].keys() == opt_after.state_dict()["state"].keys()
    assert opt_inside.param_groups[0]["params"] == list(inside.parameters())
