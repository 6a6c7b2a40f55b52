"""`nvfree plan`: search the setups that fit this machine (or a catalogue device), rank them by
predicted time or cost, and write the winner to a plan file."""

from pathlib import Path
from typing import Annotated, Literal

import typer

from estimator.cli.options import (
    SETUP_PANEL,
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
    TokensOpt,
)
from estimator.request import PLAN_DEFAULTS  # why they differ from estimate's: there

PLAN_PANEL = "Plan"

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
PlanSeqOpt = Annotated[int, typer.Option(
    "--seq-len", "-s", min=1, rich_help_panel=SETUP_PANEL,
    help="Tokens per sequence (the default plans a short run of the default model here; "
         "estimate assumes 2048: request.PLAN_DEFAULTS).")]
TorchDeviceOpt = Annotated[str, typer.Option(
    "--torch-device", help="torch device `nvfree run` trains on: cpu, cuda, mps, xpu.")]


CalibrateOpt = Annotated[bool, typer.Option(
    "--calibrate/--no-calibrate", rich_help_panel=PLAN_PANEL,
    help="For --device local without a calibration profile: measure one first (`nvfree "
         "calibrate --quick`, ~25 s) so the plan is ranked on this machine's rates.")]


def plan(
    model: ModelOpt = None, params: ParamsOpt = None, active_params: ActiveParamsOpt = None,
    active_ratio: ActiveRatioOpt = None, method: FixedMethodOpt = None,
    dtype: FixedDtypeOpt = None, optimizer: FixedOptimizerOpt = None,
    checkpointing: FixedCkptOpt = None, lora_rank: LoraRankOpt = 16,
    lora_alpha: LoraAlphaOpt = 32.0, lora_targets: LoraTargetsOpt = "all-linear",
    seq_len: PlanSeqOpt = PLAN_DEFAULTS["seq_len"],
    global_batch: GlobalBatchOpt = PLAN_DEFAULTS["global_batch"], data: DataOpt = None,
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
    from rich.console import Console

    from estimator.api import quick_calibration
    from estimator.cli.options import parse_prices
    from estimator.planfile import plan_request

    the_plan, note = plan_request(
        model, params=params, active_params=active_params, active_ratio=active_ratio,
        method=method, dtype=dtype, optimizer=optimizer, checkpointing=checkpointing,
        lora_rank=lora_rank, lora_alpha=lora_alpha, lora_targets=lora_targets,
        seq_len=seq_len, global_batch=global_batch, data=data, text_field=text_field,
        tokens=tokens, device=device, num_devices=num_devices, nodes=nodes, zero=zero,
        offload=offload, max_devices=max_devices, memory_limit=memory_limit,
        max_hours=max_hours, max_cost=max_cost, objective=objective, top=top,
        torch_device=torch_device, seed=seed, output=output, prices=parse_prices(price),
        calibrate=(lambda: quick_calibration(Console(stderr=True).print)) if calibrate
        else None)
    if json:
        typer.echo(the_plan.model_dump_json(indent=2))
        return
    from estimator.report.plan import render_plan

    render_plan(the_plan, Console(), path=str(output), calibration_note=note)


def register(app: typer.Typer) -> None:
    """Add `plan` to the app."""
    app.command()(plan)
