"""Inference rates: prefill is compute-bound, decode is bandwidth-bound (until the batch is
large enough to make it compute-bound).

Prefill of a b·s prompt runs one forward pass: 2·N_active FLOPs per token plus causal attention
(Kaplan et al. 2020 §2.1); its time comes from the per-op model in throughput.py (forward ops
only for method 'inference'). Decode emits b tokens per step and each step reads, once, every
weight a token of the batch touches plus the KV cache (Pope et al. 2022, "Efficiently Scaling
Transformer Inference" §2: small-batch decode is memory-bandwidth bound). What a step reads:

* every block weight in its storage format (4-bit codes + scales, or 16-bit) — but for a MoE
  only the routed experts that at least one sequence of the batch visits: with k of E experts
  per token and uniform routing, E·(1 − (1 − k/E)^b) distinct experts per layer;
* the lm_head (or the tied embedding) in full; of an untied input embedding only b rows;
* the KV cache at a full seq_len context (the slowest step of a generation).

The step time is max(bytes / (f_bw · peak bandwidth), FLOPs / (f_mm · peak FLOP/s)) with the same
default fractions the uncalibrated per-op model uses (efficiency.py)."""

from estimator.analytic.efficiency import DEFAULT_BANDWIDTH_FRACTION, DEFAULT_MATMUL_FRACTION
from estimator.analytic.params import layer_groups
from estimator.specs import Device, ModelSpec, ParamCounts, TrainSetup

SIXTEEN_BIT_BYTES = 2


def routed_expert_params(model: ModelSpec) -> int:
    """Weights of all routed experts over all MoE layers (count; 0 for a dense model)."""
    total = 0.0
    for linears, num_layers in layer_groups(model, routed_all=True):
        total += sum(lin.num_params * lin.count * num_layers for lin in linears if lin.routed)
    return round(total)


def experts_touched_fraction(model: ModelSpec, batch_size: int) -> float:
    """Share of a layer's routed experts that a decode step of `batch_size` sequences reads:
    1 − (1 − k/E)^b for k real experts per token out of E, uniform independent routing
    (an assumption: real routers are skewed, which touches fewer experts). 1.0 for dense."""
    moe = model.moe
    if moe is None:
        return 1.0
    share = min(1.0, moe.routed_experts_per_token / moe.num_experts)
    return 1.0 - (1.0 - share) ** batch_size


def decode_read_bytes(model: ModelSpec, setup: TrainSetup, params: ParamCounts,
                      weight_storage_bytes: int, kv_bytes: int) -> int:
    """Bytes one decode step reads: stored weights minus the untouched part of an untied input
    embedding (b rows are read) minus the routed experts no sequence visits, plus the KV cache.

    The embedding and the routed experts are priced at their storage bytes per parameter: the
    embedding stays 16-bit (32-bit for a 32-bit base); experts are stored like the rest of the
    block weights, so they get the average bytes/param of the non-embedding weights."""
    embed_bytes_per_param = 4 if setup.weight_bits == 32 else SIXTEEN_BIT_BYTES
    embedding = 0 if model.tied_embeddings else params.embedding
    skipped_embedding = max(0, embedding - setup.batch_size * model.hidden_size)
    rest_params = max(1, params.total - embedding)
    rest_bytes = weight_storage_bytes - embedding * embed_bytes_per_param
    skipped_experts = routed_expert_params(model) * (
        1.0 - experts_touched_fraction(model, setup.batch_size))
    read = (weight_storage_bytes - skipped_embedding * embed_bytes_per_param
            - skipped_experts * rest_bytes / rest_params)
    return round(read) + kv_bytes


def decode_flops_per_token(model: ModelSpec, setup: TrainSetup, params: ParamCounts) -> int:
    """Forward FLOPs of one generated token at a full seq_len context: 2·(N_active − input
    embedding) + attention over the cache, 4·s·H·d per attention (QKᵀ and PV, no causal
    saving for a single query row)."""
    if model.mla is not None:
        d = (model.mla.qk_nope_head_dim + model.mla.qk_rope_head_dim + model.mla.v_head_dim) / 2
    else:
        d = model.head_dim
    attn = 4 * setup.seq_len * model.num_heads * d * model.num_layers * model.attentions_per_layer
    return round(2 * (params.active_per_token - params.embedding) + attn)


def decode_step_seconds(model: ModelSpec, setup: TrainSetup, device: Device, params: ParamCounts,
                        weight_storage_bytes: int, kv_bytes: int) -> tuple[float, str]:
    """(seconds of one decode step for the batch, the bound: 'bandwidth' or 'compute')."""
    read = decode_read_bytes(model, setup, params, weight_storage_bytes, kv_bytes)
    memory_seconds = read / (device.memory_bandwidth_bytes_per_second
                             * DEFAULT_BANDWIDTH_FRACTION)
    peak = (device.peak_for(setup.compute_dtype) or device.peak_for("fp32")
            or device.peak_for("bf16"))
    fraction = device.achievable_matmul_fraction or DEFAULT_MATMUL_FRACTION
    compute_seconds = (setup.batch_size * decode_flops_per_token(model, setup, params)
                       / (peak * fraction)) if peak else 0.0
    if compute_seconds > memory_seconds:
        return compute_seconds, "compute"
    return memory_seconds, "bandwidth"


def decode_tokens_per_second(model: ModelSpec, setup: TrainSetup, device: Device,
                             params: ParamCounts, weight_storage_bytes: int,
                             kv_bytes: int) -> float:
    """Generated tokens per second over the whole batch (tokens/s)."""
    seconds, _ = decode_step_seconds(model, setup, device, params, weight_storage_bytes,
                                     kv_bytes)
    return setup.batch_size / seconds


def prefill_flops_per_token(model: ModelSpec, params: ParamCounts, seq_len: int) -> int:
    """Forward FLOPs per prompt token: 2·(N_active − input embedding) + causal attention
    2·s·H·d per attention (4·s·H·d halved by the causal mask) — the reference the per-op
    prefill count (flops.py, method 'inference') is checked against."""
    attn = 2 * seq_len * model.num_heads * model.head_dim * (
        model.num_layers * model.attentions_per_layer)
    return round(2 * (params.active_per_token - params.embedding) + attn)
