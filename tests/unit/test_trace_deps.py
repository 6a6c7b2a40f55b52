"""`nvfree trace` without its extra: one line naming `pip install 'nvfree[trace]'` (no torch
needed to say so: estimator.trace imports torch only inside its functions)."""

import importlib.util

import pytest

from estimator.errors import MissingDependencyError
from estimator.specs import TrainSetup
from estimator.trace import require_libraries


def test_missing_peft_is_one_actionable_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("peft", "transformers") else real(name))
    message = r"transformers, peft: pip install 'nvfree\[trace\]'"
    with pytest.raises(MissingDependencyError, match=message):
        require_libraries(TrainSetup(method="lora"))


def test_preset_maps_to_a_transformers_model_type():
    from estimator.catalog import load_model
    from estimator.trace.hf_config import config_from_spec

    types = {name: config_from_spec(load_model(name))["model_type"] for name in
             ("longcat-flash", "deepseek-v3", "mixtral-8x7b", "qwen3-30b-a3b", "llama-3.1-8b",
              "qwen2.5-7b", "mistral-7b", "gpt2", "gpt-oss-20b")}
    assert types == {"longcat-flash": "longcat_flash", "deepseek-v3": "deepseek_v3",
                     "mixtral-8x7b": "mixtral", "qwen3-30b-a3b": "qwen3_moe",
                     "llama-3.1-8b": "llama", "qwen2.5-7b": "qwen2", "mistral-7b": "mistral",
                     "gpt2": "gpt2", "gpt-oss-20b": "gpt_oss"}
    longcat = config_from_spec(load_model("longcat-flash"))
    assert (longcat["num_layers"], longcat["n_routed_experts"], longcat["zero_expert_num"],
            longcat["moe_topk"], longcat["ffn_hidden_size"]) == (28, 512, 256, 12, 12288)
