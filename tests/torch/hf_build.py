"""Build a tiny Hugging Face model + PEFT (+ bitsandbytes) from a ModelSpec and a TrainSetup,
as HF Trainer would train it, and record what it saves and allocates (tests only)."""

from __future__ import annotations

import re
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from estimator.analytic.frameworks.hf import peft_target_modules
from estimator.specs import ModelSpec, TrainSetup


def hf_config(spec: ModelSpec):
    """A transformers config with the spec's shapes (llama, qwen2, qwen3 or mixtral)."""
    import transformers

    common = {"vocab_size": spec.vocab_size, "hidden_size": spec.hidden_size,
                  "num_hidden_layers": spec.num_layers, "num_attention_heads": spec.num_heads,
                  "num_key_value_heads": spec.num_kv_heads, "head_dim": spec.head_dim,
                  "max_position_embeddings": 8192, "tie_word_embeddings": spec.tied_embeddings}
    if spec.moe is not None:
        return transformers.MixtralConfig(**common, intermediate_size=spec.moe
                                          .expert_intermediate_size,
                                          num_local_experts=spec.moe.num_experts,
                                          num_experts_per_tok=spec.moe.num_experts_per_token)
    if spec.qk_norm:
        return transformers.Qwen3Config(**common, intermediate_size=spec.intermediate_size)
    if spec.qkv_bias:
        return transformers.Qwen2Config(**common, intermediate_size=spec.intermediate_size)
    return transformers.LlamaConfig(**common, intermediate_size=spec.intermediate_size)


def build(spec: ModelSpec, setup: TrainSetup):
    """The model as a user builds it for HF Trainer: from_pretrained in the storage dtype
    (4-bit: BitsAndBytesConfig NF4), PEFT LoRA, gradient checkpointing (non-reentrant)."""
    import transformers

    torch.manual_seed(0)
    config = hf_config(spec)
    config._attn_implementation = setup.attention
    dtype = torch.float32
    if setup.compute_dtype != "fp32" and (setup.method != "full" or not setup.mixed_precision):
        dtype = torch.bfloat16 if setup.compute_dtype == "bf16" else torch.float16
    if setup.weight_bits == 32:
        dtype = torch.float32
    if setup.method == "qlora":
        bnb = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=setup.double_quant, bnb_4bit_compute_dtype=dtype)
        path = tempfile.mkdtemp()
        transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, quantization_config=bnb, device_map="cpu",
            attn_implementation=setup.attention)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    if setup.trains_adapters:
        import peft

        if setup.weight_bits <= 8:  # the QLoRA recipe PEFT documents
            model = peft.prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=setup.checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, peft.LoraConfig(
            r=setup.lora_rank, lora_alpha=setup.lora_alpha, lora_dropout=setup.lora_dropout,
            target_modules=peft_target_modules(setup), task_type="CAUSAL_LM"))
    if setup.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if setup.trains_adapters:
            model.enable_input_require_grads()
    model.train()
    return model


def autocast(setup: TrainSetup):
    """HF Trainer's mixed precision: torch.autocast in the compute dtype when bf16/fp16=True."""
    dtype = torch.float16 if setup.compute_dtype == "fp16" else torch.bfloat16
    return torch.autocast("cpu", dtype=dtype,
                          enabled=setup.mixed_precision and setup.compute_dtype != "fp32")


def batch(spec: ModelSpec, setup: TrainSetup) -> dict:
    """A packed batch as HF's collator gives it: input ids, all-ones attention mask, labels."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec.vocab_size, (setup.batch_size, setup.seq_len), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


class ParamCasts(TorchDispatchMode):
    """Records the storages of casts of parameters (autocast's weight copies: counted by
    memory.autocast_copy_params and adapter_bytes, not as activations)."""

    def __init__(self, params: set[int]):
        super().__init__()
        self.params, self.casts = params, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten._to_copy.default and isinstance(args[0], torch.Tensor) and (
                args[0].untyped_storage().data_ptr() in self.params):
            self.casts.add(out.untyped_storage().data_ptr())
        return out


def saved_bytes(model, spec: ModelSpec, setup: TrainSetup) -> dict[str, int]:
    """Bytes saved for backward by one forward (with labels: HF's own loss), deduplicated by
    storage, parameters and their autocast casts excluded; split into 'layers' (inside
    decoder layers), 'loss' (the loss function's log_softmax output and labels) and 'head'
    (the rest: final norm, lm_head, embedding indices)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    names = {m: n for n, m in model.named_modules()}
    stack = [""]
    hooks = [m.register_forward_pre_hook(lambda m, a: stack.append(names[m]))
             for m in model.modules()]
    hooks += [m.register_forward_hook(lambda m, a, o: stack.pop() and None)
              for m in model.modules()]
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen[storage.data_ptr()] = (stack[-1], storage.nbytes())
        return t

    casts = ParamCasts(params)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(setup), casts:
        out = model(**batch(spec, setup))
    for h in hooks:
        h.remove()
    parts = {"layers": 0, "head": 0, "loss": 0}
    for ptr, (where, nbytes) in seen.items():
        if ptr in casts.casts:
            continue
        part = "layers" if re.search(r"\blayers\.\d+", where) else (
            "loss" if where in ("", "base_model", "base_model.model") else "head")
        parts[part] += nbytes
    del out
    return parts


def profiled_peak(prof) -> int:
    """Peak of live bytes over a torch.profiler run (profile_memory=True): the CPU
    allocator's [memory] events in time order, summed (bytes above the run's start)."""
    cpu = torch.autograd.DeviceType.CPU
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == cpu)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def record_hf_step(spec: ModelSpec, setup: TrainSetup, batch_sizes: tuple[int, ...] = (1, 2),
                   ) -> dict[int, dict[str, dict[str, float]]]:
    """calibrate.aten_ops.record_op_bytes of one HF Trainer optimizer step per batch size, on
    one model built once (`build`): forward with labels under the Trainer's autocast,
    backward, `clip_grad_norm_(…, 1.0)` (TrainingArguments.max_grad_norm), AdamW as
    `adamw_torch_fused` builds it, zero_grad. One unrecorded step first (optimizer state,
    kernel caches)."""
    from estimator.calibrate.aten_ops import record_op_bytes

    model = build(spec, setup)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    out: dict[int, dict[str, dict[str, float]]] = {}
    for b in batch_sizes:
        inputs = batch(spec, setup.model_copy(update={"batch_size": b}))

        def step(inputs=inputs) -> None:
            with autocast(setup):
                loss = model(**inputs).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        out[b] = record_op_bytes(step)
    return out
