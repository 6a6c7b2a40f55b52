"""The bundled executor's decoder: Llama-family dense and MoE transformers in plain PyTorch.

gpt-fast / torchtitan style: one file, no parallelism, no LoRA, no quantisation (those are
transforms in lora.py, nf4.py, checkpointing.py that take a built model and return it changed).
Module names follow Hugging Face's Llama/Qwen naming without the leading ``model.`` so that LoRA
targets and weight loading are direct (hf.py adds the prefix): ``embed_tokens``,
``layers.{i}.self_attn.{q,k,v,o}_proj``, ``layers.{i}.mlp.{gate,up,down}_proj``,
``layers.{i}.input_layernorm``, ``layers.{i}.post_attention_layernorm``, ``norm``, ``lm_head``.
MoE layers use Qwen-MoE names: ``layers.{i}.mlp.gate`` (router),
``layers.{i}.mlp.experts.{j}.{gate,up,down}_proj``, ``layers.{i}.mlp.shared_experts.*``.

Shape-suffix legend:
    B batch, T sequence (tokens), N = B·T flat tokens, D hidden size, H query heads,
    K key/value heads, C head dim, V vocab, I FFN width, E routed experts, A experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from estimator.analytic.activations import EXPERT_ROW_GRANULE
from estimator.analytic.memory import FUSED_LOSS_CHUNK_ELEMENTS
from estimator.errors import SetupError
from estimator.specs.model import ModelSpec

SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
"""torch ≥ 2.5: SDPA takes K < H key/value heads itself (the CPU flash kernel does, no copy)."""


@dataclass(frozen=True)
class ModelArgs:
    """The spec flattened into plain numbers; this, not a ModelSpec, reaches the modules."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_seq_len: int
    tied_embeddings: bool = False
    mlp: str = "swiglu"
    norm: str = "rmsnorm"
    position: str = "rope"
    qkv_bias: bool = False
    o_bias: bool = False
    linear_bias: bool = False
    qk_norm: bool = False
    sliding_window: int | None = None
    num_experts: int = 0
    num_experts_per_token: int = 0
    expert_intermediate_size: int = 0
    shared_intermediate_size: int = 0
    num_dense_layers: int = 0
    expert_bias: bool = False
    norm_topk_prob: bool = True
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, float], ...] | None = None
    norm_eps: float = 1e-5


def model_args(spec: ModelSpec, **overrides) -> ModelArgs:
    """Flatten a ModelSpec into ModelArgs; raises SetupError for what the executor cannot run."""
    unsupported = {
        "MLA": spec.mla is not None,
        "attention sinks": spec.attention_sinks,
        f"{spec.attentions_per_layer} attentions per layer": spec.attentions_per_layer > 1,
    }
    moe = spec.moe
    if moe is not None:
        unsupported["zero-computation experts"] = moe.num_zero_experts > 0
        unsupported["dense FFNs beside the MoE"] = moe.dense_mlps_per_layer > 0
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise SetupError(
            f"{spec.name}: {', '.join(bad)} models can be estimated but not trained by the "
            "bundled executor"
        )
    shared = 0
    if moe is not None and moe.num_shared_experts:
        width = moe.shared_expert_intermediate_size or moe.expert_intermediate_size
        shared = moe.num_shared_experts * width
    return ModelArgs(
        num_layers=spec.num_layers, hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size, num_heads=spec.num_heads,
        num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim, vocab_size=spec.vocab_size,
        max_seq_len=spec.max_seq_len, tied_embeddings=spec.tied_embeddings, mlp=spec.mlp,
        norm=spec.norm, position=spec.position,
        qkv_bias=spec.qkv_bias or spec.linear_bias or spec.attention_bias,
        o_bias=spec.linear_bias or spec.attention_bias,
        linear_bias=spec.linear_bias, qk_norm=spec.qk_norm, sliding_window=spec.sliding_window,
        num_experts=moe.num_experts if moe else 0,
        num_experts_per_token=moe.num_experts_per_token if moe else 0,
        expert_intermediate_size=moe.expert_intermediate_size if moe else 0,
        shared_intermediate_size=shared,
        num_dense_layers=moe.num_dense_layers if moe else 0,
        expert_bias=moe.expert_bias if moe else False,
        **overrides,
    )


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


