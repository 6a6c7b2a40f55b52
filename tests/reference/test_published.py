"""Reference tests: published numbers and formulas, each citing its source in the test id."""

import pytest

from estimator.analytic import model_state as MS
from estimator.analytic.activations import activation_bytes, korthikanti_layer_bytes
from estimator.analytic.flops import model_flops_per_token
from estimator.analytic.params import count_params
from estimator.analytic.precision import nf4_bits_per_param
from estimator.catalog import load_model
from estimator.specs import ModelSpec
from estimator.specs import TrainSetup as AnySetup


def TrainSetup(**fields) -> AnySetup:
    """The bundled trainer's setup: these tests check its terms (framework 'nvfree')."""
    return AnySetup(framework="nvfree", **fields)


def gpt_layer(hidden: int, heads: int) -> ModelSpec:
    return ModelSpec(name="gpt", num_layers=1, hidden_size=hidden, intermediate_size=4 * hidden,
                     num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
                     vocab_size=8, mlp="gelu", norm="layernorm", position="learned",
                     linear_bias=True, max_seq_len=2048)


@pytest.mark.parametrize("s,b,h,a", [(2048, 1, 12288, 96), (2048, 4, 4096, 32), (512, 8, 768, 12)],
                         ids=["gpt3-175b", "gpt-7b-ish", "gpt2-small"])
def test_korthikanti_2022_eq2_without_dropout(s: int, b: int, h: int, a: int) -> None:
    """Korthikanti et al. 2022 eq. 2: sbh(34 + 5as/h) for fp16 GPT layers with dropout and
    fp16 softmax. Removing dropout (two sbh masks, the as²b mask and the 2as²b dropout output)
    leaves 32·sbh + 2·as²b; our eager model keeps HF's fp32 softmax (+4·as²b) and the fp32
    LayerNorm statistics (2 × 2 × 4·sb)."""
    assert korthikanti_layer_bytes(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
    setup = TrainSetup(batch_size=b, seq_len=s, compute_dtype="fp16", mixed_precision=False,
                       attention="eager")
    ours = activation_bytes(gpt_layer(h, a), setup)["layers"]
    expected = 32 * s * b * h + (2 + 4) * a * s * s * b + 2 * 2 * 4 * s * b
    dropout = 2 * s * b * h + 3 * a * s * s * b
    assert ours == expected
    assert korthikanti_layer_bytes(s, b, h, a) - dropout + 4 * a * s * s * b + 16 * s * b == ours


def test_mixed_precision_adamw_16_to_18_bytes_per_param() -> None:
    """ZeRO (Rajbhandari et al. 2020) §3: 2 + 2 + 12 = 16 B/param; HF 'Model training anatomy':
    18 B/param with fp32 gradients. Ours: bf16 copies 2 + fp32 master 4 + fp32 grads 4 + m,v 8,
    the copies only for weights that go through a matmul."""
    spec = load_model("llama-2-7b")
    setup = TrainSetup(method="full", compute_dtype="bf16", mixed_precision=True)
    p = count_params(spec, setup)
    states = (MS.weight_bytes(spec, setup, p)["weights"] + MS.master_weight_bytes(setup, p)
              + MS.gradient_bytes(setup, p) + MS.optimizer_state_bytes(spec, setup, p))
    assert 16 <= states / p.total <= 18


def test_qlora_nf4_double_quant_4_127_bits() -> None:
    """Dettmers et al. 2023 (QLoRA) §3: double quantisation cuts the scale overhead from
    32/64 = 0.5 to 8/64 + 32/(64·256) ≈ 0.127 bits per parameter."""
    assert nf4_bits_per_param(double_quant=False) == 4.5
    assert nf4_bits_per_param(double_quant=True) == pytest.approx(4.127, abs=5e-4)
    spec = load_model("llama-2-7b")
    setup = TrainSetup(method="qlora", weight_bits=4, double_quant=True)
    w = MS.weight_bytes(spec, setup, count_params(spec, setup))
    quantized, _ = MS.quantized_linear_params(spec)
    rest = (count_params(spec).total - quantized) * 2
    bits = (w["weights"] - rest + w["quant_scales"]) * 8 / quantized
    assert bits == pytest.approx(4.127, abs=1e-3)


def test_training_flops_6n_per_token() -> None:
    """Kaplan et al. 2020 / Transformer Math 101: C ≈ 6·N FLOPs per token (+ attention)."""
    spec = load_model("llama-2-7b")
    setup = TrainSetup(seq_len=1)  # attention term vanishes at s = 1 … almost
    p = count_params(spec)
    flops = model_flops_per_token(spec, setup, p.active_per_token, p.embedding)
    assert flops == pytest.approx(6 * (p.total - p.embedding), rel=1e-3)
