"""What the bundled trainer can run, checked before anything is built. Pure: no torch, so the
runner, the plan re-check and (through the library) `nvfree estimate` can ask without loading
it. Each check raises SetupError with one line that names the flag to change."""

import math

from estimator.analytic.model_state import optimizer_state_bytes, trainable_bytes_per_param
from estimator.analytic.params import count_params
from estimator.checks import TRAINER_OPTIMIZERS, offload_problem
from estimator.errors import SetupError
from estimator.inputs import MAX_SEED
from estimator.specs.model import ModelSpec
from estimator.specs.setup import TrainSetup

CHECKPOINT_OVERHEAD_BYTES = 1 << 20
"""state.json, the adapter's config and safetensors headers, rounded up (bytes)."""


def check_architecture(spec: ModelSpec) -> None:
    """Refuse architectures the executor's model (executor/model.py) does not build."""
    unsupported = {
        "MLA": spec.mla is not None,
        "attention sinks": spec.attention_sinks,
        f"{spec.attentions_per_layer} attentions per layer": spec.attentions_per_layer > 1,
    }
    moe = spec.moe
    if moe is not None:
        unsupported["zero-computation experts"] = moe.num_zero_experts > 0
        unsupported["dense FFNs beside the MoE"] = moe.dense_mlps_per_layer > 0
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise SetupError(
            f"{spec.name}: {', '.join(bad)} models can be estimated but not trained by the "
            "bundled executor"
        )


def check_method(spec: ModelSpec, setup: TrainSetup) -> None:
    """Refuse methods, precisions, attention kernels and lengths the trainer lacks."""
    if setup.method == "inference":
        raise SetupError("nvfree train needs --method full, lora or qlora (not inference)")
    if setup.weight_bits == 8:
        raise SetupError("the executor has no 8-bit base weights; use --bits 16 (LoRA) or "
                         "--bits 4 (QLoRA)")
    if setup.attention != "sdpa":
        raise SetupError("the executor runs SDPA attention only; use --attention sdpa")
    if setup.optimizer not in TRAINER_OPTIMIZERS:
        raise SetupError(f"the executor has no {setup.optimizer} optimizer; use --optimizer "
                         f"{', '.join(TRAINER_OPTIMIZERS)}")
    if spec.position == "learned" and setup.seq_len > spec.max_seq_len:
        raise SetupError(f"--seq-len {setup.seq_len} exceeds the {spec.max_seq_len} "
                         "learned positions of the model")


def check_parallelism(setup: TrainSetup, *, compile: bool = False) -> None:
    """Refuse what data parallelism here would not run as the setup says: DDP (zero_stage 0)
    or ZeRO-3 on FSDP2 (estimator/executor/fsdp.py) and nothing else."""
    if setup.zero_stage in (1, 2):
        raise SetupError(f"zero_stage {setup.zero_stage}: the executor runs DDP (--zero 0) or "
                         "ZeRO-3 on FSDP2 (--zero 3); ZeRO-1/2 are planned only")
    problem = offload_problem(setup)
    if problem:
        raise SetupError(f"--offload {setup.offload}: {problem}")
    if setup.expert_parallel > 1:
        raise SetupError("expert_parallel > 1: the executor has no expert parallelism; use 1")
    if setup.zero_stage == 3 and setup.num_devices > 1:
        check_zero3(setup, compile=compile)


def check_zero3(setup: TrainSetup, *, compile: bool = False) -> None:
    """What ZeRO-3 on FSDP2 here does not run as planned (one line each)."""
    unsupported = {
        "--optimizer-in-backward; use --zero 0": setup.optimizer_in_backward,
        f"--optimizer {setup.optimizer}; use adamw, sgd or sgd_momentum":
            setup.optimizer not in ("adamw", "sgd", "sgd_momentum"),
        "fp16 mixed precision (no loss scaling of sharded gradients); use --dtype bf16 or fp32":
            setup.compute_dtype == "fp16" and setup.mixed_precision,
        "--compile; train without it or with --zero 0": compile,
    }
    bad = [name for name, flag in unsupported.items() if flag]
    if bad:
        raise SetupError(f"--zero 3 (FSDP2) does not run {bad[0]}")


def check_backward_step(setup: TrainSetup, max_grad_norm: float | None) -> None:
    """What the optimizer step in backward cannot do: clip the global gradient norm (it is not
    known until every gradient exists) or unscale fp16 gradients (GradScaler steps after
    backward)."""
    if not setup.optimizer_in_backward:
        return
    if max_grad_norm:
        raise SetupError(f"--max-grad-norm {max_grad_norm:g} needs every gradient before "
                         "the step; with --optimizer-in-backward use --max-grad-norm 0")
    if setup.compute_dtype == "fp16" and setup.mixed_precision:
        raise SetupError("fp16 mixed precision scales the loss and unscales every gradient "
                         "after backward; with --optimizer-in-backward use --dtype bf16 or fp32")




def check_options(*, max_steps: int, seed: int, lr: float | None, warmup_steps: int | None,
                  max_grad_norm: float | None, lora_dropout: float,
                  checkpoint_every: int | None) -> None:
    """The run options besides the setup: counts positive, numbers finite and in range."""
    if max_steps < 1:
        raise SetupError(f"--max-steps {max_steps}: must be at least 1")
    if not 0 <= seed <= MAX_SEED:
        raise SetupError(f"--seed {seed}: must be in [0, {MAX_SEED}]")
    for flag, value in (("--lr", lr), ("--max-grad-norm", max_grad_norm),
                        ("--lora-dropout", lora_dropout)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise SetupError(f"{flag} {value}: must be a finite number ≥ 0")
    if lora_dropout > 1:
        raise SetupError(f"--lora-dropout {lora_dropout}: must be at most 1")
    if warmup_steps is not None and warmup_steps < 0:
        raise SetupError(f"--warmup-steps {warmup_steps}: must be ≥ 0")
    if checkpoint_every is not None and checkpoint_every < 1:
        raise SetupError(f"--checkpoint-every {checkpoint_every}: must be at least 1")


def check_runnable(spec: ModelSpec, setup: TrainSetup, *, max_grad_norm: float | None = None,
                   compile: bool = False) -> None:
    """Every check above: the setup is one the bundled trainer runs as written."""
    check_architecture(spec)
    check_method(spec, setup)
    check_parallelism(setup, compile=compile)
    if spec.moe is not None and setup.zero_stage == 3 and setup.num_devices > 1:
        raise SetupError("--zero 3 (FSDP2) does not run MoE models here (unproven with routed "
                         "experts left unused in a micro-batch); use --zero 0 (DDP)")
    check_backward_step(setup, max_grad_norm)


def checkpoint_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes one checkpoint takes on disk (executor/checkpoint.py): the trainable parameters in
    their stored dtype (fp32 under mixed precision), a second copy for LoRA (the PEFT adapter
    beside model.safetensors), the optimizer states, and CHECKPOINT_OVERHEAD_BYTES."""
    nvfree = setup.model_copy(update={"framework": "nvfree"})
    params = count_params(spec, nvfree)
    weights = params.trainable * trainable_bytes_per_param(nvfree)
    copies = 2 if nvfree.trains_adapters else 1
    return (weights * copies + optimizer_state_bytes(spec, nvfree, params)
            + CHECKPOINT_OVERHEAD_BYTES)
