"""`nvfree estimate`: memory, time, cost and a verdict for a model + setup + device."""

import typer

from estimator.cli.options import (
    AccumOpt,
    ActiveParamsOpt,
    ActiveRatioOpt,
    AttentionOpt,
    BackwardStepOpt,
    BatchOpt,
    BitsOpt,
    CkptOpt,
    DeviceMemoryOpt,
    DeviceOpt,
    DoubleQuantOpt,
    DtypeOpt,
    ExpertParallelOpt,
    FrameworkOpt,
    FusedLossOpt,
    JsonOpt,
    LoraAlphaOpt,
    LoraRankOpt,
    LoraTargetsOpt,
    MethodOpt,
    MixedOpt,
    ModelOpt,
    NodesOpt,
    NumDevicesOpt,
    OffloadOpt,
    OptimizerOpt,
    ParamsOpt,
    SeqOpt,
    TokensOpt,
    ZeroOpt,
)


def estimate(
    model: ModelOpt = None, params: ParamsOpt = None, active_params: ActiveParamsOpt = None,
    active_ratio: ActiveRatioOpt = None, method: MethodOpt = None, bits: BitsOpt = None,
    dtype: DtypeOpt = "auto", lora_rank: LoraRankOpt = 16, lora_alpha: LoraAlphaOpt = 32.0,
    lora_targets: LoraTargetsOpt = "all-linear", batch_size: BatchOpt = 1,
    seq_len: SeqOpt = 2048, grad_accum: AccumOpt = 1, checkpointing: CkptOpt = False,
    optimizer_in_backward: BackwardStepOpt = False,
    optimizer: OptimizerOpt = "adamw", mixed_precision: MixedOpt = True,
    attention: AttentionOpt = "sdpa", double_quant: DoubleQuantOpt = True,
    fused_loss: FusedLossOpt = True, framework: FrameworkOpt = "hf",
    num_devices: NumDevicesOpt = 1, nodes: NodesOpt = 1, zero: ZeroOpt = "0",
    offload: OffloadOpt = "none", expert_parallel: ExpertParallelOpt = 1,
    device: DeviceOpt = "local", device_memory: DeviceMemoryOpt = None,
    tokens: TokensOpt = None, json: JsonOpt = False,
    use_profile: bool = typer.Option(True, "--profile/--no-profile",
                                     help="Use this machine's calibration profile if present."),
) -> None:
    """Estimate peak memory, step time, tokens/s, wall time and cost; say whether it fits."""
    from estimator.api import estimate as run_estimate
    from estimator.cli.options import resolve_device, resolve_model, resolve_setup, with_memory

    spec = resolve_model(model, params, active_params, active_ratio)
    dev, profile, note = resolve_device(device, use_profile=use_profile)
    dev = with_memory(dev, device_memory)
    setup = resolve_setup(method=method, bits=bits, dtype=dtype, device=dev, profile=profile,
                          lora_targets=lora_targets, tokens=tokens,
                          mixed_precision=mixed_precision, lora_rank=lora_rank,
                          lora_alpha=lora_alpha, batch_size=batch_size, seq_len=seq_len,
                          grad_accum=grad_accum, checkpointing=checkpointing,
                          optimizer_in_backward=optimizer_in_backward,
                          optimizer=optimizer, attention=attention, double_quant=double_quant,
                          fused_loss=fused_loss, framework=framework,
                          num_devices=num_devices, num_nodes=nodes,
                          zero_stage=int(zero), offload=offload,
                          expert_parallel=expert_parallel)
    result = run_estimate(spec, setup, dev, profile)
    if json:
        typer.echo(result.model_dump_json(indent=2))
        return
    from rich.console import Console

    from estimator.report.estimate import render_estimate

    render_estimate(result, Console(), calibration_note=note)


def register(app: typer.Typer) -> None:
    """Add `estimate` to the app."""
    app.command()(estimate)
