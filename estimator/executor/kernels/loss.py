"""The loss head: lm_head and cross-entropy fused in row chunks, gradients formed in the forward
pass (fused_linear_cross_entropy, Liger-Kernel's idea), and a tied embedding / lm_head weight
whose gradient is formed once (TiedGradient).

Shape-suffix legend: N flat tokens, D hidden size, V vocab, C rows of a chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from estimator.analytic.micro_batch import FUSED_LOSS_CHUNK_ELEMENTS

MIXED_ADD_BLOCK_ELEMENTS = 2**18
"""Elements per call when adding a 16-bit tensor into an fp32 one: the mixed-dtype kernel
casts its operand into a temporary as large as the call, and a large temporary comes back
from the kernel with fresh pages on every call. In the trainer (V = 151,936, D = 256, bf16):
one call per chunk ran at 4.8 GB/s (38 k page faults per call); blocks of 2^22 elements still
faulted 110 MB per step (their 16 MiB temporaries returned by glibc's heap trim); blocks of
2^18 (1 MiB of fp32) ran at 13 GB/s with none."""


def _add_in_blocks_(acc: torch.Tensor, x: torch.Tensor) -> None:
    """acc += x row block by row block (MIXED_ADD_BLOCK_ELEMENTS per call)."""
    rows = max(1, MIXED_ADD_BLOCK_ELEMENTS // max(1, acc[0].numel()))
    for start in range(0, acc.shape[0], rows):
        acc[start:start + rows].add_(x[start:start + rows])


def _softmax_minus_onehot(z_CV: torch.Tensor, t_C: torch.Tensor, scale_C1: torch.Tensor):
    """The cross-entropy's gradient and loss for one chunk of logits: (softmax(z) −
    onehot(t))·s, −log softmax(z)[t] per row, and the row scale s (= valid / num_valid) still to
    apply, or None when it is in the gradient already.

    fp32 logits: e^(z − max), normalised and scaled in the same in-place pass (amax, sub_,
    exp_, sum, mul_). 16-bit logits: one torch.softmax call, which reads the row once, computes
    in fp32 and writes 16 bits; s is left for the GEMMs' small operands. On a CPU this replaces
    an fp32 upcast, five fp32 passes and the gradient's downcast (a [1024, 32000] bf16 chunk
    with its two GEMMs: 280–290 ms against 390–400, 1 thread; docs/executor.md "Round 6"). The
    loss is then −log of the 16-bit p_t, within 2⁻⁹ relative of p_t, so within 0.002 nats per
    token of the fp32 loss — below the rounding of the bf16 logits themselves. Rows whose p_t
    is below the dtype's smallest normal (loss > 87 nats in bf16, > 9.7 in fp16) take the
    exact fp32 logsumexp."""
    t_C1 = t_C[:, None]
    if z_CV.dtype == torch.float32:
        max_C1 = z_CV.amax(dim=-1, keepdim=True)
        target_C = z_CV.gather(1, t_C1)[:, 0]
        p_CV = z_CV.sub_(max_C1).exp_()  # in place: e^(z − max)
        sum_C = p_CV.sum(dim=-1)
        p_CV.mul_(scale_C1 / sum_C[:, None])
        p_CV.scatter_add_(1, t_C1, -scale_C1)
        return p_CV, sum_C.log() + max_C1[:, 0] - target_C, None
    p_CV = torch.softmax(z_CV, dim=-1)
    p_t = p_CV.gather(1, t_C1)[:, 0]
    loss_C = -p_t.float().log()
    tiny = p_t < torch.finfo(z_CV.dtype).tiny
    if tiny.any():
        z_tiny = z_CV[tiny].float()
        loss_C[tiny] = z_tiny.logsumexp(dim=-1) - z_tiny.gather(1, t_C1[tiny])[:, 0]
    # index_put_, not scatter_add_: in 16 bits that runs 80 ms on a [1024, 32000] chunk
    p_CV.index_put_((torch.arange(t_C.shape[0], device=t_C.device), t_C), p_t - 1)
    return p_CV, loss_C, scale_C1


class _LinearCrossEntropy(torch.autograd.Function):
    """loss = mean CE(h·Wᵀ, t). The gradients are formed chunk by chunk in the forward pass
    (softmax − onehot is known there), so only [chunk, V] logits ever exist and backward is a
    scale: the Liger-Kernel "fused linear cross-entropy" idea (Hsu et al. 2024, arXiv 2410.10989).
    In 16 bits the 1/num_valid row scale s (0 for ignored rows) goes on the GEMMs' small
    operands, not on the [chunk, V] gradient: ∂L/∂h = (g·W)·s, ∂L/∂W = gᵀ·(h·s).
    """

    @staticmethod
    def forward(ctx, h_ND, w_VD, t_N, chunk_rows: int, tied: TiedGradient | None):
        dtype = torch.get_autocast_dtype(h_ND.device.type) \
            if torch.is_autocast_enabled(h_ND.device.type) else h_ND.dtype
        h, w = h_ND.detach().to(dtype), w_VD.detach().to(dtype)
        valid_N = t_N != -100
        num_valid = valid_N.sum().clamp_min(1)
        grad_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        grad_w = None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            t_C, valid_C = t_N[rows].clamp_min(0), valid_N[rows]
            g_CV, loss_C, scale_C1 = _softmax_minus_onehot(
                h[rows] @ w.T, t_C, (valid_C / num_valid)[:, None])
            loss += torch.where(valid_C, loss_C, 0.0).sum()
            if grad_h is not None:
                grad_h[rows] = g_CV @ w if scale_C1 is None else (g_CV @ w).mul_(scale_C1)
            if ctx.needs_input_grad[1]:  # fp32: accumulate in place, no [V, D] temporary
                h_C = h[rows] if scale_C1 is None else (h[rows] * scale_C1).to(dtype)
                if grad_w is None:
                    grad_w = (g_CV.T @ h_C).float()
                elif g_CV.dtype == torch.float32:
                    grad_w.addmm_(g_CV.T, h_C)
                else:
                    _add_in_blocks_(grad_w, g_CV.T @ h_C)
            del g_CV  # the chunk's logits buffer: free it before the next GEMM
        ctx.tied = tied
        if tied is not None:  # the embedding's backward adds its rows and returns it
            tied.grad, grad_w = grad_w, None
        ctx.save_for_backward(grad_h, grad_w)
        ctx.dtypes = (h_ND.dtype, w_VD.dtype)
        return loss / num_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        unit = grad_loss.numel() == 1 and float(grad_loss) == 1.0  # the usual loss.backward()
        if ctx.tied is not None and not unit:
            ctx.tied.grad.mul_(grad_loss)
        h = None if grad_h is None else (grad_h if unit else grad_h * grad_loss).to(ctx.dtypes[0])
        w = None if grad_w is None else (grad_w if unit else grad_w * grad_loss).to(ctx.dtypes[1])
        return h, w, None, None, None


class TiedGradient:
    """The gradient of a tied embedding / lm_head weight, formed once. The fused loss forms
    ∂L/∂W in its forward pass and leaves it here instead of returning it; the embedding's
    backward (_EmbeddingIntoTiedGradient, the last node of backward) adds its rows into it in
    place and returns it. Returned from both, autograd would sum the two [V, D] gradients out
    of place: the embedding's dense gradient and the sum are two [V, D] transients at the end
    of backward (smollm2-135m fp32: +216 MiB over the end of backward, measured)."""

    grad: torch.Tensor | None = None


class _EmbeddingIntoTiedGradient(torch.autograd.Function):
    """F.embedding whose backward index-adds ∂out into TiedGradient.grad (no [V, D] temporary)
    and returns it as the weight's whole gradient."""

    @staticmethod
    def forward(ctx, tokens, weight, tied: TiedGradient):
        ctx.save_for_backward(tokens)
        ctx.tied, ctx.dtype = tied, weight.dtype
        return F.embedding(tokens, weight)

    @staticmethod
    def backward(ctx, grad_out):
        (tokens,) = ctx.saved_tensors
        grad_w, ctx.tied.grad = ctx.tied.grad, None
        grad_w.index_add_(0, tokens.flatten(),
                          grad_out.reshape(-1, grad_out.shape[-1]).to(grad_w.dtype))
        return None, grad_w.to(ctx.dtype), None


def fused_linear_cross_entropy(h_ND: torch.Tensor, w_VD: torch.Tensor, targets_N: torch.Tensor,
                               *, chunk_rows: int | None = None,
                               tied: TiedGradient | None = None) -> torch.Tensor:
    """mean over non-ignored rows of CE(h·Wᵀ, targets), chunked; see _LinearCrossEntropy.
    Default chunk: 2^25 fp32 logits (128 MiB, memory.FUSED_LOSS_CHUNK_ELEMENTS), at least 64
    rows. `tied`: ∂L/∂W goes there instead of being returned (TiedGradient)."""
    chunk_rows = chunk_rows or max(64, FUSED_LOSS_CHUNK_ELEMENTS // w_VD.shape[0])
    if not torch.is_grad_enabled():  # evaluation: no gradients formed in the forward pass
        h_ND, w_VD = h_ND.detach(), w_VD.detach()
    return _LinearCrossEntropy.apply(h_ND, w_VD, targets_N, chunk_rows, tied)
