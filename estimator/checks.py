"""The one check of a setup, called by estimate, plan, compare, train and run.

Two kinds of answer: `check(model, setup, device)` refuses (SetupError, one line) what no
training code can do with this model on this device — a LoRA rank above the hidden size,
expert parallelism on a dense model, more tokens than a learned position table has rows,
offload to the memory the device already uses; `trainer_limits(model, setup)` lists what
the bundled trainer (`nvfree train`, `plan`, `run`) cannot run, which estimate reports without
refusing ('the bundled trainer cannot run this: …') and train, plan and run refuse.
"""

from estimator.errors import SetupError
from estimator.specs import Device, ModelSpec, TrainSetup
from estimator.specs.setup import LINEAR_TARGETS


def resolve_setup(model: ModelSpec, setup: TrainSetup) -> TrainSetup:
    """The setup with its LoRA targets in the canonical names the analytic model counts
    (analytic.params.resolve_lora_targets: Qwen-1's c_attn → q_proj, k_proj, v_proj; a fused
    module's members all together); the same object when nothing changes."""
    from estimator.analytic.params import resolve_lora_targets

    if not setup.trains_adapters:
        return setup
    targets, unknown = resolve_lora_targets(model, setup.lora_targets)
    if unknown:
        raise SetupError(f"unknown LoRA target(s) {', '.join(unknown)} for {model.name}; use "
                         f"PEFT names: {lora_target_names(model)} or all-linear")
    if targets == setup.lora_targets:
        return setup
    return setup.model_copy(update={"lora_targets": targets})


def lora_target_names(model: ModelSpec) -> str:
    """The --lora-targets names a model takes, for messages: canonical, then its own."""
    return ", ".join([*LINEAR_TARGETS, *(n for n in model.lora_module_names
                                         if n not in LINEAR_TARGETS)])


def check(model: ModelSpec, setup: TrainSetup, device: Device | None = None) -> TrainSetup:
    """Refuse, with one line, what no framework can train or run; return the setup with
    canonical LoRA targets (resolve_setup). Without a device, the device checks are skipped
    (the planner checks its base setup once per device)."""
    setup = resolve_setup(model, setup)
    for problem in (_size_problem(model), _adapter_problem(model, setup),
                    _expert_problem(model, setup), _position_problem(model, setup),
                    _offload_problem(setup, device) if device is not None else None,
                    _process_problem(setup, device) if device is not None else None):
        if problem:
            raise SetupError(problem)
    return setup


MAX_PARAMS = 10**15
"""Most parameters a model may have (a quadrillion: ~1,000× the largest published, and the
bound of --params, inputs.RANGES, with room for configs): beyond it no device or cluster could
hold it, and the planner's byte arithmetic stays within 64-bit integers."""


def _size_problem(model: ModelSpec) -> str | None:
    """A model too large for anything to train or run (a config.json with absurd sizes)."""
    from estimator.analytic.params import count_params

    total = count_params(model).total
    if total > MAX_PARAMS:
        return (f"{model.name} has {total:.3g} parameters, more than {MAX_PARAMS:.0e}: check "
                "its sizes")
    return None


def _adapter_problem(model: ModelSpec, setup: TrainSetup) -> str | None:
    if not setup.trains_adapters:
        return None
    if setup.lora_rank > model.hidden_size:
        return f"LoRA rank {setup.lora_rank} exceeds the hidden size {model.hidden_size}"
    from estimator.analytic.frameworks.targets import head_target_ok

    unknown = [t for t in setup.lora_targets
               if t not in LINEAR_TARGETS and not head_target_ok(setup, t)]
    if unknown:
        return (f"unknown LoRA target(s) {', '.join(unknown)}; use PEFT names: "
                f"{', '.join(LINEAR_TARGETS)} or all-linear")
    return None


def _expert_problem(model: ModelSpec, setup: TrainSetup) -> str | None:
    if setup.expert_parallel > 1 and model.moe is None:
        return (f"--expert-parallel {setup.expert_parallel} needs an MoE model; {model.name} "
                "is dense")
    if model.moe is not None and setup.expert_parallel > model.moe.num_experts:
        return (f"--expert-parallel {setup.expert_parallel} exceeds the "
                f"{model.moe.num_experts} experts of {model.name}")
    return None


def _position_problem(model: ModelSpec, setup: TrainSetup) -> str | None:
    """A learned position table has max_seq_len rows: longer sequences cannot be embedded by
    any framework (RoPE models extrapolate, at their own risk)."""
    if model.position == "learned" and setup.seq_len > model.max_seq_len:
        return (f"--seq-len {setup.seq_len} exceeds the {model.max_seq_len} learned positions "
                f"of {model.name}")
    return None


