"""The training loop: build the ModelSpec, apply the TrainSetup, train, checkpoint, measure.

`train(...)` is a library call: it never prints. Progress goes to an optional callback (the CLI
draws a rich progress bar from it); the result is a RunReport, also written to
OUTPUT/run_report.json. The loop runs on cpu, cuda, rocm, mps or xpu through torch.device only.

Precision (read with estimator/specs/setup.py):
- full fine-tune, mixed_precision: fp32 weights (the master copy), fp32 grads and optimizer
  states, matmuls under torch.autocast(device, compute dtype). mixed_precision=False: the model
  is stored and trained in the compute dtype (model.to(bfloat16)), states in that dtype.
- LoRA/QLoRA: the frozen base in weight_bits (16 → the compute dtype; 4 → NF4 codes, dequantised
  to the compute dtype per matmul); adapters fp32 under mixed precision, else the compute dtype.
  LoRA with a 16-bit base and fp32 compute (`--bits 16 --dtype fp32`): the base in bf16, each
  weight upcast to fp32 for its own matmul (lora.upcast_frozen_base); all else fp32.

Step semantics: one optimizer step = grad_accum micro-batches of batch_size sequences. The loss
of a step is the mean cross-entropy over its micro-batches (nats/token), computed in fp32.
Stops: max_steps reached; SIGINT/SIGTERM (the current step finishes, a checkpoint is saved);
a non-finite loss or gradient norm (nothing is saved, the last good checkpoint stays).

Compilation (config.compile, `nvfree train --compile`): each decoder block runs under
torch.compile; the first optimizer step compiles (forward, then backward). Every step during
which dynamo compiled a frame is marked on the StepTimer and left out of the step-time median,
like the two warm-up steps (measure.median_step_seconds).
The analytic prediction models eager execution: a compiled run's report says so
(RunReport.compiled and its prediction_note). Compiled blocks keep their parameter names, so
checkpoints and --resume are the same with or without it.

Data parallel (estimator/executor/distributed.py): under torchrun every rank builds the same
model, trains on its own slice of each step's sequences (data.stream_position) and DDP averages
the gradients, so N ranks × accumulation a train exactly as one rank × accumulation N·a. The
ranks agree after every step on the mean loss and on whether to stop (a signal or a non-finite
value on any rank stops all of them after the same step); only rank 0 writes checkpoints and
the report. ZeRO-3 (setup.zero_stage 3, estimator/executor/fsdp.py): the model is sharded by
FSDP2 before resume and the optimizer built over the shards; every rank writes its shard of a
checkpoint (sharded_checkpoint.py).
"""

import contextlib
import dataclasses
import os
from collections.abc import Callable
from pathlib import Path

import torch

from estimator.errors import SetupError
from estimator.executor import checkpoint as ckpt
from estimator.executor import distributed, measure
from estimator.executor.build import (
    TORCH_DTYPES,
    autocast_context,
    build_training_model,
    resolve_device,
    run_tokenizer,
    storage_dtype,
    trim_heap_before_loss_head,
)
from estimator.executor.checks import check_options, check_runnable
from estimator.executor.config import DEFAULT_LR, REPORT_FILE, Run, StepProgress, TrainConfig
from estimator.executor.data import check_vocab, describe_source, load_dataset
from estimator.executor.loop import Outcome, final_message, run_loop
from estimator.executor.optim import BackwardStep, build_optimizer
from estimator.executor.resume import checkpoint_root, prepared_output, resume_run
from estimator.executor.step import clip_norm, train_step
from estimator.specs.model import ModelSpec
from estimator.specs.run import RunReport
from estimator.specs.setup import TrainSetup

__all__ = ["DEFAULT_LR", "REPORT_FILE", "TORCH_DTYPES", "Run", "StepProgress", "TrainConfig",
           "autocast_context", "build_training_model", "clip_norm", "prepare_run",
           "resolve_device", "storage_dtype", "train", "train_step", "train_with_config",
           "trim_heap_before_loss_head"]


