"""Published GPU peak-memory measurements of fine-tuning frameworks, mapped to nvfree inputs.

Reads data/published_peaks.toml (one [[rows]] table per published figure, with its configuration,
statistic and source; see the file's header and docs/published_peaks.md), checks every row has the
fields, prints a summary per project, and maps a row to the inputs of `estimator.estimate`:

    model, setup_kwargs, device = row_to_inputs(row)
    setup = TrainSetup(**{k: v for k, v in setup_kwargs.items() if k != "framework"})

`setup_kwargs["framework"]` names the framework the run used (hf, torchtune, litgpt, unsloth),
a TrainSetup.framework value. Features a run used that TrainSetup cannot express are listed by
`unmodelled(row)`; they are not folded into the kwargs. `--compare` estimates the rows
(benchmarks/published_compare.py).

Usage: python benchmarks/published_peaks.py [--check] [--compare [FRAMEWORK ...]] [--file PATH]
  (no flag) validate the fields and print the per-project summary;
  --check   also map every usable row (model preset or [models.*] table, device key, TrainSetup
            kwargs) and check the device key of every other row; exit 1 on any problem;
  --compare estimate every usable row and print published vs predicted, per framework
            (benchmarks/published_compare.py).
"""

import argparse
import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from estimator.catalog import load_device, load_model
from estimator.errors import NvfreeError
from estimator.specs import ModelSpec, TrainSetup

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DEFAULT_FILE = Path(__file__).resolve().parents[1] / "data" / "published_peaks.toml"
REQUIRED = (
    "id", "kind", "usable", "confidence", "project", "source", "retrieved", "framework", "model",
    "model_type", "nvfree_model", "method", "weight_bits", "compute_dtype", "mixed_precision",
    "optimizer", "lora_rank", "lora_alpha", "lora_targets", "batch_size", "seq_len", "grad_accum",
    "checkpointing", "attention", "num_gpus", "zero_stage", "gpu", "device", "statistic",
    "unmodelled", "notes")
PEAK_FIELDS = ("peak_gib", "peak_gb", "peak_mib", "peak_mb")
KINDS = ("measured", "max_fit", "estimate")
CONFIDENCES = ("pinned", "partial", "unpinned")
FRAMEWORK = {"hf": "hf", "trl": "hf", "hf+deepspeed": "hf", "torchtune": "torchtune",
             "litgpt": "litgpt", "unsloth": "unsloth"}
"""Row framework → the TrainSetup.framework value (TRL's SFTTrainer and DeepSpeed runs are the HF
Trainer; the DeepSpeed stage travels in zero_stage)."""
ATTENTION = {"flash": "sdpa", "sdpa": "sdpa", "eager": "eager"}
QWEN_V1_TARGETS = {"c_attn": ("q_proj", "k_proj", "v_proj"), "c_proj": ("o_proj", "down_proj"),
                   "w1": ("up_proj",), "w2": ("gate_proj",)}
"""Qwen v1 module names → nvfree's: c_attn is the fused q/k/v projection, 'c_proj' matches both
the attention output and the MLP down projection, w1/w2 are the two MLP input projections."""


def load(path: Path = DEFAULT_FILE) -> tuple[list[dict[str, Any]], dict[str, ModelSpec]]:
    """The rows and the file's own model tables (as ModelSpecs, keyed like presets)."""
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    models = {key: ModelSpec(name=key, **entry) for key, entry in data.get("models", {}).items()}
    return data["rows"], models


def row_problems(row: dict[str, Any]) -> list[str]:
    """Missing or malformed fields of one row (no mapping)."""
    rid = row.get("id", "?")
    problems = [f"{rid}: missing field '{f}'" for f in REQUIRED if f not in row]
    peaks = [f for f in PEAK_FIELDS if f in row]
    if row.get("kind") == "max_fit":
        if "vram_gb" not in row or peaks:
            problems.append(f"{rid}: a max_fit row has vram_gb and no peak field")
    elif len(peaks) != 1:
        problems.append(f"{rid}: exactly one of {', '.join(PEAK_FIELDS)} expected, got {peaks}")
    if row.get("kind") not in KINDS:
        problems.append(f"{rid}: kind must be one of {KINDS}")
    if row.get("confidence") not in CONFIDENCES:
        problems.append(f"{rid}: confidence must be one of {CONFIDENCES}")
    if row.get("usable") and row.get("kind") != "measured":
        problems.append(f"{rid}: only measured rows can be usable")
    return problems


