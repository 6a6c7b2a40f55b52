"""Options shared by `estimate`, `train` and `plan`, and their translation into specs.

Each option is an Annotated alias so a command declares it in one line; `resolve_inputs` turns
the parsed values into (ModelSpec, TrainSetup, Device, profile, notes)."""

from typing import Annotated, Literal

import typer

from estimator.errors import SetupError

MODEL_PANEL = "Model"
SETUP_PANEL = "Training setup"


ModelOpt = Annotated[str | None, typer.Option(
    "--model", "-m", rich_help_panel=MODEL_PANEL,
    help="Preset name or HF id (see `nvfree models`), or a config.json / model directory.")]
ParamsOpt = Annotated[float | None, typer.Option(
    "--params", rich_help_panel=MODEL_PANEL,
    help="Total parameters, e.g. 56e9; a Llama-style architecture is inferred and stated.")]
ActiveParamsOpt = Annotated[float | None, typer.Option(
    "--active-params", rich_help_panel=MODEL_PANEL,
    help="MoE: parameters active per token (with --params).")]
ActiveRatioOpt = Annotated[float | None, typer.Option(
    "--active-ratio", rich_help_panel=MODEL_PANEL,
    help="MoE: active / total parameters, 0 < r ≤ 1 (with --params).")]
MethodOpt = Annotated[Literal["full", "lora", "qlora", "inference"] | None, typer.Option(
    "--method", rich_help_panel=SETUP_PANEL,
    help="full | lora | qlora | inference  [default: qlora for --bits 4, lora for 8, else full]")]
BitsOpt = Annotated[Literal["4", "8", "16", "32"] | None, typer.Option(
    "--bits", rich_help_panel=SETUP_PANEL,
    help="Storage bits of the base weights: 4 (NF4), 8, 16, 32  [default: 4 for qlora, 32 for "
         "--dtype fp32, else 16]")]
DtypeOpt = Annotated[Literal["auto", "fp32", "bf16", "fp16"], typer.Option(
    "--dtype", rich_help_panel=SETUP_PANEL,
    help="Compute dtype; auto = bf16 where the device has a bf16 rate (or measured faster).")]
LoraRankOpt = Annotated[int, typer.Option("--lora-rank", min=1, rich_help_panel=SETUP_PANEL)]
LoraAlphaOpt = Annotated[float, typer.Option("--lora-alpha", min=0.0, rich_help_panel=SETUP_PANEL)]
LoraTargetsOpt = Annotated[str, typer.Option(
    "--lora-targets", rich_help_panel=SETUP_PANEL,
    help="PEFT module names, comma-separated (q_proj,v_proj), or all-linear.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, rich_help_panel=SETUP_PANEL,
                                       help="Micro-batch (sequences).")]
SeqOpt = Annotated[int, typer.Option("--seq-len", "-s", min=1, rich_help_panel=SETUP_PANEL,
                                     help="Tokens per sequence.")]
AccumOpt = Annotated[int, typer.Option("--grad-accum", min=1, rich_help_panel=SETUP_PANEL)]
CkptOpt = Annotated[bool, typer.Option("--checkpointing/--no-checkpointing",
                                       rich_help_panel=SETUP_PANEL,
                                       help="Gradient checkpointing of every block.")]
OptimizerOpt = Annotated[
    Literal["adamw", "adamw8bit", "sgd", "sgd_momentum", "adafactor", "lion"],
    typer.Option("--optimizer", rich_help_panel=SETUP_PANEL)]
MixedOpt = Annotated[bool, typer.Option(
    "--mixed-precision/--no-mixed-precision", rich_help_panel=SETUP_PANEL,
    help="fp32 master weights and optimizer states with 16-bit compute (autocast), or pure "
         "16-bit training as model.to(torch.bfloat16).")]
AttentionOpt = Annotated[Literal["sdpa", "eager"],
                         typer.Option("--attention", rich_help_panel=SETUP_PANEL)]
DoubleQuantOpt = Annotated[bool, typer.Option("--double-quant/--no-double-quant",
                                              rich_help_panel=SETUP_PANEL,
                                              help="NF4 double quantisation of block scales.")]
FusedLossOpt = Annotated[bool, typer.Option(
    "--fused-loss/--no-fused-loss", rich_help_panel=SETUP_PANEL,
    help="lm_head + cross-entropy fused in row chunks (the bundled trainer), or full b·s·V "
         "logits (HF Trainer's default).")]
BackwardStepOpt = Annotated[bool, typer.Option(
    "--optimizer-in-backward", rich_help_panel=SETUP_PANEL,
    help="Apply the optimizer to each parameter as soon as its gradient exists and free the "
         "gradient (one device, --grad-accum 1, no gradient clipping).")]
FrameworkOpt = Annotated[Literal["hf", "nvfree", "torchtune", "litgpt"], typer.Option(
    "--framework", "-f", rich_help_panel=SETUP_PANEL,
    help="The training code the estimate describes: hf (Transformers Trainer + PEFT + "
         "bitsandbytes), torchtune, litgpt, or nvfree (the bundled trainer, what "
         "`nvfree train` runs).")]
