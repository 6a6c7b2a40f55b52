"""Which linears a framework's LoRA reaches, from the PEFT-style names of a TrainSetup.

Kept apart from the term modules so that analytic/params.py can ask without an import cycle.
"""

from estimator.specs import TrainSetup

MLP_NAMES = frozenset({"gate_proj", "up_proj", "down_proj"})
ATTENTION_NAMES = frozenset({"q_proj", "k_proj", "v_proj", "o_proj"})
LM_HEAD = "lm_head"
"""LoRA on the output projection: torchtune's `apply_lora_to_output`, LitGPT's `lora_head`."""
HEAD_TARGET_FRAMEWORKS = ("torchtune", "litgpt")
"""Frameworks whose terms model an adapter on lm_head."""


def adapted(setup: TrainSetup) -> frozenset[str]:
    """The linears that carry adapters. hf/nvfree: exactly the names given. torchtune
    (`lora_attn_modules` + `apply_lora_to_mlp`, torchtune 0.5 models/llama3_2/
    _component_builders.py) and LitGPT (`lora_query/key/value/projection` + `lora_mlp`,
    litgpt/lora.py at 00af8b0d) switch the MLP on as a whole: any MLP name adapts all
    three; 'lm_head' is their `apply_lora_to_output` / `lora_head`."""
    if not setup.trains_adapters:
        return frozenset()
    names = set(setup.lora_targets)
    if setup.framework in HEAD_TARGET_FRAMEWORKS and names & MLP_NAMES:
        names |= MLP_NAMES
    return frozenset(names)


def head_target_ok(setup: TrainSetup, name: str) -> bool:
    """Whether `name` is 'lm_head' and the setup's framework models an adapter on it."""
    return name == LM_HEAD and setup.framework in HEAD_TARGET_FRAMEWORKS
