"""The memory-bound ops of the blocks: norms, activations, residuals, RoPE and the MoE router,
counted in bytes read + written per token (measured per precision regime and pass), and the MoE
routing's gathers and scatters. The GEMMs are flops.py; the ops outside the blocks loss_optim.py."""

from dataclasses import dataclass

from estimator.analytic.activations import padded_expert_rows
from estimator.analytic.dispatch import ATTENTION_TARGETS, MLP_TARGETS
from estimator.analytic.flops import Op
from estimator.analytic.frameworks import hf
from estimator.specs import ModelSpec, TrainSetup


@dataclass(frozen=True)
class TokenBytes:
    """Memory-bound bytes per token of one block pass (every non-GEMM, non-attention, non-view
    aten call): hidden·h + ffn·i + q·H·d + kv·K·d + rank·r·(adapted linears), in `calls`
    kernel calls. Coefficients in bytes per unit of each dimension (dtypes fixed by the
    regime)."""

    hidden: float
    ffn: float
    q: float
    kv: float
    rank: float
    calls: int

    def per_token(self, model: ModelSpec, width: float, rank_sum: float) -> float:
        """Bytes per token of one block for the model's dimensions (bytes)."""
        return (self.hidden * model.hidden_size + self.ffn * width
                + self.q * model.num_heads * model.head_dim
                + self.kv * model.num_kv_heads * model.head_dim + self.rank * rank_sum)


MEMORY_BOUND_BYTES: dict[tuple[str, str], dict[str, TokenBytes]] = {
    ("lora", "mixed"): {
        "forward": TokenBytes(96.2, 10.1, 18.1, 18.2, 0.2, 63),
        "backward": TokenBytes(216.1, 28.1, 26.1, 20.1, 0.1, 75),
        "recompute": TokenBytes(90.2, 10.1, 18.1, 18.2, 0.2, 62),
    },
    ("qlora", "mixed"): {
        "forward": TokenBytes(96.2, 10.1, 18.1, 18.2, 0.2, 126),
        "backward": TokenBytes(216.1, 28.1, 26.1, 20.1, 0.1, 138),
        "recompute": TokenBytes(90.2, 10.1, 18.1, 18.2, 0.2, 125),
    },
    ("full", "mixed"): {
        "forward": TokenBytes(96.2, 18.1, 22.1, 26.2, 0.0, 52),
        "backward": TokenBytes(262.2, 28.1, 20.1, 20.2, 0.0, 61),
        "recompute": TokenBytes(86.2, 18.1, 22.1, 26.2, 0.0, 51),
    },
    ("full", "fp32"): {
        "forward": TokenBytes(96.2, 36.1, 44.1, 52.2, 0.0, 39),
        "backward": TokenBytes(244.2, 56.1, 40.1, 40.2, 0.0, 48),
        "recompute": TokenBytes(84.2, 36.1, 44.1, 52.2, 0.0, 38),
    },
    ("lora", "fp32"): {
        "forward": TokenBytes(80.2, 20.1, 36.1, 36.2, 0.2, 39),
        "backward": TokenBytes(240.1, 56.1, 52.1, 40.1, 0.1, 53),
    },
    ("full", "pure"): {
        "forward": TokenBytes(104.2, 18.1, 22.1, 26.2, 0.0, 49),
        "backward": TokenBytes(266.2, 28.1, 20.1, 20.2, 0.0, 62),
    },
    ("lora", "pure"): {
        "forward": TokenBytes(96.2, 10.1, 18.1, 18.2, 0.2, 49),
        "backward": TokenBytes(216.1, 28.1, 26.1, 20.1, 0.1, 61),
    },
}
"""Per (method, precision) — method 'full' | 'lora' | 'qlora', precision 'fp32' | 'mixed'
(16-bit autocast over fp32 weights) | 'pure' (16-bit weights) — the bytes per token of a
block's 'forward', 'backward' and checkpoint 'recompute' (the extra backward-phase bytes of a
checkpointed block: the recomputed forward plus the non-reentrant machinery).

Measured (benchmarks/record_block_bytes.py; torch 2.13 CPU, the executor's Llama block, RMSNorm
composition, rope, SDPA, SwiGLU, LoRA on all 7 linears): a TorchDispatchMode sums the bytes
every aten call reads + writes (calibrate.benches.record_op_bytes); per block = the difference
of 2- and 1-block models, per token = the difference of 64- and 32-token micro-batches (so
weight-sized ops — autocast weight casts, NF4 dequantisation, gradient accumulation — drop out:
cast_ops, adapter_cast_ops and dequant_ops charge those); coefficients = least squares over
5–6 shapes varying h, i, H, K and r (residual ≤ 0.1 %). tests/torch/test_block_bytes.py checks
them against a fresh recording on 2 shapes. The recompute of a checkpointed block records as the
forward's bytes less 6–20 B per unit of h (the non-reentrant machinery moves no activation-sized
data of its own); regimes without a recorded recompute use their forward. The adapters' own
in/out-sized bytes are folded into the h, i, H·d, K·d coefficients (recorded with all seven
linears adapted), so fewer targets are slightly over-charged."""


