"""Build a tiny torchtune model from a ModelSpec and a TrainSetup with torchtune's own builders,
run its recipe's training step, and record what it saves and allocates (tests only)."""

from __future__ import annotations

import re

import hf_build
import torch

from estimator.specs import ModelSpec, TrainSetup

TORCHTUNE_NAMES = {"q_proj": "q_proj", "k_proj": "k_proj", "v_proj": "v_proj",
                   "o_proj": "output_proj"}


def dtype_of(setup: TrainSetup) -> torch.dtype:
    """torchtune's `dtype`: fp32 for fp32 compute or a 32-bit base, else bf16."""
    fp32 = setup.compute_dtype == "fp32" or setup.weight_bits == 32
    return torch.float32 if fp32 else torch.bfloat16


def builder_kwargs(spec: ModelSpec) -> dict:
    return {"vocab_size": spec.vocab_size, "num_layers": spec.num_layers,
            "num_heads": spec.num_heads, "num_kv_heads": spec.num_kv_heads,
            "embed_dim": spec.hidden_size, "max_seq_len": spec.max_seq_len,
            "intermediate_dim": spec.intermediate_size}


def build(spec: ModelSpec, setup: TrainSetup):
    """The model as the recipes build it: llama3_1 (untied) or llama3_2 (tied) components in
    `dtype`, LoRA/QLoRA adapters trainable and the rest frozen, per-layer checkpointing and
    compile as the recipe applies them, the output chunked for CEWithChunkedOutputLoss."""
    from torchtune import modules, training
    from torchtune.models.llama3_1._component_builders import llama3_1, lora_llama3_1
    from torchtune.models.llama3_2._component_builders import llama3_2, lora_llama3_2
    from torchtune.modules.peft import get_adapter_params, set_trainable_params

    torch.manual_seed(0)
    base, lora = (llama3_2, lora_llama3_2) if spec.tied_embeddings else (llama3_1, lora_llama3_1)
    with training.set_default_dtype(dtype_of(setup)):
        if setup.trains_adapters:
            targets = set(setup.lora_targets)
            model = lora(
                [TORCHTUNE_NAMES[n] for n in TORCHTUNE_NAMES if n in targets],
                apply_lora_to_mlp=bool(targets & {"gate_proj", "up_proj", "down_proj"}),
                apply_lora_to_output="lm_head" in targets, lora_rank=setup.lora_rank,
                lora_alpha=setup.lora_alpha, lora_dropout=setup.lora_dropout,
                quantize_base=setup.method == "qlora", **builder_kwargs(spec))
        else:
            model = base(**builder_kwargs(spec))
    if setup.trains_adapters:
        set_trainable_params(model, get_adapter_params(model))
    if setup.compile:  # fresh caches: the recording hooks are traced into every layer
        torch._dynamo.reset()
        torch._dynamo.config.recompile_limit = 64
        training.compile_model(model, verbose=False)
    if setup.checkpointing:
        training.set_activation_checkpointing(
            model, auto_wrap_policy={modules.TransformerSelfAttentionLayer})
    if setup.fused_loss:
        model.set_num_output_chunks(8)
    model.train()
    return model


def loss_fn(setup: TrainSetup):
    """The recipe's loss: CEWithChunkedOutputLoss (compute_cross_entropy compiled with compile)
    or torch.nn.CrossEntropyLoss."""
    from torchtune import training
    from torchtune.modules.loss import CEWithChunkedOutputLoss

    if not setup.fused_loss:
        return torch.nn.CrossEntropyLoss()
    loss = CEWithChunkedOutputLoss()
    if setup.compile:
        training.compile_loss(loss, verbose=False)
    return loss


