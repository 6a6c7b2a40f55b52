"""Run orchestration: every decision `nvfree train` and `nvfree run` make, as library calls, so a
notebook gets what the commands do and the CLI only parses and renders.

- train(spec, setup, config, launch=…, argv=…, progress=…) → Outcome: checks everything a user
  can get wrong before any model exists (preflight: what the trainer runs, the options, the data
  and model paths, whether the setup can fit this machine at all, the output directory and its
  disk), then trains in this process; with more than one process it runs the same command under
  torchrun (holding the output's lock, forwarding SIGINT/SIGTERM/SIGHUP, reaping every rank:
  launcher.launch) and reads the report rank 0 wrote.
- run_plan(path, …) → (Plan, Outcome): a plan file re-checked on this machine (its prediction
  recomputed from its own model and setup: planfile.prediction_problems; refusals overridable
  with force, "cannot run here at all" not), resumed when its output holds checkpoints.
- exit_code, model_directory, role: the small decisions the CLI used to hold.

Resume, restart, the output lock and checkpoint debris are handled where the output directory
is prepared (resume.prepared_output), so library callers of executor.train get them too.
"""

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

from estimator.errors import ConfigError, NvfreeError, SetupError
from estimator.executor import checkpoint as ckpt
from estimator.executor import distributed, launcher
from estimator.executor.checks import check_options, check_runnable, checkpoint_bytes
from estimator.executor.config import REPORT_FILE, StepProgress, TrainConfig
from estimator.executor.resume import check_checkpoints
from estimator.inputs import check_data_path
from estimator.outputs import check_free_space, check_output_dir, gib, lock_env, output_lock
from estimator.specs.estimate import Estimate
from estimator.specs.model import ModelSpec
from estimator.specs.plan import Plan
from estimator.specs.run import RunReport
from estimator.specs.setup import TrainSetup

EXIT_CODES = {"max_steps": 0, "nonfinite_loss": 1}
"""Exit code per stop reason; interrupted runs exit 128 + the signal (130 SIGINT, 143 SIGTERM)."""
Progress = Callable[[int], AbstractContextManager[Callable[[StepProgress], None]]]
"""Given max_steps, a context manager that yields the on_progress callback (a progress bar)."""


@dataclass(frozen=True)
class Launch:
    """How many processes train: per machine and machines (torchrun's options)."""

    nproc: int = 1
    """Processes per machine (count)."""
    nnodes: int = 1
    """Machines (count)."""
    node_rank: int | None = None
    """This machine's rank, passed to torchrun (multi-node)."""
    rdzv_endpoint: str | None = None
    """HOST:PORT of the c10d rendezvous (multi-node)."""

    @property
    def world_size(self) -> int:
        """Processes in all (count)."""
        return self.nproc * self.nnodes


@dataclass(frozen=True)
class Role:
    """Where this process stands: a torchrun worker (and its rank) or the user's process."""

    worker: bool
    rank: int

    @property
    def shows_output(self) -> bool:
        """Whether this process draws progress and notes (the user's process, or rank 0)."""
        return self.rank == 0


@dataclass(frozen=True)
class Outcome:
    """How a run ended, for the caller to render."""

    report: RunReport | None
    """The run's report; None when there is none here (rank 0 ran elsewhere, or torchrun
    failed before it was written)."""
    report_path: Path
    """Where the report is (or would be) written."""
    exit_code: int
    """The process exit code: 0, 1 (non-finite loss), 128 + signal, or torchrun's."""
    worker: bool = False
    """This process is a torchrun worker: the launcher renders rank 0's report."""
    message: str | None = None
    """What to say when there is no report."""


def role() -> Role:
    """This process's Role (from torchrun's environment)."""
    ctx = distributed.context_from_env()
    return Role(worker=distributed.in_worker(), rank=ctx.rank)


