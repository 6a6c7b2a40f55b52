"""Plan files: build a Plan from a search, write and read it, and check a machine against it.

Pure (no torch). The file is the Plan spec as JSON; unknown or corrupted fields are refused with
one line that names the field."""

import contextlib
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from estimator.errors import ConfigError, SetupError
from estimator.inputs import checked
from estimator.planner import SearchResult, plan_setup
from estimator.request import typed_errors
from estimator.specs import CalibrationProfile, Device, Estimate, ModelSpec
from estimator.specs.plan import PLAN_SCHEMA_VERSION, Plan


def make_plan(result: SearchResult, *, model: ModelSpec, model_source: str, data: str | None,
              text_field: str, device: Device, device_key: str, torch_device: str,
              fingerprint: str | None, profile: CalibrationProfile | None, num_tokens: int,
              objective: str, seed: int = 0) -> Plan:
    """The Plan for the search's best candidate (which must meet the constraints)."""
    from estimator import __version__

    best = result.candidates[0]
    return Plan(
        created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        nvfree_version=__version__, model=model, model_source=model_source, data=data,
        text_field=text_field, setup=plan_setup(best, num_tokens), device=device,
        device_key=device_key, torch_device=torch_device, machine_fingerprint=fingerprint,
        profile_id=profile.profile_id if profile else None, max_steps=result.max_steps,
        seed=seed, memory_limit_bytes=result.memory_limit_bytes, objective=objective,
        predicted_peak_bytes=best.peak_bytes, predicted_step_seconds=best.step_seconds,
        predicted_total_seconds=best.total_seconds, predicted_cost_usd=best.cost_usd,
        num_candidates=result.num_candidates, num_fitting=result.num_fitting,
        candidates=tuple(result.candidates))