def batch(spec: ModelSpec, setup: TrainSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed batch: tokens and input positions (one sample per row, positions 0..s-1)."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, spec.vocab_size, (setup.batch_size, setup.seq_len), generator=gen)
    return tokens, torch.arange(setup.seq_len).repeat(setup.batch_size, 1)


def loss_step(model, loss, tokens, input_pos):
    """full_finetune_single_device `_loss_step`: labels shifted by an ignore column, logits
    reshaped (not chunked) and deleted after the loss."""
    labels = torch.hstack((tokens[..., 1:], torch.full((tokens.shape[0], 1), -100)))
    logits = model(tokens, input_pos=input_pos)
    if not isinstance(logits, list):
        labels = labels.reshape(-1)
        logits = logits.reshape(-1, logits.size(-1))
    out = loss(logits, labels)
    del logits
    return out


def storage_ptr(t: torch.Tensor) -> int | None:
    """The storage address of a plain tensor; None for wrapper subclasses (torchao's
    NF4Tensor: the frozen weights linear_nf4 saves)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return None
    return t.untyped_storage().data_ptr()


def saved_bytes(model, spec: ModelSpec, setup: TrainSetup) -> dict[str, int]:
    """Bytes saved for backward by one forward + loss, deduplicated by storage, parameters and
    buffers excluded; split into 'layers' (inside layers.N), 'loss' (the loss function) and
    'head' (final norm, output projection, embedding)."""
    own = {storage_ptr(t) for t in [*model.parameters(), *model.buffers()]}
    names = {m: n for n, m in model.named_modules()}
    stack = ["loss"]
    hooks = [m.register_forward_pre_hook(lambda m, a: stack.append(names[m]))
             for m in model.modules()]
    hooks += [m.register_forward_hook(lambda m, a, o: [stack.pop(), None][1])
              for m in model.modules()]
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = storage_ptr(t)
        if ptr is not None and ptr not in own and ptr not in seen:
            seen[ptr] = (stack[-1], t.untyped_storage().nbytes())
        return t

    tokens, input_pos = batch(spec, setup)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = loss_step(model, loss_fn(setup), tokens, input_pos)
    for h in hooks:
        h.remove()
    parts = {"layers": 0, "head": 0, "loss": 0}
    for where, nbytes in seen.values():
        part = "layers" if re.search(r"\blayers\.\d+", where) else (
            "loss" if where == "loss" else "head")
        parts[part] += nbytes
    del out
    return parts


def optimizer(model, setup: TrainSetup):
    """torch.optim.AdamW(fused=True) as the configs name it; with optimizer_in_backward one per
    parameter, stepped from a post-accumulate-grad hook (training.register_optim_in_bwd_hooks)."""
    from torchtune import training

    params = [p for p in model.parameters() if p.requires_grad]
    if not setup.optimizer_in_backward:
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    optims = {p: torch.optim.AdamW([p], lr=1e-5, fused=True) for p in params}
    training.register_optim_in_bwd_hooks(model=model, optim_dict=optims)
    return None


def train_steps(model, spec: ModelSpec, setup: TrainSetup, steps: int = 2) -> None:
    """The recipe's loop body: loss × tokens, backward, grads scaled, step, zero_grad."""
    from torchtune import training

    opt, loss = optimizer(model, setup), loss_fn(setup)
    tokens, input_pos = batch(spec, setup)
    for _ in range(steps):
        current = loss_step(model, loss, tokens, input_pos) * tokens.numel()
        current.backward()
        del current
        if opt is not None:
            training.scale_grads(model, torch.tensor(1 / tokens.numel()))
            opt.step()
            opt.zero_grad(set_to_none=True)


def allocation_peak(model, spec: ModelSpec, setup: TrainSetup, steps: int = 2) -> int:
    """Peak bytes above the start of `steps` training steps, from the CPU allocator's events
    (torch.profiler memory events, replayed in time order)."""
    from torch.profiler import ProfilerActivity, profile

    if setup.compile:  # compile outside the recording: one forward + backward, no step
        tokens, input_pos = batch(spec, setup)
        loss_step(model, loss_fn(setup), tokens, input_pos).backward()
        model.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_steps(model, spec, setup, steps)
    return hf_build.profiled_peak(prof)
