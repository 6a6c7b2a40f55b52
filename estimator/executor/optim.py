"""Optimizers, learning-rate schedule and gradient clipping for the executor.

AdamW and SGD are torch's own. AdamW8bit is ours, in pure PyTorch so that it runs on every
backend: Adam's m and v are kept as 8-bit codes in blocks of 256 values, each block scaled by its
absmax (fp32), as bitsandbytes' blockwise 8-bit optimizers do (Dettmers et al. 2022,
"8-bit Optimizers via Block-wise Quantization", arXiv 2110.02861). State ≈ 2 B/param + 8 B per
256 params of scales. The codebooks are log-spaced (a dynamic-exponent code: constant relative
precision across 6–7 decades), so small second moments are not rounded to zero.
"""

import math
from collections.abc import Iterable

import torch

from estimator.analytic.model_state import ADAMW8BIT_CHUNK_ELEMENTS
from estimator.errors import SetupError
from estimator.specs.setup import TrainSetup

BLOCK_SIZE = 256
"""Values per quantisation block of the 8-bit states (count; bitsandbytes' blocksize)."""
MIN_8BIT_NUMEL = 4096
"""Tensors smaller than this keep fp32 states (count; bitsandbytes' min_8bit_size)."""
SGD_MOMENTUM = 0.9
"""Momentum of the 'sgd_momentum' optimizer."""


def _log_codebook(*, signed: bool, num_decades: float) -> torch.Tensor:
    """256 sorted code values in [−1, 1] (signed) or [0, 1]: 0, and magnitudes
    10^(−num_decades·(1 − i/(n−1))) for i = 0 … n−1 (log-spaced, the largest exactly 1)."""
    num_magnitudes = 127 if signed else 255
    exponents = -num_decades * (1 - torch.arange(num_magnitudes, dtype=torch.float64)
                                / (num_magnitudes - 1))
    magnitudes = torch.pow(10.0, exponents)
    values = [torch.zeros(1, dtype=torch.float64), magnitudes]
    if signed:
        values += [-magnitudes, torch.zeros(1, dtype=torch.float64)]  # pad to 256 codes
    return torch.sort(torch.cat(values)).values.float()


SIGNED_CODE = _log_codebook(signed=True, num_decades=6.0)
"""Codebook of the first moment m (signed, 127 magnitudes over 6 decades)."""
UNSIGNED_CODE = _log_codebook(signed=False, num_decades=7.0)
"""Codebook of the second moment v (unsigned, 255 magnitudes over 7 decades)."""


