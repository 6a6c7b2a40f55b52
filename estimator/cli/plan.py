"""`nvfree plan`: search the setups that fit this machine (or a catalogue device), rank them by
predicted time or cost, and write the winner to a plan file."""

from pathlib import Path
from typing import Annotated, Literal

import typer

from estimator.cli.options import (
    ActiveParamsOpt,
    ActiveRatioOpt,
    DeviceOpt,
    JsonOpt,
    LoraAlphaOpt,
    LoraRankOpt,
    LoraTargetsOpt,
    ModelOpt,
    NodesOpt,
    NumDevicesOpt,
    OffloadOpt,
    ParamsOpt,
    PriceOpt,
    SeqOpt,
    TokensOpt,
)
from estimator.errors import SetupError

PLAN_PANEL = "Plan"
DEFAULT_MODEL = "smollm2-135m"
"""The model `nvfree plan` plans when none is named."""
DEFAULT_TOKENS = 32_768
"""Token budget when neither --tokens nor --data is given: 16 steps of 8 × 256 tokens, about
two minutes of training the default model on a 2-core CPU (measured: docs/planning.md)."""

FixedMethodOpt = Annotated[Literal["full", "lora", "qlora"] | None, typer.Option(
    "--method", rich_help_panel=PLAN_PANEL, help="Fix the method  [default: search all]")]
FixedDtypeOpt = Annotated[Literal["fp32", "bf16", "fp16"] | None, typer.Option(
    "--dtype", rich_help_panel=PLAN_PANEL,
    help="Fix the compute dtype  [default: search fp32 and the device's 16-bit type]")]
FixedOptimizerOpt = Annotated[Literal["adamw", "adamw8bit", "sgd", "sgd_momentum",
                                      "adafactor"] | None, typer.Option(
    "--optimizer", rich_help_panel=PLAN_PANEL,
    help="Fix the optimizer  [default: search adamw and adamw8bit]")]
FixedCkptOpt = Annotated[bool | None, typer.Option(
    "--checkpointing/--no-checkpointing", rich_help_panel=PLAN_PANEL,
    help="Fix gradient checkpointing  [default: search both]")]
GlobalBatchOpt = Annotated[int, typer.Option(
    "--global-batch", min=1, rich_help_panel=PLAN_PANEL,
    help="Sequences per optimizer step (micro-batch × accumulation × devices).")]
MemoryLimitOpt = Annotated[float | None, typer.Option(
    "--memory-limit", min=0.001, rich_help_panel=PLAN_PANEL,
    help="GiB per device the plan may use  [default: what the device offers]")]
MaxHoursOpt = Annotated[float | None, typer.Option("--max-hours", min=0.0,
                                                   rich_help_panel=PLAN_PANEL)]
MaxCostOpt = Annotated[float | None, typer.Option("--max-cost", min=0.0,
                                                  rich_help_panel=PLAN_PANEL, help="USD.")]
ObjectiveOpt = Annotated[Literal["time", "cost"], typer.Option("--objective",
                                                               rich_help_panel=PLAN_PANEL)]
DataOpt = Annotated[Path | None, typer.Option(
    "--data", help="Training data (text file, directory, JSONL)  [default: the embedded "
                   "corpus]; without --tokens the plan covers it once.")]
OutputOpt = Annotated[Path, typer.Option("--output", "-o", help="Plan file to write.")]
TopOpt = Annotated[int, typer.Option("--top", min=1, help="Candidates kept in the plan.")]
FixedZeroOpt = Annotated[Literal["0", "1", "2", "3"] | None, typer.Option(
    "--zero", rich_help_panel=PLAN_PANEL,
    help="Fix the ZeRO stage  [default: search 0–3 on catalogue devices; 0 (DDP, what the "
         "bundled trainer runs) for local]")]
MaxDevicesOpt = Annotated[int | None, typer.Option(
    "--max-devices", min=1, rich_help_panel=PLAN_PANEL,
    help="Search 1, 2, 4, … up to N devices (--nodes spreads N)  [default: --num-devices]")]
TorchDeviceOpt = Annotated[str, typer.Option(
    "--torch-device", help="torch device `nvfree run` trains on: cpu, cuda, mps, xpu.")]


CalibrateOpt = Annotated[bool, typer.Option(
    "--calibrate/--no-calibrate", rich_help_panel=PLAN_PANEL,
    help="For --device local without a calibration profile: measure one first (`nvfree "
         "calibrate --quick`, ~25 s) so the plan is ranked on this machine's rates.")]


def quick_calibration(console) -> None:
    """Run `nvfree calibrate --quick` on the CPU and store its profile (needs torch)."""
    import importlib.util

    if importlib.util.find_spec("torch") is None:
        return
    from estimator.calibrate.run import calibrate as run_calibration

    console.print("no calibration profile for this machine: measuring one (calibrate --quick)")
    result = run_calibration("cpu", "quick")
    console.print(f"stored {result.path} ({result.wall_seconds:.0f} s)")


