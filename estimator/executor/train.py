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
the report.
"""

import contextlib
import dataclasses
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from estimator.errors import ConfigError, SetupError
from estimator.executor import checkpoint as ckpt
from estimator.executor import distributed, measure
from estimator.executor.data import (
    PackedDataset,
    Tokenizer,
    check_vocab,
    describe_source,
    load_dataset,
    stream_position,
)
from estimator.executor.optim import (
    BackwardStep,
    build_optimizer,
    clip_gradients,
    default_warmup_steps,
    lr_at,
    set_lr,
)
from estimator.specs.model import ModelSpec
from estimator.specs.run import RunReport, StopReason
from estimator.specs.setup import TrainSetup

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_LR = {"full": 1e-4, "lora": 2e-4, "qlora": 2e-4}
"""Peak learning rate per method when none is given (common fine-tuning defaults: HF/PEFT
examples use 1e-4–2e-4 for LoRA; 1e-5–1e-4 for full fine-tunes)."""
REPORT_FILE = "run_report.json"


@dataclass(frozen=True)
class StepProgress:
    """What the loop reports after every optimizer step (the CLI renders it)."""

    step: int
    """Optimizer steps done (count)."""
    max_steps: int
    """Step target (count)."""
    loss: float
    """Mean loss of the step (nats/token)."""
    lr: float
    """Learning rate used by the step."""
    step_seconds: float
    """Wall time of this step (seconds)."""
    tokens_per_second: float
    """Tokens per second at the median step time so far (tokens/s)."""
    eta_seconds: float
    """Remaining steps × median step time (seconds)."""
    memory_bytes: int
    """Peak memory of the training phase so far (bytes)."""


@dataclass(frozen=True)
class TrainConfig:
    """Everything train() needs besides the model and setup (defaults are the CLI's)."""

    max_steps: int
    output_dir: Path
    data: Path | None = None
    text_field: str = "text"
    model_path: Path | None = None
    resume: bool = False
    device: str = "cpu"
    seed: int = 0
    lr: float | None = None
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    """Clip the global gradient norm to this (0: no clipping); None: 1.0, or 0 when the
    optimizer steps in backward (which cannot clip: see optim.BackwardStep)."""
    lora_dropout: float = 0.0
    checkpoint_every: int | None = None
    keep_checkpoints: int = 2
    log_every: int = 1
    predict: bool = True
    compile: bool = False
    """torch.compile each decoder block (checkpointing.compile_blocks) after LoRA, NF4 and
    checkpointing; the first steps compile (the step-time median skips them)."""


@dataclass
class Run:
    """Mutable state of one run: what prepare_run builds and train_step advances."""

    config: TrainConfig
    spec: ModelSpec
    setup: TrainSetup
    device: torch.device
    dataset: PackedDataset
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    trainable: list[torch.nn.Parameter]
    start_step: int = 0
    losses: list[float] = field(default_factory=list)
    grads_bytes: int | None = None
    scaler: torch.amp.GradScaler | None = None
    dist: distributed.DistContext = field(default_factory=distributed.DistContext)
    ddp: torch.nn.Module | None = None
    """The DDP-wrapped LossModule that forwards micro-batches when dist.is_distributed."""
    allreduce: distributed.AllReduceTimer | None = None
    backward_step: BackwardStep | None = None
    """The optimizer's per-parameter step inside backward (setup.optimizer_in_backward)."""


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
    if setup.weight_bits == 32 or compute == torch.float32:
        return torch.float32
    return compute


def autocast_context(setup: TrainSetup, device: torch.device) -> contextlib.AbstractContextManager:
    """torch.autocast in the compute dtype under mixed precision, else nothing."""
    if setup.mixed_precision and setup.compute_dtype != "fp32":
        return torch.autocast(device.type, dtype=TORCH_DTYPES[setup.compute_dtype])
    return contextlib.nullcontext()


def _load_tokenizer(model_path: Path | None) -> Tokenizer:
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
    if setup.method == "qlora":
        from estimator.executor.nf4 import apply_nf4

        apply_nf4(model, double_quant=setup.double_quant,
                  compute_dtype=TORCH_DTYPES[setup.compute_dtype])
    if setup.checkpointing:
        apply_checkpointing(model)
    if config.compile:
        compile_blocks(model)
    return spec, model


def _checkpoint_root(config: TrainConfig) -> Path:
    return config.output_dir / ckpt.CHECKPOINTS_DIR


def _check_resumable(saved: dict, run: Run, data_source: str) -> None:
    mismatches = [
        name for name, ours in (
            ("model", run.spec.model_dump(mode="json")),
            ("setup", run.setup.model_dump(mode="json")),
            ("seed", run.config.seed),
            ("data", data_source),
            ("num_data_tokens", run.dataset.tokens.numel()),
        ) if saved.get(name) != ours
    ]
    if mismatches:
        raise ConfigError(
            f"the checkpoint in {run.config.output_dir} was made with a different "
            f"{', '.join(mismatches)}; rerun with the same flags or use another --output"
        )


def _resume(run: Run, data_source: str) -> str | None:
    """Load the latest good checkpoint into run; return a note when there was none."""
    root = _checkpoint_root(run.config)
    loaded = ckpt.latest_checkpoint(root)
    if loaded is None:
        return f"no checkpoint to resume in {root}; started at step 0"
    _check_resumable(loaded.state, run, data_source)
    ckpt.restore_model(loaded, run.model)
    ckpt.restore_optimizer(loaded, run.optimizer)
    ckpt.restore_rng_states(loaded.state["rng"], run.device)
    if run.scaler is not None and loaded.state.get("grad_scaler"):
        run.scaler.load_state_dict(loaded.state["grad_scaler"])
    run.start_step = loaded.step
    run.losses = list(loaded.state["losses"])
    return None


def _save(run: Run, step: int, data_source: str) -> Path:
    setup = run.setup
    write_adapter = None
    if setup.trains_adapters:
        from estimator.executor.lora import save_peft_adapter

        model_type = "llama"
        if run.config.model_path is not None:
            from estimator.executor.hf import read_config

            model_type = read_config(run.config.model_path).get("model_type", "llama")

        def write_adapter(path: Path) -> None:
            save_peft_adapter(run.model, path, base_model_name=str(run.config.model_path
                                                                   or run.spec.name),
                              rank=setup.lora_rank, alpha=setup.lora_alpha,
                              dropout=run.config.lora_dropout, targets=setup.lora_targets,
                              model_type=model_type)

    state = {
        "model": run.spec.model_dump(mode="json"),
        "setup": setup.model_dump(mode="json"),
        "seed": run.config.seed,
        "data": data_source,
        "num_data_tokens": run.dataset.tokens.numel(),
        "data_position": step * setup.batch_size * setup.grad_accum * run.dist.world_size,
        "losses": run.losses,
        "rng": ckpt.rng_states(run.device),
        "grad_scaler": run.scaler.state_dict() if run.scaler is not None else None,
    }
    return ckpt.save_checkpoint(_checkpoint_root(run.config), step, model=run.model,
                                optimizer=run.optimizer, state=state,
                                trainable_only=setup.trains_adapters,
                                write_adapter=write_adapter,
                                keep_last=run.config.keep_checkpoints)


@contextlib.contextmanager
def _signals_stop() -> Iterator[list[int]]:
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
        with contextlib.nullcontext() if run.ddp is None or last else run.ddp.no_sync():
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


def clip_norm(config: TrainConfig, setup: TrainSetup) -> float:
    """The gradient-norm limit of the run: config.max_grad_norm, by default 1.0 (0, no
    clipping, when the optimizer steps in backward)."""
    if config.max_grad_norm is not None:
        return config.max_grad_norm
    return 0.0 if setup.optimizer_in_backward else 1.0


def _params_finite(params: list[torch.nn.Parameter]) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


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


def prepare_run(model_spec: ModelSpec, setup: TrainSetup, config: TrainConfig,
                memory_probe: Callable[[], int] = measure.current_rss_bytes
                ) -> tuple[Run, str, int, int]:
    """Data, model, optimizer: returns (run, data source name, memory before the model was
    built, memory after; both from memory_probe, bytes)."""
    if setup.method == "inference":
        raise SetupError("nvfree train needs --method full, lora or qlora (not inference)")
    if setup.weight_bits == 8:
        raise SetupError("the executor has no 8-bit base weights; use --bits 16 (LoRA) or "
                         "--bits 4 (QLoRA)")
    if setup.attention != "sdpa":
        raise SetupError("the executor runs SDPA attention only; use --attention sdpa")
    if model_spec.position == "learned" and setup.seq_len > model_spec.max_seq_len:
        raise SetupError(f"--seq-len {setup.seq_len} exceeds the {model_spec.max_seq_len} "
                         "learned positions of the model")
    if setup.optimizer_in_backward:
        _check_backward_step(setup, config)
    device = resolve_device(config.device)
    if config.compile:
        from estimator.executor.checkpointing import check_compile_support

        check_compile_support(device)
    tokenizer = _load_tokenizer(config.model_path)
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


def _check_backward_step(setup: TrainSetup, config: TrainConfig) -> None:
    """What the optimizer step in backward cannot do: clip the global gradient norm (it is not
    known until every gradient exists) or unscale fp16 gradients (GradScaler steps after
    backward)."""
    if config.max_grad_norm:
        raise SetupError(f"--max-grad-norm {config.max_grad_norm:g} needs every gradient before "
                         "the step; with --optimizer-in-backward use --max-grad-norm 0")
    if setup.compute_dtype == "fp16" and setup.mixed_precision:
        raise SetupError("fp16 mixed precision scales the loss and unscales every gradient "
                         "after backward; with --optimizer-in-backward use --dtype bf16 or fp32")


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
    if config.max_steps <= 0:
        raise SetupError("--max-steps must be positive")
    with distributed.process_group(config.device) as (ctx, device_name):
        distributed.check_setup(setup, ctx)
        config = dataclasses.replace(config, device=device_name,
                                     predict=config.predict and ctx.is_main)
        root = _checkpoint_root(config)
        if not config.resume and ckpt.list_checkpoints(root):
            raise ConfigError(f"{config.output_dir} already holds checkpoints; pass --resume "
                              "to continue that run or choose another --output")
        peak = measure.PeakMemory(resolve_device(config.device))
        try:
            return _train(model_spec, setup, config, peak, on_progress, ctx)
        finally:
            peak.close()


@dataclass
class _Outcome:
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


def _loop(run: Run, data_source: str, timer: measure.StepTimer, peak: measure.PeakMemory,
          on_progress: Callable[[StepProgress], None] | None) -> _Outcome:
    """Steps from run.start_step to max_steps: update, report, checkpoint, stop on a signal or a
    non-finite value."""
    config, out = run.config, _Outcome()
    base_lr = config.lr if config.lr is not None else DEFAULT_LR[run.setup.method]
    warmup = config.warmup_steps if config.warmup_steps is not None else \
        default_warmup_steps(config.max_steps)
    compiling = contextlib.nullcontext()
    if config.compile:
        from estimator.executor.checkpointing import compile_errors

        compiling = compile_errors()
    with _signals_stop() as received, compiling:
        for step in range(run.start_step, config.max_steps):
            lr = lr_at(step, base_lr=base_lr, warmup_steps=warmup, total_steps=config.max_steps)
            frames = _compiled_frames() if config.compile else 0
            timer.start()
            loss, bad = train_step(run, step, lr)
            seconds = timer.stop()
            if config.compile and _compiled_frames() != frames:
                timer.mark_compiled()
            if run.allreduce is not None:
                run.allreduce.end_step()
            loss, bad, signum = _agree(run, loss, bad, received, step)
            if bad is not None:
                out.stop_reason, out.message = "nonfinite_loss", bad
                return out
            if out.optimizer_bytes is None:
                out.optimizer_bytes = measure.optimizer_state_bytes(run.optimizer)
            run.losses.append(loss)
            done = step + 1
            _report_progress(on_progress, run, done, loss, lr, seconds, timer, peak)
            if received and not run.dist.is_distributed:  # ranks act on agreed signals only
                signum = received[0]
            due = config.checkpoint_every and done % config.checkpoint_every == 0
            if signum or due or done == config.max_steps:
                if not _params_finite(run.trainable):
                    out.stop_reason = "nonfinite_loss"
                    out.message = f"weights became non-finite at step {done}"
                    return out
                if run.dist.is_main:
                    out.checkpoint_dir = _save(run, done, data_source)
            if signum:
                out.stop_reason = "interrupted"
                out.message = (f"stopped by {signal.Signals(signum).name} after step "
                               f"{done}; checkpoint {out.checkpoint_dir}; continue with --resume")
                return out
    return out


def _compiled_frames() -> int:
    """Frames torch dynamo has compiled in this process so far (count); a change across a
    step means the step compiled (or recompiled) a block."""
    from torch._dynamo.utils import counters

    return counters["frames"]["total"]


def _final_message(out: _Outcome, run: Run, latest: Path | None, resume_note: str | None) -> str:
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


def _train(model_spec: ModelSpec, setup: TrainSetup, config: TrainConfig,
           peak: measure.PeakMemory, on_progress: Callable[[StepProgress], None] | None,
           ctx: distributed.DistContext) -> RunReport:
    run, data_source, runtime_bytes, baseline_bytes = prepare_run(model_spec, setup, config,
                                                                  peak.current_bytes)
    run.dist = ctx
    resume_note = _resume(run, data_source) if config.resume else None
    previous = config.output_dir / REPORT_FILE
    if run.start_step >= config.max_steps and previous.is_file():
        # nothing to train: keep the finished run's measurement instead of comparing the
        # prediction with a peak that no training step produced
        report = RunReport.model_validate_json(previous.read_text())
        return report.model_copy(update={"message": _final_message(
            _Outcome(), run, report.checkpoint_dir, resume_note)})
    weights_bytes = measure.weights_bytes(run.model)
    if ctx.is_distributed:
        run.ddp, run.allreduce = distributed.wrap_ddp(run.model, run.spec, setup, ctx, run.device)
    timer = measure.StepTimer(run.device)
    run.model.train()
    peak.reset()
    out = _loop(run, data_source, timer, peak, on_progress)
    peaks = [int(row[0]) for row in distributed.gather_floats([peak.peak_bytes()], ctx)]
    latest = ckpt.latest_checkpoint(_checkpoint_root(config))
    latest_path = latest.path if latest else None
    report = measure.build_run_report(
        run.spec, setup, config=config, device=run.device, data_source=data_source,
        num_data_tokens=run.dataset.tokens.numel(), start_step=run.start_step,
        losses=run.losses, step_seconds=timer.step_seconds, stop_reason=out.stop_reason,
        message=_final_message(out, run, latest_path, resume_note),
        checkpoint_dir=latest_path, memory_method=peak.method, runtime_bytes=runtime_bytes,
        baseline_bytes=baseline_bytes, peak_bytes=max(peaks), weights_bytes=weights_bytes,
        gradient_bytes=run.grads_bytes, optimizer_bytes=out.optimizer_bytes,
        world_size=ctx.world_size, peak_bytes_per_rank=peaks if ctx.is_distributed else [],
        allreduce_step_seconds=run.allreduce.step_seconds if run.allreduce else None,
        compiled_steps=timer.compiled_steps,
    )
    if config.compile:
        report = _label_compiled(report, timer)
    if ctx.is_main:
        config.output_dir.mkdir(parents=True, exist_ok=True)
        _write_report(report, config.output_dir / REPORT_FILE)
    distributed.barrier(ctx)
    return report


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


def _report_progress(on_progress: Callable[[StepProgress], None] | None, run: Run, done: int,
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


def _write_report(report: RunReport, path: Path) -> None:
    """Write the report atomically (temp file + os.replace)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(report.model_dump_json(indent=2))
    os.replace(tmp, path)
