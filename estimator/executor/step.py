"""One optimizer step: grad_accum micro-batches forward and backward (DDP reducing with the last
one), then clipping and the update, or nothing when the loss or gradient norm is not finite."""

import contextlib
import math

import torch
import torch.nn.functional as F

from estimator.executor import measure
from estimator.executor.build import autocast_context
from estimator.executor.config import Run, TrainConfig
from estimator.executor.data import stream_position
from estimator.executor.optim import clip_gradients, set_lr
from estimator.specs.setup import TrainSetup


def _micro_batch_loss(run: Run, position: int) -> torch.Tensor:
    """Forward one micro-batch and return its fp32 mean cross-entropy (nats/token). With
    setup.fused_loss (the default) the model's fused chunked lm_head + cross-entropy
    (Transformer.loss: only [chunk, V] logits exist at a time), else full logits and
    F.cross_entropy — the two logits terms of estimator.analytic.memory.logits_bytes."""
    inputs_BT, targets_BT = run.dataset.batch(run.config.seed, position, run.setup.batch_size)
    inputs_BT, targets_BT = inputs_BT.to(run.device), targets_BT.to(run.device)
    with autocast_context(run.setup, run.device):
        if run.ddp is not None:
            return run.ddp(inputs_BT, targets_BT)
        if run.setup.fused_loss:
            return run.model.loss(inputs_BT, targets_BT)
        logits_BTV = run.model(inputs_BT)
    return F.cross_entropy(logits_BTV.float().flatten(0, 1), targets_BT.flatten())


def train_step(run: Run, step: int, lr: float) -> tuple[float, str | None]:
    """One optimizer step; returns (mean loss, None) or (loss, reason) when it is not finite
    (then no update is applied). Data parallel: the loss is this rank's; gradients are
    all-reduced with the last micro-batch's backward only (no_sync before), and a non-finite
    loss does not return early (the other ranks wait in the all-reduce): it makes the
    averaged gradient norm non-finite on every rank, which skips the update everywhere."""
    setup, ctx = run.setup, run.dist
    set_lr(run.optimizer, lr)
    total = 0.0
    for micro in range(setup.grad_accum):
        position = stream_position(step, micro, batch_size=setup.batch_size,
                                   grad_accum=setup.grad_accum, rank=ctx.rank,
                                   world_size=ctx.world_size)
        last = micro == setup.grad_accum - 1
        with _sync(run, last):
            loss = _micro_batch_loss(run, position)
            value = float(loss.detach())
            if not math.isfinite(value) and run.ddp is None:
                run.optimizer.zero_grad(set_to_none=True)
                return value, f"loss became {value} at step {step + 1}"
            scaled = loss / setup.grad_accum
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        total += value
    if not math.isfinite(total):
        run.optimizer.zero_grad(set_to_none=True)
        return total / setup.grad_accum, f"loss became {total} at step {step + 1}"
    if run.backward_step is not None:  # backward has applied every gradient already
        run.grads_bytes = run.backward_step.largest_gradient_bytes
        return total, None
    if run.grads_bytes is None:
        run.grads_bytes = measure.gradient_bytes(run.model)
    if run.scaler is not None:
        run.scaler.unscale_(run.optimizer)
    norm = clip_gradients(run.trainable, clip_norm(run.config, setup))
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    elif not math.isfinite(norm):
        run.optimizer.zero_grad(set_to_none=True)
        return total / setup.grad_accum, f"gradient norm became {norm} at step {step + 1}"
    else:
        run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total / setup.grad_accum, None


def _sync(run: Run, last: bool) -> contextlib.AbstractContextManager:
    """DDP: no gradient all-reduce before the last micro-batch. ZeRO-3 (FSDP2) reduce-scatters
    every micro-batch into the sharded gradients (estimator/executor/fsdp.py says why)."""
    if run.ddp is None or last or run.sharded:
        return contextlib.nullcontext()
    return run.ddp.no_sync()


def clip_norm(config: TrainConfig, setup: TrainSetup) -> float:
    """The gradient-norm limit of the run: config.max_grad_norm, by default 1.0 (0, no
    clipping, when the optimizer steps in backward)."""
    if config.max_grad_norm is not None:
        return config.max_grad_norm
    return 0.0 if setup.optimizer_in_backward else 1.0


def params_finite(params: list[torch.nn.Parameter]) -> bool:
    """Every element finite (this rank's shard of a DTensor)."""
    return all(bool(torch.isfinite(getattr(p, "to_local", lambda p=p: p)()).all())
               for p in params)
