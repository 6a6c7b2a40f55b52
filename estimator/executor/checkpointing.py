"""Block-level transforms of a built model: activation checkpointing and torch.compile.

Checkpointing: each block keeps only its input for backward and recomputes its activations
during backward (Chen et al. 2016, arXiv 1604.06174): one extra forward of the block.
``use_reentrant=False`` is required with a frozen base: the reentrant variant gives LoRA no
gradients when no block input requires grad (transformers#26221, peft#1142).

Compilation (opt-in): ``torch.compile`` of each block fuses the elementwise work around the
GEMMs (RMSNorm, RoPE, SiLU·up, residual adds, dtype casts, the LoRA update), which is most of a
CPU step's non-GEMM time. It costs a one-time compile (about a minute on 2 cores) and needs a
C++ compiler on CPU; MoE blocks recompile as the tokens per expert change, so it is meant for
dense models. ``check_compile_support`` finds a missing compiler before a run starts, and
``compile_errors`` turns a compile that fails inside the first step into one SetupError line.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from estimator.errors import SetupError

_NO_COMPILE = "or train without --compile"


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


def check_compile_support(device: torch.device) -> None:
    """SetupError (one line) when torch.compile cannot work here: on the CPU, inductor
    compiles C++ kernels and needs a C++ compiler (``$CXX``, else ``g++``; inductor's own
    search, ``torch._inductor.cpp_builder.get_cpp_compiler``)."""
    if device.type != "cpu":
        return
    try:
        from torch._inductor import cpp_builder
        from torch._inductor.exc import InvalidCxxCompiler
    except ImportError:  # a torch without inductor: torch.compile itself will say so
        return
    try:
        cpp_builder.get_cpp_compiler()
    except InvalidCxxCompiler as e:
        raise SetupError(f"--compile needs a C++ compiler on the CPU ({e}); install g++ or "
                         f"point $CXX at one, {_NO_COMPILE}") from None


@contextlib.contextmanager
def compile_errors() -> Iterator[None]:
    """Turn a failure of the torch.compile backend (raised lazily, inside the first forward
    or backward of a compiled block) into a one-line SetupError."""
    from torch._dynamo.exc import BackendCompilerFailed  # inductor's InductorError included

    try:
        yield
    except BackendCompilerFailed as e:
        raise SetupError(f"torch.compile failed: {_compile_failure(str(e))[:400]}; "
                         f"{_NO_COMPILE}") from None


def _compile_failure(text: str) -> str:
    """The error's first line, plus the compiler's first output line when inductor's message
    has one (``CppCompileError: C++ compile error`` … ``Output:`` … e.g. a missing header)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return "unknown error"
    if "Output:" in lines[:-1]:
        return f"{lines[0]}: {lines[lines.index('Output:') + 1]}"
    return lines[0]
