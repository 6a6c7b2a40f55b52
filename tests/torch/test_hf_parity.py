"""Logits of the executor's Transformer equal transformers' on tiny random HF checkpoints that
the test saves itself (Llama with GQA, Qwen2 with qkv bias + tied embeddings, Qwen3 with qk-norm,
Mixtral MoE), loaded back through estimator.executor.hf from the directory written."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from estimator.errors import ConfigError  # noqa: E402
from estimator.executor.hf import load_hf_model  # noqa: E402
from estimator.specs import ModelSpec, MoESpec  # noqa: E402

pytestmark = pytest.mark.torch

COMMON = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
CONFIGS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {"rope_theta": 5000.0, "rms_norm_eps": 1e-5}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def spec_from_config(config: dict) -> ModelSpec:
    """Minimal config.json reader for the test (estimator.catalog.load_model is the real one)."""
    heads = config["num_attention_heads"]
    moe = None
    if "num_local_experts" in config:
        moe = MoESpec(num_experts=config["num_local_experts"],
                      num_experts_per_token=config["num_experts_per_tok"],
                      expert_intermediate_size=config["intermediate_size"])
    return ModelSpec(
        name=config["model_type"], num_layers=config["num_hidden_layers"],
        hidden_size=config["hidden_size"], intermediate_size=config["intermediate_size"],
        num_heads=heads, num_kv_heads=config["num_key_value_heads"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        vocab_size=config["vocab_size"], tied_embeddings=config.get("tie_word_embeddings", False),
        qkv_bias=config["model_type"] == "qwen2", qk_norm=config["model_type"] == "qwen3",
        moe=moe,
    )


def save_tiny(kind: str, out_dir, **save_kwargs):
    config_cls, model_cls, extra = CONFIGS[kind]
    torch.manual_seed(0)
    config = getattr(transformers, config_cls)(**COMMON, **extra)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # random norm weights and biases, so a missed one would show
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, **save_kwargs)
    return model


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_logits_match_transformers(kind, tmp_path):
    hf_model = save_tiny(kind, tmp_path)
    spec = spec_from_config(json.loads((tmp_path / "config.json").read_text()))
    _, ours = load_hf_model(tmp_path, dtype=torch.float32, spec=spec)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, COMMON["vocab_size"], (2, 24), generator=generator)
    with torch.no_grad():
        expected = hf_model(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)


def test_sharded_checkpoint_loads(tmp_path):
    hf_model = save_tiny("llama", tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    spec = spec_from_config(json.loads((tmp_path / "config.json").read_text()))
    _, ours = load_hf_model(tmp_path, spec=spec)
    tokens = torch.arange(16)[None]
    with torch.no_grad():
        torch.testing.assert_close(ours(tokens), hf_model(tokens).logits, atol=2e-5, rtol=1e-4)


def test_mismatched_checkpoint_is_a_clear_error(tmp_path):
    save_tiny("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    wrong = spec_from_config({**config, "intermediate_size": 128})
    with pytest.raises(ConfigError, match="shape"):
        load_hf_model(tmp_path, spec=wrong)
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_hf_model(tmp_path / "nowhere", spec=wrong)


def test_tokenizer_json_and_byte_fallback(tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from estimator.executor.tokenizer import ByteTokenizer, load_tokenizer

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "</s>"])
    tok.train_from_iterator(["def f(x):\n    return x + 1\n"] * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)
    text = "def f(x):\n    return x + 1\n"
    assert loaded.decode(loaded.encode(text)) == text
    assert loaded.eos_id == tok.token_to_id("</s>") and loaded.vocab_size == tok.get_vocab_size()
    assert load_tokenizer(tmp_path / "none") is None
    byte = ByteTokenizer()
    assert byte.decode(byte.encode("héllo ✓")) == "héllo ✓" and byte.vocab_size == 258