PARALLEL_PANEL = "Devices and sharding"
NumDevicesOpt = Annotated[int, typer.Option(
    "--num-devices", min=1, rich_help_panel=PARALLEL_PANEL,
    help="Data-parallel devices in total, over all nodes; each runs --batch-size.")]
NodesOpt = Annotated[int, typer.Option(
    "--nodes", min=1, rich_help_panel=PARALLEL_PANEL,
    help="Machines the devices are spread over evenly (inter-node traffic uses the network).")]
ZeroOpt = Annotated[Literal["0", "1", "2", "3"], typer.Option(
    "--zero", rich_help_panel=PARALLEL_PANEL,
    help="ZeRO stage: 0 = DDP, 1 = shard optimizer states, 2 = + gradients, 3 = + parameters "
         "(FSDP).")]
OffloadOpt = Annotated[Literal["none", "optimizer", "optimizer_and_params"], typer.Option(
    "--offload", rich_help_panel=PARALLEL_PANEL,
    help="Keep optimizer states (and parameters, with --zero 3) in host memory; the optimizer "
         "step runs on the CPU (ZeRO-Offload).")]
ExpertParallelOpt = Annotated[int, typer.Option(
    "--expert-parallel", min=1, rich_help_panel=PARALLEL_PANEL,
    help="MoE: split the routed experts over this many devices (divides --num-devices).")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", "-d", help="Catalogue device (see `nvfree devices`) or local (this machine).")]
DeviceMemoryOpt = Annotated[float | None, typer.Option(
    "--device-memory", min=0.001,
    help="Override the device's memory in GiB (e.g. a CPU server's installed RAM).")]
TokensOpt = Annotated[float | None, typer.Option(
    "--tokens", help="Training token budget for wall time and cost, e.g. 1e8.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


def resolve_model(model: str | None, params: float | None, active_params: float | None,
                  active_ratio: float | None):
    """The ModelSpec from --model, or inferred from --params."""
    from estimator.analytic.infer import infer_model
    from estimator.catalog import load_model

    if model is not None and params is not None:
        raise SetupError("give either --model or --params, not both")
    if active_params is not None and active_ratio is not None:
        raise SetupError("give either --active-params or --active-ratio, not both")
    if model is not None:
        return load_model(model)
    if params is None:
        raise SetupError("say which model: --model NAME (see `nvfree models`) or --params N")
    if active_ratio is not None:
        if not 0 < active_ratio <= 1:
            raise SetupError(f"--active-ratio must be in (0, 1], got {active_ratio:g}")
        active_params = active_ratio * params
    return infer_model(params, active_params=active_params)


def resolve_setup(*, method: str | None, bits: str | None, dtype: str, device, profile,
                  lora_targets: str, tokens: float | None, mixed_precision: bool, **rest):
    """A TrainSetup from the flags, filling the defaults the help text states."""
    from estimator.api import auto_dtype
    from estimator.specs import TrainSetup

    num_bits = int(bits) if bits else None
    if method is None:
        method = {4: "qlora", 8: "lora"}.get(num_bits or 16, "full")
    compute = auto_dtype(device, profile) if dtype == "auto" else dtype
    if num_bits is None:  # fp32 compute stores fp32 weights (as the executor builds them)
        num_bits = 4 if method == "qlora" else (32 if compute == "fp32" else 16)
    targets = parse_targets(lora_targets)
    if tokens is not None and tokens <= 0:
        raise SetupError(f"--tokens must be positive, got {tokens:g}")
    try:
        return TrainSetup(method=method, weight_bits=num_bits, compute_dtype=compute,
                          mixed_precision=mixed_precision and compute != "fp32",
                          lora_targets=targets, num_tokens=round(tokens) if tokens else None,
                          **rest)
    except ValueError as exc:
        raise setup_error(exc) from None


def parse_targets(text: str) -> tuple[str, ...]:
    """--lora-targets: comma-separated PEFT module names, or all-linear."""
    from estimator.specs import LINEAR_TARGETS

    if text.strip() == "all-linear":
        return LINEAR_TARGETS
    return tuple(t.strip() for t in text.split(",") if t.strip())


def setup_error(exc: ValueError) -> SetupError:
    """A TrainSetup validation error as one line (pydantic's first message)."""
    errors = getattr(exc, "errors", None)
    message = errors()[0]["msg"] if errors else str(exc)
    return SetupError(message.removeprefix("Value error, "))


def with_memory(device, memory_gib: float | None):
    """The device with its memory replaced by --device-memory (GiB), if given."""
    if memory_gib is None:
        return device
    return device.model_copy(update={"memory_bytes": round(memory_gib * 1024**3)})


def resolve_device(name: str, *, use_profile: bool = True):
    """(Device, CalibrationProfile | None, one-line note about calibration) for --device."""
    from estimator.catalog import load_device

    if name.strip().lower() != "local":
        return load_device(name), None, "catalogue device: uncalibrated"
    from estimator.hardware import detect, local_device
    from estimator.profiles import lookup_profile

    machine = detect()
    found = lookup_profile(machine) if use_profile else None
    profile = found.profile if found else None
    note = found.reason if found else "calibration profile not used (--no-profile)"
    return local_device(machine, profile), profile, note