def validate(rows: list[dict[str, Any]]) -> list[str]:
    """Field problems of every row, and duplicate ids."""
    problems = [p for row in rows for p in row_problems(row)]
    counts = Counter(row.get("id") for row in rows)
    problems += [f"duplicate id '{rid}'" for rid, n in counts.items() if n > 1]
    return problems


def resolve_model(row: dict[str, Any], models: dict[str, ModelSpec]) -> str | ModelSpec:
    """The preset key, or the file's ModelSpec for models without a preset (Qwen v1)."""
    key = row["nvfree_model"]
    if not key:
        raise ValueError(f"{row['id']}: no nvfree model (nvfree_model is empty)")
    return models.get(key, key)


def lora_targets(row: dict[str, Any]) -> tuple[str, ...]:
    """The row's LoRA targets in nvfree (PEFT/Llama) names; 'lm_head' passes through as stated."""
    names: list[str] = []
    for name in row["lora_targets"]:
        names += QWEN_V1_TARGETS.get(name, (name,))
    return tuple(dict.fromkeys(names))


def known(value: Any) -> bool:
    """False for the file's 'unstated' / 'n/a' markers."""
    return value not in ("unstated", "n/a", "")


def setup_kwargs(row: dict[str, Any]) -> dict[str, Any]:
    """TrainSetup keyword arguments for a usable row, plus 'framework'."""
    kw: dict[str, Any] = {
        "framework": FRAMEWORK[row["framework"]], "method": row["method"],
        "weight_bits": row["weight_bits"], "compute_dtype": row["compute_dtype"],
        # 'unstated' mixed precision (Qwen LoRA: peft version unknown) maps to autocast with fp32
        # adapters, the HF Trainer --bf16 default the row's notes name.
        "mixed_precision": row["mixed_precision"] if isinstance(row["mixed_precision"], bool)
        else True,
        "optimizer": row["optimizer"], "batch_size": row["batch_size"], "seq_len": row["seq_len"],
        "grad_accum": row["grad_accum"], "checkpointing": row["checkpointing"] in (True, "offload"),
        "attention": ATTENTION.get(row["attention"], "sdpa"),
        "num_devices": row["num_gpus"], "zero_stage": row["zero_stage"],
    }
    if row["method"] != "full":
        kw.update(lora_rank=row["lora_rank"], lora_targets=lora_targets(row))
        if known(row["lora_alpha"]):
            kw["lora_alpha"] = float(row["lora_alpha"])
    for field in ("double_quant", "optimizer_in_backward", "fused_loss", "compile",
                  "activation_offloading"):
        if isinstance(row.get(field), bool):
            kw[field] = row[field]
    if row["method"] != "full" and isinstance(row.get("lora_dropout"), float):
        kw["lora_dropout"] = row["lora_dropout"]
    if row.get("num_nodes"):
        kw["num_nodes"] = row["num_nodes"]
    if known(row.get("offload", "none")):
        kw["offload"] = row.get("offload", "none")
    return kw


def row_to_inputs(row: dict[str, Any], models: dict[str, ModelSpec] | None = None
                  ) -> tuple[str | ModelSpec, dict[str, Any], str]:
    """(model preset key or ModelSpec, TrainSetup kwargs + 'framework', device key) of a usable
    row. Raises ValueError for rows marked unusable (estimates, bounds, unpinned setups)."""
    if not row.get("usable"):
        raise ValueError(f"{row['id']}: not usable ({row['kind']}, {row['confidence']}); "
                         "see its notes")
    if models is None:
        models = load()[1]
    return resolve_model(row, models), setup_kwargs(row), row["device"]


