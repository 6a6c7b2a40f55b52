"""Block-level transforms of a built model: activation checkpointing and torch.compile.

Checkpointing: each block keeps only its input for backward and recomputes its activations
during backward (Chen et al. 2016, arXiv 1604.06174): one extra forward of the block.
``use_reentrant=False`` is required with a frozen base: the reentrant variant gives LoRA no
gradients when no block input requires grad (transformers#26221, peft#1142).

Compilation (opt-in): ``torch.compile`` of each block fuses the elementwise work around the
GEMMs (RMSNorm, RoPE, SiLU·up, residual adds, dtype casts, the LoRA update), which is most of a
CPU step's non-GEMM time. It costs a one-time compile (about a minute on 2 cores) and needs a
C++ compiler on CPU; MoE blocks recompile as the tokens per expert change, so it is meant for
dense models.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_module(module: nn.Module) -> nn.Module:
    """Make ``module``'s forward run under torch.utils.checkpoint (in place; names unchanged)."""
    if getattr(module, "_nvfree_forward", None) is not None:
        return module
    forward = module.forward
    module.forward = functools.partial(checkpoint, forward, use_reentrant=False)
    module._nvfree_forward = forward
    return module


def apply_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint each decoder block in ``model.layers`` (in place) and return the model."""
    for block in model.layers:
        checkpoint_module(block)
    return model


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """torch.compile each decoder block (in place); apply after LoRA, NF4 and checkpointing.
    A checkpointed block compiles its inner forward and stays checkpointed."""
    for block in model.layers:
        inner = getattr(block, "_nvfree_forward", None)
        if inner is None:
            block.compile(**compile_kwargs)
        else:
            compiled = torch.compile(inner, **compile_kwargs)
            block.forward = functools.partial(checkpoint, compiled, use_reentrant=False)
    return model
