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
ZeroOpt = Annotated[int, typer.Option(
    "--zero", min=0, max=3, rich_help_panel=PARALLEL_PANEL,
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
PriceOpt = Annotated[list[str] | None, typer.Option(
    "--price", help="Your price for a device, DEVICE=USD per device-hour (repeatable), e.g. "
                    "--price mi300x=2.10; replaces the catalogue's (data/prices.toml).")]
LoraDropoutOpt = Annotated[float, typer.Option(
    "--lora-dropout", min=0.0, max=0.99, rich_help_panel=SETUP_PANEL,
    help="Dropout on the adapters' input (PEFT lora_dropout).")]

SETUP_OPTIONS = {
    "method": MethodOpt, "bits": BitsOpt, "dtype": DtypeOpt, "framework": FrameworkOpt,
    "lora_rank": LoraRankOpt, "lora_alpha": LoraAlphaOpt, "lora_targets": LoraTargetsOpt,
    "lora_dropout": LoraDropoutOpt, "batch_size": BatchOpt, "seq_len": SeqOpt,
    "grad_accum": AccumOpt, "checkpointing": CkptOpt, "optimizer_in_backward": BackwardStepOpt,
    "optimizer": OptimizerOpt, "mixed_precision": MixedOpt, "attention": AttentionOpt,
    "double_quant": DoubleQuantOpt, "fused_loss": FusedLossOpt, "num_devices": NumDevicesOpt,
    "nodes": NodesOpt, "zero": ZeroOpt, "offload": OffloadOpt,
    "expert_parallel": ExpertParallelOpt, "tokens": TokensOpt,
}
"""The option of each setup flag, declared once; defaults from request.SETUP_DEFAULTS."""


def with_setup_options(*names: str):
    """Give a command the shared setup options `names` (all when none are named) with the one
    set of defaults (request.SETUP_DEFAULTS); the command receives them as one dict,
    `setup_flags`, to pass to the library unchanged."""
    import functools
    import inspect

    from estimator.request import SETUP_DEFAULTS

    chosen = names or tuple(SETUP_OPTIONS)

    def decorate(command):
        sig = inspect.signature(command)
        own = [p for p in sig.parameters.values() if p.name != "setup_flags"]
        shared = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY,
                                    default=SETUP_DEFAULTS[n], annotation=SETUP_OPTIONS[n])
                  for n in chosen]

        @functools.wraps(command)
        def wrapper(**kwargs):
            flags = {n: kwargs.pop(n) for n in chosen}
            return command(**kwargs, setup_flags=flags)

        keyword = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        wrapper.__signature__ = sig.replace(parameters=keyword + shared)
        wrapper.__annotations__ = {**{p.name: p.annotation for p in keyword},
                                   **{p.name: p.annotation for p in shared}}
        del wrapper.__wrapped__
        return wrapper

    return decorate


def resolve_model(model: str | None, params: float | None, active_params: float | None,
                  active_ratio: float | None):
    """The ModelSpec from --model, or inferred from --params (request.resolve_model)."""
    from estimator.request import resolve_model as resolve

    return resolve(model, params, active_params, active_ratio)


def resolve_setup(*, device, profile, **flags):
    """A TrainSetup from the flags (request.build_setup: the defaults the help texts state)."""
    from estimator.request import build_setup

    return build_setup(device, profile, **flags)


def parse_targets(text: str) -> tuple[str, ...]:
    """--lora-targets: comma-separated PEFT module names, or all-linear."""
    from estimator.request import parse_targets as parse

    return parse(text)


def setup_error(exc: ValueError) -> SetupError:
    """A TrainSetup validation error as one line naming the field."""
    from estimator.request import setup_error as one_line

    return one_line(exc)


def with_memory(device, memory_gib: float | None):
    """The device with its memory replaced by --device-memory (GiB), if given."""
    if memory_gib is None:
        return device
    return device.model_copy(update={"memory_bytes": round(memory_gib * 1024**3)})


def parse_prices(items: list[str] | None) -> dict[str, float]:
    """--price DEVICE=USD/h (repeatable) → {device key: USD per device-hour}."""
    out: dict[str, float] = {}
    for item in items or []:
        key, _, value = item.partition("=")
        try:
            usd = float(value.strip().removesuffix("/h").removeprefix("$"))
        except ValueError:
            raise SetupError(f"--price {item}: expected DEVICE=USD per hour, e.g. "
                             "mi300x=2.10") from None
        if not key.strip() or usd < 0:
            raise SetupError(f"--price {item}: expected DEVICE=USD per hour (>= 0)")
        out[key.strip().lower()] = usd
    return out


def resolve_device(name: str, *, use_profile: bool = True):
    """(Device, CalibrationProfile | None, one-line note about calibration) for --device:
    estimator.hardware.resolve_device."""
    from estimator.hardware import resolve_device as resolve

    return resolve(name, use_profile=use_profile)
