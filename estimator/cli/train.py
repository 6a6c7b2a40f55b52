"""`nvfree train`: run the training an estimate describes on this machine, and measure it.

With --nproc N (and --nnodes) this process is the launcher: it re-executes the same command
under torchrun (estimator.executor.distributed.launch), waits, then renders the report rank 0
wrote. Inside torchrun (a worker) the same command trains one rank; rank 0 draws the progress
bar on stderr; workers exit 0 after a handled stop and the launcher sets the exit code."""

import sys
import time
from pathlib import Path
from typing import Annotated

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
    DoubleQuantOpt,
    DtypeOpt,
    FusedLossOpt,
    JsonOpt,
    LoraAlphaOpt,
    LoraRankOpt,
    LoraTargetsOpt,
    MethodOpt,
    MixedOpt,
    ModelOpt,
    OptimizerOpt,
    ParamsOpt,
    SeqOpt,
)

RUN_PANEL = "Run"
EXIT_CODES = {"max_steps": 0, "nonfinite_loss": 1}
"""Exit code per stop reason; interrupted runs exit 128 + the signal (130 SIGINT, 143 SIGTERM)."""

DataOpt = Annotated[Path | None, typer.Option(
    "--data", rich_help_panel=RUN_PANEL,
    help="Text file, directory of text files, or JSONL  [default: the embedded corpus, this "
         "Python's standard-library sources]")]
TextFieldOpt = Annotated[str, typer.Option("--text-field", rich_help_panel=RUN_PANEL,
                                           help="JSONL field holding the text.")]
MaxStepsOpt = Annotated[int, typer.Option("--max-steps", min=1, rich_help_panel=RUN_PANEL,
                                          help="Optimizer steps to train (in total, resumed "
                                               "ones included).")]
OutputOpt = Annotated[Path, typer.Option(
    "--output", "-o", rich_help_panel=RUN_PANEL,
    help="Directory for checkpoints/ and run_report.json.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", rich_help_panel=RUN_PANEL,
                                         help="Continue from the latest checkpoint in --output.")]
TorchDeviceOpt = Annotated[str, typer.Option(
    "--device", "-d", rich_help_panel=RUN_PANEL,
    help="torch device to train on: cpu, cuda, cuda:1, mps, xpu.")]
SeedOpt = Annotated[int, typer.Option("--seed", rich_help_panel=RUN_PANEL,
                                      help="Seed of initialisation, data order and dropout.")]
LrOpt = Annotated[float | None, typer.Option(
    "--lr", min=0.0, rich_help_panel=RUN_PANEL,
    help="Peak learning rate (warm-up, then cosine to 10 %)  [default: 1e-4 full, 2e-4 LoRA]")]
WarmupOpt = Annotated[int | None, typer.Option(
    "--warmup-steps", min=0, rich_help_panel=RUN_PANEL,
    help="Linear warm-up steps  [default: 5 % of --max-steps, at most 100]")]
ClipOpt = Annotated[float | None, typer.Option(
    "--max-grad-norm", min=0.0, rich_help_panel=RUN_PANEL,
    help="Gradient clipping (global L2 norm); 0 = off  [default: 1.0; 0 with "
         "--optimizer-in-backward]")]
DropoutOpt = Annotated[float, typer.Option("--lora-dropout", min=0.0, max=1.0,
                                           rich_help_panel=RUN_PANEL)]
DIST_PANEL = "Data parallel"
NprocOpt = Annotated[int, typer.Option(
    "--nproc", "--nproc-per-node", min=1, rich_help_panel=DIST_PANEL,
    help="Processes per machine (DDP ranks; torchrun). On the CPU each gets cores // N "
         "threads; on GPUs one device each.")]
NnodesOpt = Annotated[int, typer.Option("--nnodes", min=1, rich_help_panel=DIST_PANEL,
                                        help="Machines (run the same command on each).")]
NodeRankOpt = Annotated[int | None, typer.Option(
    "--node-rank", min=0, rich_help_panel=DIST_PANEL,
    help="This machine's rank (0 … nnodes − 1), passed to torchrun.")]
RdzvOpt = Annotated[str | None, typer.Option(
    "--rdzv-endpoint", rich_help_panel=DIST_PANEL,
    help="HOST:PORT of the c10d rendezvous every machine reaches (needed with --nnodes > 1).")]
CompileOpt = Annotated[bool, typer.Option(
    "--compile/--no-compile", rich_help_panel=RUN_PANEL,
    help="torch.compile each decoder block (fuses the elementwise work; the first step "
         "compiles, about a minute; needs a C++ compiler on the CPU). The prediction stays "
         "the eager one.")]
CkptEveryOpt = Annotated[int | None, typer.Option(
    "--checkpoint-every", min=1, rich_help_panel=RUN_PANEL,
    help="Save every N steps  [default: at the end, and when interrupted]")]


def _model_dir(model: str | None) -> Path | None:
    """--model as a Hugging Face directory with weights (trained from them), else None."""
    if model is None:
        return None
    path = Path(model)
    return path if path.is_dir() and any(path.glob("*.safetensors")) else None


