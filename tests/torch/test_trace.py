"""`nvfree trace` (estimator/trace): the fake-tensor trace of one HF training step allocates what
the same code allocates on real CPU tensors, tracked the same way, on tiny models built from
config.json files the tests write (dense Llama, Qwen2 with tied embeddings and qkv bias, a
Mixtral-style MoE; full / LoRA / QLoRA; fp32 / bf16 autocast / pure bf16; checkpointing;
eager attention); MLA attention is pinned to CUDA's kernel; user errors are one line."""

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from estimator.errors import ConfigError, SetupError  # noqa: E402
from estimator.specs import TrainSetup  # noqa: E402
from estimator.trace import trace_step  # noqa: E402

pytestmark = pytest.mark.torch

COMMON = {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
CONFIGS = {
    "llama": {"model_type": "llama", **COMMON},
    "qwen2": {"model_type": "qwen2", **COMMON, "tie_word_embeddings": True},
    "mixtral": {"model_type": "mixtral", **COMMON, "num_local_experts": 4,
                "num_experts_per_tok": 2},
}
TINY_LONGCAT = {"model_type": "longcat_flash", "vocab_size": 128, "hidden_size": 64,
                "num_layers": 1, "num_attention_heads": 4, "ffn_hidden_size": 64,
                "expert_ffn_hidden_size": 32, "n_routed_experts": 4, "zero_expert_num": 2,
                "moe_topk": 2, "q_lora_rank": 32, "kv_lora_rank": 16, "qk_nope_head_dim": 16,
                "qk_rope_head_dim": 8, "v_head_dim": 16, "head_dim": 8}


def setup_of(method: str, dtype: str, *, mixed: bool = True, **extra) -> TrainSetup:
    bits = 4 if method == "qlora" else (32 if dtype == "fp32" else 16)
    return TrainSetup(method=method, weight_bits=bits, compute_dtype=dtype,
                      mixed_precision=mixed and dtype != "fp32", lora_rank=8, lora_alpha=16,
                      batch_size=2, seq_len=64, **extra)


def write_config(tmp_path, kind: str):
    path = tmp_path / kind / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(CONFIGS[kind]))
    return str(path)


CASES = [
    ("llama", setup_of("full", "fp32"), "grouped_mm"),
    ("llama", setup_of("full", "bf16"), "grouped_mm"),
    ("llama", setup_of("lora", "bf16", attention="eager"), "grouped_mm"),
    ("llama", setup_of("qlora", "bf16"), "grouped_mm"),
    ("qwen2", setup_of("full", "bf16", mixed=False, checkpointing=True), "grouped_mm"),
    ("qwen2", setup_of("qlora", "bf16", checkpointing=True), "grouped_mm"),
    ("mixtral", setup_of("lora", "bf16"), "grouped_mm"),
    ("mixtral", setup_of("full", "fp32"), "eager"),
    ("llama", setup_of("full", "fp32", optimizer="adamw8bit"), "grouped_mm"),
]


@pytest.mark.parametrize(("kind", "setup", "experts"), CASES,
                         ids=[f"{k}-{s.method}-{s.compute_dtype}"
                              f"{'-mixed' if s.mixed_precision else ''}"
                              f"{'-ckpt' if s.checkpointing else ''}-{s.attention}-{e}"
                              f"-{s.optimizer}"
                              for k, s, e in CASES])
def test_fake_peak_equals_real_run(kind, setup, experts, tmp_path):
    config = write_config(tmp_path, kind)
    fake = trace_step(config, setup, experts=experts)
    real = trace_step(config, setup, fake=False, experts=experts)
    assert fake.fake and not real.fake
    assert fake.peak_bytes == pytest.approx(real.peak_bytes, rel=0.03)
    assert fake.peak_phase == real.peak_phase
    assert sum(fake.peak_components.values()) == fake.peak_bytes
    assert fake.top_modules and fake.num_trainable_parameters > 0


def test_balanced_routing_matches_the_router(tmp_path):
    """The eager loop's balanced assumption against transformers' own routed loop."""
    config = write_config(tmp_path, "mixtral")
    setup = setup_of("full", "fp32")
    balanced = trace_step(config, setup, experts="eager")
    routed = trace_step(config, setup, fake=False, experts="routed")
    assert balanced.peak_bytes == pytest.approx(routed.peak_bytes, rel=0.03)
    assert any("balanced routing" in a for a in balanced.assumptions)