def project_normed(norm: nn.Module | None, linears: list[nn.Module], x: torch.Tensor
                   ) -> list[torch.Tensor]:
    """[linear(norm(x)) for linear in linears] (no norm: of x): through _NormLinears where the
    norm is an RMSNorm and every linear a trained plain nn.Linear (a full fine-tune)."""
    if norm is None:
        return [linear(x) for linear in linears]
    if isinstance(norm, RMSNorm) and all(type(lin) is nn.Linear and lin.weight.requires_grad
                                         for lin in linears):
        weights_biases = [t for lin in linears for t in (lin.weight, lin.bias)]
        return list(_NormLinears.apply(x, norm.weight, norm.eps, norm.out_dtype(x),
                                       *weights_biases))
    y = norm(x)
    return [linear(y) for linear in linears]


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x²) + eps) · weight, computed in fp32 (Zhang & Sennrich 2019; HF Llama).
    Under autocast the output is in the autocast dtype (cast once here instead of in each next
    matmul); for backward it keeps only x and the fp32 rstd (_RMSNormFunction)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def out_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return self.weight.dtype if self.weight.dtype != torch.float32 else x.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFunction.apply(x, self.weight, self.eps, self.out_dtype(x))


def make_norm(args: ModelArgs, dim: int) -> nn.Module:
    """RMSNorm for Llama-family specs, LayerNorm (with bias) for GPT-2-style specs."""
    if args.norm == "rmsnorm":
        return RMSNorm(dim, args.norm_eps)
    return nn.LayerNorm(dim, eps=args.norm_eps)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """inv_freq_j = theta^(-2j/C) (Su et al. 2021), with Llama-3 frequency scaling if configured."""
    exponent_C2 = torch.arange(0, args.head_dim, 2).float() / args.head_dim
    inv_freq = 1.0 / (args.rope_theta**exponent_C2)
    scaling = dict(args.rope_scaling or ())
    if scaling.get("rope_type") == 3.0:  # "llama3", encoded by hf.py as 3.0
        inv_freq = _llama3_scaling(inv_freq, scaling)
    return inv_freq.float()


def _llama3_scaling(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    """Llama 3.1 RoPE scaling (HF modeling_rope_utils._compute_llama3_parameters)."""
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    mid = (1 - smooth) * scaled / factor + smooth * scaled
    is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_mid, mid, scaled)


def apply_rope(x_BTHC: torch.Tensor, cos_TC2: torch.Tensor, sin_TC2: torch.Tensor) -> torch.Tensor:
    """Rotate halves (HF rotate_half convention): [x1, x2] → [x1·cos − x2·sin, x2·cos + x1·sin],
    on [batch, seq, heads, head_dim] (the projection's layout)."""
    x1, x2 = x_BTHC.chunk(2, dim=-1)
    cos_T1C2 = cos_TC2.to(x_BTHC.dtype)[:, None]
    sin_T1C2 = sin_TC2.to(x_BTHC.dtype)[:, None]
    return torch.cat((x1 * cos_T1C2 - x2 * sin_T1C2, x2 * cos_T1C2 + x1 * sin_T1C2), dim=-1)


