"""The assumptions a trace made, one line each (they travel in TraceResult.assumptions)."""

from __future__ import annotations

from estimator.specs import TrainSetup

MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def assumptions(setup: TrainSetup, hf_config, run, *, fake: bool, experts: str) -> list[str]:
    """What the step substituted or assumed (see estimator/trace/kernels.py for the pins)."""
    lines = [("fake tensors" if fake else "real tensors") + " on the CPU device: live storage "
             "bytes, no allocator rounding, caching or fragmentation",
             "unpadded batch (no attention_mask): SDPA with is_causal, no mask tensor",
             "HF Trainer step: loss from model(labels=…) (fp32 logits), clip_grad_norm_(1.0), "
             + optimizer_line(setup.optimizer) + ", zero_grad(set_to_none=True)"]
    if setup.mixed_precision and setup.compute_dtype != "fp32":
        lines.append(f"forward under torch.autocast('cpu', {setup.compute_dtype}) (CPU autocast "
                     "op lists; HF's RMSNorm, softmax and loss upcast explicitly either way)")
    if run.num_attention_pins:
        lines.append(f"{run.num_attention_pins} SDPA calls with q/k width ≠ v width pinned to "
                     "CUDA's memory-efficient kernel (saves output + logsumexp)")
    if setup.method == "qlora":
        lines.append("bitsandbytes NF4 on every nn.Linear but lm_head; gemm_4bit as dequantise "
                     "+ linear (CUDA path past 1536 rows); prepare_model_for_kbit_training "
                     "casts the other 16-bit parameters to fp32")
    if setup.trains_adapters:
        lines.append("PEFT LoraConfig defaults: lora_dropout 0, adapters in fp32")
    if any(getattr(hf_config, key, None) for key in MOE_KEYS):
        lines.append(experts_line(experts))
    return lines


def optimizer_line(name: str) -> str:
    """How the optimizer was built."""
    return {"adamw": "torch AdamW(fused=True) (adamw_torch_fused)",
            "adamw8bit": "bitsandbytes AdamW8bit",
            "sgd": "torch SGD", "sgd_momentum": "torch SGD(momentum=0.9)"}[name]


def experts_line(experts: str) -> str:
    """The MoE routing assumption."""
    if experts == "eager":
        return ("MoE: transformers' eager expert loop with balanced routing: each expert gets "
                "tokens·top_k/num_experts tokens (± 1)")
    return ("MoE: transformers' grouped_mm experts (all tokens·top_k rows in one grouped GEMM: "
            "shapes do not depend on the routing)")
