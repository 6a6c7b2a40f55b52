"""Activation (gradient) checkpointing of every decoder block, as a transform of a built model.

Each block keeps only its input for backward and recomputes its activations during backward
(Chen et al. 2016, arXiv 1604.06174): one extra forward of the block. ``use_reentrant=False`` is
required with a frozen base: the reentrant variant gives LoRA no gradients when no block input
requires grad (transformers#26221, peft#1142).
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_module(module: nn.Module) -> nn.Module:
    """Make ``module``'s forward run under torch.utils.checkpoint (in place; names unchanged)."""
    if getattr(module, "_nvfree_checkpointed", False):
        return module
    forward = module.forward
    module.forward = functools.partial(checkpoint, forward, use_reentrant=False)
    module._nvfree_checkpointed = True
    return module


def apply_checkpointing(model: nn.Module) -> nn.Module:
    """Checkpoint each decoder block in ``model.layers`` (in place) and return the model."""
    for block in model.layers:
        checkpoint_module(block)
    return model