def constraints_from(*, method, dtype, optimizer, checkpointing, global_batch, memory_limit,
                     max_hours, max_cost, objective, top, zero_stages, max_devices=None):
    """planner.Constraints from the flags (a fixed flag narrows that dimension to one value)."""
    from estimator.planner import Constraints, devices_up_to

    precisions = () if dtype is None else (
        ((dtype, False),) if dtype == "fp32" else ((dtype, True), (dtype, False)))
    return Constraints(
        global_batch=global_batch,
        memory_limit_bytes=None if memory_limit is None else round(memory_limit * 2**30),
        max_seconds=None if max_hours is None else max_hours * 3600,
        max_cost_usd=max_cost, objective=objective, top=top,
        methods=(method,) if method else ("full", "lora", "qlora"), precisions=precisions,
        optimizers=(optimizer,) if optimizer else ("adamw", "adamw8bit"),
        checkpointing=(checkpointing,) if checkpointing is not None else (False, True),
        zero_stages=zero_stages,
        device_counts=devices_up_to(max_devices) if max_devices else ())


def plan(
    model: ModelOpt = None, params: ParamsOpt = None, active_params: ActiveParamsOpt = None,
    active_ratio: ActiveRatioOpt = None, method: FixedMethodOpt = None,
    dtype: FixedDtypeOpt = None, optimizer: FixedOptimizerOpt = None,
    checkpointing: FixedCkptOpt = None, lora_rank: LoraRankOpt = 16,
    lora_alpha: LoraAlphaOpt = 32.0, lora_targets: LoraTargetsOpt = "all-linear",
    seq_len: SeqOpt = 256, global_batch: GlobalBatchOpt = 8, data: DataOpt = None,
    text_field: str = typer.Option("text", "--text-field", help="JSONL field holding the text."),
    tokens: TokensOpt = None, device: DeviceOpt = "local", num_devices: NumDevicesOpt = 1,
    nodes: NodesOpt = 1, zero: FixedZeroOpt = None, offload: OffloadOpt = "none",
    max_devices: MaxDevicesOpt = None,
    memory_limit: MemoryLimitOpt = None,
    max_hours: MaxHoursOpt = None, max_cost: MaxCostOpt = None,
    objective: ObjectiveOpt = "time", output: OutputOpt = Path("plan.json"), top: TopOpt = 5,
    torch_device: TorchDeviceOpt = "cpu", seed: int = typer.Option(0, "--seed"),
    calibrate: CalibrateOpt = True, price: PriceOpt = None, json: JsonOpt = False,
) -> None:
    """Choose the setup that fits and finishes soonest (or cheapest); write it as a plan file
    for `nvfree run`. With no arguments: the default model on the embedded corpus, here."""
    from estimator.cli.options import parse_targets, resolve_device, resolve_model, setup_error
    from estimator.planfile import count_data_tokens, make_plan, save_plan
    from estimator.planner import search
    from estimator.specs import TrainSetup

    if model is None and params is None:
        model = DEFAULT_MODEL
    from rich.console import Console

    spec = resolve_model(model, params, active_params, active_ratio)
    dev, profile, note = resolve_device(device)
    if calibrate and profile is None and device.strip().lower() == "local":
        quick_calibration(Console(stderr=True))
        dev, profile, note = resolve_device(device)
    from estimator.api import with_user_price
    from estimator.cli.options import parse_prices

    dev = with_user_price(dev, parse_prices(price))
    num_tokens = _token_budget(tokens, data, text_field, count_data_tokens)
    num_devices = max_devices or num_devices
    try:
        base = TrainSetup(framework="nvfree", seq_len=seq_len, lora_rank=lora_rank,
                          lora_alpha=lora_alpha, lora_targets=parse_targets(lora_targets),
                          num_tokens=num_tokens,
                          num_devices=num_devices, num_nodes=nodes, offload=offload)
    except ValueError as exc:
        raise setup_error(exc) from None
    local = device.strip().lower() == "local"
    if local and zero not in (None, "0"):
        raise SetupError("the bundled trainer runs data parallel without sharding (--zero 0, "
                         "DDP); plan ZeRO stages for a catalogue --device")
    stages = (int(zero),) if zero is not None else ((0,) if local else (0, 1, 2, 3))
    c = constraints_from(method=method, dtype=dtype, optimizer=optimizer,
                         checkpointing=checkpointing, global_batch=global_batch,
                         memory_limit=memory_limit, max_hours=max_hours, max_cost=max_cost,
                         objective=objective, top=top, zero_stages=stages,
                         max_devices=max_devices)
    result = search(spec, base, dev, profile, c)
    if not result.candidates[0].verdict.startswith("chosen"):
        raise SetupError(f"no candidate meets the constraints; the closest: "
                         f"{result.candidates[0].verdict} (see `nvfree estimate` advice)")
    fingerprint = _local_fingerprint() if local else None
    the_plan = make_plan(result, model=spec, model_source=model or f"--params {params:g}",
                         data=None if data is None else str(data), text_field=text_field,
                         device=dev, device_key=device.strip().lower(),
                         torch_device=torch_device, fingerprint=fingerprint, profile=profile,
                         num_tokens=num_tokens, objective=objective, seed=seed)
    save_plan(the_plan, output)
    if json:
        typer.echo(the_plan.model_dump_json(indent=2))
        return
    from estimator.report.plan import render_plan

    render_plan(the_plan, Console(), path=str(output), calibration_note=note)


def _token_budget(tokens: float | None, data: Path | None, text_field: str, count) -> int:
    if tokens is not None:
        if tokens <= 0:
            raise SetupError(f"--tokens must be positive, got {tokens:g}")
        return round(tokens)
    return DEFAULT_TOKENS if data is None else count(data, text_field)


def _local_fingerprint() -> str:
    from estimator.hardware import detect, fingerprint

    return fingerprint(detect())


def register(app: typer.Typer) -> None:
    """Add `plan` to the app."""
    app.command()(plan)