def quantize_blockwise(x: torch.Tensor, code: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [numel padded to blocks], absmax fp32 [num_blocks]) of x: each block of 256
    values is divided by its absmax and rounded to the nearest code value."""
    flat = x.detach().float().reshape(-1)
    pad = (-flat.numel()) % BLOCK_SIZE
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK_SIZE)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    normalized = blocks / absmax[:, None]
    midpoints = (code[1:] + code[:-1]) / 2
    codes = torch.bucketize(normalized, midpoints.to(normalized.device))
    return codes.to(torch.uint8).view(-1), absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor,
                         like: torch.Tensor) -> torch.Tensor:
    """Inverse of quantize_blockwise: fp32 tensor shaped like `like`."""
    values = code.to(codes.device)[codes.long()].view(-1, BLOCK_SIZE) * absmax[:, None]
    return values.view(-1)[: like.numel()].view(like.shape)


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with blockwise 8-bit m and v (decoupled weight decay, bias correction as torch's
    AdamW). Tensors under MIN_8BIT_NUMEL elements keep fp32 states. Large tensors are updated
    in chunks of `chunk_elements` (default memory.ADAMW8BIT_CHUNK_ELEMENTS; whole quantisation
    blocks, so the result does not depend on the chunk size): the step's fp32 moments, update
    and quantisation temporaries exist for one chunk only."""

    def __init__(self, params: Iterable[torch.nn.Parameter], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.01,
                 chunk_elements: int = ADAMW8BIT_CHUNK_ELEMENTS) -> None:
        if chunk_elements % BLOCK_SIZE:
            raise ValueError(f"chunk_elements must be a multiple of {BLOCK_SIZE}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps,
                                  "weight_decay": weight_decay})
        self.chunk_elements = chunk_elements

    @staticmethod
    def _adamw(p: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor,
               group: dict, step: int) -> None:
        """In-place AdamW update of p (any dtype, computed in fp32) and fp32 m, v."""
        beta1, beta2 = group["betas"]
        grad = grad.float()
        m.mul_(beta1).add_(grad, alpha=1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (v / (1 - beta2**step)).sqrt_().add_(group["eps"])
        update = (m / (1 - beta1**step)).div_(denom)
        p_fp32 = p.float().mul_(1 - group["lr"] * group["weight_decay"])
        p.copy_(p_fp32.add_(update, alpha=-group["lr"]))

    def _step_8bit(self, p: torch.Tensor, state: dict, group: dict, step: int) -> None:
        """Dequantise, update and requantise one chunk of whole blocks at a time."""
        numel = p.numel()
        if "m_codes" not in state:
            blocks = -(-numel // BLOCK_SIZE)
            zero = torch.zeros(1, device=p.device)
            for name, code in (("m", SIGNED_CODE), ("v", UNSIGNED_CODE)):
                codes, absmax = quantize_blockwise(zero, code)
                state[f"{name}_codes"] = codes[:1].expand(blocks * BLOCK_SIZE).clone()
                state[f"{name}_absmax"] = absmax[:1].expand(blocks).clone()
        flat_p, flat_g = p.view(-1), p.grad.reshape(-1)
        for lo in range(0, numel, self.chunk_elements):
            hi = min(lo + self.chunk_elements, numel)
            blocks = slice(lo // BLOCK_SIZE, -(-hi // BLOCK_SIZE))
            codes = slice(blocks.start * BLOCK_SIZE, blocks.stop * BLOCK_SIZE)
            like = flat_p[lo:hi]
            m = dequantize_blockwise(state["m_codes"][codes], state["m_absmax"][blocks],
                                     SIGNED_CODE, like)
            v = dequantize_blockwise(state["v_codes"][codes], state["v_absmax"][blocks],
                                     UNSIGNED_CODE, like)
            self._adamw(like, flat_g[lo:hi], m, v, group, step)
            state["m_codes"][codes], state["m_absmax"][blocks] = quantize_blockwise(
                m, SIGNED_CODE)
            state["v_codes"][codes], state["v_absmax"][blocks] = quantize_blockwise(
                v, UNSIGNED_CODE)

    @torch.no_grad()
    def step(self, closure=None):  # torch.optim signature
        """One AdamW update of every parameter with a gradient."""
        loss = None if closure is None else closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                step = int(state.get("step", torch.tensor(0.0))) + 1
                state["step"] = torch.tensor(float(step))
                if p.numel() >= MIN_8BIT_NUMEL and p.is_contiguous():
                    self._step_8bit(p, state, group, step)
                    continue
                if "m" not in state:
                    state["m"] = torch.zeros_like(p, dtype=torch.float32)
                    state["v"] = torch.zeros_like(p, dtype=torch.float32)
                self._adamw(p, p.grad, state["m"], state["v"], group, step)
        return loss


def build_optimizer(params: list[torch.nn.Parameter], setup: TrainSetup, *, lr: float,
                    weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer named by setup.optimizer over `params`."""
    if not params:
        raise SetupError("the setup leaves no trainable parameters")
    name = setup.optimizer
    if name == "adamw":
        return adamw(params, lr=lr, weight_decay=weight_decay, eps=adam_eps(params[0].dtype))
    if name == "adamw8bit":
        return AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd_momentum":
        return torch.optim.SGD(params, lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
    if name == "adafactor" and hasattr(torch.optim, "Adafactor"):
        return torch.optim.Adafactor(params, lr=lr, weight_decay=weight_decay)
    raise SetupError(
        f"the executor has no {name} optimizer; use --optimizer adamw, adamw8bit, sgd "
        "or sgd_momentum"
    )


FUSED_ADAMW_DEVICES = ("cpu", "cuda", "xpu", "mps")
"""Device types with torch's fused AdamW kernel (CPU since torch 2.4)."""


def adamw(params: list[torch.nn.Parameter], **kwargs: float) -> torch.optim.AdamW:
    """torch's AdamW, fused into one kernel per tensor where the device has one: on this CPU
    2–5× faster than the default per-tensor loop and no temporaries (the loop allocates two
    tensors the size of the largest parameter; measured: 0 vs 216 MiB over a 108 MiB tensor,
    benchmarks in docs/executor.md). Same update to 1e-8 (tests/torch/test_optim.py)."""
    fused = all(p.device.type in FUSED_ADAMW_DEVICES and p.dtype.is_floating_point
                for p in params)
    return torch.optim.AdamW(params, fused=fused or None, **kwargs)


def adam_eps(dtype: torch.dtype) -> float:
    """Adam's ε for states kept in `dtype`: 1e-8, except 1e-4 for fp16. 1e-8 underflows to 0 in
    fp16, and an element with zero gradient history then updates by 0/0 = NaN."""
    return 1e-4 if dtype == torch.float16 else 1e-8


def lr_at(step: int, *, base_lr: float, warmup_steps: int, total_steps: int,
          min_lr_fraction: float = 0.1) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warm-up over warmup_steps to
    base_lr, then cosine decay to min_lr_fraction·base_lr at total_steps (Loshchilov & Hutter
    2017, SGDR; the GPT-3/Llama schedule)."""
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return base_lr * (min_lr_fraction + (1 - min_lr_fraction) * cosine)


def default_warmup_steps(total_steps: int) -> int:
    """Warm-up length when none is given: 5 % of the run, at least 1, at most 100 steps."""
    return max(1, min(100, total_steps // 20))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global L2 norm of the gradients to max_norm (no clipping when max_norm <= 0);
    return the norm before clipping (inf/nan if a gradient is not finite)."""
    limit = max_norm if max_norm > 0 else math.inf
    norm = torch.nn.utils.clip_grad_norm_(params, limit, error_if_nonfinite=False)
    if hasattr(norm, "full_tensor"):  # sharded gradients (FSDP2): the norm is a DTensor
        norm = norm.full_tensor()
    return float(norm)


class BackwardStep:
    """The optimizer step fused into backward (TrainSetup.optimizer_in_backward): a
    post-accumulate-grad hook on every trainable parameter runs `optimizer.step()` as soon as
    backward has accumulated that parameter's gradient, then frees the gradient, so gradients
    never all exist at once (PyTorch tutorial "How to save memory by fusing the optimizer step
    into the backward pass"; torchtitan's optimizer-in-backward). One optimizer serves every
    hook, so its state, state_dict and learning rate are those of the ordinary step. Inside a
    hook it steps over the hooked parameter's group narrowed to that parameter: a step over all
    groups scans every parameter for a gradient, which made a backward over P tensors cost
    O(P²) (fused AdamW, 18,000 tiny tensors: 1.4 ms per hook, 25 s per step).

    No gradient is checked before it is applied (a check per parameter costs a read of every
    gradient, +4 % of a step here, and on an accelerator a wait for the device per parameter):
    a non-finite gradient makes its weights non-finite, which the next step's loss or the
    weight check before every checkpoint catches, so the last checkpoint stays good
    (train.py)."""

    def __init__(self, optimizer: torch.optim.Optimizer,
                 params: list[torch.nn.Parameter]) -> None:
        self.optimizer = optimizer
        self.largest_gradient_bytes = 0
        """Storage of the largest gradient seen (bytes): the gradient memory of this mode."""
        self._group_of = {p: group for group in optimizer.param_groups for p in group["params"]}
        for p in params:
            p.register_post_accumulate_grad_hook(self._step)

    @torch.no_grad()
    def _step(self, param: torch.Tensor) -> None:
        grad = param.grad
        self.largest_gradient_bytes = max(self.largest_gradient_bytes,
                                          grad.numel() * grad.element_size())
        groups = self.optimizer.param_groups
        self.optimizer.param_groups = [{**self._group_of[param], "params": [param]}]
        try:
            self.optimizer.step()
        finally:
            self.optimizer.param_groups = groups
        param.grad = None
