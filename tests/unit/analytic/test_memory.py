"""Memory terms against hand-computed values (tiny_dense: N params, h=64, V=100)."""

import pytest

from estimator.analytic import memory as M
from estimator.analytic import micro_batch as MB
from estimator.analytic import model_state as MS
from estimator.analytic import runtime as RT
from estimator.analytic.activations import activation_bytes
from estimator.analytic.params import count_params
from estimator.catalog import load_device
from estimator.specs import ModelSpec
from estimator.specs import TrainSetup as AnySetup


def TrainSetup(**fields) -> AnySetup:
    """The bundled trainer's setup: these tests check its terms (framework 'nvfree')."""
    return AnySetup(framework="nvfree", **fields)

H100 = load_device("h100-sxm")


def terms(model: ModelSpec, **setup):
    s = TrainSetup(**setup)
    return s, count_params(model, s)


def test_full_mixed_adamw_is_18_bytes_per_linear_param(tiny_dense: ModelSpec) -> None:
    s, p = terms(tiny_dense, method="full", compute_dtype="bf16", mixed_precision=True)
    cast = MS.autocast_copy_params(tiny_dense, s, p)  # block matmul weights (fused loss)
    assert cast == p.total - 2 * 100 * 64 - 5 * 64
    assert MS.weight_bytes(tiny_dense, s, p) == {"weights": 2 * cast, "quant_scales": 0}
    assert MS.master_weight_bytes(s, p) == 4 * p.total
    assert MS.gradient_bytes(s, p) == 4 * p.total
    assert MS.optimizer_state_bytes(tiny_dense, s, p) == 8 * p.total


def test_pure_bf16_adamw_is_8_bytes_per_param(tiny_dense: ModelSpec) -> None:
    s, p = terms(tiny_dense, method="full", compute_dtype="bf16", mixed_precision=False)
    states = (MS.weight_bytes(tiny_dense, s, p)["weights"] + MS.master_weight_bytes(s, p)
              + MS.gradient_bytes(s, p) + MS.optimizer_state_bytes(tiny_dense, s, p))
    assert states == 8 * p.total


@pytest.mark.parametrize("optimizer,per_param", [
    ("sgd", 0), ("sgd_momentum", 4), ("lion", 4), ("adamw", 8)])
def test_optimizer_states_fp32(tiny_dense: ModelSpec, optimizer: str, per_param: int) -> None:
    s, p = terms(tiny_dense, optimizer=optimizer)
    assert MS.optimizer_state_bytes(tiny_dense, s, p) == per_param * p.total


