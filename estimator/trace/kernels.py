"""Where the traced step would take a device-specific or data-dependent path, pin it to what a
CUDA run of the same code does, explicitly and by name.

- Attention: the trace's tensors are CPU tensors, and torch's CPU SDPA falls back to its math
  kernel (which keeps the s×s probabilities) when the query/key head width differs from the
  value head width (MLA: 192 vs 128). On CUDA the same call runs the memory-efficient kernel,
  which saves only output + logsumexp. `CudaAttentionPin` sends exactly those calls to
  aten._scaled_dot_product_efficient_attention (its autograd formula saves what CUDA saves).
  Other SDPA calls are left alone: CPU flash attention saves what CUDA flash saves (output +
  logsumexp).
  Only on fake tensors: the CPU has no kernel for it.
- bitsandbytes 4-bit matmul: `Dequant4bitPin` runs bitsandbytes::gemm_4bit as the CUDA backend
  does for training-size inputs (> 1536 rows, bitsandbytes/backends/cuda/ops.py
  `_dequant_linear_fallback`): dequantise the weight (and nested absmax) to a transient
  compute-dtype matrix, then F.linear. The fused op's fake kernel would hide the transient.
- MoE experts: HF's default `grouped_mm` experts path has routing-independent shapes and is
  traced as is. Its `eager` per-expert loop indexes tokens with nonzero/where, which fake
  tensors cannot size; `balanced_experts_forward` is that loop with a balanced routing
  assumption: slot j of token t goes to expert (t·k + j) mod E, so each expert receives
  T·k/E tokens (± 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

BALANCED_EXPERTS = "nvfree_balanced"
"""Name under which balanced_experts_forward is registered in transformers' ExpertsInterface."""


class CudaAttentionPin:
    """While entered, torch.nn.functional.scaled_dot_product_attention (which transformers'
    sdpa_attention_forward looks up at each call) sends q/k width ≠ v width to CUDA's
    memory-efficient kernel (saves output + logsumexp, no s×s probabilities); other calls go
    to SDPA unchanged. A patched attribute rather than a TorchFunctionMode: the autograd engine
    runs checkpointed recomputation without the caller's function modes. Counts what it pinned."""

    def __init__(self) -> None:
        self.num_pinned = 0
        self._patch = None

    def __call__(self, query, key, value, *args, **kwargs):
        if query.shape[-1] != value.shape[-1]:
            self.num_pinned += 1
            return efficient_attention(query, key, value, *args, **kwargs)
        return ORIGINAL_SDPA(query, key, value, *args, **kwargs)

    def __enter__(self) -> CudaAttentionPin:
        from unittest import mock

        self._patch = mock.patch.object(F, "scaled_dot_product_attention", self)
        self._patch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._patch.__exit__(*exc)


ORIGINAL_SDPA = F.scaled_dot_product_attention


def efficient_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                        scale=None, enable_gqa=False):
    """torch's CUDA memory-efficient SDPA on the same arguments (GQA keys/values expanded,
    as torch does for this kernel; inputs cast to the autocast dtype as SDPA would be)."""
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeats = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(repeats, dim=-3)
        value = value.repeat_interleave(repeats, dim=-3)
    out = torch.ops.aten._scaled_dot_product_efficient_attention(
        query, key, value, attn_mask, query.requires_grad or key.requires_grad, dropout_p,
        is_causal, scale=scale)
    return out[0]


class Dequant4bitPin(TorchDispatchMode):
    """bitsandbytes::gemm_4bit as dequantise-then-linear (the CUDA path past 1536 rows), so
    the transient compute-dtype weight is allocated and freed where a GPU run allocates it."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.bitsandbytes.gemm_4bit.default:
            return dequant_linear(*args, **kwargs)
        return func(*args, **kwargs)


def dequant_linear(A, B, shapeB, absmax, blocksize, quant_type, bias=None, absmax_8bit=None,
                   absmax_code=None, absmax_offset=None):
    """bitsandbytes/backends/cuda/ops.py `_dequant_linear_fallback`, op for op."""
    ops = torch.ops.bitsandbytes
    if absmax_8bit is not None:
        absmax = ops.dequantize_blockwise.default(absmax_8bit, absmax, absmax_code, 256,
                                                  torch.float32) + absmax_offset
    weight = ops.dequantize_4bit.default(B, absmax, blocksize, quant_type, shapeB, A.dtype)
    return F.linear(A, weight, bias)


def balanced_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' eager experts loop (models/mixtral/modeling_mixtral.py MixtralExperts
    .forward) with the router's choice replaced by a balanced assignment: expert e takes the
    (token, slot) pairs s = t·k + j with s mod E = e. The router's weights still scale each
    expert's output, so the router gets its gradient."""
    num_tokens, top_k = top_k_index.shape
    slots = torch.arange(num_tokens * top_k, device=hidden_states.device)
    final = torch.zeros_like(hidden_states)
    for expert in range(self.num_experts):
        picked = slots[expert::self.num_experts]
        token_idx, top_k_pos = picked // top_k, picked % top_k
        out = expert_mlp(self, hidden_states[token_idx], expert)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


def expert_mlp(self, x, expert: int):
    """One expert's gate-up projection, gate and down projection (transformers' layout:
    gate_up_proj [E, 2I, D] and down_proj [E, D, I], or transposed, optional biases)."""
    def linear(x, name):
        weight = getattr(self, name)[expert]
        bias = getattr(self, f"{name}_bias")[expert] if getattr(self, "has_bias", False) \
            else None
        out = x @ weight if getattr(self, "is_transposed", False) else F.linear(x, weight)
        return out if bias is None else out + bias

    if getattr(self, "has_gate", True):
        hidden = self._apply_gate(linear(x, "gate_up_proj"))
    else:
        hidden = self.act_fn(linear(x, "up_proj"))
    return linear(hidden, "down_proj")


def register_balanced_experts() -> None:
    """Make `experts_implementation="nvfree_balanced"` known to transformers."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS.register(BALANCED_EXPERTS, balanced_experts_forward)
