"""SwiGLU kernels: silu(g) ⊙ u keeping g and u only (_SiLUMul), and the same fused with a
trained down_proj (_SwiGLUDown), which recomputes the product in backward for ∂W.

Shape-suffix legend: N flat tokens, I FFN width, O output features.
"""

import torch
import torch.nn.functional as F

from estimator.executor.kernels.norm import _linear_grads


class _SiLUMul(torch.autograd.Function):
    """silu(g) ⊙ u that saves only g and u and recomputes silu(g) in backward (Liger-Kernel's
    LigerSiLUMulFunction, Hsu et al. 2024): `F.silu(g) * u` saves g (for silu's backward),
    silu(g) and u (for the product's), one [tokens, width] tensor more. The backward calls the
    kernels autograd would (mul, silu_backward, and silu again), so gradients are identical."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return F.silu(g) * u

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        g, u = ctx.saved_tensors
        grad_g = torch.ops.aten.silu_backward(grad_y * u, g) if ctx.needs_input_grad[0] else None
        grad_u = grad_y * F.silu(g) if ctx.needs_input_grad[1] else None
        return grad_g, grad_u


class _SwiGLUDown(torch.autograd.Function):
    """down(silu(g) ⊙ u) for a trained plain down_proj that saves g and u only: the product
    h = silu(g) ⊙ u, which the linear would save for ∂W, is recomputed in backward from the g
    and u that _SiLUMul keeps anyway (one [tokens, width] tensor less per FFN, one more multiply
    in backward; Liger-Kernel's fused SwiGLU keeps g and u the same way). Under autocast the
    weight is cast once and that copy kept, as autograd keeps autocast's copy. The backward
    calls the kernels autograd would, in its order, so gradients are identical."""

    @staticmethod
    def forward(ctx, g, u, weight, bias):
        h = F.silu(g) * u
        w_c = weight.to(h.dtype)
        b_c = None if bias is None else bias.to(h.dtype)
        ctx.save_for_backward(g, u, w_c)
        ctx.dtypes = weight.dtype, None if bias is None else bias.dtype
        return F.linear(h, w_c, b_c)

    @staticmethod
    def backward(ctx, grad_y):
        g, u, w_c = ctx.saved_tensors
        dy_NO = grad_y.reshape(-1, grad_y.shape[-1])
        s = F.silu(g)
        h_NI = (s * u).reshape(-1, g.shape[-1]) if ctx.needs_input_grad[2] else None
        grad_w, grad_b, grad_h = _linear_grads(ctx, 2, dy_NO, h_NI, w_c, ctx.dtypes)
        grad_h = grad_h.view(g.shape)
        grad_g = torch.ops.aten.silu_backward(grad_h * u, g) if ctx.needs_input_grad[0] else None
        grad_u = grad_h * s if ctx.needs_input_grad[1] else None
        return grad_g, grad_u, grad_w, grad_b
