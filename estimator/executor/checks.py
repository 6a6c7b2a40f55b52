"""What the bundled trainer can run, checked before anything is built. Pure: no torch, so the
runner, the plan re-check and (through the library) `nvfree estimate` can ask without loading
it. Each check raises SetupError with one line that names the flag to change."""

from estimator.errors import SetupError
from estimator.specs.model import ModelSpec
from estimator.specs.setup import TrainSetup


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
    if spec.position == "learned" and setup.seq_len > spec.max_seq_len:
        raise SetupError(f"--seq-len {setup.seq_len} exceeds the {spec.max_seq_len} "
                         "learned positions of the model")


def check_parallelism(setup: TrainSetup) -> None:
    """Refuse what data parallelism here would not run as the setup says (DDP only)."""
    if setup.zero_stage > 0:
        raise SetupError(f"zero_stage {setup.zero_stage}: the executor runs DDP only (every rank "
                         "holds all states); use zero_stage 0 (sharded modes are unproven here)")
    if setup.offload != "none":
        raise SetupError(f"offload {setup.offload}: the executor has no CPU offload; use 'none'")
    if setup.expert_parallel > 1:
        raise SetupError("expert_parallel > 1: the executor has no expert parallelism; use 1")


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


def check_runnable(spec: ModelSpec, setup: TrainSetup, *, max_grad_norm: float | None = None
                   ) -> None:
    """Every check above: the setup is one the bundled trainer runs as written."""
    check_architecture(spec)
    check_method(spec, setup)
    check_parallelism(setup)
    check_backward_step(setup, max_grad_norm)
