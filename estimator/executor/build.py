"""The model a run trains, built and transformed per its setup (LoRA, NF4, checkpointing,
torch.compile), with the precision rules of estimator/executor/train.py's docstring, and the
torch device a --device names."""

import contextlib
from pathlib import Path

import torch

from estimator.errors import SetupError
from estimator.executor import measure
from estimator.executor.config import TrainConfig
from estimator.executor.data import Tokenizer
from estimator.specs.model import ModelSpec
from estimator.specs.setup import TrainSetup

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """torch.device for --device (cpu, cuda, cuda:1, mps, xpu …); SetupError if absent here."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SetupError(f"--device {name}: not a torch device (cpu, cuda, mps, xpu)") from None
    if device.type == "cpu":
        return device
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() \
        else None
    if accelerator is None or accelerator.type != device.type:
        raise SetupError(f"--device {name}: no such accelerator in this torch build / machine")
    return device


def storage_dtype(setup: TrainSetup) -> torch.dtype:
    """dtype the model is built in (see the module docstring)."""
    compute = TORCH_DTYPES[setup.compute_dtype]
    if setup.method == "full":
        return torch.float32 if setup.mixed_precision or setup.weight_bits == 32 else compute
    if setup.upcasts_frozen_base:
        return torch.bfloat16
    if setup.weight_bits == 32 or compute == torch.float32:
        return torch.float32
    return compute


def autocast_context(setup: TrainSetup, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast in the compute dtype under mixed precision, else nothing."""
    if setup.mixed_precision and setup.compute_dtype != "fp32":
        return torch.autocast(device.type, dtype=TORCH_DTYPES[setup.compute_dtype])
    return contextlib.nullcontext()


def run_tokenizer(model_path: Path | None) -> Tokenizer:
    """The model directory's own tokenizer, else the byte-level one."""
    from estimator.executor.tokenizer import ByteTokenizer, load_tokenizer

    found = load_tokenizer(model_path) if model_path is not None else None
    return found if found is not None else ByteTokenizer()


def build_training_model(spec: ModelSpec, setup: TrainSetup, config: TrainConfig,
                         device: torch.device) -> tuple[ModelSpec, torch.nn.Module]:
    """Build (or load) the model and apply LoRA, NF4, checkpointing per the setup and, with
    config.compile, torch.compile per block (last, so it traces the transformed blocks).
    Seeds torch's RNG with config.seed first, so the random initialisation is reproducible."""
    from estimator.executor.checkpointing import apply_checkpointing, compile_blocks
    from estimator.executor.lora import apply_lora
    from estimator.executor.model import build_model

    torch.manual_seed(config.seed)
    dtype = storage_dtype(setup)
    if config.model_path is not None:
        from estimator.executor.hf import load_hf_model

        spec, model = load_hf_model(config.model_path, dtype=dtype, device=device)
    else:
        model = build_model(spec, dtype=dtype, device=device)
    if setup.trains_adapters:
        compute = TORCH_DTYPES[setup.compute_dtype]
        adapter_dtype = torch.float32 if setup.mixed_precision else compute
        apply_lora(model, rank=setup.lora_rank, alpha=setup.lora_alpha,
                   dropout=config.lora_dropout, targets=setup.lora_targets,
                   adapter_dtype=adapter_dtype)
    if setup.upcasts_frozen_base:
        from estimator.executor.lora import upcast_frozen_base

        upcast_frozen_base(model, torch.float32)
    if setup.method == "qlora":
        from estimator.executor.nf4 import apply_nf4

        apply_nf4(model, double_quant=setup.double_quant,
                  compute_dtype=TORCH_DTYPES[setup.compute_dtype])
    if setup.checkpointing:
        apply_checkpointing(model)
    if config.compile:
        compile_blocks(model)
    return spec, model


def _release_before_loss_head(module: torch.nn.Module, args: object, output: object) -> None:
    """Forward hook on the final norm (CPU): give the free pages of glibc's heap back to the
    OS (malloc_trim) before the loss head allocates the step's largest transient, the
    [chunk, V] logits, on top of the saved activations — the step's peak. glibc keeps what the
    forward freed resident, in holes later tensors do not fill. This is the only trim of a
    step: trimming after every optimizer step as well gave the same peak and cost 4–10 % step
    time, because the next forward page-faults every activation afresh (docs/training.md,
    'Heap')."""
    measure.release_freed_memory()


def trim_heap_before_loss_head(model: torch.nn.Module) -> None:
    """Register _release_before_loss_head on the model's final norm (the CPU trainer does)."""
    model.norm.register_forward_hook(_release_before_loss_head)