def train(
    model: ModelOpt = None, params: ParamsOpt = None, active_params: ActiveParamsOpt = None,
    active_ratio: ActiveRatioOpt = None, method: MethodOpt = None, bits: BitsOpt = None,
    dtype: DtypeOpt = "auto", lora_rank: LoraRankOpt = 16, lora_alpha: LoraAlphaOpt = 32.0,
    lora_targets: LoraTargetsOpt = "all-linear", batch_size: BatchOpt = 1,
    seq_len: SeqOpt = 2048, grad_accum: AccumOpt = 1, checkpointing: CkptOpt = False,
    optimizer_in_backward: BackwardStepOpt = False,
    optimizer: OptimizerOpt = "adamw", mixed_precision: MixedOpt = True,
    attention: AttentionOpt = "sdpa", double_quant: DoubleQuantOpt = True,
    fused_loss: FusedLossOpt = True, data: DataOpt = None, text_field: TextFieldOpt = "text",
    max_steps: MaxStepsOpt = 100,
    output: OutputOpt = Path("runs/train"), resume: ResumeOpt = False,
    device: TorchDeviceOpt = "cpu", seed: SeedOpt = 0, lr: LrOpt = None,
    warmup_steps: WarmupOpt = None, max_grad_norm: ClipOpt = None,
    lora_dropout: DropoutOpt = 0.0, checkpoint_every: CkptEveryOpt = None,
    compiled: CompileOpt = False,
    nproc: NprocOpt = 1, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = None,
    rdzv_endpoint: RdzvOpt = None, json: JsonOpt = False,
) -> None:
    """Train the model with the setup on this machine (random init, or the weights of a
    Hugging Face --model directory); checkpoint, measure, and compare with the estimate.
    --nproc N trains data-parallel (DDP) in N processes launched by torchrun."""
    from estimator.cli.options import resolve_device, resolve_model, resolve_setup
    from estimator.executor.distributed import context_from_env, in_worker


    spec = resolve_model(model, params, active_params, active_ratio)
    local, profile, _ = resolve_device("local")
    setup = resolve_setup(method=method, bits=bits, dtype=dtype, device=local, profile=profile,
                          lora_targets=lora_targets, tokens=None,
                          mixed_precision=mixed_precision, lora_rank=lora_rank,
                          lora_alpha=lora_alpha, batch_size=batch_size, seq_len=seq_len,
                          grad_accum=grad_accum, checkpointing=checkpointing,
                          optimizer_in_backward=optimizer_in_backward,
                          optimizer=optimizer, attention=attention, double_quant=double_quant,
                          fused_loss=fused_loss, framework="nvfree")
    setup = type(setup).model_validate({**setup.model_dump(), "num_devices": nproc * nnodes,
                                        "num_nodes": nnodes})
    if nproc * nnodes > 1 and not in_worker():  # errors above are shown once, here
        _launch_and_report(nproc, nnodes, node_rank, rdzv_endpoint, output, json)
    from rich.console import Console

    from estimator.executor.train import TrainConfig, train_with_config
    from estimator.report.train import TrainProgress, render_run_report

    config = TrainConfig(max_steps=max_steps, output_dir=output, data=data,
                         text_field=text_field, model_path=_model_dir(model), resume=resume,
                         device=device, seed=seed, lr=lr, warmup_steps=warmup_steps,
                         max_grad_norm=max_grad_norm, lora_dropout=lora_dropout,
                         checkpoint_every=checkpoint_every, compile=compiled)
    worker = in_worker()
    console = Console(stderr=json or worker, quiet=worker and context_from_env().rank > 0)
    with TrainProgress(console, max_steps=max_steps) as bar:
        report = train_with_config(spec, setup, config, on_progress=bar.update)
    if worker:  # the launcher renders rank 0's report and sets the exit code
        raise typer.Exit(0)
    if json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        render_run_report(report, console, report_path=str(output / "run_report.json"))
    raise typer.Exit(_exit_code(report.stop_reason, report.message))


def _launch_and_report(nproc: int, nnodes: int, node_rank: int | None,
                       rdzv_endpoint: str | None, output: Path, json: bool) -> None:
    """Run this same command under torchrun, then render the report rank 0 wrote (if it
    was written on this machine) and exit with its code; else exit with torchrun's."""
    from rich.console import Console

    from estimator.executor.distributed import launch
    from estimator.report.train import render_run_report
    from estimator.specs.run import RunReport

    started = time.time()
    code = launch(sys.argv[1:], nproc, nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
    path = output / "run_report.json"
    fresh = path.is_file() and path.stat().st_mtime >= started
    if not fresh and not (code == 0 and path.is_file()):  # (a finished run resumed: its report)
        if code == 0:
            typer.echo(f"the run finished; its report is where rank 0 ran ({path})", err=True)
        raise typer.Exit(code)
    report = RunReport.model_validate_json(path.read_text())
    if json:
        typer.echo(report.model_dump_json(indent=2))
    else:
        render_run_report(report, Console(), report_path=str(path))
    raise typer.Exit(_exit_code(report.stop_reason, report.message))


def _exit_code(stop_reason: str, message: str) -> int:
    """0 done, 1 non-finite loss, 130 SIGINT, 143 SIGTERM (128 + signal number)."""
    if stop_reason == "interrupted":
        return 143 if "SIGTERM" in message else 130
    return EXIT_CODES[stop_reason]


def register(app: typer.Typer) -> None:
    """Add `train` to the app."""
    app.command()(train)
