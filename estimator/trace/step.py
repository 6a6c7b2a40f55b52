"""One training step of a built model, every tensor tracked: forward with labels (transformers'
ForCausalLMLoss upcasts the logits to fp32), backward, gradient clipping at 1.0 (HF Trainer's
max_grad_norm), optimizer step, zero_grad(set_to_none=True), as HF Trainer's loop runs it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from estimator.specs import TrainSetup
from estimator.trace.tracker import PeakTracker


@dataclass
class StepRun:
    """What the step left behind: the tracker and the pins that fired."""

    tracker: PeakTracker
    num_attention_pins: int = 0
    notes: list[str] = field(default_factory=list)


def batch(vocab_size: int, setup: TrainSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) of one micro-batch, unpadded (no attention_mask, so SDPA runs with
    is_causal and no mask tensor, as with packed or equal-length sequences)."""
    ids = torch.randint(0, vocab_size, (setup.batch_size, setup.seq_len))
    return ids, ids.clone()


def pins(fake: bool, quantized: bool):
    """The kernel pins of kernels.py that apply (attention only on fake tensors)."""
    from estimator.trace.kernels import CudaAttentionPin, Dequant4bitPin

    attention = CudaAttentionPin() if fake else None
    dispatch = Dequant4bitPin() if quantized else None
    return attention, dispatch


def run_step(model: nn.Module, optimizer: torch.optim.Optimizer, setup: TrainSetup, *,
             vocab_size: int, fake: bool, extra_params=()) -> StepRun:
    """Forward, backward, clip, step, zero_grad under a PeakTracker (see module doc)."""
    ids, labels = batch(vocab_size, setup)
    tracker = PeakTracker()
    tracker.track_external(model, optimizer, ids, labels)
    tracker.track_as_parameters(extra_params)
    attention, dispatch = pins(fake, quantized=bool(extra_params))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    autocast = torch.autocast("cpu", dtype=DTYPE[setup.compute_dtype],
                              enabled=setup.mixed_precision and setup.compute_dtype != "fp32")
    with unpacked_sequences(), tracker, optional(attention), optional(dispatch):
        tracker.stage = "forward"
        with autocast:
            loss = model(input_ids=ids, labels=labels).loss
        tracker.stage = "backward"
        loss.backward()
        del loss
        tracker.stage = "optimizer"
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return StepRun(tracker, attention.num_pinned if attention else 0)


DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@contextlib.contextmanager
def unpacked_sequences():
    """transformers' packed-sequence check reads position_ids' values, and on fake tensors it
    answers 'packed' (a 4-D mask is then built and GQA keys/values expanded). The batch holds
    one sequence per row with the model's own arange position_ids, so answer 'not packed', as
    a real run does."""
    from unittest import mock

    from transformers import masking_utils

    with mock.patch.object(masking_utils, "find_packed_sequence_indices", lambda ids: None):
        yield


def optional(mode):
    """The mode as a context manager, or a no-op."""
    return mode if mode is not None else contextlib.nullcontext()