def prepare_run(model_spec: ModelSpec, setup: TrainSetup, config: TrainConfig,
                memory_probe: Callable[[], int] = measure.current_rss_bytes
                ) -> tuple[Run, str, int, int]:
    """Data, model, optimizer: returns (run, data source name, memory before the model was
    built, memory after; both from memory_probe, bytes)."""
    check_runnable(model_spec, setup, max_grad_norm=config.max_grad_norm,
                   compile=config.compile)
    device = resolve_device(config.device)
    if config.compile:
        from estimator.executor.checkpointing import check_compile_support

        check_compile_support(device)
    tokenizer = run_tokenizer(config.model_path)
    dataset = load_dataset(config.data, tokenizer, setup.seq_len, text_field=config.text_field)
    data_source = describe_source(config.data)
    runtime_bytes = memory_probe()
    spec, model = build_training_model(model_spec, setup, config, device)
    if device.type == "cpu":  # tokenising and quantising leave freed buffers resident
        measure.release_freed_memory()
        trim_heap_before_loss_head(model)
    check_vocab(dataset.tokens, spec.vocab_size)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lr = config.lr if config.lr is not None else DEFAULT_LR[setup.method]
    if lr > torch.finfo(storage_dtype(setup)).max:
        raise SetupError(f"--lr {lr} overflows the {setup.compute_dtype} weights")
    optimizer = build_optimizer(trainable, setup, lr=lr, weight_decay=config.weight_decay)
    scaler = None
    if setup.compute_dtype == "fp16" and setup.mixed_precision:
        scaler = torch.amp.GradScaler(device.type)
    run = Run(config=config, spec=spec, setup=setup, device=device, dataset=dataset,
               model=model, optimizer=optimizer, trainable=trainable, scaler=scaler)
    if setup.optimizer_in_backward:
        run.backward_step = BackwardStep(optimizer, trainable)
    return run, data_source, runtime_bytes, memory_probe()


def train(model_spec: ModelSpec, setup: TrainSetup, *, max_steps: int, output_dir: Path,
          data: Path | None = None, resume: bool = False, device: str = "cpu", seed: int = 0,
          lr: float | None = None, checkpoint_every: int | None = None, log_every: int = 1,
          on_progress: Callable[[StepProgress], None] | None = None, **options) -> RunReport:
    """Train `model_spec` under `setup` for max_steps optimizer steps, checkpointing into
    output_dir, and return (and write to output_dir/run_report.json) the RunReport with the
    analytic prediction beside the measurement. `options`: the other TrainConfig fields
    (model_path, text_field, warmup_steps, weight_decay, max_grad_norm, lora_dropout,
    keep_checkpoints, predict). `on_progress` is called every log_every steps."""
    config = TrainConfig(max_steps=max_steps, output_dir=Path(output_dir),
                         data=None if data is None else Path(data), resume=resume,
                         device=device, seed=seed, lr=lr, checkpoint_every=checkpoint_every,
                         log_every=log_every, **options)
    return train_with_config(model_spec, setup, config, on_progress=on_progress)


def train_with_config(model_spec: ModelSpec, setup: TrainSetup, config: TrainConfig, *,
                      on_progress: Callable[[StepProgress], None] | None = None) -> RunReport:
    """train() with the options gathered in a TrainConfig. Under torchrun (see
    estimator/executor/distributed.py) every rank calls this; setup.num_devices must equal the
    number of processes. Every rank returns the report; only rank 0 writes it."""
    check_options(max_steps=config.max_steps, seed=config.seed, lr=config.lr,
                  warmup_steps=config.warmup_steps, max_grad_norm=config.max_grad_norm,
                  lora_dropout=config.lora_dropout, checkpoint_every=config.checkpoint_every)
    with distributed.process_group(config.device) as (ctx, device_name):
        distributed.check_setup(setup, ctx)
        config = dataclasses.replace(config, device=device_name,
                                     predict=config.predict and ctx.is_main)
        outputs = prepared_output(model_spec, setup, config) if ctx.is_main else \
            contextlib.nullcontext()
        with outputs:
            peak = measure.PeakMemory(resolve_device(config.device))
            try:
                return _train(model_spec, setup, config, peak, on_progress, ctx)
            finally:
                peak.close()


