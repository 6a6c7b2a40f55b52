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


def test_bf16_base_under_fp32_compute_equals_fp32_on_the_rounded_weights():
    """`--bits 16 --dtype fp32` (upcast_frozen_base): a LoRA model whose frozen base is stored in
    bf16 and upcast per matmul computes exactly what an fp32 model holding the same bf16-rounded
    weights computes — loss and every adapter gradient — in half the base bytes, with fp32
    norms and activations."""
    from estimator.executor.lora import FrozenLinear, upcast_frozen_base

    models = []
    for stored in (torch.bfloat16, torch.float32):
        torch.manual_seed(0)
        model = build_model(SPEC, dtype=torch.bfloat16)
        if stored == torch.float32:
            model = model.float()  # the same rounded values, widened once
        torch.manual_seed(1)
        apply_lora(model, rank=4, alpha=8.0, targets=("q_proj", "v_proj"),
                   adapter_dtype=torch.float32)
        randomise_lora_b(model)
        if stored == torch.bfloat16:
            upcast_frozen_base(model, torch.float32)
        models.append(model)
    upcast, wide = models
    assert type(upcast.layers[0].mlp.up_proj) is FrozenLinear
    assert type(upcast.lm_head) is FrozenLinear
    assert upcast.norm.weight.dtype == torch.float32
    losses = []
    for model in models:
        loss = model.loss(TOKENS[:, :-1], TOKENS[:, 1:])
        loss.backward()
        losses.append(loss)
    assert losses[0].dtype == torch.float32
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad} for m in models]
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)

    def frozen_bytes(model):
        return sum(p.numel() * p.element_size() for p in model.parameters()
                   if not p.requires_grad and p.dim() > 1)

    assert frozen_bytes(upcast) * 2 == frozen_bytes(wide)
