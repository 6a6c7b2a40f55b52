"""LoRA as a transform: only adapters require grad and change, the initial adapter is a no-op,
'all-linear' matches PEFT, merge_lora preserves the function, and an adapter saved in PEFT's
format loads in PEFT on the transformers model with identical logits."""

import json

import pytest

torch = pytest.importorskip("torch")

from estimator.errors import SetupError  # noqa: E402
from estimator.executor.lora import (  # noqa: E402
    LoRALinear,
    apply_lora,
    lora_state_dict,
    merge_lora,
    save_peft_adapter,
)
from estimator.executor.model import build_model  # noqa: E402
from estimator.specs import ModelSpec, MoESpec  # noqa: E402

pytestmark = pytest.mark.torch
SPEC = ModelSpec(name="t", num_layers=2, hidden_size=64, intermediate_size=96, num_heads=4,
                 num_kv_heads=2, head_dim=16, vocab_size=100)
TOKENS = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))


def randomise_lora_b(model, seed=3):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_only_lora_params_require_grad_and_change():
    torch.manual_seed(0)
    model = build_model(SPEC)
    reference = model(TOKENS).detach()
    apply_lora(model, rank=4, alpha=8.0, dropout=0.1)
    model.eval()
    torch.testing.assert_close(model(TOKENS), reference)  # B = 0: starts as the base model
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 7 * SPEC.num_layers
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = torch.nn.functional.cross_entropy(model(TOKENS).flatten(0, 1), TOKENS.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {k for k in before if ".lora_" in k}


def test_all_linear_targets_every_linear_but_lm_head_and_router():
    moe = SPEC.model_copy(update={"moe": MoESpec(num_experts=2, num_experts_per_token=1,
                                                 expert_intermediate_size=32)})
    model = apply_lora(build_model(moe), rank=2, alpha=4.0, targets="all-linear")
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and ".lora_" not in n}
    assert wrapped and linears == {"lm_head", "layers.0.mlp.gate", "layers.1.mlp.gate"}
    assert "layers.1.mlp.experts.1.down_proj" in wrapped


def test_no_matching_target_is_a_setup_error():
    with pytest.raises(SetupError, match="no linear layer"):
        apply_lora(build_model(SPEC), rank=4, alpha=8.0, targets=("c_attn",))


def test_merge_preserves_logits():
    torch.manual_seed(0)
    model = apply_lora(build_model(SPEC), rank=4, alpha=8.0)
    randomise_lora_b(model)
    expected = model(TOKENS).detach()
    merge_lora(model)
    assert not lora_state_dict(model)
    torch.testing.assert_close(model(TOKENS), expected, atol=1e-5, rtol=1e-5)


def test_peft_adapter_loads_in_peft_with_same_logits(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from estimator.executor.hf import load_hf_model

    config = transformers.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2)
    torch.manual_seed(0)
    hf_model = transformers.LlamaForCausalLM(config).eval()
    hf_model.save_pretrained(tmp_path / "base")
    _, ours = load_hf_model(tmp_path / "base", spec=SPEC.model_copy(update={"hf_id": "x"}))
    targets = ("q_proj", "v_proj", "down_proj")
    apply_lora(ours, rank=4, alpha=16.0, targets=targets)
    randomise_lora_b(ours)
    save_peft_adapter(ours, tmp_path / "adapter", base_model_name=str(tmp_path / "base"),
                      rank=4, alpha=16.0, dropout=0.0, targets=targets)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and saved["target_modules"] == sorted(targets)
    peft_model = peft.PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS), peft_model(TOKENS).logits, atol=2e-5, rtol=1e-4)
