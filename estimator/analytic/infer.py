"""A plausible architecture for a bare parameter count (and, for MoE, an active count).

Shape rules follow the Llama-2/3 family (Touvron et al. 2023; Llama-3 model card): head_dim 128,
8 KV heads (GQA), SwiGLU width 3.5·h rounded to 256, vocabulary 128 256, untied embeddings, and
depth ≈ h/128 (Llama-2-7B 4096/32, 13B 5120/40; 70B 8192/80 is 102). The hidden size comes from
N_nonemb ≈ L·(2h² + 2h·K·d + 10.5h²) with L = h/128, rounded (round_hidden); the layer count
is then solved so the total matches N as closely as whole layers allow. MoE: experts of width
h/2 (≈ Qwen/DeepSeek fine-grained experts), expert count and top-k from the active ratio. The
result says all of this in `inferred_from`; the estimate lists it under assumptions.
"""

from estimator.analytic.params import count_params
from estimator.errors import SetupError
from estimator.specs import ModelSpec, MoESpec

DEFAULT_VOCAB = 128_256
HEAD_DIM = 128
KV_HEADS = 8
DEPTH_RATIO = 128
MAX_INFERENCE_ERROR = 0.10
"""Largest relative gap between --params and the inferred model's count we accept."""


def round_to(x: float, multiple: int) -> int:
    """Nearest positive multiple."""
    return max(multiple, round(x / multiple) * multiple)


def round_hidden(x: float) -> int:
    """Hidden sizes: multiples of 1024 from 4096 up (head counts divisible by 8 KV heads),
    of 128 (one head) below."""
    return round_to(x, 1024 if x >= 3584 else 128)


def dense_shape(num_params: float, vocab: int) -> tuple[int, int, int]:
    """(hidden, layers, intermediate) of a dense Llama-like model with ~num_params params."""
    hidden = HEAD_DIM
    for _ in range(50):  # fixed point: embeddings depend on h
        non_emb = max(num_params - 2 * vocab * hidden, num_params * 0.05)
        per_h3 = (2 + 2 * KV_HEADS * HEAD_DIM / max(hidden, 1) + 10.5) / DEPTH_RATIO
        hidden = round_hidden((non_emb / per_h3) ** (1 / 3))
    inter = round_to(3.5 * hidden, 256)
    kv = min(KV_HEADS, hidden // HEAD_DIM)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv * HEAD_DIM + 3 * hidden * inter
    layers = max(1, round((num_params - 2 * vocab * hidden) / per_layer))
    return hidden, layers, inter


def infer_model(num_params: float, *, active_params: float | None = None) -> ModelSpec:
    """Infer a ModelSpec; dense unless active_params < num_params."""
    if num_params <= 0:
        raise SetupError(f"--params must be positive, got {num_params:g}")
    if active_params is not None and not 0 < active_params <= num_params:
        raise SetupError(
            f"active parameters ({active_params:g}) must be positive and at most the total "
            f"({num_params:g})")
    vocab = DEFAULT_VOCAB if num_params >= 1e9 else 32_000 if num_params >= 5e7 else 256
    if active_params is None or active_params >= num_params * 0.999:
        spec = dense_model(num_params, vocab)
    else:
        spec = moe_model(num_params, active_params, vocab)
    total = count_params(spec).total
    if abs(total / num_params - 1) > MAX_INFERENCE_ERROR:
        raise SetupError(
            f"cannot infer a plausible architecture for {num_params:.4g} parameters (closest: "
            f"{total:.4g}); pass an exact model with --model NAME or a config.json")
    return spec


def dense_model(num_params: float, vocab: int) -> ModelSpec:
    """Dense inference, with the shape rule stated."""
    hidden, layers, inter = dense_shape(num_params, vocab)
    spec = llama_like(f"dense-{num_params / 1e9:.3g}B", hidden, layers, inter, vocab)
    total = count_params(spec).total
    how = (f"inferred from --params {num_params:.4g}: Llama-style dense decoder, {layers} layers, "
           f"hidden {hidden}, SwiGLU {inter}, {hidden // HEAD_DIM} heads of {HEAD_DIM} with "
           f"{spec.num_kv_heads} KV heads, vocab {vocab}, untied; {total / 1e9:.3f}B params "
           f"({(total / num_params - 1) * 100:+.1f} %)")
    return spec.model_copy(update={"inferred_from": how})


def llama_like(name: str, hidden: int, layers: int, inter: int, vocab: int,
               moe: MoESpec | None = None) -> ModelSpec:
    """A Llama-3-style ModelSpec of the given shape."""
    heads = max(1, hidden // HEAD_DIM)
    kv = min(KV_HEADS, heads)
    while heads % kv:
        kv -= 1
    return ModelSpec(name=name, num_layers=layers, hidden_size=hidden, intermediate_size=inter,
                     num_heads=heads, num_kv_heads=kv, head_dim=HEAD_DIM, vocab_size=vocab,
                     max_seq_len=8192, moe=moe)


def moe_model(num_params: float, active_params: float, vocab: int) -> ModelSpec:
    """MoE inference: experts of width h/2 (1.5·h² params each); the expert count E and
    top-k are chosen so that (attention + k experts) / (attention + E experts) per layer
    matches the active ratio best (E in 8…256, k ≥ 1); then h from the total with depth h/128,
    the layer count solved for the total and k re-solved for the active count."""
    attn = 2 + 2 * KV_HEADS * HEAD_DIM / 4096  # ≈ attention params / h² at h = 4096
    ratio = active_params / num_params
    best = min((abs((attn + 1.5 * k) / (attn + 1.5 * e) - ratio), e, k)
                for e in (8, 16, 32, 64, 128, 256) for k in range(1, e // 2 + 1))
    num_experts = best[1]
    non_emb = num_params * 0.97
    hidden = round_hidden((DEPTH_RATIO * non_emb / (attn + 1.5 * num_experts)) ** (1 / 3))
    width = round_to(hidden / 2, 128)
    probe = llama_like("probe", hidden, 1, width, vocab)
    per_attn = count_params(probe).components["attention"] + 2 * hidden
    per_expert = 3 * hidden * width
    fixed = 2 * vocab * hidden + hidden
    layers = max(1, round((num_params - fixed) / (per_attn + num_experts * per_expert)))
    top_k = round((active_params - fixed - layers * per_attn) / (layers * per_expert))
    top_k = min(num_experts, max(1, top_k))
    moe = MoESpec(num_experts=num_experts, num_experts_per_token=top_k,
                  expert_intermediate_size=width)
    spec = llama_like(f"moe-{num_params / 1e9:.3g}B-a{active_params / 1e9:.3g}B", hidden,
                      layers, width, vocab, moe)
    counts = count_params(spec)
    how = (f"inferred from --params {num_params:.4g} --active-params {active_params:.4g}: "
           f"Llama-style MoE, {layers} layers, hidden {hidden}, {num_experts} experts of "
           f"width {width}, top-{top_k}, vocab {vocab}; {counts.total / 1e9:.3f}B total, "
           f"{counts.active_per_token / 1e9:.3f}B active")
    return spec.model_copy(update={"inferred_from": how})