def exit_code(stop_reason: str, message: str) -> int:
    """0 done, 1 non-finite loss, 130 SIGINT, 143 SIGTERM (128 + signal number)."""
    if stop_reason == "interrupted":
        return 143 if "SIGTERM" in message else 130
    return EXIT_CODES[stop_reason]


def model_directory(model: str | None) -> Path | None:
    """--model as a Hugging Face directory with weights (trained from them), else None."""
    if model is None:
        return None
    try:
        path = Path(model)
        return path if path.is_dir() and any(path.glob("*.safetensors")) else None
    except (OSError, ValueError):  # a name too long or with a NUL: not a directory
        return None


def _estimate(spec: ModelSpec, setup: TrainSetup, device, profile) -> Estimate:
    """api.estimate of the bundled trainer's setup; SetupError for input it cannot compute."""
    from estimator.planner.estimate import estimate

    try:
        return estimate(spec, setup.model_copy(update={"framework": "nvfree"}), device, profile)
    except NvfreeError:
        raise
    except (ArithmeticError, ValueError, TypeError, RecursionError) as exc:
        raise SetupError(f"the setup cannot be estimated ({type(exc).__name__}: "
                         f"{' '.join(str(exc).split())[:120]})") from None


def machine_estimate(spec: ModelSpec, setup: TrainSetup, torch_device: str) -> Estimate:
    """The estimate of the setup on the device of this machine that `torch_device` names (the
    CPU, or the first accelerator), without a calibration profile (memory does not need one)."""
    from estimator.executor.build import resolve_device
    from estimator.hardware import cpu_device, detect, local_device

    kind = resolve_device(torch_device).type
    machine = detect(probe_torch=kind != "cpu")
    device = cpu_device(machine) if kind == "cpu" else local_device(machine)
    return _estimate(spec, setup, device, None)


def check_fits_machine(estimate: Estimate) -> None:
    """SetupError when even the lower end of the predicted peak exceeds what the device offers:
    the run could not start here, at any luck (bounded work: refused before allocating)."""
    memory = estimate.memory
    least = memory.lower_bytes or memory.total_bytes
    if least > memory.capacity_bytes:
        raise SetupError(f"the setup needs at least {gib(least)} per device (predicted peak, "
                         f"lower end) but {estimate.device.display_name} offers "
                         f"{gib(memory.capacity_bytes)}; `nvfree estimate` with the same flags "
                         "shows what fits")


def check_model_directory(path: Path, spec: ModelSpec) -> None:
    """A --model directory the trainer will load: every weight file inside it, and its
    config.json describing the model the setup was checked for."""
    from estimator.catalog import load_model
    from estimator.executor.hf import read_config, safetensors_files

    read_config(path)
    safetensors_files(path)
    if load_model(str(path)) != spec:
        raise SetupError(f"{path}: its config.json describes another model than {spec.name} "
                         "(the plan or spec was edited; re-plan)")


def preflight(spec: ModelSpec, setup: TrainSetup, config: TrainConfig) -> Estimate:
    """Everything checked before any model is built or process started; returns the estimate
    on this machine."""
    check_options(max_steps=config.max_steps, seed=config.seed, lr=config.lr,
                  warmup_steps=config.warmup_steps, max_grad_norm=config.max_grad_norm,
                  lora_dropout=config.lora_dropout, checkpoint_every=config.checkpoint_every)
    check_runnable(spec, setup, max_grad_norm=config.max_grad_norm, compile=config.compile)
    if config.resume and config.restart:
        raise SetupError("--resume continues the run in --output, --restart deletes it; "
                         "choose one")
    if config.data is not None:
        check_data_path(config.data)
    if config.model_path is not None:
        check_model_directory(config.model_path, spec)
    estimate = machine_estimate(spec, setup, config.device)
    check_fits_machine(estimate)
    check_output_dir(config.output_dir)
    check_checkpoints(config.output_dir / ckpt.CHECKPOINTS_DIR, config)
    check_free_space(config.output_dir, checkpoint_bytes(spec, setup), "one checkpoint")
    return estimate


