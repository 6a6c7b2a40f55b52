"""The memory-bound block term (flops.elementwise_ops) built from the measured bytes table."""

import itertools

import pytest

from estimator.analytic import elementwise as EW
from estimator.analytic import flops as F
from estimator.analytic import loss_optim as SO
from estimator.specs import ModelSpec, MoESpec
from estimator.specs import TrainSetup as AnySetup


def TrainSetup(**fields) -> AnySetup:
    """The bundled trainer's setup: these tests check its terms (framework 'nvfree')."""
    return AnySetup(framework="nvfree", **fields)

SPEC = ModelSpec(name="t", num_layers=4, hidden_size=576, intermediate_size=1536, num_heads=9,
                 num_kv_heads=3, head_dim=64, vocab_size=49152, max_seq_len=2048)


def _bytes(ops: list[F.Op], prefix: str = "elementwise") -> float:
    return sum(op.bytes_moved for op in ops if op.name == prefix)


def test_bytes_are_the_table_times_tokens_and_layers():
    setup = TrainSetup(method="lora", compute_dtype="bf16", batch_size=2, seq_len=256)
    table = EW.MEMORY_BOUND_BYTES["lora", "mixed"]
    rank_sum = setup.lora_rank * 7
    per_token = sum(table[p].per_token(SPEC, SPEC.intermediate_size, rank_sum)
                    for p in ("forward", "backward"))
    ops = EW.elementwise_ops(SPEC, setup)
    assert _bytes(ops) == pytest.approx(per_token * 512 * SPEC.num_layers)
    assert sum(op.num_calls for op in ops) == (table["forward"].calls
                                               + table["backward"].calls) * SPEC.num_layers


def test_checkpointing_adds_the_recompute_pass():
    setup = TrainSetup(method="full", compute_dtype="bf16")
    plain = _bytes(EW.elementwise_ops(SPEC, setup))
    ckpt = _bytes(EW.elementwise_ops(SPEC, setup.model_copy(update={"checkpointing": True})))
    recompute = EW.block_token_bytes(setup)["recompute"].per_token(SPEC, 1536, 0)
    assert ckpt - plain == pytest.approx(recompute * setup.tokens_per_micro_batch * 4)
    assert recompute >= EW.block_token_bytes(setup)["forward"].per_token(SPEC, 1536, 0) * 0.5


@pytest.mark.parametrize(("method", "dtype", "mixed", "ckpt"), list(itertools.product(
    ("full", "lora", "qlora", "inference"), ("fp32", "bf16", "fp16"), (True, False),
    (True, False))))
def test_every_regime_has_positive_bytes(method, dtype, mixed, ckpt):
    bits = {"qlora": 4, "inference": 16}.get(method, 32 if dtype == "fp32" else 16)
    setup = TrainSetup(method=method, compute_dtype=dtype, mixed_precision=mixed,
                       weight_bits=bits, checkpointing=ckpt)
    ops = EW.elementwise_ops(SPEC, setup)
    assert ops and all(op.bytes_per_call > 0 and op.num_calls > 0 for op in ops)


def test_moe_layers_add_routing_bytes():
    moe = SPEC.model_copy(update={"moe": MoESpec(num_experts=8, num_experts_per_token=2,
                                                 expert_intermediate_size=768)})
    setup = TrainSetup(method="lora", compute_dtype="bf16")
    ops = EW.elementwise_ops(moe, setup)
    routing = _bytes(ops, "moe.routing")
    per_hk, per_h, _ = EW.MOE_ROUTING_BYTES["forward"]
    per_hk_b, per_h_b, _ = EW.MOE_ROUTING_BYTES["backward"]
    tokens = setup.tokens_per_micro_batch
    expected = ((per_hk + per_hk_b) * 576 * 2 + (per_h + per_h_b) * 576) * 4 * tokens
    assert routing == pytest.approx(expected)


