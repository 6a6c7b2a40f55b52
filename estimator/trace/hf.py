"""The model a Hugging Face user trains, built the way transformers + PEFT build it.

Recipe (HF Trainer + PEFT, the documented QLoRA/LoRA path):
  model = AutoModelForCausalLM.from_config(config, dtype=…, attn_implementation=…)
  qlora: every nn.Linear but lm_head → bitsandbytes NF4 Linear4bit (quantize.py), then
         peft.prepare_model_for_kbit_training (casts the remaining 16-bit parameters to fp32)
  lora / qlora: peft.get_peft_model(model, LoraConfig(r, lora_alpha, target_modules))
         (PEFT's defaults: lora_dropout 0, adapters upcast to fp32)
  checkpointing: model.gradient_checkpointing_enable({"use_reentrant": False})
Parameter dtype: fp32 for full fine-tunes with mixed precision (master weights; compute under
torch.autocast) and for fp32 compute; the compute dtype otherwise (pure 16-bit training, and the
frozen base of LoRA, which HF users load in 16 bits).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from estimator.analytic.frameworks.hf import peft_target_modules
from estimator.errors import SetupError
from estimator.specs import TrainSetup

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PEFT_PREFIX = "base_model.model."
"""Module-path prefix PEFT adds in front of the wrapped transformers model."""


def compute_dtype(setup: TrainSetup) -> torch.dtype:
    """torch dtype of the matmuls."""
    return DTYPES[setup.compute_dtype]


def param_dtype(setup: TrainSetup) -> torch.dtype:
    """torch dtype the model is built in (see the module docstring)."""
    if setup.compute_dtype == "fp32" or (setup.method == "full" and setup.mixed_precision):
        return torch.float32
    if setup.method == "lora" and setup.weight_bits == 32:
        return torch.float32
    return compute_dtype(setup)


def uses_autocast(setup: TrainSetup) -> bool:
    """HF Trainer's bf16=True / fp16=True: forward and loss under torch.autocast."""
    return setup.mixed_precision and setup.compute_dtype != "fp32"


def check_supported(setup: TrainSetup) -> None:
    """One-line SetupError for setups the HF trace does not build."""
    if setup.method == "inference":
        raise SetupError("nvfree trace traces a training step; --method inference is not traced")
    if setup.method == "lora" and setup.weight_bits == 8:
        raise SetupError("nvfree trace does not build 8-bit (LLM.int8) bases yet; use --bits 16 "
                         "or --method qlora")
    if setup.optimizer not in ("adamw", "adamw8bit", "sgd", "sgd_momentum"):
        raise SetupError(f"nvfree trace builds adamw, adamw8bit, sgd and sgd_momentum, not "
                         f"{setup.optimizer}")
    if setup.num_devices > 1 or setup.offload != "none" or setup.grad_accum > 1:
        raise SetupError("nvfree trace traces one device, one micro-batch, no offload: drop "
                         "--num-devices, --grad-accum and --offload")


def build_model(hf_config, setup: TrainSetup, *, fake: bool, experts: str) -> nn.Module:
    """The trainable model (see the module docstring); its parameters are fake tensors when
    built inside FakeTensorMode."""
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": param_dtype(setup),
                              "attn_implementation": setup.attention}
    try:
        model = AutoModelForCausalLM.from_config(hf_config, **kwargs)
    except ValueError as exc:
        raise SetupError(f"transformers cannot build {hf_config.model_type} for causal LM: "
                         f"{str(exc).splitlines()[0]}") from None
    keep_fp32_modules(model)
    set_experts(model, experts)
    if setup.method == "qlora":
        quantize(model, setup, fake)
    if setup.trains_adapters:
        model = add_lora(model, setup)
    if setup.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def keep_fp32_modules(model: nn.Module) -> None:
    """from_pretrained's dtype plan (transformers modeling_utils `_get_dtype_plan`): modules in
    `_keep_in_fp32_modules` stay fp32 when loading in fp16, those in
    `_keep_in_fp32_modules_strict` when loading in fp16 or bf16. from_config skips the plan."""
    names = set()
    dtype = next(model.parameters()).dtype
    if dtype == torch.float16:
        names |= set(getattr(model, "_keep_in_fp32_modules", None) or ())
    if dtype in (torch.float16, torch.bfloat16):
        names |= set(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    for name, param in model.named_parameters():
        if any(key in name for key in names) and param.is_floating_point():
            param.data = param.data.float()


def set_experts(model: nn.Module, experts: str) -> None:
    """grouped_mm (transformers' default), the balanced eager loop ('eager') or transformers'
    own eager loop ('routed', real tensors only), for MoE models."""
    from estimator.trace.kernels import BALANCED_EXPERTS, register_balanced_experts

    if not model.config._experts_implementation or experts == "grouped_mm":
        return
    register_balanced_experts()
    model.set_experts_implementation(BALANCED_EXPERTS if experts == "eager" else "eager")


def quantize(model: nn.Module, setup: TrainSetup, fake: bool) -> None:
    """NF4 base, then PEFT's k-bit preparation (fp32 norms/embeddings/head, frozen base)."""
    from peft import prepare_model_for_kbit_training

    from estimator.trace.quantize import quantize_4bit

    quantize_4bit(model, compute_dtype(setup), setup.double_quant, fake)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def add_lora(model: nn.Module, setup: TrainSetup) -> nn.Module:
    """peft.get_peft_model with the setup's rank, alpha and target names."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=setup.lora_rank, lora_alpha=setup.lora_alpha,
                        target_modules=peft_target_modules(setup), task_type="CAUSAL_LM")
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise SetupError(f"PEFT: {str(exc).splitlines()[0]}") from None


def trainable(model: nn.Module) -> list[nn.Parameter]:
    """Parameters with requires_grad, each once."""
    return [p for p in model.parameters() if p.requires_grad]


def make_optimizer(params: list[nn.Parameter], name: str) -> torch.optim.Optimizer:
    """HF Trainer's optimizers: adamw → adamw_torch_fused (torch AdamW, fused), adamw8bit →
    bitsandbytes AdamW8bit, sgd / sgd_momentum → torch SGD."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    if name == "adamw8bit":
        return adamw8bit(params)
    return torch.optim.SGD(params, lr=1e-5, momentum=0.9 if name == "sgd_momentum" else 0.0)


def adamw8bit(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """bitsandbytes AdamW8bit. Its quantization maps are built from Python lists (no values on
    fake tensors): build them for real, then hand the optimizer fake copies."""
    import bitsandbytes as bnb
    from torch._guards import active_fake_mode
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    mode = active_fake_mode()
    if mode is None:
        return bnb.optim.AdamW8bit(params, lr=1e-5)
    with unset_fake_temporarily():
        optimizer = bnb.optim.AdamW8bit(params, lr=1e-5)
    optimizer.name2qmap = {k: mode.from_tensor(v) for k, v in optimizer.name2qmap.items()}
    return optimizer