def train(spec: ModelSpec, setup: TrainSetup, config: TrainConfig, *,
          launch: Launch = Launch(), argv: Sequence[str] = (),
          progress: Progress | None = None) -> Outcome:
    """Train `spec` under `setup` as `config` says: checked first (preflight), then in this
    process, or in launch.world_size processes under torchrun re-running `nvfree ARGV`. Inside
    a torchrun worker (the same command, started by the launcher) this trains one rank."""
    who = role()
    if not who.worker and (launch.world_size, launch.nnodes) != (setup.num_devices,
                                                                 setup.num_nodes):
        raise SetupError(f"the setup trains on {setup.num_devices} devices over "
                         f"{setup.num_nodes} machine(s), the launch starts {launch.nproc} "
                         f"process(es) on each of {launch.nnodes}")
    if who.worker:
        launcher.die_with_parent()
    else:
        preflight(spec, setup, config)
        if launch.world_size > 1:
            return _launch(config, launch, argv)
    from estimator.executor.train import train_with_config

    show = progress if who.shows_output else None
    with started_at_first_step(show, config.max_steps) as on_progress:
        report = train_with_config(spec, setup, config, on_progress=on_progress)
    return Outcome(report=report, report_path=config.output_dir / REPORT_FILE,
                   exit_code=0 if who.worker else exit_code(report.stop_reason, report.message),
                   worker=who.worker)


@contextlib.contextmanager
def started_at_first_step(progress: Progress | None, max_steps: int
                          ) -> Iterator[Callable[[StepProgress], None] | None]:
    """The progress callback, its display entered at the first step (so an error while the
    data and model are prepared is the only line shown) and left at the end."""
    if progress is None:
        yield None
        return
    with contextlib.ExitStack() as stack:
        shown: list[Callable[[StepProgress], None]] = []

        def on_progress(step: StepProgress) -> None:
            if not shown:
                shown.append(stack.enter_context(progress(max_steps)))
            shown[0](step)

        yield on_progress


def _launch(config: TrainConfig, launch: Launch, argv: Sequence[str]) -> Outcome:
    """Run `nvfree ARGV` under torchrun; one machine: holding the output's lock (its rank 0
    is told so), several: rank 0 locks where it runs. Then the report rank 0 wrote."""
    out = config.output_dir
    started = time.time()
    lock = output_lock(out) if launch.nnodes == 1 else contextlib.nullcontext()
    with lock:
        code = launcher.launch(list(argv), launch.nproc, launch.nnodes,
                                  node_rank=launch.node_rank,
                                  rdzv_endpoint=launch.rdzv_endpoint,
                                  env=lock_env(out) if launch.nnodes == 1 else None)
    return launched_outcome(out / REPORT_FILE, started, code)


def launched_outcome(path: Path, started: float, code: int) -> Outcome:
    """The outcome of a torchrun that exited with `code`: rank 0's report if it wrote one on
    this machine since `started` (or a finished run's, when there was nothing to train)."""
    fresh = path.is_file() and path.stat().st_mtime >= started - 1
    report = None
    if fresh or (code == 0 and path.is_file()):
        with contextlib.suppress(OSError, ValueError):
            report = RunReport.model_validate_json(path.read_bytes())
    if report is None:
        message = f"the run finished; its report is where rank 0 ran ({path})" if code == 0 \
            else None
        return Outcome(report=None, report_path=path, exit_code=code, message=message)
    return Outcome(report=report, report_path=path,
                   exit_code=exit_code(report.stop_reason, report.message))