def _offload_problem(setup: TrainSetup, device: Device) -> str | None:
    """A CPU has no separate host memory to offload to; offload needs a training optimizer;
    parameter offload streams sharded parameters (ZeRO-Infinity)."""
    if setup.offload == "none":
        return None
    if device.kind == "cpu" or device.unified_memory:
        return (f"--offload moves states to host memory, but {device.display_name} already "
                "uses host memory: use --offload none")
    if setup.method == "inference":
        return "--offload applies to training (optimizer states); use --offload none"
    if setup.offload == "optimizer_and_params" and setup.zero_stage != 3:
        return "--offload optimizer_and_params streams sharded parameters (ZeRO-Infinity): " \
               "use --zero 3"
    return None


def _process_problem(setup: TrainSetup, device: Device) -> str | None:
    """Several ranks on one CPU machine split its cores (analytic.parallel.rank_device): each
    needs at least one."""
    from estimator.analytic.parallel import ranks_per_node

    ranks = ranks_per_node(setup)
    if device.kind == "cpu" and device.num_cores and ranks > device.num_cores:
        return (f"{ranks} processes per machine on {device.display_name}, which has "
                f"{device.num_cores} cores: at most one process per core (use more --nodes)")
    return None


def offload_problem(setup: TrainSetup) -> str | None:
    """Why the trainer cannot offload as the setup says, or None. It offloads one way:
    FSDP2's CPUOffloadPolicy (sharded parameters, gradients and optimizer states in host
    memory, the optimizer step on the CPU: estimator/executor/fsdp.py), which is
    --offload optimizer_and_params under --zero 3 on two or more ranks, LoRA or a full
    fine-tune."""
    if setup.offload == "none":
        return None
    if setup.offload == "optimizer":
        return ("offloading the optimizer alone (ZeRO-Offload) is planned only; the trainer "
                "offloads the parameters with it: --offload optimizer_and_params --zero 3")
    if setup.zero_stage != 3 or setup.num_devices < 2:
        return "the trainer offloads through FSDP2 on 2 or more ranks: use --zero 3 and --nproc 2"
    if setup.method == "qlora":
        return ("the NF4 base stays whole on every rank under FSDP2 and is not offloaded; "
                "use --offload none")
    return None


TRAINER_OPTIMIZERS = ("adamw", "adamw8bit", "sgd", "sgd_momentum", "adafactor")
"""The optimizers the bundled trainer builds (executor/optim.py build_optimizer; adafactor
where torch has torch.optim.Adafactor); lion is estimated only."""


def trainer_limits(model: ModelSpec, setup: TrainSetup) -> list[str]:
    """What the bundled trainer cannot run of this model and setup (empty when it can): the
    one list `estimate` reports and train, plan and run refuse on."""
    offload = offload_problem(setup)
    layout = {
        "MLA attention": model.mla is not None,
        "attention sinks": model.attention_sinks,
        f"{model.attentions_per_layer} attentions per layer": model.attentions_per_layer > 1,
        "a parallel residual": model.parallel_residual,
        f"{model.norms_per_layer} norms per layer": (model.norms_per_layer or 2) != 2,
        "a GeGLU MLP": model.mlp == "geglu",
        "q/k norms over the whole projection": model.qk_norm_scope == "projection",
        "an lm_head bias": model.lm_head_bias,
        "MLP biases": model.mlp_bias,
        "zero-computation experts": model.moe is not None and model.moe.num_zero_experts > 0,
        "dense FFNs beside the MoE": model.moe is not None and model.moe.dense_mlps_per_layer > 0,
        "a shared-expert gate": model.moe is not None and model.moe.shared_expert_gate,
    }
    out = [f"{model.name} has {what}" for what, present in layout.items() if present]
    run = {
        "inference (it trains)": setup.method == "inference",
        "8-bit base weights (use --bits 16 or 4)": setup.weight_bits == 8,
        f"--optimizer {setup.optimizer} (it runs {', '.join(TRAINER_OPTIMIZERS)})":
            setup.optimizer not in TRAINER_OPTIMIZERS,
        "eager attention (it runs SDPA)": setup.attention != "sdpa",
        f"ZeRO-{setup.zero_stage} (it runs DDP or ZeRO-3 on FSDP2)": setup.zero_stage in (1, 2),
        "the optimizer step in backward under ZeRO-3":
            setup.zero_stage == 3 and setup.num_devices > 1 and setup.optimizer_in_backward,
        f"--optimizer {setup.optimizer} under ZeRO-3 (adamw, sgd or sgd_momentum)":
            setup.zero_stage == 3 and setup.num_devices > 1
            and setup.optimizer not in ("adamw", "sgd", "sgd_momentum"),
        f"--offload {setup.offload} ({offload})": offload is not None,
        "expert parallelism": setup.expert_parallel > 1,
        "fp16 mixed precision with the optimizer step in backward (use bf16 or fp32)":
            setup.optimizer_in_backward and setup.compute_dtype == "fp16"
            and setup.mixed_precision,
    }
    return out + [what for what, present in run.items() if present]