def test_adamw8bit_states(tiny_dense: ModelSpec) -> None:
    s, p = terms(tiny_dense, optimizer="adamw8bit")
    blocks = -(-p.total // 256)
    assert MS.optimizer_state_bytes(tiny_dense, s, p) == 2 * p.total + 8 * blocks


def test_adafactor_factored_states(tiny_dense: ModelSpec) -> None:
    s, p = terms(tiny_dense, optimizer="adafactor")
    per_layer = (64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64)
    expected = 2 * per_layer + 2 * (100 + 64) + 5 * 64
    assert MS.optimizer_state_bytes(tiny_dense, s, p) == 4 * expected


def test_qlora_nf4_storage(tiny_dense: ModelSpec) -> None:
    s, p = terms(tiny_dense, method="qlora", weight_bits=4, double_quant=False)
    quantized, _ = MS.quantized_linear_params(tiny_dense)
    assert quantized == p.total - 2 * 100 * 64 - 5 * 64
    w = MS.weight_bytes(tiny_dense, s, p)
    assert w["weights"] == quantized // 2 + (p.total - quantized) * 2
    assert w["quant_scales"] == 4 * (quantized // 64)


def test_zero3_keeps_the_bundled_trainers_nf4_base_whole(tiny_dense: ModelSpec) -> None:
    """FSDP2 shards parameters, not the NF4 buffers (executor/fsdp.py): under ZeRO-3 on 2
    devices every rank of the bundled trainer holds all the codes and scales and half of the
    16-bit rest; HF + bitsandbytes (4-bit storage as parameters) shards them all."""
    s, p = terms(tiny_dense, method="qlora", weight_bits=4, double_quant=False,
                 num_devices=2, zero_stage=3)
    quantized, _ = MS.quantized_linear_params(tiny_dense)
    state = M.model_state_terms(tiny_dense, s, H100, p)
    rest = (p.total - quantized) * 2
    assert state["weights"] == quantized // 2 + rest // 2
    assert state["quant_scales"] == 4 * (quantized // 64)
    hf = s.model_copy(update={"framework": "hf"})
    hf_state = M.model_state_terms(tiny_dense, hf, H100, count_params(tiny_dense, hf))
    assert hf_state["quant_scales"] == 4 * (quantized // 64) // 2
    assert state["gathered_params"] < hf_state["gathered_params"]


def test_full_logits_buffers(tiny_dense: ModelSpec) -> None:
    s = TrainSetup(batch_size=2, seq_len=8, compute_dtype="bf16", fused_loss=False)
    assert MB.logits_bytes(tiny_dense, s) == 2 * 8 * 100 * (2 + 12)
    s32 = TrainSetup(batch_size=2, seq_len=8, compute_dtype="fp32", mixed_precision=False,
                     fused_loss=False)
    assert MB.logits_bytes(tiny_dense, s32) == 2 * 8 * 100 * 16


def test_fused_loss_buffers(tiny_dense: ModelSpec) -> None:
    """Chunk of min(b·s, max(64, 2^25/V)) rows: 16 rows here; grads of h and (full) of W, whose
    16-bit buffers peak apart from the chunk's softmax (16-bit logits and their 16-bit
    softmax: C·V·4)."""
    lora = TrainSetup(method="lora", batch_size=2, seq_len=8, compute_dtype="bf16")
    assert MB.logits_bytes(tiny_dense, lora) == 16 * 100 * (2 + 2) + 16 * 64 * 2
    full = lora.model_copy(update={"method": "full"})
    # one chunk: the softmax (C·V·4) or the chunk's gradient with W's product and fp32 sum
    assert MB.logits_bytes(tiny_dense, full) == 16 * 64 * 2 + max(16 * 100 * 4,
                                                                 16 * 100 * 2 + 100 * 64 * 6)
    several = full.model_copy(update={"seq_len": 2**20})  # a later chunk sees the fp32 sum
    rows, tokens = 2**25 // 100, 2 * 2**20
    assert MB.logits_bytes(tiny_dense, several) == tokens * 64 * 2 + max(
        rows * 100 * 4 + 100 * 64 * 4, rows * 100 * 2 + 100 * 64 * 6)
    fp32 = full.model_copy(update={"compute_dtype": "fp32", "weight_bits": 32,
                                   "mixed_precision": False})
    assert MB.logits_bytes(tiny_dense, fp32) == 16 * 100 * 4 + 16 * 64 * 4 + 100 * 64 * 4
    long = lora.model_copy(update={"seq_len": 2**20})
    assert MB.fused_loss_chunk_rows(tiny_dense, long) == 2**25 // 100


def test_kv_cache_inference(tiny_dense: ModelSpec) -> None:
    s = TrainSetup(method="inference", batch_size=3, seq_len=10)
    assert MB.kv_cache_bytes(tiny_dense, s) == 3 * 10 * 2 * 2 * 16 * 2 * 2


def test_checkpointing_keeps_layer_inputs(tiny_dense: ModelSpec) -> None:
    s = TrainSetup(batch_size=2, seq_len=8, checkpointing=True)
    acts = activation_bytes(tiny_dense, s)
    assert acts["layers"] == 2 * (2 * 8 * 64 * 4)  # fp32 residual under autocast
    full = activation_bytes(tiny_dense, TrainSetup(batch_size=2, seq_len=8))
    assert acts["recompute"] == full["layers"] // 2 - 2 * 8 * 64 * 4


def test_sdpa_layer_saved_tensors_by_hand(tiny_dense: ModelSpec) -> None:
    """Pure bf16 full training, SDPA: per layer, T = 16 tokens, c = r = 2 bytes. The norm
    outputs (q/k/v and gate/up inputs) and the down_proj input are recomputed in backward, the
    o_proj input is SDPA's output."""
    s = TrainSetup(batch_size=2, seq_len=8, mixed_precision=False)
    t, h, i = 16, 64, 128
    norms = 2 * (t * h * 2 + t * 4)
    attn = t * (64 + 32 + 32) * 2 + t * 64 * 2 + 2 * 4 * 8 * 4  # q, k, v; output; logsumexp
    mlp = 2 * t * i * 2  # g and u
    assert activation_bytes(tiny_dense, s)["layers"] == 2 * (norms + attn + mlp)


def test_frozen_base_saves_less(tiny_dense: ModelSpec) -> None:
    full = activation_bytes(tiny_dense, TrainSetup(seq_len=32))["layers"]
    lora = activation_bytes(tiny_dense, TrainSetup(method="lora", seq_len=32,
                                                   lora_targets=("q_proj", "v_proj")))["layers"]
    assert lora < full


def test_unified_memory_reserve() -> None:
    cpu = load_device("xeon-platinum-8480plus")
    assert RT.os_reserve_bytes(cpu) == max(2 * 1024**3, cpu.memory_bytes // 10)
    assert RT.os_reserve_bytes(H100) == 0
    assert RT.os_reserve_bytes(load_device("m4-max")) == load_device("m4-max").memory_bytes // 4


def test_breakdown_sums_and_peak_phase(tiny_dense: ModelSpec) -> None:
    s, p = terms(tiny_dense, seq_len=64)
    mem = M.memory_breakdown(tiny_dense, s, H100, p)
    assert mem.total_bytes == sum(mem.components.values())
    assert mem.capacity_bytes == H100.memory_bytes
    assert mem.notes["peak_phase"] in ("start of backward", "optimizer step")


def test_cpu_process_baseline_terms(tiny_dense: ModelSpec) -> None:
    """CPU training: runtime = imports + tokenised corpus + model-build residue, plus the
    step's kernel caches and allocator retention; none of them on an accelerator (its
    allocator statistics do not see host memory) and no corpus for inference."""
    cpu = load_device("xeon-platinum-8480plus")
    s, p = terms(tiny_dense, seq_len=64)
    mem = M.memory_breakdown(tiny_dense, s, cpu, p).components
    assert RT.TRAINING_DATA_BYTES == 4 * 2**20 * 4  # 4 MiB corpus, 1 int32 id per byte
    assert mem["runtime_overhead"] == (RT.RUNTIME_OVERHEAD_BYTES["cpu"] + RT.TRAINING_DATA_BYTES
                                       + RT.MODEL_BUILD_RESIDUE_BYTES)
    assert mem["kernel_caches"] == RT.KERNEL_CACHE_BYTES
    assert mem["allocator_retention"] == RT.ALLOCATOR_RETENTION_BYTES + round(
        RT.GRADIENT_RETENTION_FRACTION * MS.gradient_bytes(s, p))
    gpu = M.memory_breakdown(tiny_dense, s, H100, p).components
    assert gpu["runtime_overhead"] == RT.RUNTIME_OVERHEAD_BYTES["cuda"]
    assert gpu["kernel_caches"] == gpu["allocator_retention"] == 0
    infer, p_infer = terms(tiny_dense, method="inference", seq_len=64)
    mem_infer = M.memory_breakdown(tiny_dense, infer, cpu, p_infer).components
    assert mem_infer["runtime_overhead"] == mem["runtime_overhead"] - RT.TRAINING_DATA_BYTES
    assert mem_infer["allocator_retention"] == 0


def test_expert_kernel_cache(tiny_moe: ModelSpec, tiny_dense: ModelSpec) -> None:
    """CPU, 16-bit: ⌈b·s / 32⌉ padded row counts × distinct expert linear shapes (gate/up:
    D→I, down: I→D) × 8 GEMMs when adapted, 3 when trained (full), 2 when frozen
    (attention-only LoRA), at most 1024 primitives; nothing for fp32, dense models or
    accelerators."""
    lora = {"method": "lora", "weight_bits": 16, "compute_dtype": "bf16", "batch_size": 2,
            "seq_len": 100}
    s, _ = terms(tiny_moe, **lora)
    assert RT.expert_kernel_cache_bytes(tiny_moe, s, "cpu") == 7 * 2 * 8 * RT.EXPERT_PRIMITIVE_BYTES
    big, _ = terms(tiny_moe, **{**lora, "seq_len": 4096})
    assert RT.expert_kernel_cache_bytes(tiny_moe, big, "cpu") == 1024 * RT.EXPERT_PRIMITIVE_BYTES
    full, _ = terms(tiny_moe, **{**lora, "method": "full"})
    assert (RT.expert_kernel_cache_bytes(tiny_moe, full, "cpu")
            == 7 * 2 * 3 * RT.EXPERT_PRIMITIVE_BYTES)
    attention_only, _ = terms(tiny_moe, **{**lora, "lora_targets": ("q_proj", "v_proj")})
    assert (RT.expert_kernel_cache_bytes(tiny_moe, attention_only, "cpu")
            == 7 * 2 * 2 * RT.EXPERT_PRIMITIVE_BYTES)
    fp32, _ = terms(tiny_moe, **{**lora, "compute_dtype": "fp32", "weight_bits": 32})
    assert RT.expert_kernel_cache_bytes(tiny_moe, fp32, "cpu") == 0
    assert RT.expert_kernel_cache_bytes(tiny_moe, s, "cuda") == 0
    s_dense, _ = terms(tiny_dense, **lora)
    assert RT.expert_kernel_cache_bytes(tiny_dense, s_dense, "cpu") == 0
    p = count_params(tiny_moe, s)
    cpu = load_device("xeon-platinum-8480plus")
    assert M.memory_breakdown(tiny_moe, s, cpu, p).components["expert_kernel_caches"] == (
        RT.expert_kernel_cache_bytes(tiny_moe, s, "cpu"))


def test_optimizer_in_backward_holds_one_gradient(tiny_dense: ModelSpec) -> None:
    """The optimizer step inside backward frees each gradient once applied: the gradient term is
    the largest trainable tensor's (a [128, 64] MLP weight here), the optimizer phase holds only
    it, and the heap retention scales with it instead of with every gradient."""
    plain, p = terms(tiny_dense, seq_len=8)
    inside, _ = terms(tiny_dense, seq_len=8, optimizer_in_backward=True)
    assert MS.largest_trainable_tensor(tiny_dense, inside, p) == 128 * 64
    assert MS.backward_step_gradient_bytes(tiny_dense, inside, p) == 128 * 64 * 4
    cpu = load_device("xeon-platinum-8480plus")
    state = M.model_state_terms(tiny_dense, inside, cpu, p)
    assert state["gradients"] == 128 * 64 * 4
    before = M.memory_breakdown(tiny_dense, plain, cpu, p)
    after = M.memory_breakdown(tiny_dense, inside, cpu, p)
    assert before.notes["peak_phase"] == "optimizer step"  # seq 8: the gradients set the peak
    assert after.components["allocator_retention"] == RT.ALLOCATOR_RETENTION_BYTES + round(
        RT.GRADIENT_RETENTION_FRACTION * 128 * 64 * 4)
    assert after.total_bytes < before.total_bytes
    # on an accelerator the foreach AdamW list covers the one tensor each step sees
    assert MS.optimizer_transient_bytes(tiny_dense, plain, H100, p) == 4 * p.trainable
    assert MS.optimizer_transient_bytes(tiny_dense, inside, H100, p) == 128 * 64 * 4


def test_bf16_base_under_fp32_compute(tiny_dense: ModelSpec) -> None:
    """`--bits 16 --dtype fp32` LoRA in the bundled trainer: the base at 2 B per parameter (as
    stored, executor/lora.upcast_frozen_base), the widest upcast copy (the larger of lm_head and
    a block linear, in fp32), and the upcast passes in the step's ops; a 32-bit base keeps 4 B
    and neither term. Other frameworks build the model in fp32 for the same flags."""
    from estimator.analytic import loss_optim as SO

    s16, p = terms(tiny_dense, method="lora", weight_bits=16, compute_dtype="fp32")
    s32, _ = terms(tiny_dense, method="lora", weight_bits=32, compute_dtype="fp32")
    assert s16.upcasts_frozen_base and not s32.upcasts_frozen_base
    assert MS.weight_bytes(tiny_dense, s16, p)["weights"] == 2 * p.total
    assert MS.weight_bytes(tiny_dense, s32, p)["weights"] == 4 * p.total
    assert MB.dequant_transient_bytes(tiny_dense, s16) == 4 * 64 * 128  # FFN > lm_head here
    assert MB.dequant_transient_bytes(tiny_dense, s32) == 0
    block = MS.quantized_linear_params(tiny_dense)[0]
    ops = {op.name: op for op in SO.upcast_ops(tiny_dense, s16, block)}
    base, head = ops["upcast.base"], ops["upcast.lm_head"]
    assert base.bytes_per_call * base.num_calls == pytest.approx(block * 6 * 2)  # fwd + bwd
    assert head.bytes_per_call * head.num_calls == 100 * 64 * 6  # once, fused loss
    assert SO.upcast_ops(tiny_dense, s32, block) == []
    torchtune = s16.model_copy(update={"framework": "torchtune"})
    assert SO.upcast_ops(tiny_dense, torchtune, block) == []