def check_plan(plan: Plan, path: Path) -> tuple[list[str], list[str], Estimate]:
    """(reasons to refuse, notes, the estimate here) for running a plan on this machine: the
    machine it was made for, the memory available now, and its prediction recomputed from its
    own model and setup (here for a local plan; on its device for a catalogue plan, to check
    the file). SetupError when the trainer cannot run it or it cannot fit here at all."""
    import psutil

    from estimator.hardware import detect, fingerprint, local_device
    from estimator.hardware.profiles import lookup_profile
    from estimator.planfile import machine_problems, prediction_problems

    check_runnable(plan.model, plan.setup)
    machine = detect()
    profile = lookup_profile(machine).profile
    refuse, notes = machine_problems(plan, fingerprint=fingerprint(machine),
                                     available_bytes=psutil.virtual_memory().available,
                                     profile=profile)
    here = _estimate(plan.model, plan.setup, local_device(machine, profile), profile)
    check_fits_machine(here)
    local = plan.device_key == "local"
    recomputed = here if local else _estimate(plan.model, plan.setup, plan.device, None)
    more, extra = prediction_problems(plan, recomputed, same_device=True)
    return refuse + more, notes + extra, here


def checked_plan(plan: Plan, path: Path) -> tuple[list[str], list[str], Estimate]:
    """check_plan, with any arithmetic the plan's values break reported as the plan's error
    (a plan file is user input: one line, never a traceback; --debug shows the cause)."""
    try:
        return check_plan(plan, path)
    except NvfreeError:
        raise
    except (ArithmeticError, TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: the plan's values cannot be checked ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:120]})") from exc


def plan_output(path: Path, output: Path | None) -> Path:
    """The run directory of a plan: --output, else runs/<plan file name>."""
    return output if output is not None else Path("runs") / Path(path).stem


def plan_config(plan: Plan, out: Path, *, restart: bool = False) -> TrainConfig:
    """The TrainConfig that runs a plan in `out`, resuming when `out` holds checkpoints."""
    resume = not restart and bool(ckpt.list_checkpoints(out / ckpt.CHECKPOINTS_DIR))
    return TrainConfig(max_steps=plan.max_steps, output_dir=out,
                       data=None if plan.data is None else Path(plan.data),
                       text_field=plan.text_field, model_path=model_directory(plan.model_source),
                       resume=resume, restart=restart, device=plan.torch_device, seed=plan.seed)


def run_plan(path: Path, *, output: Path | None = None, force: bool = False,
             restart: bool = False, node_rank: int | None = None,
             rdzv_endpoint: str | None = None, argv: Sequence[str] = (),
             progress: Progress | None = None,
             on_note: Callable[[str], None] | None = None) -> tuple[Plan, Outcome]:
    """Run a plan file on this machine (see check_plan; `force` overrides its refusals),
    resuming its interrupted run; a plan for N devices runs N processes under torchrun
    (num_devices / num_nodes per machine). `on_note` gets the lines worth telling the user."""
    from estimator.planfile import load_plan

    plan = load_plan(path)
    who = role()
    note = on_note if on_note is not None and who.shows_output else (lambda line: None)
    if not who.worker:
        refuse, notes, _ = checked_plan(plan, Path(path))
        if refuse and not force:
            raise SetupError(f"{path}: {'; '.join(refuse)} (--force runs it anyway)")
        for line in [*notes, *(f"forced: {r}" for r in refuse)]:
            note(line)
    setup = plan.setup
    if setup.num_nodes < 1 or setup.num_devices % setup.num_nodes:
        raise ConfigError(f"{path}: {setup.num_devices} devices do not split over "
                          f"{setup.num_nodes} nodes")
    config = plan_config(plan, plan_output(path, output), restart=restart)
    if config.resume:
        note(f"resuming the interrupted run in {config.output_dir}")
    launch = Launch(nproc=setup.num_devices // setup.num_nodes, nnodes=setup.num_nodes,
                    node_rank=node_rank, rdzv_endpoint=rdzv_endpoint)
    return plan, train(plan.model, setup, config, launch=launch, argv=argv, progress=progress)