def nf4_bytes(out_features: int, in_features: int) -> int:
    """bitsandbytes NF4 with double quantisation: packed codes (½ B/param), one uint8 absmax
    per 64-block, one fp32 absmax per 256 of those, the 256-entry fp32 code of the nested
    quantisation and the 16-entry fp32 NF4 code (both copied per layer), one fp32 offset."""
    n = out_features * in_features
    blocks = n // 64
    return n // 2 + blocks + 4 * -(-blocks // 256) + 256 * 4 + 16 * 4 + 4


def test_qlora_parameters_are_nf4_codes_and_scales(tmp_path):
    """Parameter bytes of the tiny Llama under QLoRA, from bitsandbytes' storage layout."""
    config = write_config(tmp_path, "llama")
    result = trace_step(config, setup_of("qlora", "bf16"))
    d, inter, kv = 128, 256, 64  # hidden, MLP width, 2 kv heads × 32
    linears = [(d, d), (kv, d), (kv, d), (d, d), (inter, d), (inter, d), (d, inter)]
    quantized = 2 * sum(nf4_bytes(o, i) for o, i in linears)
    adapters = 2 * sum(8 * (o + i) for o, i in linears) * 4  # r=8, fp32
    fp32_rest = (2 * 512 * d + 5 * d) * 4  # embedding, lm_head, norms: upcast by PEFT
    assert result.peak_components["parameters"] == quantized + adapters + fp32_rest


def test_mla_attention_is_pinned_to_the_cuda_kernel():
    setup = TrainSetup(method="lora", compute_dtype="bf16", batch_size=1, seq_len=32,
                       checkpointing=True, lora_targets=("o_proj", "q_b_proj"))
    result = trace_step(dict(TINY_LONGCAT), setup)
    assert result.model_type == "longcat_flash"
    assert any("memory-efficient kernel" in a for a in result.assumptions)
    assert any("grouped_mm" in a for a in result.assumptions)


def test_one_line_errors(tmp_path):
    config = write_config(tmp_path, "mixtral")
    with pytest.raises(SetupError, match="--experts eager"):
        trace_step(config, setup_of("full", "fp32"))  # grouped_mm takes bf16 only
    with pytest.raises(SetupError, match="8-bit"):
        trace_step(config, TrainSetup(method="lora", weight_bits=8))
    with pytest.raises(ConfigError, match="model_type 'nonesuch'"):
        trace_step({"model_type": "nonesuch"}, setup_of("full", "fp32"))
    with pytest.raises(SetupError, match="PEFT"):
        trace_step(config, setup_of("lora", "bf16", lora_targets=("no_such_proj",)))


def test_presets_build_as_transformers_models():
    """Every preset maps to a transformers config that builds on fake tensors, with the
    preset's parameter count (LongCat-Flash: 560B) within 2 %."""
    from transformers import AutoModelForCausalLM

    from estimator.analytic.params import count_params
    from estimator.catalog import list_models
    from estimator.trace.fake import fake_mode
    from estimator.trace.hf_config import build_config, config_from_spec

    for spec in list_models():
        config = build_config(config_from_spec(spec))
        with fake_mode():
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        built = sum(p.numel() for p in model.parameters())
        expected = count_params(spec, TrainSetup()).total
        assert built == pytest.approx(expected, rel=0.02), spec.name


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    from estimator.cli.app import main

    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_cli_json_puts_the_estimate_beside_the_trace(capsys, tmp_path):
    config = write_config(tmp_path, "llama")
    code, out, _ = run_cli(capsys, "trace", "-m", config, "--method", "qlora", "-b", "1",
                           "-s", "32", "--json")
    assert code == 0
    data = json.loads(out)
    trace, estimate = data["trace"], data["estimate"]
    assert trace["setup"]["method"] == "qlora" and trace["peak_bytes"] > 0
    assert estimate["tensor_bytes"] == estimate["total_bytes"] - sum(
        estimate["components"].get(t, 0) for t in
        ("runtime_overhead", "kernel_caches", "allocator_retention", "expert_kernel_caches"))
    assert data["ratio"] == pytest.approx(estimate["tensor_bytes"] / trace["peak_bytes"])


def test_cli_renders_and_fails_in_one_line(capsys, tmp_path):
    config = write_config(tmp_path, "qwen2")
    code, out, _ = run_cli(capsys, "trace", "-m", config, "--method", "lora", "-s", "32")
    assert code == 0 and "Traced peak" in out and "Analytic estimate" in out
    for args in (["-m", "no-such-model"], ["-m", config, "--method", "inference"],
                 ["-m", config, "--method", "lora", "--bits", "8"]):
        code, _, err = run_cli(capsys, "trace", *args)
        assert code == 2 and err.count("\n") == 1 and err.startswith("nvfree: error:")
