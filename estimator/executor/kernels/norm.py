"""RMSNorm kernels: the norm keeping only its input and the fp32 rstd (_RMSNormFunction), and
the norm fused with the linears that read its output (_NormLinears), which recomputes the
normalised x in backward instead of keeping it.

Shape-suffix legend: N flat tokens, K input features, O output features.
"""

import torch
import torch.nn.functional as F


def _rms_rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))
    return torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)


def _rms_apply(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor,
               out_dtype: torch.dtype) -> torch.Tensor:
    x32 = x.to(rstd.dtype)
    if weight.dtype in (torch.float32, torch.float64):  # HF: fp32 product (autocast) …
        y = (weight * (x32 * rstd)).to(out_dtype)
    else:  # … or weight · x̂ cast to the input dtype first
        y = weight * (x32 * rstd).to(weight.dtype)
    return y.to(out_dtype)


def _rms_backward(ctx, x, weight, rstd, grad_y):
    """(∂x, ∂w) of RMSNorm: ∂w = Σ g⊙x̂, ∂x = rstd·(g⊙w − x̂·mean(g⊙w⊙x̂)), x̂ = x·rstd
    recomputed; ctx.needs_input_grad[0] / [1] say which are wanted."""
    x_hat = x.to(rstd.dtype) * rstd
    g = grad_y.to(rstd.dtype)
    grad_w = (g * x_hat).flatten(0, -2).sum(0).to(weight.dtype) \
        if ctx.needs_input_grad[1] else None
    grad_x = None
    if ctx.needs_input_grad[0]:
        gw = g * weight.to(rstd.dtype)
        grad_x = (rstd * (gw - x_hat * (gw * x_hat).mean(-1, keepdim=True))).to(x.dtype)
    return grad_x, grad_w


class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm that saves only its input and the fp32 rstd for backward (the composite HF
    version saves an fp32 copy of x and the fp32 normalised x as well: 8 more bytes per element).
    Backward recomputes x̂ = x·rstd: ∂w = Σ g⊙x̂, ∂x = rstd·(g⊙w − x̂·mean(g⊙w⊙x̂))."""

    @staticmethod
    def forward(ctx, x, weight, eps: float, out_dtype: torch.dtype):
        rstd = _rms_rstd(x, eps)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            ctx.save_for_backward(x, weight, rstd)
        return _rms_apply(x, weight, rstd, out_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, rstd = ctx.saved_tensors
        return *_rms_backward(ctx, x, weight, rstd, grad_y), None, None


def _linear_grads(ctx, index: int, dy_NO: torch.Tensor, x_NK: torch.Tensor, w_c: torch.Tensor,
                  dtypes: tuple[torch.dtype, torch.dtype | None]):
    """(∂W, ∂b, ∂x) of y = x·W_cᵀ + b for the weight and bias at ctx inputs `index`, `index`+1
    (None where not needed): ∂W = dyᵀ·x, autograd's order for a transposed weight (so
    bit-identical to it), cast to the weight's dtype; ∂b = Σ dy; ∂x = dy·W_c."""
    w_dtype, b_dtype = dtypes
    grad_w = dy_NO.t().mm(x_NK).to(w_dtype) if ctx.needs_input_grad[index] else None
    grad_b = dy_NO.sum(0).to(b_dtype) \
        if b_dtype is not None and ctx.needs_input_grad[index + 1] else None
    return grad_w, grad_b, dy_NO.mm(w_c)


class _NormLinears(torch.autograd.Function):
    """[linear_i(RMSNorm(x))] for trained plain linears that read one norm's output (q/k/v,
    gate/up): keeps x, the fp32 rstd and the weights, not the normalised y the linears would
    each keep for ∂W: y is recomputed in backward from x and rstd (one elementwise pass; the
    norm-plus-matmul recompute of Liger-Kernel's and Unsloth's fused kernels, done here in
    PyTorch). One [tokens, hidden] tensor less per norm in a full fine-tune. Under autocast the
    weights are cast once and those copies kept, as autograd keeps autocast's. Arguments: x,
    norm weight, eps, out dtype, then weight, bias (or None) of each linear."""

    @staticmethod
    def forward(ctx, x, norm_w, eps: float, out_dtype: torch.dtype, *weights_biases):
        rstd = _rms_rstd(x, eps)
        y = _rms_apply(x, norm_w, rstd, out_dtype)
        ws, bs = weights_biases[0::2], weights_biases[1::2]
        w_c = [w.to(y.dtype) for w in ws]
        ctx.save_for_backward(x, norm_w, rstd, *w_c)
        ctx.out_dtype = out_dtype
        ctx.dtypes = [(w.dtype, None if b is None else b.dtype)
                      for w, b in zip(ws, bs, strict=True)]
        return tuple(F.linear(y, w, None if b is None else b.to(y.dtype))
                     for w, b in zip(w_c, bs, strict=True))

    @staticmethod
    def backward(ctx, *grad_outs):
        x, norm_w, rstd, *w_c = ctx.saved_tensors
        y_NK = _rms_apply(x, norm_w, rstd, ctx.out_dtype).reshape(-1, x.shape[-1])
        grads_wb: list[torch.Tensor | None] = []
        grad_y = None
        for i in range(len(w_c)):
            dy_NO = grad_outs[i].reshape(-1, grad_outs[i].shape[-1])
            grad_w, grad_b, part = _linear_grads(ctx, 4 + 2 * i, dy_NO, y_NK, w_c[i],
                                                 ctx.dtypes[i])
            grads_wb += [grad_w, grad_b]
            grad_y = part if grad_y is None else grad_y + part
        grad_x, grad_w = _rms_backward(ctx, x, norm_w, rstd, grad_y.view(x.shape))
        return grad_x, grad_w, None, None, *grads_wb