COMPILED_BACKENDS = ("xla", "neuron", "hpu")
"""Device backends (data/devices.toml `backend`) whose training stack compiles the step graph
and fuses its elementwise work (data/software.toml families): TPU — JAX/MaxText and
PyTorch/XLA; Trainium — torch-neuronx, PyTorch/XLA lowered by the Neuron compiler; Gaudi —
PyTorch lazy mode, whose ops are accumulated into graphs for the Gaudi graph compiler."""


def fuses_elementwise(backend: str) -> bool:
    """Whether the backend's stack fuses elementwise/norm/activation work (COMPILED_BACKENDS)."""
    return backend in COMPILED_BACKENDS


def fused_token_bytes(setup: TrainSetup) -> dict[str, TokenBytes]:
    """Bytes per token of a block's memory-bound work when a compiler fuses it (XLA's
    operator fusion: "Fusion is XLA's single most important optimization ... removing memory
    operations", openxla.org/xla and the TensorFlow XLA overview; the same for the Neuron
    compiler, which lowers PyTorch/XLA HLO, and the Gaudi graph compiler). A fused region
    reads its inputs from memory once and writes its outputs once; the intermediates between
    its ops stay on chip. A block's forward has four such regions between the GEMMs and the
    attention kernel:

    - residual add + RMSNorm, before attention and before the MLP: read the residual r·h and
      the branch output c·h, write the new residual r·h and the normed c·h: 2(r + c)·h each;
    - RoPE of q and k: read and write (H + K)·d·c;
    - SwiGLU: read gate and up 2·i·c, write i·c.

    c = bytes of the compute dtype; r = bytes of the residual stream (4 under mixed
    precision, where the fp32 residual stays fp32, else c). Backward: each region's gradient
    reads its saved inputs and output gradients and writes its input gradients, twice the
    forward's tensors; checkpoint recompute = the forward. 4 kernels per block forward, 8
    backward. LoRA's scaling and add fuse into the adapted GEMM's output (0 bytes). Nothing
    here is fitted to a published run."""
    c = 4.0 if setup.compute_dtype == "fp32" else 2.0
    r = 4.0 if setup.mixed_precision or setup.compute_dtype == "fp32" else c
    forward = TokenBytes(hidden=4 * (r + c), ffn=3 * c, q=2 * c, kv=2 * c, rank=0.0, calls=4)
    backward = TokenBytes(hidden=8 * (r + c), ffn=6 * c, q=4 * c, kv=4 * c, rank=0.0, calls=8)
    return {"forward": forward, "backward": backward, "recompute": forward}


def precision_regime(setup: TrainSetup) -> str:
    """'fp32', 'mixed' (16-bit compute over fp32 weights: autocast) or 'pure' (16-bit
    weights)."""
    if setup.compute_dtype == "fp32":
        return "fp32"
    return "mixed" if setup.mixed_precision else "pure"


HF_TOKEN_BYTES: dict[tuple[str, str], dict[str, TokenBytes]] = {
    key: {phase: TokenBytes(*row) for phase, row in passes.items()}
    for key, passes in hf.HF_BLOCK_BYTES.items()}
"""frameworks/hf.HF_BLOCK_BYTES as TokenBytes (built once: the planner asks per candidate)."""


def recorded_tables(setup: TrainSetup) -> dict[tuple[str, str], dict[str, TokenBytes]]:
    """The recorded per-layer tables of the framework the setup describes: HF Transformers +
    PEFT + bitsandbytes (HF_TOKEN_BYTES, recorded on their code), else the bundled trainer's
    (MEMORY_BOUND_BYTES; torchtune and LitGPT are not recorded and use it)."""
    return HF_TOKEN_BYTES if setup.framework == "hf" else MEMORY_BOUND_BYTES


def block_token_bytes(setup: TrainSetup) -> dict[str, TokenBytes]:
    """The measured coefficients for the setup (recorded_tables); a regime not measured
    falls back to the nearest measured one (QLoRA → LoRA of the same precision; pure ↔ mixed
    of the same method; recompute → the regime's forward plus the mixed recompute extra)."""
    method = "full" if setup.method in ("full", "inference") else setup.method
    precision = precision_regime(setup)
    tables = recorded_tables(setup)
    for key in ((method, precision), ("lora" if method == "qlora" else method, precision),
                (method, "mixed" if precision == "pure" else precision),
                ("full", precision), ("lora", "mixed")):
        if key in tables:
            table = tables[key]
            break
    else:  # pragma: no cover - the table always has ('lora', 'mixed')
        raise KeyError((method, precision))
    if "recompute" not in table:
        table = {**table, "recompute": table["forward"]}
    return table


def mlp_width(model: ModelSpec) -> float:
    """Activated MLP width per token (count): the dense intermediate size, or for MoE the
    routed experts' width times experts per token plus the shared experts'."""
    if model.moe is None:
        return model.intermediate_size
    moe = model.moe
    return moe.expert_intermediate_size * moe.routed_experts_per_token + (
        moe.num_shared_experts * (moe.shared_expert_intermediate_size
                                  or moe.expert_intermediate_size))