def _train(model_spec: ModelSpec, setup: TrainSetup, config: TrainConfig,
           peak: measure.PeakMemory, on_progress: Callable[[StepProgress], None] | None,
           ctx: distributed.DistContext) -> RunReport:
    sharded = ctx.is_distributed and setup.zero_stage == 3
    if ctx.is_distributed and resolve_device(config.device).type == "cpu":
        measure.fix_mmap_threshold()  # gloo's threads, FSDP2's per-block buffers: no heap holes
    run, data_source, runtime_bytes, baseline_bytes = prepare_run(model_spec, setup, config,
                                                                  peak.current_bytes)
    run.dist = ctx
    if sharded:
        _shard(run)
        if run.device.type == "cpu":  # the unsharded weights the build left resident
            measure.release_freed_memory()
        baseline_bytes = peak.current_bytes()  # the sharded model is this run's model
    resume_note = resume_run(run, data_source) if config.resume else None
    previous = config.output_dir / REPORT_FILE
    if run.start_step >= config.max_steps and previous.is_file():
        # nothing to train: keep the finished run's measurement instead of comparing the
        # prediction with a peak that no training step produced
        report = _previous_report(previous)
        if report is not None:
            latest = ckpt.latest_checkpoint(checkpoint_root(config))
            where = str(latest.path) if latest else None  # the report names what exists now
            return report.model_copy(update={"checkpoint_dir": where, "message": final_message(
                Outcome(), run, where, resume_note)})
    weights_bytes = measure.weights_bytes(run.model)
    if ctx.is_distributed and not run.sharded:
        run.ddp, run.comm = distributed.wrap_ddp(run.model, run.spec, setup, ctx, run.device)
    timer = measure.StepTimer(run.device)
    run.model.train()
    peak.reset()
    out = run_loop(run, data_source, timer, peak, on_progress)
    peaks = [int(row[0]) for row in distributed.gather_floats([peak.peak_bytes()], ctx)]
    latest = ckpt.latest_checkpoint(checkpoint_root(config))
    latest_path = latest.path if latest else None
    report = measure.build_run_report(
        run.spec, setup, config=config, device=run.device, data_source=data_source,
        num_data_tokens=run.dataset.tokens.numel(), start_step=run.start_step,
        losses=run.losses, step_seconds=timer.step_seconds, stop_reason=out.stop_reason,
        message=final_message(out, run, latest_path, resume_note),
        checkpoint_dir=latest_path, memory_method=peak.method, runtime_bytes=runtime_bytes,
        baseline_bytes=baseline_bytes, peak_bytes=max(peaks), weights_bytes=weights_bytes,
        gradient_bytes=run.grads_bytes, optimizer_bytes=out.optimizer_bytes,
        world_size=ctx.world_size, peak_bytes_per_rank=peaks if ctx.is_distributed else [],
        comm_step_seconds=run.comm.step_seconds if run.comm else None,
        compiled_steps=timer.compiled_steps,
    )
    if config.compile:
        report = _label_compiled(report, timer)
    if ctx.is_main:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        _write_report(report, config.output_dir / REPORT_FILE)
    distributed.barrier(ctx)
    return report


def _shard(run: Run) -> None:
    """ZeRO-3: shard the model with FSDP2 (fsdp.wrap_fsdp) and build the optimizer again over
    the sharded parameters (the one prepare_run built holds no state yet)."""
    from estimator.executor.fsdp import wrap_fsdp

    defaults = run.optimizer.defaults
    run.ddp, run.comm = wrap_fsdp(run.model, run.setup, run.dist, run.device)
    run.sharded = True
    run.trainable = [p for p in run.model.parameters() if p.requires_grad]
    run.optimizer = build_optimizer(run.trainable, run.setup, lr=defaults["lr"],
                                    weight_decay=defaults.get("weight_decay", 0.0))


def _previous_report(path: Path) -> RunReport | None:
    """The finished run's report in the output directory, or None when it does not read."""
    try:
        return RunReport.model_validate_json(path.read_bytes())
    except (OSError, ValueError):
        return None


def _label_compiled(report: RunReport, timer: measure.StepTimer) -> RunReport:
    """Mark a compiled run's report: the prediction beside it models eager execution; say
    which steps compiled (left out of the step time)."""
    note = ("predicted for eager execution; this run was compiled (torch.compile per block): "
            "the estimate models neither the compiled speed nor the compiler's memory")
    compiling = sorted(report.start_step + i + 1 for i in timer.compiled_steps)
    if compiling:
        steps = f"step{'s' if len(compiling) > 1 else ''} {', '.join(map(str, compiling))}"
        if len(compiling) < len(timer.step_seconds):
            note += f"; {steps} compiled (left out of the step time)"
        else:
            note += f"; every step compiled ({steps}): the step time includes the compile"
    if report.prediction_note:
        note = f"{note}; {report.prediction_note}"
    return report.model_copy(update={"compiled": True, "prediction_note": note})


def _write_report(report: RunReport, path: Path) -> None:
    """Write the report atomically (temp file + os.replace)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(report.model_dump_json(indent=2))
    os.replace(tmp, path)
