"""torchtune under torch.compile: what inductor's compiled layers and loss keep.

torchtune's `compile: True` (training/_compile.py at 1814feb17) compiles every
TransformerSelfAttentionLayer (`layer.compile()`) and, for CEWithChunkedOutputLoss, its
`compute_cross_entropy`. AOTAutograd's min-cut partitioner then decides what the forward keeps
for backward (matmul outputs kept, pointwise ops recomputed). Recorded with torch 2.13 and
inductor on CPU (tests/torch/test_torchtune_terms.py); the published tables ran torch 2.5, whose
partitioner may choose differently.
"""

import math

from estimator.analytic.frameworks.targets import ATTENTION_NAMES, MLP_NAMES, adapted
from estimator.analytic.params import layer_groups
from estimator.specs import ModelSpec, TrainSetup

FP32_BYTES = 4
LOSS_CHUNKS = 8


def compiled_layer_saved_bytes(model: ModelSpec, setup: TrainSetup, *,
                               first: bool = False) -> float:
    """One layer under torch.compile (training/_compile.py: `layer.compile()` per
    TransformerSelfAttentionLayer; inductor's min-cut partitioner keeps matmul outputs and
    recomputes pointwise ops), recorded with torch 2.13 on CPU: each norm keeps its c-byte
    input and fp32 rstd (the upcast is recomputed) and its output when a linear needs it;
    SDPA keeps what it keeps eagerly; RoPE keeps nothing (the packed positions, once); the MLP
    keeps w1(x) and w3(x), and the product only for a trained or adapted w2; a dropout keeps
    a 1-byte mask; an NF4 linear (QLoRA) keeps its weight dequantised to `dtype` when its
    input needs a gradient (dequantised_weight_bytes)."""
    from estimator.analytic.frameworks import torchtune as tt

    tokens = setup.batch_size * setup.seq_len
    c, h, ada = tt.dtype_bytes(setup), model.hidden_size, adapted(setup)
    heads, d = model.num_heads, model.head_dim
    full = setup.method == "full"
    input_grad = not (first and not full)
    mlp_grad = input_grad or bool(ada & ATTENTION_NAMES)
    total = (tokens * (h * c + FP32_BYTES)) * (input_grad + mlp_grad)
    total += dequantised_weight_bytes(model, setup, input_grad, mlp_grad)
    reads = {"mask_bytes": 1}
    total += tt.linear_inputs_bytes(setup, ["q_proj", "k_proj", "v_proj"], h, tokens,
                                 input_grad=input_grad, **reads)
    sdpa = input_grad or full or bool(ada & {"q_proj", "k_proj", "v_proj"})
    if sdpa:
        total += tokens * heads * d * c * 4 + setup.batch_size * heads * setup.seq_len * 4
    total += tt.linear_inputs_bytes(setup, ["o_proj"], heads * d, tokens, kept=sdpa, **reads)
    gated = model.mlp != "gelu"
    first_mlp = ["gate_proj", "up_proj"] if gated else ["up_proj"]
    total += tt.linear_inputs_bytes(setup, first_mlp, h, tokens, input_grad=mlp_grad, **reads)
    if mlp_grad or full or bool(ada & set(first_mlp)):
        total += (2 if gated else 1) * tokens * model.intermediate_size * c
        total += tt.linear_inputs_bytes(setup, ["down_proj"], model.intermediate_size, tokens,
                                     **reads)
    return total


def compiled_backward_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """A compiled layer's backward kernel holds its MLP gradients ([T, I] each: ∂product,
    ∂w1(x), ∂w3(x)) while its saved tensors are still alive: 3·T·I·c when the MLP trains or
    carries adapters, one (∂product) when it is frozen. Recorded with torch 2.13 on CPU
    (inductor's buffer reuse: 3.1–3.5 and 1.1 T·I·c measured); it matters with checkpointing,
    where one recomputed layer is the peak's other part. QLoRA: by then inductor has freed
    two of the layer's dequantised MLP weights (2·I·h·c fewer; recorded at T = 128 and 512)."""
    from estimator.analytic.frameworks import torchtune as tt

    if not setup.compile:
        return 0
    mlp = setup.method == "full" or bool(adapted(setup) & MLP_NAMES)
    c, width = tt.dtype_bytes(setup), model.intermediate_size
    grads = (3 if mlp else 1) * setup.batch_size * setup.seq_len * width * c
    return grads - (2 * width * model.hidden_size * c if setup.method == "qlora" else 0)


def dequantised_weight_bytes(model: ModelSpec, setup: TrainSetup, input_grad: bool,
                             mlp_grad: bool) -> float:
    """Compiled QLoRA: the partitioner keeps the c-byte dequantised weight of each NF4 linear
    whose input needs a gradient (q/k/v when the block input does; output_proj, w1/w3 when the
    MLP input does, w2 then too), recorded with torch 2.13 on CPU."""
    from estimator.analytic.frameworks import torchtune as tt

    if setup.method != "qlora":
        return 0.0
    needs = {"q_proj": input_grad, "k_proj": input_grad, "v_proj": input_grad,
             "o_proj": True, "gate_proj": mlp_grad, "up_proj": mlp_grad, "down_proj": True}
    return sum(i * o for name, i, o, _ in layer_linears(model) if needs[name]) * tt.dtype_bytes(
        setup)


def layer_linears(model: ModelSpec) -> list[tuple[str, int, int, float]]:
    """(name, in, out, count) of one dense layer's linears."""
    linears, _ = layer_groups(model, routed_all=True)[0]
    return [(lin.name, lin.in_features, lin.out_features, lin.count) for lin in linears]


def compiled_loss_bytes(model: ModelSpec, setup: TrainSetup) -> int:
    """Compiled `compute_cross_entropy` (inductor): the chunk's fp32 upcast and log-softmax are
    fused into reductions; the compiled function keeps its c-byte input chunk and per-row
    statistics for backward, so the listed chunks (c·N) are what stays, and backward forms
    each chunk's c-byte gradient in one kernel: c·N + c·N/C."""
    from estimator.analytic.frameworks import torchtune as tt

    n = setup.batch_size * setup.seq_len * model.vocab_size
    c = tt.dtype_bytes(setup)
    return math.ceil(n * c * (1 + 1 / LOSS_CHUNKS))
