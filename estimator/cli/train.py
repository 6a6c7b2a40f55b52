"""`nvfree train`: run the training an estimate describes on this machine, and measure it.

Parse → estimator.executor.runner.train → render. The runner checks everything before any
work, launches torchrun for --nproc/--nnodes (this process then renders the report rank 0
wrote), resumes or restarts, and sets the exit code. Inside torchrun (a worker) the same
command trains one rank; rank 0 draws the progress bar on stderr."""

import sys
from pathlib import Path
from typing import Annotated, Literal

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
ResumeOpt = Annotated[bool, typer.Option(
    "--resume", rich_help_panel=RUN_PANEL,
    help="Continue from the newest checkpoint in --output that loads (stops, naming them, "
         "when none does).")]
RestartOpt = Annotated[bool, typer.Option(
    "--restart", rich_help_panel=RUN_PANEL,
    help="Delete the checkpoints and report in --output and start over at step 0.")]
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
TrainZeroOpt = Annotated[int, typer.Option(
    "--zero", min=0, max=3, rich_help_panel=DIST_PANEL,
    help="0 = DDP (every rank holds the whole model); 3 = ZeRO-3 on FSDP2 (parameters, "
         "gradients and optimizer states sharded over the ranks). 1 and 2 are planned only "
         "(refused).")]
TrainOffloadOpt = Annotated[Literal["none", "optimizer", "optimizer_and_params"], typer.Option(
    "--offload", rich_help_panel=DIST_PANEL,
    help="optimizer_and_params (with --zero 3 on 2+ ranks of accelerators): FSDP2's "
         "CPUOffloadPolicy keeps the sharded parameters, gradients and optimizer states in "
         "host memory and steps the optimizer on the CPU. 'optimizer' alone is planned only "
         "(refused).")]
CompileOpt = Annotated[bool, typer.Option(
    "--compile/--no-compile", rich_help_panel=RUN_PANEL,
    help="torch.compile each decoder block (fuses the elementwise work; the first step "
         "compiles, about a minute; needs a C++ compiler on the CPU). The prediction stays "
         "the eager one.")]
CkptEveryOpt = Annotated[int | None, typer.Option(
    "--checkpoint-every", min=1, rich_help_panel=RUN_PANEL,
    help="Save every N steps  [default: at the end, and when interrupted]")]


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
    restart: RestartOpt = False,
    device: TorchDeviceOpt = "cpu", seed: SeedOpt = 0, lr: LrOpt = None,
    warmup_steps: WarmupOpt = None, max_grad_norm: ClipOpt = None,
    lora_dropout: DropoutOpt = 0.0, checkpoint_every: CkptEveryOpt = None,
    compiled: CompileOpt = False,
    nproc: NprocOpt = 1, nnodes: NnodesOpt = 1, node_rank: NodeRankOpt = None,
    rdzv_endpoint: RdzvOpt = None, zero: TrainZeroOpt = 0,
    offload: TrainOffloadOpt = "none", json: JsonOpt = False,
) -> None:
    """Train the model with the setup on this machine (random init, or the weights of a
    Hugging Face --model directory); checkpoint, measure, and compare with the estimate.
    --nproc N trains data-parallel (DDP; with --zero 3 sharded by FSDP2) in N processes
    launched by torchrun."""
    from estimator.cli.options import resolve_device, resolve_model, resolve_setup
    from estimator.executor import runner
    from estimator.executor.config import TrainConfig

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
    setup = setup.model_copy(update={"num_devices": nproc * nnodes, "num_nodes": nnodes,
                                     "zero_stage": zero, "offload": offload})
    config = TrainConfig(max_steps=max_steps, output_dir=output, data=data,
                         text_field=text_field, model_path=runner.model_directory(model),
                         resume=resume, restart=restart, device=device, seed=seed, lr=lr,
                         warmup_steps=warmup_steps, max_grad_norm=max_grad_norm,
                         lora_dropout=lora_dropout, checkpoint_every=checkpoint_every,
                         compile=compiled)
    launch = runner.Launch(nproc=nproc, nnodes=nnodes, node_rank=node_rank,
                           rdzv_endpoint=rdzv_endpoint)
    console = run_console(json)
    outcome = runner.train(spec, setup, config, launch=launch, argv=sys.argv[1:],
                           progress=progress_bars(console))
    render_outcome(outcome, console, json)


def run_console(json: bool):
    """The console of this process: stderr under --json or in a torchrun worker; silent in
    every worker but rank 0."""
    from rich.console import Console

    from estimator.executor.runner import role

    who = role()
    return Console(stderr=json or who.worker, quiet=not who.shows_output)


def progress_bars(console):
    """runner.Progress drawing a rich progress bar on `console`."""
    import contextlib

    from estimator.report.train import TrainProgress

    @contextlib.contextmanager
    def bar(max_steps: int):
        with TrainProgress(console, max_steps=max_steps) as progress:
            yield progress.update

    return bar


def render_outcome(outcome, console, json: bool, extra=None) -> None:
    """Show the run's report (rank 0's, read by the launcher) and exit with its code; a
    worker exits 0 (the launcher sets the code)."""
    if outcome.worker:
        raise typer.Exit(0)
    if outcome.report is None:
        if outcome.message:
            typer.echo(outcome.message, err=True)
        raise typer.Exit(outcome.exit_code)
    if json:
        typer.echo(outcome.report.model_dump_json(indent=2))
    else:
        from estimator.report.train import render_run_report

        render_run_report(outcome.report, console, report_path=str(outcome.report_path))
        if extra is not None:
            extra(outcome.report)
    raise typer.Exit(outcome.exit_code)


def register(app: typer.Typer) -> None:
    """Add `train` to the app."""
    app.command()(train)
