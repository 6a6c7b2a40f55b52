"""Plan files: build a Plan from a search, write and read it, and check a machine against it.

Pure (no torch). The file is the Plan spec as JSON; unknown or corrupted fields are refused with
one line that names the field."""

import json
from datetime import UTC, datetime
from pathlib import Path

from pydantic import ValidationError

from estimator.errors import ConfigError
from estimator.planner import SearchResult, plan_setup
from estimator.specs import CalibrationProfile, Device, ModelSpec
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
    """Write the plan as JSON (to a temp file, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(plan.model_dump_json(indent=2) + "\n")
    tmp.replace(path)
    return path


def load_plan(path: Path) -> Plan:
    """Read a plan file; ConfigError (one line) when missing, not JSON, of another schema
    version, or with an unknown, missing or invalid field."""
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such plan file (make one with `nvfree plan`)") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a plan file ({exc})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: not a plan file (a JSON object is expected)")
    version = raw.get("schema_version")
    if version != PLAN_SCHEMA_VERSION:
        raise ConfigError(f"{path}: plan schema version {version!r}; this nvfree reads "
                          f"version {PLAN_SCHEMA_VERSION} (re-run `nvfree plan`)")
    try:
        return Plan.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise ConfigError(f"{path}: field '{where}': {err['msg']}") from None


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


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.2f} GiB"


def count_data_tokens(path: Path, text_field: str = "text") -> int:
    """Tokens in one pass over the data with the byte-level tokenizer (UTF-8 bytes + one EOS
    per document); an upper bound for a model's own BPE tokenizer (~4 bytes per token).
    Directories count their text files, JSONL its `text_field`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--data {path}: no such file or directory")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    total = 0
    for f in files:
        if f.suffix == ".jsonl":
            for number, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    total += len(_jsonl_text(line, text_field, f, number).encode()) + 1
        elif f.suffix in TEXT_SUFFIXES:
            total += f.stat().st_size + 1
    if total == 0:
        raise ConfigError(f"--data {path}: no text found")
    return total


def _jsonl_text(line: str, text_field: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise ConfigError(f"--data {path}:{number}: not a JSON object") from None
    if not isinstance(record, dict) or text_field not in record:
        raise ConfigError(f"--data {path}:{number}: no '{text_field}' field (see --text-field)")
    return str(record[text_field])


TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".json")
"""Text files a data directory is read from (as estimator.executor.data reads them)."""