def test_padded_expert_rows(tiny_moe: ModelSpec) -> None:
    """With pad_experts every routed GEMM covers b·s·k/E + (32 − 1)/2 rows per expert call
    (memory.pads_expert_rows); dense and attention GEMMs are unchanged."""
    from estimator.analytic.flops import block_linear_ops

    setup = TrainSetup(method="lora", weight_bits=16, compute_dtype="bf16", batch_size=2,
                       seq_len=64)
    plain = block_linear_ops(tiny_moe, setup)
    padded = block_linear_ops(tiny_moe, setup, pad_experts=True)
    rows = 2 * 64 * 2 / 4
    ratios = {round(b.flops / a.flops, 6) for a, b in zip(plain, padded, strict=True)}
    assert ratios == {1.0, round((rows + 15.5) / rows, 6)}


def test_padded_expert_rows_add_their_memory_bound_bytes(tiny_moe: ModelSpec) -> None:
    """Each padded row costs a routed row's routing bytes and expert-MLP elementwise bytes."""
    setup = TrainSetup(method="lora", weight_bits=16, compute_dtype="bf16", batch_size=2,
                       seq_len=64)
    plain = EW.moe_routing_ops(tiny_moe, setup)
    padded = EW.moe_routing_ops(tiny_moe, setup, pad_experts=True)
    table = EW.block_token_bytes(setup)
    pad_rows = tiny_moe.moe.num_experts * 15.5
    for phase, a, b in zip(("forward", "backward"), plain, padded, strict=True):
        per_hk = EW.MOE_ROUTING_BYTES[phase][0]
        per_row = (per_hk * tiny_moe.hidden_size
                   + table[phase].ffn * tiny_moe.moe.expert_intermediate_size)
        assert b.bytes_moved - a.bytes_moved == pytest.approx(
            pad_rows * per_row * tiny_moe.num_moe_layers)


def test_kernel_only_elementwise_curve_leaves_its_calls_dispatch_to_the_framework_term():
    """A curve with no per-call overhead (timed on the kernel alone) does not carry the calls'
    Python/autograd cost: those calls stay in the dispatch.autograd count."""
    from estimator.analytic.params import count_params
    from estimator.analytic.throughput import timed_ops
    from estimator.catalog import load_device
    from estimator.specs import CalibrationProfile, EfficiencyCurve

    def profile(overhead: float) -> CalibrationProfile:
        curve = EfficiencyCurve(op_class="elementwise.bf16", unit="bytes", log10_work=(4.0,),
                                rates=(1e10,), overhead_seconds=overhead)
        return CalibrationProfile(
            fingerprint="t", torch_version="x", num_threads=2, backend="cpu", device_name="t",
            created_at="2026-01-01T00:00:00Z", preferred_dtype="bf16",
            curves={"elementwise.bf16": curve})

    setup = TrainSetup(method="lora", compute_dtype="bf16", batch_size=2, seq_len=64)
    cpu = load_device("xeon-platinum-8480plus")
    params = count_params(SPEC, setup)

    def dispatch_calls(prof: CalibrationProfile) -> float:
        ops = timed_ops(SPEC, setup, params, cpu, prof)
        return sum(o.num_calls for o in ops if o.op_class == "dispatch.autograd")

    elementwise = sum(o.num_calls for o in timed_ops(SPEC, setup, params, cpu, profile(0.0))
                      if o.op_class == "elementwise")
    assert dispatch_calls(profile(0.0)) - dispatch_calls(profile(1e-6)) == elementwise > 0