class Attention(nn.Module):
    """Causal GQA self-attention through F.scaled_dot_product_attention (no T×T saved)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        D, H, K, C = args.hidden_size, args.num_heads, args.num_kv_heads, args.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, K, C
        self.sliding_window = args.sliding_window
        self.q_proj = nn.Linear(D, H * C, bias=args.qkv_bias)
        self.k_proj = nn.Linear(D, K * C, bias=args.qkv_bias)
        self.v_proj = nn.Linear(D, K * C, bias=args.qkv_bias)
        self.o_proj = nn.Linear(H * C, D, bias=args.o_bias)
        self.q_norm = RMSNorm(C, args.norm_eps) if args.qk_norm else None
        self.k_norm = RMSNorm(C, args.norm_eps) if args.qk_norm else None

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                norm: nn.Module | None = None):
        """Attention over norm(x) (over x without a norm)."""
        B, T, _ = x_BTD.shape
        q, k, v = project_normed(norm, [self.q_proj, self.k_proj, self.v_proj], x_BTD)
        q_BTHC = q.view(B, T, self.num_heads, self.head_dim)
        k_BTKC = k.view(B, T, self.num_kv_heads, self.head_dim)
        v_BKTC = v.view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q_BTHC, k_BTKC = self.q_norm(q_BTHC), self.k_norm(k_BTKC)
        if rope is not None:
            q_BTHC, k_BTKC = apply_rope(q_BTHC, *rope), apply_rope(k_BTKC, *rope)
        # [B, T, H, C] memory seen as [B, H, T, C]: SDPA's output takes q's layout, so the
        # o_proj input below is a view of the output SDPA keeps, not a second copy
        q_BHTC, k_BKTC = q_BTHC.transpose(1, 2), k_BTKC.transpose(1, 2)
        gqa = {}
        if self.num_kv_heads != self.num_heads and SDPA_HAS_GQA:  # no K→H copy (torch ≥ 2.5)
            gqa = {"enable_gqa": True}
        elif self.num_kv_heads != self.num_heads:  # repeat_kv
            rep = self.num_heads // self.num_kv_heads
            k_BKTC = k_BKTC.repeat_interleave(rep, dim=1)
            v_BKTC = v_BKTC.repeat_interleave(rep, dim=1)
        mask_TT = None
        if self.sliding_window is not None and self.sliding_window < T:
            i_T1 = torch.arange(T, device=x_BTD.device)[:, None]
            j_1T = torch.arange(T, device=x_BTD.device)[None, :]
            mask_TT = (j_1T <= i_T1) & (i_T1 - j_1T < self.sliding_window)
        y_BHTC = F.scaled_dot_product_attention(
            q_BHTC, k_BKTC, v_BKTC, attn_mask=mask_TT, is_causal=mask_TT is None, **gqa
        )
        return self.o_proj(y_BHTC.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU FFN down(silu(gate(x)) ⊙ up(x)) (Shazeer 2020), or GELU FFN down(gelu(up(x)))."""

    def __init__(self, dim: int, width: int, *, gated: bool = True, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, width, bias=bias) if gated else None
        self.up_proj = nn.Linear(dim, width, bias=bias)
        self.down_proj = nn.Linear(width, dim, bias=bias)

    def forward(self, x_ND: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """The FFN of norm(x) (of x without a norm)."""
        if self.gate_proj is None:
            (a,) = project_normed(norm, [self.up_proj], x_ND)
            return self.down_proj(F.gelu(a, approximate="tanh"))
        g, u = project_normed(norm, [self.gate_proj, self.up_proj], x_ND)
        down = self.down_proj
        if type(down) is nn.Linear and down.weight.requires_grad:  # trained plain linear
            return _SwiGLUDown.apply(g, u, down.weight, down.bias)
        return down(_SiLUMul.apply(g, u))


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


class MoE(nn.Module):
    """Top-k softmax router (renormalised top-k weights, as Mixtral), routed SwiGLU experts and
    always-on shared experts (DeepSeek-style, no gate). Tokens are grouped by expert (sort +
    index_select + index_add), so each expert computes only its own tokens."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        D = args.hidden_size
        self.top_k, self.norm_topk_prob = args.num_experts_per_token, args.norm_topk_prob
        self.gate = nn.Linear(D, args.num_experts, bias=args.expert_bias)
        self.experts = nn.ModuleList(
            MLP(D, args.expert_intermediate_size, bias=args.expert_bias)
            for _ in range(args.num_experts)
        )
        shared = args.shared_intermediate_size
        self.shared_experts = MLP(D, shared) if shared else None

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1])
        N = x_ND.shape[0]
        probs_NE = F.softmax(self.gate(x_ND), dim=-1, dtype=torch.float32)
        weight_NA, expert_NA = probs_NE.topk(self.top_k, dim=-1)
        if self.norm_topk_prob:
            weight_NA = weight_NA / weight_NA.sum(dim=-1, keepdim=True)
        order_M = expert_NA.flatten().argsort(stable=True)  # M = N·A (token, slot) pairs
        token_M, weight_M = order_M // self.top_k, weight_NA.flatten()[order_M]
        counts = torch.bincount(expert_NA.flatten(), minlength=len(self.experts)).tolist()
        if _reuses_shapes(x_ND):  # one call per expert, rows padded to few shapes
            token_M, weight_M, counts = _pad_groups(token_M, weight_M, counts,
                                                    EXPERT_ROW_GRANULE, N)
            x_ND = torch.cat([x_ND, x_ND.new_zeros(1, x_ND.shape[1])])
        used = [e for e, count in enumerate(counts) if count]
        xs_MD = x_ND.index_select(0, token_M)
        outs = [self.experts[e](x_mD)
                for e, x_mD in zip(used, xs_MD.split([counts[e] for e in used]), strict=True)]
        ys_MD = torch.cat(outs) * weight_M[:, None].to(x_ND.dtype)
        out_ND = torch.zeros_like(x_ND).index_add_(0, token_M, ys_MD)[:N]
        if self.shared_experts is not None:
            out_ND = out_ND + self.shared_experts(x_ND[:N])
        return out_ND.view_as(x_BTD)


def _reuses_shapes(x: torch.Tensor) -> bool:
    """True on CPU with 16-bit matmuls. oneDNN builds and caches one kernel ("primitive") per
    matmul shape; per-expert token counts change every step, so each step would create hundreds
    of new primitives (~0.5 MiB of heap each), the 1024-entry cache would keep ~0.7 GiB of them,
    and the heap fragments (measured: docs/executor.md, MoE full bf16). Padding each expert's
    rows to a multiple of 32 (_pad_groups) leaves few distinct shapes, in one call per expert:
    cutting them into 32·k + r rows instead (two calls) was slower, because a GEMM of r < 32
    rows still packs the whole weight (~0.14 ms for 768×384 here): tiny-moe full bf16, 12 steps,
    0.29–0.32 s vs 0.34 s per step, peak 1308–1316 vs 1409–1415 MiB (fewer primitives). fp32
    CPU matmuls (MKL/BLAS) and GPU kernels keep nothing per shape, so they run each expert's
    rows whole."""
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return x.device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def _pad_groups(token_M: torch.Tensor, weight_M: torch.Tensor, counts: list[int],
                granule: int, pad_token: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Pad each expert's group of rows (sorted by expert) up to a multiple of ``granule``: pad
    rows read token ``pad_token`` (a zero row appended to the input) with weight 0, so they
    add nothing to the output or to any gradient. Returns the padded (token, weight, counts)."""
    padded = [-(-c // granule) * granule for c in counts]
    count_E = torch.tensor(counts, device=token_M.device)
    padded_E = torch.tensor(padded, device=token_M.device)
    shift_E = (padded_E.cumsum(0) - padded_E) - (count_E.cumsum(0) - count_E)  # group starts
    expert_M = torch.repeat_interleave(torch.arange(len(counts), device=token_M.device), count_E)
    dest_M = torch.arange(len(token_M), device=token_M.device) + shift_E[expert_M]
    total = sum(padded)
    token_P = token_M.new_full((total,), pad_token).scatter(0, dest_M, token_M)
    weight_P = weight_M.new_zeros(total).scatter(0, dest_M, weight_M)
    return token_P, weight_P, padded


class Block(nn.Module):
    """Pre-norm decoder block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, args: ModelArgs, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = make_norm(args, args.hidden_size)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = make_norm(args, args.hidden_size)
        if args.num_experts and layer_id >= args.num_dense_layers:
            self.mlp: nn.Module = MoE(args)
        else:
            gated = args.mlp == "swiglu"
            self.mlp = MLP(args.hidden_size, args.intermediate_size, gated=gated,
                           bias=args.linear_bias)

    def forward(self, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None):
        h_BTD = x_BTD + self.self_attn(x_BTD, rope, self.input_layernorm)
        if isinstance(self.mlp, MLP):
            return h_BTD + self.mlp(h_BTD, self.post_attention_layernorm)
        return h_BTD + self.mlp(self.post_attention_layernorm(h_BTD))


class Transformer(nn.Module):
    """Decoder-only LM: tokens_BT → logits_BTV in the model dtype (the loop upcasts the loss)."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        learned = args.position == "learned"
        self.embed_positions = (
            nn.Embedding(args.max_seq_len, args.hidden_size) if learned else None
        )
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.num_layers))
        self.norm = make_norm(args, args.hidden_size)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.tie_weights()
        self._rope_cache: dict = {}

    def tie_weights(self) -> None:
        """Share lm_head's weight with the input embedding when the spec ties them."""
        if self.args.tied_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """fp32 cos, sin of shape [T, C/2] for positions 0..T-1 (cached per length and device)."""
        if self.args.position != "rope":
            return None
        key = (T, str(device))
        if key not in self._rope_cache:
            inv_freq_C2 = rope_inv_freq(self.args).to(device)
            angle_TC2 = torch.outer(torch.arange(T, device=device).float(), inv_freq_C2)
            self._rope_cache = {key: (angle_TC2.cos(), angle_TC2.sin())}
        return self._rope_cache[key]

    def hidden(self, tokens_BT: torch.Tensor, tied: TiedGradient | None = None
               ) -> torch.Tensor:
        """The final-normed hidden states, before lm_head (`tied`: see TiedGradient)."""
        T = tokens_BT.shape[1]
        if tied is None:
            x_BTD = self.embed_tokens(tokens_BT)
        else:
            x_BTD = _EmbeddingIntoTiedGradient.apply(tokens_BT, self.embed_tokens.weight, tied)
        if self.embed_positions is not None:
            x_BTD = x_BTD + self.embed_positions(torch.arange(T, device=tokens_BT.device))
        rope = self.rope(T, tokens_BT.device)
        for layer in self.layers:
            x_BTD = layer(x_BTD, rope)
        return self.norm(x_BTD)

    def forward(self, tokens_BT: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.hidden(tokens_BT))

    def loss(self, tokens_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        """Mean next-token cross-entropy (fp32) without materialising the B·T·V logits: lm_head
        and the loss run fused in row chunks (``fused_linear_cross_entropy``). Targets equal to
        -100 are ignored. Same value and gradients as F.cross_entropy(forward(tokens)).
        A tied weight that trains gets one gradient tensor: TiedGradient."""
        weight = self.lm_head.weight
        tied = TiedGradient() if (weight is self.embed_tokens.weight and weight.requires_grad
                                  and torch.is_grad_enabled()) else None
        h_ND = self.hidden(tokens_BT, tied).flatten(0, 1)
        return fused_linear_cross_entropy(h_ND, weight, targets_BT.flatten(), tied=tied)

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """N(0, std) for linears and embeddings, zero biases, unit norms (GPT-2 / HF Llama)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)


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


def build_model(
    spec: ModelSpec,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    norm_eps: float = 1e-5,
    norm_topk_prob: bool = True,
    init: bool = True,
) -> Transformer:
    """Build the Transformer a ModelSpec describes, directly in ``dtype`` on ``device``.

    Built on the meta device first (no memory), then materialised; ``init=False`` leaves the
    weights uninitialised (for loading a checkpoint); ``device="meta"`` only counts parameters.
    ``rope_scaling``: HF's dict; only ``rope_type: llama3`` (or none/default) is supported.
    """
    scaling = _rope_scaling_items(rope_scaling)
    args = model_args(
        spec, rope_theta=rope_theta, rope_scaling=scaling, norm_eps=norm_eps,
        norm_topk_prob=norm_topk_prob,
    )
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype=dtype)
    if torch.device(device).type == "meta":
        return model
    model = model.to_empty(device=device)
    model.tie_weights()  # to_empty materialises each module's parameter separately
    if init:
        model.init_weights()
    return model


def _rope_scaling_items(rope_scaling: dict | None) -> tuple[tuple[str, float], ...] | None:
    """HF rope_scaling dict → hashable items; raises SetupError for unsupported scaling types."""
    if not rope_scaling:
        return None
    kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise SetupError(f"RoPE scaling type {kind!r} is not supported by the bundled executor")
    keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return (("rope_type", 3.0), *((k, float(rope_scaling[k])) for k in keys))
