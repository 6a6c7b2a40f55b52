"""The step loop: steps from the start step to max_steps, progress reports, checkpoints when due,
and the stops (a signal, a non-finite value on any rank); the one-line message of how it ended."""

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from estimator.executor import distributed, measure
from estimator.executor.config import DEFAULT_LR, Run, StepProgress
from estimator.executor.optim import default_warmup_steps, lr_at
from estimator.executor.resume import save_run_checkpoint
from estimator.executor.step import params_finite, train_step
from estimator.specs.run import StopReason


@contextlib.contextmanager
def signals_stop() -> Iterator[list[int]]:
    """Record SIGINT/SIGTERM instead of dying, so the loop can finish its step and save.
    A second SIGINT raises KeyboardInterrupt. Only in the main thread (signal module rule)."""
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum: int, frame: object) -> None:
        if received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, old in previous.items():
            signal.signal(s, old)


@dataclass
class Outcome:
    """How the loop ended (internal)."""

    stop_reason: StopReason = "max_steps"
    message: str = ""
    checkpoint_dir: Path | None = None
    optimizer_bytes: int | None = None


def _agree(run: Run, loss: float, bad: str | None, received: list[int], step: int
           ) -> tuple[float, str | None, int]:
    """After a step, every rank's (loss, non-finite?, signal?) → the mean loss, a stop message
    if any rank saw a non-finite value, the signal any rank received (0 if none). A single
    process gets its own values back."""
    signum = received[0] if received else 0
    if not run.dist.is_distributed:
        return loss, bad, signum
    rows = distributed.gather_floats([loss, float(bad is not None), float(signum)], run.dist)
    mean = sum(row[0] for row in rows) / len(rows)
    if bad is None and any(row[1] for row in rows):
        bad = f"a rank's loss or gradient norm became non-finite at step {step + 1}"
    return mean, bad, signum or int(max(row[2] for row in rows))


def run_loop(run: Run, data_source: str, timer: measure.StepTimer, peak: measure.PeakMemory,
          on_progress: Callable[[StepProgress], None] | None) -> Outcome:
    """Steps from run.start_step to max_steps: update, report, checkpoint, stop on a signal or a
    non-finite value."""
    config, out = run.config, Outcome()
    base_lr = config.lr if config.lr is not None else DEFAULT_LR[run.setup.method]
    warmup = config.warmup_steps if config.warmup_steps is not None else \
        default_warmup_steps(config.max_steps)
    compiling = contextlib.nullcontext()
    if config.compile:
        from estimator.executor.checkpointing import compile_errors

        compiling = compile_errors()
    with signals_stop() as received, compiling:
        for step in range(run.start_step, config.max_steps):
            lr = lr_at(step, base_lr=base_lr, warmup_steps=warmup, total_steps=config.max_steps)
            frames = _compiled_frames() if config.compile else 0
            timer.start()
            loss, bad = train_step(run, step, lr)
            seconds = timer.stop()
            if config.compile and _compiled_frames() != frames:
                timer.mark_compiled()
            if run.comm is not None:
                run.comm.end_step()
            loss, bad, signum = _agree(run, loss, bad, received, step)
            if bad is not None:
                out.stop_reason, out.message = "nonfinite_loss", bad
                return out
            if out.optimizer_bytes is None:
                out.optimizer_bytes = measure.optimizer_state_bytes(run.optimizer)
            run.losses.append(loss)
            done = step + 1
            report_progress(on_progress, run, done, loss, lr, seconds, timer, peak)
            if received and not run.dist.is_distributed:  # ranks act on agreed signals only
                signum = received[0]
            due = config.checkpoint_every and done % config.checkpoint_every == 0
            if signum or due or done == config.max_steps:
                if not _all_finite(run):
                    out.stop_reason = "nonfinite_loss"
                    out.message = f"weights became non-finite at step {done}"
                    return out
                if run.dist.is_main or run.sharded:  # a sharded save is collective
                    out.checkpoint_dir = save_run_checkpoint(run, done, data_source)
            if signum:
                out.stop_reason = "interrupted"
                out.message = (f"stopped by {signal.Signals(signum).name} after step "
                               f"{done}; checkpoint {out.checkpoint_dir}; continue with --resume")
                return out
    return out


def _all_finite(run: Run) -> bool:
    """Every trainable weight finite; sharded, on every rank (agreed, so all ranks save or
    none does)."""
    finite = params_finite(run.trainable)
    if run.sharded:
        finite = all(row[0] for row in distributed.gather_floats([float(finite)], run.dist))
    return finite


def _compiled_frames() -> int:
    """Frames torch dynamo has compiled in this process so far (count); a change across a
    step means the step compiled (or recompiled) a block."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def final_message(out: Outcome, run: Run, latest: Path | None, resume_note: str | None) -> str:
    """One line on how the run ended and what to do next."""
    message = out.message
    if out.stop_reason == "nonfinite_loss":
        message = f"{message}; stopped without saving; last good checkpoint: {latest or 'none'}"
    elif run.start_step >= run.config.max_steps:
        message = (f"the checkpoint is already at step {run.start_step} ≥ --max-steps "
                   f"{run.config.max_steps}; nothing to train (raise --max-steps to continue)")
    elif out.stop_reason == "max_steps":
        message = f"reached step {run.config.max_steps}; checkpoint {out.checkpoint_dir}"
    return f"{resume_note}; {message}" if resume_note else message


def report_progress(on_progress: Callable[[StepProgress], None] | None, run: Run, done: int,
                     loss: float, lr: float, seconds: float, timer: measure.StepTimer,
                     peak: measure.PeakMemory) -> None:
    if on_progress is None or not run.dist.is_main or (
            done % run.config.log_every and done != run.config.max_steps):
        return
    median = timer.median_seconds() or seconds
    tokens = run.setup.global_tokens_per_step
    on_progress(StepProgress(
        step=done, max_steps=run.config.max_steps, loss=loss, lr=lr, step_seconds=seconds,
        tokens_per_second=tokens / median, eta_seconds=(run.config.max_steps - done) * median,
        memory_bytes=peak.peak_bytes(),
    ))