def test_loss_head_fresh_pages_count_every_buffer_above_the_mmap_ceiling():
    """Every loss-head buffer over glibc's 32 MiB mmap ceiling is fresh pages: per chunk the
    [C, V] logits, in 16 bits also their 16-bit softmax (the gradient); under autocast the
    16-bit copy of an fp32 lm_head weight; a full fine-tune's V·D lm_head products, fp32 sum
    and cast back, and with tied embeddings the embedding's gradient, but not the gradient
    the optimizer reads (fresh_gradient_op's). Small vocabularies stay under the ceiling
    (nothing); the bytes scale with the tokens."""
    model = ModelSpec(name="m", num_layers=2, hidden_size=576, intermediate_size=1536,
                      num_heads=9, num_kv_heads=3, head_dim=64, vocab_size=49152,
                      max_seq_len=4096)

    def fresh(spec: ModelSpec = model, **kw) -> float:
        setup = TrainSetup(**{"method": "lora", "compute_dtype": "bf16", "batch_size": 2,
                              "seq_len": 256, **kw})
        return sum(op.bytes_per_call * op.num_calls for op in SO.loss_head_fresh_ops(spec, setup))

    logits, head = 512 * 49152, 49152 * 576  # one chunk of 512 rows
    assert fresh() == logits * (2 + 2)
    assert fresh(compute_dtype="fp32", weight_bits=32) == logits * 4
    assert fresh(fused_loss=False) == logits * (2 + 4 + 2 + 3 * 4)
    # the weight's 16-bit copy and the products; the fp32 sum is the gradient:
    assert fresh(method="full") == logits * 4 + head * (2 + 2)
    assert fresh(method="full", compute_dtype="fp32", weight_bits=32) == logits * 4
    assert fresh(method="full", mixed_precision=False) == logits * 4 + head * (2 + 4)
    tied = model.model_copy(update={"tied_embeddings": True})
    assert fresh(tied, method="full") == logits * 4 + head * (2 + 2 + 4 + 4)
    assert fresh(seq_len=1024) == pytest.approx(4 * fresh())  # 3 chunks of 682 rows, by tokens
    small = model.model_copy(update={"vocab_size": 8192})
    assert SO.loss_head_fresh_ops(small, TrainSetup(method="lora", compute_dtype="bf16",
                                                   batch_size=2, seq_len=256)) == []
    assert fresh(method="inference") == 0


def test_cross_entropy_and_lm_head_gradient_bytes_as_recorded():
    """The cross-entropy's passes (fused: 5 × 4 B per logit in fp32, one 16-bit softmax, 2 ×
    2 B, in bf16; full logits: three passes plus two (c + 4)-byte casts in 16 bits), and a full
    fine-tune's lm_head/embedding gradient work: the later chunks' adds into the fp32 sum, the
    embedding's gradient and the tied sum (bytes of the V = 151,936 records)."""
    model = ModelSpec(name="m", num_layers=2, hidden_size=256, intermediate_size=704,
                      num_heads=4, num_kv_heads=2, head_dim=64, vocab_size=151936,
                      max_seq_len=4096, tied_embeddings=True)
    setup = TrainSetup(method="full", compute_dtype="bf16", batch_size=2, seq_len=256)
    ops = {op.name: op for op in [*SO.head_ops(model, setup), *SO.lm_head_grad_ops(model, setup)]}
    logits, vd = 512 * 151936, 151936 * 256
    assert ops["cross_entropy"].bytes_moved == pytest.approx(311.2e6, rel=1e-3)  # _softmax
    assert "cross_entropy.casts" not in ops
    unfused = setup.model_copy(update={"fused_loss": False})
    casts = [op for op in SO.head_ops(model, unfused) if op.name == "cross_entropy.casts"]
    assert casts[0].bytes_moved == pytest.approx(933.5e6, rel=1e-3)
    fp32 = TrainSetup(method="full", compute_dtype="fp32", weight_bits=32, batch_size=2,
                      seq_len=256)
    ce = [op for op in SO.head_ops(model, fp32) if op.name == "cross_entropy"]
    assert ce[0].bytes_moved == 5 * 4 * logits
    assert ops["lm_head.grad_accumulate"].bytes_moved == pytest.approx((512 / 220 - 1) * 6 * vd)
    assert ops["embedding.grad"].bytes_moved == pytest.approx(156.1e6, rel=1e-3)
    assert ops["embedding.tied_sum"].bytes_moved == pytest.approx(466.7e6, rel=1e-3)
    assert {op.name for op in SO.lm_head_grad_ops(model, fp32)} == {"embedding.grad",
                                                                  "embedding.tied_sum"}
    assert SO.lm_head_grad_ops(model, TrainSetup(method="lora", compute_dtype="bf16")) == []


def test_cpu_gradients_are_one_fresh_region_per_micro_batch():
    """On a CPU the trainer's loss-head trim returns the freed gradients' pages: gradients.alloc
    becomes grad_accum calls of all the gradient bytes (same total bytes)."""
    setup = TrainSetup(method="full", compute_dtype="bf16", grad_accum=3)
    per_tensor = SO.gradient_alloc_ops(setup, 3_000_000, 100)[0]
    fresh = SO.fresh_gradient_op(per_tensor, setup)
    assert (fresh.num_calls, fresh.bytes_per_call) == (3, 3_000_000)
    assert fresh.bytes_moved == per_tensor.bytes_moved