def unmodelled(row: dict[str, Any]) -> list[str]:
    """What the run did that the TrainSetup kwargs cannot carry (as recorded in the row)."""
    return list(row.get("unmodelled", []))


def published_bytes(row: dict[str, Any], per_gpu: bool = True) -> int | None:
    """The published figure in bytes (GB and MB decimal, GiB and MiB binary), divided by the GPU
    count where the row reads it as a total over the GPUs (sum_over_gpus) and per_gpu is set;
    None for max_fit and other rows without a peak."""
    scale = {"peak_gib": 2**30, "peak_gb": 10**9, "peak_mib": 2**20, "peak_mb": 10**6}
    for field, factor in scale.items():
        if field in row:
            share = row["num_gpus"] if per_gpu and row.get("sum_over_gpus") else 1
            return round(row[field] * factor / share)
    return None


def check_row(row: dict[str, Any], models: dict[str, ModelSpec]) -> list[str]:
    """Mapping problems of one row: device key for every row that names one; for usable rows
    also the model and the TrainSetup kwargs (framework excluded)."""
    rid, problems = row["id"], []
    try:
        if row["device"]:
            load_device(row["device"])
    except NvfreeError as exc:
        problems.append(f"{rid}: device: {exc}")
    if not row["usable"]:
        return problems
    try:
        model, kwargs, _ = row_to_inputs(row, models)
        if isinstance(model, str):
            load_model(model)
        TrainSetup(**{k: v for k, v in kwargs.items() if k != "framework"})
    except (NvfreeError, ValueError, ValidationError, TypeError, KeyError) as exc:
        problems.append(f"{rid}: {type(exc).__name__}: {exc}".splitlines()[0])
    return problems


def check(rows: list[dict[str, Any]], models: dict[str, ModelSpec]) -> list[str]:
    """Mapping problems of every row."""
    return [p for row in rows for p in check_row(row, models)]


def summary(rows: list[dict[str, Any]]) -> str:
    """One block per project: rows by kind, usable rows, confidence, frameworks, models."""
    by_project: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_project[row["project"]].append(row)
    lines = []
    for project, group in by_project.items():
        kinds = Counter(r["kind"] for r in group)
        conf = Counter(r["confidence"] for r in group if r["usable"])
        lines.append(f"{project}: {len(group)} rows ("
                     + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
                     + f"), {sum(r['usable'] for r in group)} usable ("
                     + ", ".join(f"{n} {c}" for c, n in sorted(conf.items())) + ")")
        frameworks = Counter(r["framework"] for r in group)
        lines.append("  frameworks: " + ", ".join(f"{f} {n}" for f, n in frameworks.items()))
        models = Counter(r["nvfree_model"] or f"({r['model']})" for r in group)
        lines.append("  models: " + ", ".join(f"{m} {n}" for m, n in models.items()))
    usable = [r for r in rows if r["usable"]]
    per_fw = Counter(FRAMEWORK[r["framework"]] for r in usable)
    lines.append(f"total: {len(rows)} rows, {len(usable)} usable measured rows from "
                 f"{len({r['project'] for r in usable})} projects; usable by framework: "
                 + ", ".join(f"{f} {n}" for f, n in per_fw.items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Validate, summarise and (with --check) map every row; 1 on any problem."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="map every row to nvfree inputs")
    parser.add_argument("--file", type=Path, default=DEFAULT_FILE)
    parser.add_argument("--compare", nargs="*", metavar="FRAMEWORK",
                        help="estimate every usable row and print published vs predicted per "
                             "framework (all when none is named)")
    args = parser.parse_args(argv)
    rows, models = load(args.file)
    if args.compare is not None:
        from published_compare import report

        print(report(rows, models, args.compare or None))
        return 0
    problems = validate(rows)
    if not problems:
        print(summary(rows))
        if args.check:
            problems = check(rows, models)
            if not problems:
                print(f"check: all {sum(r['usable'] for r in rows)} usable rows map to a model, "
                      "a device and valid TrainSetup kwargs; every named device exists")
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
