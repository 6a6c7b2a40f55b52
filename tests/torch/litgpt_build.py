"""Build a tiny LitGPT model from a ModelSpec and a TrainSetup with LitGPT's own classes, run its
finetune scripts' training step, and record what it saves and allocates (tests only)."""

from __future__ import annotations

import contextlib
import re

import hf_build
import torch

from estimator.analytic.frameworks.litgpt import precision
from estimator.specs import ModelSpec, TrainSetup

LORA_FLAGS = {"q_proj": "lora_query", "k_proj": "lora_key", "v_proj": "lora_value",
              "o_proj": "lora_projection", "lm_head": "lora_head"}


def config(spec: ModelSpec, setup: TrainSetup):
    """litgpt.lora.Config of the spec's shapes (a Llama block: RMSNorm, LLaMAMLP, full RoPE)."""
    import litgpt.config
    import litgpt.lora

    shapes = {"n_layer": spec.num_layers, "n_embd": spec.hidden_size, "n_head": spec.num_heads,
              "n_query_groups": spec.num_kv_heads, "head_size": spec.head_dim,
              "intermediate_size": spec.intermediate_size, "vocab_size": spec.vocab_size,
              "padded_vocab_size": spec.vocab_size, "block_size": spec.max_seq_len,
              "bias": False, "norm_class_name": "RMSNorm", "mlp_class_name": "LLaMAMLP",
              "parallel_residual": False, "rotary_percentage": 1.0}
    if not setup.trains_adapters:
        return litgpt.config.Config(**shapes)
    targets = set(setup.lora_targets)
    flags = {flag: name in targets for name, flag in LORA_FLAGS.items()}
    return litgpt.lora.Config(
        **shapes, lora_r=setup.lora_rank, lora_alpha=int(setup.lora_alpha),
        lora_dropout=setup.lora_dropout,
        lora_mlp=bool(targets & {"gate_proj", "up_proj", "down_proj"}), **flags)


def dtype_of(setup: TrainSetup) -> torch.dtype:
    """The weights' dtype under Fabric's precision: bf16 for bf16-true, else fp32."""
    return torch.bfloat16 if precision(setup) == "bf16-true" else torch.float32


def build(spec: ModelSpec, setup: TrainSetup):
    """The model as finetune/{full,lora}.py builds it: GPT in the precision's dtype, only LoRA
    trainable, rope cache rebuilt for the training length (`model.max_seq_length = ...`)."""
    import litgpt.lora
    import litgpt.model

    torch.manual_seed(0)
    gpt = litgpt.lora.GPT if setup.trains_adapters else litgpt.model.GPT
    model = gpt(config(spec, setup)).to(dtype_of(setup))
    if setup.trains_adapters:
        litgpt.lora.mark_only_lora_as_trainable(model)
    if setup.checkpointing:
        from litgpt.model import Block
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
            apply_activation_checkpointing,
        )

        apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, Block))
    model.max_seq_length = setup.seq_len
    model.train()
    return model


def precision_context(setup: TrainSetup):
    """Fabric's forward context: default dtype bf16 (bf16-true) or torch.autocast
    (bf16-mixed)."""
    if precision(setup) == "bf16-mixed":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    if precision(setup) == "bf16-true":
        return default_dtype(torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def batch(spec: ModelSpec, setup: TrainSetup) -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, spec.vocab_size, (setup.batch_size, setup.seq_len), generator=gen)


def forward_loss(model, setup: TrainSetup, ids: torch.Tensor, held: dict):
    """fit()'s forward and loss; `held["logits"]` is the loop's `logits` variable, replaced as
    soon as the model returns (the previous step's logits live until then) and kept through
    backward. lora.py: `model(ids, lm_head_chunk_size=128)`, the last chunk shifted,
    chunked_cross_entropy over the chunks; full.py: whole logits, shifted by a slice, split
    into 128-row chunks by chunked_cross_entropy."""
    from litgpt.utils import chunked_cross_entropy

    with precision_context(setup):
        if not setup.trains_adapters:
            held["logits"] = model(ids)
            return chunked_cross_entropy(held["logits"][..., :-1, :], ids[..., 1:])
        held["logits"] = model(ids, lm_head_chunk_size=128)
        held["logits"][-1] = held["logits"][-1][..., :-1, :]
        return chunked_cross_entropy(held["logits"], ids[..., 1:])


class WeightCasts(hf_build.ParamCasts):
    """Autocast's 16-bit copies of parameters (counted by memory.autocast_copy_params and
    adapter_bytes); a norm's `weight.float()` stays an activation. Keeps each copy alive while
    recording, so that no later activation reuses its address."""

    def __init__(self, params: set[int]):
        super().__init__(params)
        self.kept: list[torch.Tensor] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = set(self.casts)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if isinstance(out, torch.Tensor) and out.dtype == torch.float32:
            self.casts = before
        elif self.casts != before:
            self.kept.append(out)
        return out


def saved_bytes(model, spec: ModelSpec, setup: TrainSetup) -> dict[str, int]:
    """Bytes saved for backward by one forward + loss, deduplicated by storage, parameters and
    buffers excluded; 'layers' (inside transformer.h.N), 'loss' (outside the model), 'head'."""
    with torch.no_grad():  # LoRAQKVLinear registers its index buffer on first use
        forward_loss(model, setup, batch(spec, setup), {})
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    names = {m: n for n, m in model.named_modules()}
    stack = ["loss"]
    hooks = [m.register_forward_pre_hook(lambda m, a: stack.append(names[m]))
             for m in model.modules()]
    hooks += [m.register_forward_hook(lambda m, a, o: [stack.pop(), None][1])
              for m in model.modules()]
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own and ptr not in seen:
            seen[ptr] = (stack[-1], t.untyped_storage().nbytes())
        return t

    casts = WeightCasts(own)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), casts:
        held = {}
        loss = forward_loss(model, setup, batch(spec, setup), held)
    for h in hooks:
        h.remove()
    parts = {"layers": 0, "head": 0, "loss": 0}
    for ptr, (where, nbytes) in seen.items():
        if ptr in casts.casts:  # autocast's weight copies: memory.autocast_copy_params
            continue
        part = "layers" if re.search(r"\bh\.\d+", where) else (
            "loss" if where == "loss" else "head")
        parts[part] += nbytes
    del held, loss
    return parts


def train_steps(model, spec: ModelSpec, setup: TrainSetup, steps: int = 2) -> None:
    """fit()'s loop: forward, loss, backward, AdamW step (torch.optim.AdamW as the config hub
    names it: the per-tensor loop on a CPU), zero_grad; `logits` lives on into the next step."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0, betas=(0.9, 0.95))
    ids, held = batch(spec, setup), {}
    for _ in range(steps):
        loss = forward_loss(model, setup, ids, held)
        loss.backward()
        del loss
        opt.step()
        opt.zero_grad()
    held.clear()


def allocation_peak(model, spec: ModelSpec, setup: TrainSetup, steps: int = 2) -> int:
    """Peak bytes above the start of `steps` steps, from the CPU allocator's events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_steps(model, spec, setup, steps)
    return hf_build.profiled_peak(prof)
