"""The bundled executor's decoder: Llama-family dense and MoE transformers in plain PyTorch.

gpt-fast / torchtitan style: one file, no parallelism, no LoRA, no quantisation (those are
transforms in lora.py, nf4.py, checkpointing.py that take a built model and return it changed).
The custom autograd functions it calls (norm, SwiGLU and loss kernels that keep fewer tensors
for backward) live in kernels/; rotary embeddings in rope.py.
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

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from estimator.analytic.activations import EXPERT_ROW_GRANULE
from estimator.executor.checks import check_architecture
from estimator.executor.kernels import (
    TiedGradient,
    _EmbeddingIntoTiedGradient,
    _NormLinears,
    _RMSNormFunction,
    _SiLUMul,
    _SwiGLUDown,
    fused_linear_cross_entropy,
)
from estimator.executor.rope import apply_rope, rope_inv_freq, rope_scaling_items
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
    check_architecture(spec)
    moe = spec.moe
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
            inv_freq_C2 = rope_inv_freq(self.args.head_dim, self.args.rope_theta,
                                        self.args.rope_scaling).to(device)
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
        x_BTD = x_BTD.to(self.norm.weight.dtype)  # a 16-bit frozen base under fp32 compute
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
    scaling = rope_scaling_items(rope_scaling)
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
