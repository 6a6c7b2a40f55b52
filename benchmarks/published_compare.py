"""Published peak-memory rows against nvfree's estimate for the framework each row ran.

For every usable row of data/published_peaks.toml: `estimator.api.estimate` on the row's model,
setup (framework included) and device, and the estimate of the statistic the row reports. The
counters torch's caching allocator keeps (max_memory_allocated, memory_stats' active peak) see
tensors only, so the estimate compared with them is the memory breakdown without the
`runtime_overhead` term (the CUDA context and kernels, outside the allocator); a row of
*reserved* memory would also need the allocator's cached-but-free blocks, which nvfree has no
derived term for: such rows are flagged, as are rows whose setup is not pinned (`unpinned`),
rows that did something TrainSetup cannot express (`unmodelled`) and rows whose counter is not
stated (compared as allocated, reported apart).

    python benchmarks/published_peaks.py --compare [FRAMEWORK ...]
"""

import statistics
from dataclasses import dataclass
from typing import Any

from estimator.api import estimate
from estimator.catalog import load_model
from estimator.errors import NvfreeError
from estimator.specs import TrainSetup

GIB = 2**30
NOT_TENSORS = ("runtime_overhead", "kernel_caches", "allocator_retention",
               "expert_kernel_caches")
"""Breakdown terms outside torch's device allocator (the CPU-only ones are 0 on a GPU)."""


@dataclass
class Compared:
    """One row: what was published, what nvfree predicts for the same statistic, and why the
    row is reported apart (empty: it counts in the framework's summary)."""

    row: dict[str, Any]
    statistic: str
    published: int
    predicted: int | None
    flags: list[str]

    @property
    def error(self) -> float | None:
        """(predicted − published) / published."""
        return None if self.predicted is None else self.predicted / self.published - 1


def statistic_kind(text: str) -> str:
    """'reserved', 'active', 'allocated' or 'unstated', read from the row's statistic."""
    lowered = text.lower()
    if "unstated" in lowered or "not said" in lowered or "not stated" in lowered:
        return "unstated"
    for kind in ("reserved", "active", "allocated"):
        if kind in lowered:
            return kind
    return "unstated"


def tensor_bytes(row: dict[str, Any], models) -> int:
    """The estimate of what the device allocator counts: the breakdown's tensor terms."""
    from published_peaks import row_to_inputs

    model, kwargs, device = row_to_inputs(row, models)
    spec = load_model(model) if isinstance(model, str) else model
    memory = estimate(spec, TrainSetup(**kwargs), device).memory
    return memory.total_bytes - sum(memory.components.get(k, 0) for k in NOT_TENSORS)


def compare_row(row: dict[str, Any], models) -> Compared:
    """Estimate one usable row and say why it is flagged, if it is."""
    from published_peaks import published_bytes

    kind = statistic_kind(row["statistic"])
    flags = [f"unmodelled: {u}" for u in row["unmodelled"]]
    if row["confidence"] == "unpinned":
        flags.append("setup unpinned (see notes)")
    if kind == "reserved":
        flags.append("reserved memory: no caching-allocator term")
    if kind == "unstated":
        flags.append("counter unstated (compared as allocated)")
    try:
        predicted = tensor_bytes(row, models)
    except NvfreeError as exc:
        predicted, flags = None, [*flags, f"not estimated: {exc}"]
    return Compared(row, kind, published_bytes(row), predicted, flags)


def summary(rows: list[Compared]) -> str:
    """Median and largest |error|, rows under- and over-predicted."""
    errors = [r.error for r in rows if r.error is not None]
    if not errors:
        return "no rows"
    under = sum(e < 0 for e in errors)
    return (f"{len(errors)} rows: median |error| {statistics.median(map(abs, errors)):.1%}, "
            f"max {max(map(abs, errors)):.1%}; {under} under-, {len(errors) - under} "
            "over-predicted")


def line(c: Compared) -> str:
    """One row as a table line: id, configuration, statistic, published, predicted, error."""
    r = c.row
    config = (f"{r['nvfree_model']} {r['method']} b{r['batch_size']} s{r['seq_len']}"
              f"{' ckpt' if r['checkpointing'] else ''} x{r['num_gpus']} {r['device']}")
    pred = "—" if c.predicted is None else f"{c.predicted / GIB:7.2f}"
    err = "—" if c.error is None else f"{c.error:+6.1%}"
    return (f"| {r['id']} | {config} | {c.statistic} | {c.published / GIB:7.2f} | {pred} | "
            f"{err} |")


def report(rows: list[dict[str, Any]], models, frameworks: list[str] | None) -> str:
    """The comparison tables and summaries per framework, unflagged rows first."""
    from published_peaks import FRAMEWORK

    out = []
    done = [compare_row(r, models) for r in rows if r["usable"]]
    names = frameworks or sorted({FRAMEWORK[c.row["framework"]] for c in done})
    header = ("| row | configuration | statistic | published GiB | predicted GiB | error |\n"
              "|---|---|---|---|---|---|")
    for fw in names:
        mine = [c for c in done if FRAMEWORK[c.row["framework"]] == fw]
        clean = [c for c in mine if not c.flags]
        flagged = [c for c in mine if c.flags]
        out += [f"## {fw}", "", f"summary (unflagged): {summary(clean)}", "", header]
        out += [line(c) for c in clean]
        if flagged:
            out += ["", f"flagged, reported apart: {summary(flagged)}", "", header]
            out += [f"{line(c)} {'; '.join(c.flags)}" for c in flagged]
        out.append("")
    return "\n".join(out)