def block_passes(setup: TrainSetup) -> list[str]:
    """The passes a block's memory-bound work runs in: 'forward'; training adds 'backward' and,
    with checkpointing, the 'recompute' of the forward."""
    if setup.method == "inference":
        return ["forward"]
    return ["forward", "backward", *(["recompute"] if setup.checkpointing else [])]


def elementwise_ops(model: ModelSpec, setup: TrainSetup, *, pad_experts: bool = False,
                    fused: bool = False) -> list[Op]:
    """Memory-bound kernels of the blocks (norms, rope, SwiGLU, residuals, autocast casts of
    activations, LoRA scaling, their gradients): bytes per token per block and pass from
    MEMORY_BOUND_BYTES (measured on the executor, eager PyTorch), over `calls` kernels per
    block and pass, or from fused_token_bytes under a compiling stack (`fused`,
    fuses_elementwise; op 'elementwise.fused'); checkpointing adds the recompute pass; MoE
    routing and padded expert rows in moe_routing_ops."""
    tokens = setup.tokens_per_micro_batch
    table = fused_token_bytes(setup) if fused else block_token_bytes(setup)
    name = "elementwise.fused" if fused else "elementwise"
    rank_sum = 0.0
    if setup.trains_adapters:
        rank_sum = setup.lora_rank * len(set(setup.lora_targets)
                                         & set(ATTENTION_TARGETS + MLP_TARGETS))
    ops = []
    for phase in block_passes(setup):
        coef = table[phase]
        dense = [(model.intermediate_size, model.num_layers - model.num_moe_layers)]
        if model.moe is not None and model.num_moe_layers:
            dense.append((mlp_width(model), model.num_moe_layers))
        for width, num_layers in dense:
            if num_layers <= 0:
                continue
            total = tokens * coef.per_token(model, width, rank_sum) * num_layers
            calls = max(1, coef.calls) * num_layers
            ops.append(Op(name, "elementwise", 0, total / calls, calls))
    return ops + moe_routing_ops(model, setup, pad_experts=pad_experts)


MOE_ROUTING_BYTES: dict[str, tuple[float, float, int]] = {
    "forward": (13.3, 13.9, 48),
    "backward": (42.3, -10.3, 69),
}
"""Routing, gather and scatter of an MoE layer beyond a dense block of the activated width
(router softmax, top-k, argsort, index_select of the routed copies, the weighting multiply,
index_add back, and their gradients): (bytes per token per unit of h·k, per unit of h, extra
calls per layer), k = experts per token. Measured like MEMORY_BOUND_BYTES on the executor's MoE
block (LoRA, bf16 autocast; benchmarks/record_block_bytes.py --moe): the recording minus the
dense coefficients at width k·i_expert, with whole expert groups (padding is its own term),
fitted over 5 shapes (h 64/96, i_expert 32/48, 4/8 experts, k 1/2); extra calls = the fewest
recorded. Residual up to 25 % of this term (≤ 4 % of the block), because which experts a
random router hits changes with the batch. The full fine-tune's recording (7.3·h·k + 0.0·h
forward, 31·h·k + 26·h backward) is within that spread, so one set serves all methods.
Re-recorded 2026-11-28 with `_NormLinears` / `_SwiGLUDown` (the per-h backward term is the
remainder after the dense block's coefficients, which moved; it came out negative)."""


def moe_routing_ops(model: ModelSpec, setup: TrainSetup, *, pad_experts: bool = False
                    ) -> list[Op]:
    """MoE routing/gather/scatter bytes per MoE layer and pass (MOE_ROUTING_BYTES); the
    recompute of a checkpointed block repeats the forward's. `pad_experts`
    (memory.pads_expert_rows): each expert's group gains (granule − 1) / 2 rows on average,
    each costing what a routed row costs: its share of the expert MLP's memory-bound bytes
    (the block table's ffn coefficient × the expert width) and of the routing (per h·k)."""
    if model.moe is None or not model.num_moe_layers:
        return []
    k = model.moe.routed_experts_per_token
    tokens = setup.tokens_per_micro_batch
    pad_rows = padded_expert_rows(model) if pad_experts else 0.0
    table = block_token_bytes(setup) if pad_experts else {}
    ops = []
    for phase in block_passes(setup):
        per_hk, per_h, calls = MOE_ROUTING_BYTES["forward" if phase == "recompute" else phase]
        per_token = per_hk * model.hidden_size * k + per_h * model.hidden_size
        per_layer = per_token * tokens
        if pad_rows:
            per_row = (per_hk * model.hidden_size
                       + table[phase].ffn * model.moe.expert_intermediate_size)
            per_layer += pad_rows * per_row
        num_calls = calls * model.num_moe_layers
        ops.append(Op("moe.routing", "elementwise", 0,
                      per_layer * model.num_moe_layers / num_calls, num_calls))
    return ops