def save_plan(plan: Plan, path: Path) -> Path:
    """Write the plan as JSON (to a temp file, then rename); ConfigError (one line) when the
    destination cannot take it (check_writable tells before the search)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(plan.model_dump_json(indent=2) + "\n")
        tmp.replace(path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise ConfigError(f"--output {path}: cannot write the plan "
                          f"({(exc.strerror or str(exc)).lower()})") from None
    return path


MAX_PLAN_BYTES = 16 * 2**20
"""Largest plan file read (bytes); a plan is tens of kilobytes."""


def _plan_json(path: Path) -> dict:
    """The plan file as a JSON object; ConfigError (one line) for anything else."""
    from estimator.inputs import read_json

    try:
        return read_json(path, max_bytes=MAX_PLAN_BYTES)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such plan file (make one with `nvfree plan`)") from None
    except ConfigError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        raise ConfigError(f"{path}: not a plan file ({reason})") from None


def load_plan(path: Path) -> Plan:
    """Read a plan file; ConfigError (one line) when missing, not UTF-8 JSON (nesting and size
    bounded: estimator.inputs), of another schema version, or with an unknown, missing or
    invalid field (named with its path)."""
    raw = _plan_json(Path(path))
    version = raw.get("schema_version")
    if version != PLAN_SCHEMA_VERSION:
        raise ConfigError(f"{path}: plan schema version {repr(version)[:40]}; this nvfree "
                          f"reads version {PLAN_SCHEMA_VERSION} (re-run `nvfree plan`)")
    try:
        return Plan.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        message = " ".join(str(err["msg"]).split())[:200]
        raise ConfigError(f"{path}: field '{where}': {message}") from None
    except (ArithmeticError, TypeError, ValueError, RecursionError) as exc:
        raise ConfigError(f"{path}: not a valid plan ({type(exc).__name__}: "
                          f"{' '.join(str(exc).split())[:160]})") from None


def looks_like_plan(head: bytes) -> bool:
    """Whether a file's first bytes are a plan file's (or the file is empty)."""
    text = head.lstrip()
    return not text or (text.startswith(b"{") and b'"schema_version"' in head)


def check_writable(path: Path, flag: str = "--output") -> Path:
    """Check, before any search, that a plan can be written to `path`: not a directory or
    special file, its directory writable (created), an existing file only if it is a plan
    (never someone's other file), and 1 MiB free on its disk. ConfigError, one line."""
    from estimator.outputs import check_free_space, check_writable_file

    path = check_writable_file(Path(path), flag, accept=looks_like_plan)
    check_free_space(path.parent, 2**20, "the plan file", flag)
    return path


def machine_problems(plan: Plan, *, fingerprint: str | None, available_bytes: int,
                     profile: CalibrationProfile | None) -> tuple[list[str], list[str]]:
    """(reasons to refuse the plan here, notes) — refusals are overridden by --force."""
    refuse, notes = [], []
    if plan.predicted_peak_bytes > plan.memory_limit_bytes:
        refuse.append(f"the plan is predicted not to fit: {_gib(plan.predicted_peak_bytes)} > "
                      f"{_gib(plan.memory_limit_bytes)}")
    if plan.device_key != "local":
        refuse.append(f"the plan is for {plan.device.display_name}, not this machine "
                      f"(re-plan with `nvfree plan --device local`)")
    elif plan.machine_fingerprint and fingerprint and fingerprint != plan.machine_fingerprint:
        refuse.append("the plan was made on another machine (fingerprint differs); re-plan here")
    if available_bytes < plan.predicted_peak_bytes:
        refuse.append(f"only {_gib(available_bytes)} of memory is available now; the plan "
                      f"needs {_gib(plan.predicted_peak_bytes)}")
    current = profile.profile_id if profile else None
    if current != plan.profile_id:
        notes.append(f"calibration profile changed since planning ({plan.profile_id} → "
                     f"{current}); the run report re-predicts with the current one")
    return refuse, notes


PEAK_TOLERANCE = 0.10
"""How far (fraction) the peak recomputed from a plan's setup may differ from the peak the file
records before `nvfree run` calls the file edited (or made by a different nvfree)."""


def prediction_problems(plan: Plan, estimate: Estimate, *, same_device: bool
                        ) -> tuple[list[str], list[str]]:
    """(reasons to refuse, notes) from the plan's prediction recomputed from its own model and
    setup on this machine (`estimate`): it must fit here (its upper end within the plan's
    memory limit and the device's capacity), agree with the peak the file records
    (same_device: the file's number was made for this device) and with its step count."""
    refuse, notes = [], []
    memory = estimate.memory
    limit = min(plan.memory_limit_bytes, memory.capacity_bytes)
    if memory.upper_bytes > limit:
        refuse.append(f"recomputed from its setup, the plan does not fit here: up to "
                      f"{_gib(memory.upper_bytes)} > {_gib(limit)}")
    recorded = plan.predicted_peak_bytes
    if same_device and abs(memory.total_bytes - recorded) > PEAK_TOLERANCE * max(
            memory.total_bytes, recorded, 1):
        refuse.append(f"the file says peak {_gib(recorded)}, its model and setup give "
                      f"{_gib(memory.total_bytes)}: the plan was edited or made by another "
                      "nvfree (re-plan)")
    tokens = plan.setup.num_tokens
    if tokens is not None:
        steps = max(1, -(-tokens // plan.setup.global_tokens_per_step))  # planner.num_steps
        if steps != plan.max_steps:
            refuse.append(f"max_steps {plan.max_steps} does not cover its token budget "
                          f"({steps} steps do): the plan was edited (re-plan)")
    seconds = estimate.throughput.step_seconds
    if not same_device or abs(seconds - plan.predicted_step_seconds) > 0.5 * seconds:
        notes.append(f"predicted step time here: {seconds:.3g} s (the plan says "
                     f"{plan.predicted_step_seconds:.3g} s)")
    return refuse, notes


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def count_data_tokens(path: Path, text_field: str = "text") -> int:
    """Tokens in one pass over the data with the byte-level tokenizer (UTF-8 bytes + one EOS
    per document); an upper bound for a model's own BPE tokenizer (~4 bytes per token).
    Directories count their regular text files, JSONL its `text_field` (UTF-8 lines; a FIFO
    or device is refused, not read)."""
    from estimator.inputs import check_data_path

    path = check_data_path(Path(path))
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    total = 0
    for f in files:
        if f.suffix == ".jsonl":
            total += _jsonl_bytes(f, text_field)
        elif f.suffix in TEXT_SUFFIXES:
            total += f.stat().st_size + 1
    if total == 0:
        raise ConfigError(f"--data {path}: no text found")
    return total


def _jsonl_bytes(path: Path, text_field: str) -> int:
    """UTF-8 bytes + 1 EOS of every document of a JSONL file."""
    from estimator.inputs import jsonl_object

    total = 0
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, 1):
                record = jsonl_object(raw, f"--data {path}:{number}")
                if record is None:
                    continue
                if text_field not in record:
                    raise ConfigError(f"--data {path}:{number}: no '{text_field}' field (see "
                                      "--text-field)")
                total += len(str(record[text_field]).encode()) + 1
    except OSError as exc:
        raise ConfigError(f"--data {path}: cannot be read ({exc.strerror or exc})") from None
    return total


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".json")
"""Text files a data directory is read from (as estimator.executor.data reads them)."""


def constraints_from(*, method=None, dtype=None, optimizer=None, checkpointing=None,
                     global_batch: int, memory_limit: float | None = None,
                     max_hours: float | None = None, max_cost: float | None = None,
                     objective: str = "time", top: int = 5, zero_stages=(0,),
                     max_devices: int | None = None):
    """planner.Constraints from `nvfree plan`'s flags (a fixed flag narrows that dimension to
    one value; memory_limit in GiB, max_hours in hours)."""
    from estimator.planner import Constraints, devices_up_to

    memory_limit, max_hours = checked("--memory-limit", memory_limit), checked("--max-hours",
                                                                                max_hours)
    max_cost, top = checked("--max-cost", max_cost), checked("--top", top)
    max_devices = checked("--max-devices", max_devices)
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


def token_budget(tokens: float | None, data: Path | str | None, text_field: str) -> int:
    """--tokens, else the tokens of --data (once over it), else PLAN_DEFAULTS' budget."""
    from estimator.request import PLAN_DEFAULTS

    if tokens is not None:
        return round(checked("--tokens", tokens))
    return PLAN_DEFAULTS["tokens"] if data is None else count_data_tokens(Path(data), text_field)


@typed_errors
def plan_request(model: str | ModelSpec | None = None, *, params: float | None = None,
                 active_params: float | None = None, active_ratio: float | None = None,
                 method: str | None = None, dtype: str | None = None,
                 optimizer: str | None = None, checkpointing: bool | None = None,
                 lora_rank: int = 16, lora_alpha: float = 32.0,
                 lora_targets: str = "all-linear", seq_len: int | None = None,
                 global_batch: int | None = None, data: Path | str | None = None,
                 text_field: str = "text", tokens: float | None = None,
                 device: str = "local", num_devices: int = 1, nodes: int = 1,
                 zero: str | int | None = None, offload: str = "none",
                 max_devices: int | None = None, memory_limit: float | None = None,
                 max_hours: float | None = None, max_cost: float | None = None,
                 objective: str = "time", top: int = 5, torch_device: str = "cpu",
                 seed: int = 0, output: Path | str | None = None,
                 calibrate: Callable[[], object] | None = None,
                 prices: dict[str, float] | None = None) -> tuple[Plan, str | None]:
    """`nvfree plan` without the rendering: (the Plan, the calibration note of the device).
    Takes the command's flags by name (request.PLAN_DEFAULTS for the model, sequence length,
    global batch and token budget left out); `calibrate` is called when --device local has no
    profile (the CLI's quick calibration), then the device is resolved again; the plan is
    written to `output` when given. SetupError when no candidate meets the constraints."""
    from estimator.hardware import detect, fingerprint, resolve_device
    from estimator.planner import search
    from estimator.planner.estimate import with_user_price
    from estimator.request import PLAN_DEFAULTS, parse_targets, resolve_model, setup_error
    from estimator.specs import TrainSetup

    if model is None and params is None:
        model = PLAN_DEFAULTS["model"]
    seq_len = PLAN_DEFAULTS["seq_len"] if seq_len is None else seq_len
    global_batch = PLAN_DEFAULTS["global_batch"] if global_batch is None else \
        checked("--global-batch", global_batch)
    local = device.strip().lower() == "local"
    if output is not None:
        check_writable(Path(output))
    spec = resolve_model(model, params, active_params, active_ratio)
    dev, profile, note = resolve_device(device)
    if calibrate is not None and profile is None and local:
        calibrate()
        dev, profile, note = resolve_device(device)
    dev = with_user_price(dev, prices)  # --price DEVICE=USD/h
    num_tokens = token_budget(tokens, data, text_field)
    num_devices = max_devices or num_devices
    try:
        base = TrainSetup(framework="nvfree", seq_len=seq_len, lora_rank=lora_rank,
                          lora_alpha=lora_alpha, lora_targets=parse_targets(lora_targets),
                          num_tokens=num_tokens, num_devices=num_devices, num_nodes=nodes,
                          offload=offload)
    except ValueError as exc:
        raise setup_error(exc) from None
    if local and zero not in (None, "0", 0, "3", 3):
        raise SetupError("the bundled trainer runs DDP (--zero 0) or ZeRO-3 on FSDP2 (--zero 3); "
                         "plan ZeRO-1/2 for a catalogue --device")
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
    source = model if isinstance(model, str) else (
        model.name if isinstance(model, ModelSpec) else f"--params {params:g}")
    the_plan = make_plan(result, model=spec, model_source=source,
                         data=None if data is None else str(data), text_field=text_field,
                         device=dev, device_key=device.strip().lower(),
                         torch_device=torch_device,
                         fingerprint=fingerprint(detect()) if local else None,
                         profile=profile, num_tokens=num_tokens, objective=objective,
                         seed=seed)
    if output is not None:
        save_plan(the_plan, Path(output))
    return the_plan, note
