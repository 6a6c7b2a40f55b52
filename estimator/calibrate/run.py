"""Run the calibration suite on one device, fit the curves and store the profile.

Modes: 'full' (≤ 90 s on a 2-core CPU), 'quick' (≤ 10 s), 'tiny' (tests only: toy sizes).
Cases of one op class run from small to large work; a case whose projected time per call
(work / best rate measured so far in its class) exceeds the mode's limit is skipped, so a slow
path (bf16 on an AVX2-only CPU is 40×+ slower than fp32) cannot stall the run.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import psutil
import torch

from estimator.allocator import active_allocator
from estimator.calibrate import benches
from estimator.calibrate.benches import Case
from estimator.calibrate.fit import fit_curve, overhead_curve
from estimator.calibrate.timing import (
    Timing,
    cpu_snapshot,
    others_busy_fraction,
    time_call,
    wait_until_idle,
)
from estimator.errors import NvfreeError
from estimator.hardware import detect, fingerprint, training_threads
from estimator.profiles import save_profile
from estimator.specs.calibration import CalibrationProfile
from estimator.specs.machine import MachineInfo

Mode = Literal["full", "quick", "tiny"]
Progress = Callable[[int, int, str], None]

BYTES_CLASSES = ("memory", "alloc", "elementwise", "norm", "optimizer", "optimizer.adamw8bit",
                 "dequant.nf4")
"""Memory-bound op classes (work in bytes; per-dtype variants such as 'elementwise.bf16'
included): their curves keep the measured rates (fit.fit_curve monotone=False)."""


@dataclass(frozen=True)
class ModeSettings:
    """Timing effort of a mode."""

    warmup_seconds: float
    min_run_seconds: float
    min_samples: int
    max_samples: int
    max_call_seconds: float
    """Skip a case projected to take longer than this per call (seconds)."""
    max_retries: int = 0
    """Re-time a case disturbed by other processes up to this many times (count)."""
    max_wait_seconds: float = 0.0
    """Total time the run may wait for other processes to go idle before retrying (seconds)."""
    retry_until_seconds: float = 0.0
    """No retries once the run has taken this long, so load cannot blow the time budget."""
    wait_first: bool = False
    """Wait for idle CPUs before the first timing of every case too (patient mode)."""
    cpu_clock: bool = False
    """Time samples with process CPU time instead of wall time (single-threaded CPU only)."""


DISTURBED_FRACTION = 0.2
"""A case during which other processes used more than this share of all CPUs is disturbed."""

SETTINGS: dict[str, ModeSettings] = {
    "full": ModeSettings(0.03, 0.12, 3, 30, 1.0, max_retries=2, max_wait_seconds=15.0,
                         retry_until_seconds=60.0),
    "quick": ModeSettings(0.01, 0.02, 3, 10, 0.3, max_retries=1, max_wait_seconds=0.5,
                          retry_until_seconds=3.0),
    "tiny": ModeSettings(0.001, 0.003, 2, 5, 0.05),
}

GEMM_SHAPES = {  # (tokens, hidden, out): 2·T·h·o from ~1e6 to ~7e10 FLOPs on CPU
    "full": [(32, 128, 128), (128, 256, 256), (256, 512, 512), (512, 512, 1408),
             (512, 1024, 1024), (1024, 1024, 2816), (2048, 1024, 1024), (1024, 2048, 2048),
             (2048, 2048, 5632), (2048, 4096, 4096)],
    "quick": [(64, 256, 256), (256, 512, 1024), (512, 1024, 2816), (512, 2048, 2048)],
    "tiny": [(16, 32, 32), (32, 64, 64)],
}
COLD_GEMM_SHAPES = {  # the hot shapes up to ~1e10 FLOPs: above that GEMMs are compute-bound
    "full": GEMM_SHAPES["full"][:8],
    "quick": [(256, 512, 1024), (512, 1024, 2816)],
    "tiny": [(16, 32, 32)],
}
COLD_POOL_TINY_BYTES = 4 * 2**20
"""Operand pool of the tiny (test) mode: no cold guarantee, just the code path (bytes)."""
GPU_EXTRA_GEMM_SHAPES = [(4096, 4096, 4096), (8192, 8192, 8192), (8192, 8192, 28672)]
LORA_SHAPES = {  # (tokens, hidden, rank)
    "full": [(512, 1024, 8), (512, 1024, 64), (2048, 4096, 8), (2048, 4096, 16),
             (2048, 4096, 64)],
    "quick": [(512, 2048, 16)],
    "tiny": [(32, 64, 8)],
}
ATTENTION_SHAPES = {  # (heads, seq, head_dim); the first (seq ≤ 8) is the overhead probe
    "full": [(1, 8, 8), (8, 128, 64), (8, 256, 64), (8, 512, 64), (8, 1024, 64), (8, 2048, 64),
             (8, 512, 128), (8, 1024, 128)],
    "quick": [(1, 8, 8), (8, 256, 64), (8, 1024, 64)],
    "tiny": [(1, 8, 8), (2, 32, 16)],
}
MEMORY_SIZES = {  # fp32 elements; 2**26 = 256 MiB per array
    "full": [16, 2**12, 2**14, 2**16, 2**18, 2**20, 2**22, 2**24, 2**26],
    "quick": [16, 2**14, 2**18, 2**22, 2**23],
    "tiny": [16, 1024, 16384],
}
ALLOC_SIZES = {  # fp32 elements: 16 (overhead probe) … 256 MiB
    "full": [16, 2**16, 2**20, 2**24, 2**26],
    "quick": [16, 2**20, 2**24],
    "tiny": [16, 4096],
}
"""No case at glibc's 32 MiB mmap ceiling itself: 2^23 fp32 elements came from the heap in
one calibration (51.6 GB/s) and fresh from the kernel in the next (4.7 GB/s), and every loss-
head buffer above the ceiling is charged at the rate interpolated next to it. 64 and 256 MiB
are always fresh."""
ELEMENTWISE_SHAPES = {
    "full": [(1, 16), (64, 256), (256, 1024), (1024, 2048), (2048, 4096)],
    "quick": [(1, 16), (256, 1024), (2048, 2048)],
    "tiny": [(1, 16), (16, 64)],
}
OPTIMIZER_SIZES = {
    "full": [16, 10_000, 100_000, 1_000_000, 4_000_000, 16_000_000],
    "quick": [16, 100_000, 4_000_000],
    "tiny": [16, 1000],
}
DEQUANT_SIZES = {
    "full": [64, 65_536, 1_048_576, 16_777_216],
    "quick": [64, 1_048_576],
    "tiny": [64, 4096],
}


@dataclass(frozen=True)
class Measurement:
    """One timed case."""

    op_class: str
    label: str
    work: float
    timing: Timing
    tiny: bool
    disturbed_fraction: float = 0.0
    """Share of all CPUs other processes used while it was timed (0…1)."""


@dataclass
class CalibrationResult:
    """What a calibration run produced."""

    profile: CalibrationProfile
    path: Path | None
    measurements: list[Measurement]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(case label, reason) of cases not run."""
    wall_seconds: float = 0.0
    busy_percent: float = 0.0
    """CPU use by all processes just before measuring (%); high = numbers depressed by load."""

    @property
    def num_disturbed(self) -> int:
        """Measurements kept although other processes disturbed them (count)."""
        return sum(m.disturbed_fraction > DISTURBED_FRACTION for m in self.measurements)


def torch_device(device: str) -> str:
    """Map the CLI device name to a torch device type; NvfreeError if it is not available."""
    if device == "cpu":
        return "cpu"
    if device in ("cuda", "rocm"):
        if not torch.cuda.is_available():
            raise NvfreeError("no CUDA/ROCm device visible to torch; use --device cpu")
        return "cuda"
    if device == "mps":
        if not torch.backends.mps.is_available():
            raise NvfreeError("MPS is not available (needs Apple silicon + macOS ≥ 12.3)")
        return "mps"
    if device == "xpu":
        if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
            raise NvfreeError("no Intel XPU visible to torch; use --device cpu")
        return "xpu"
    raise NvfreeError(f"unknown device '{device}': use cpu, cuda, mps or xpu")


def profile_backend(device: str) -> str:
    """Backend name a profile is stored under (cuda on a ROCm build is 'rocm')."""
    if device == "cuda" and getattr(torch.version, "hip", None):
        return "rocm"
    return device


def executor_elementwise(mode: Mode, device: str) -> bool:
    """Whether `elementwise.*` is measured on the executor's own calls (block_rates) rather
    than on the generic elementwise cases: full and quick runs on a CPU (docs/calibration.md)."""
    return mode in ("full", "quick") and device == "cpu"


def plan(mode: Mode, device: str) -> list[Case]:
    """Every case of the suite for a mode and torch device type, each class small → large."""
    # fp16 on a CPU is not a training dtype (CPU autocast uses bf16) and torch promotes its
    # GEMMs to fp32: skipped by --quick there, and measured at the quick sizes by a full run.
    dtypes = ["fp32", "bf16"] if device == "cpu" and mode == "quick" else ["fp32", "bf16", "fp16"]
    # per-op framework cost: a tiny executor training step (full); the cheaper multiply chain
    # (quick/tiny: ~3× lower, docs/calibration.md §5) where the step's start-up (2–7 s) would
    # break the time budget
    probe = benches.executor_dispatch_case() if mode == "full" else (
        benches.autograd_dispatch_case())
    cases: list[Case] = [benches.dispatch_case(), probe]
    pool = COLD_POOL_TINY_BYTES if mode == "tiny" else benches.cold_pool_bytes()
    for dtype in dtypes:
        sizes: Mode = "quick" if device == "cpu" and dtype == "fp16" else mode
        gemm = list(GEMM_SHAPES[sizes])
        if device != "cpu" and sizes == "full":
            gemm += GPU_EXTRA_GEMM_SHAPES
        cases.append(benches.gemm_overhead_case(dtype, f"matmul.{dtype}"))
        cases += benches.gemm_cases(dtype, gemm, f"matmul.{dtype}")
        if dtype != "fp16":  # fp16 is not a CPU training dtype; on GPUs rare next to bf16
            cases.append(benches.gemm_overhead_case(dtype, f"matmul_cold.{dtype}"))
            cases.append(benches.gemm_overhead_case(dtype, f"matmul_wgrad.{dtype}"))
            cases += benches.cold_gemm_cases(dtype, COLD_GEMM_SHAPES[mode],
                                             f"matmul_cold.{dtype}", f"matmul_wgrad.{dtype}",
                                             pool)
        cases.append(benches.gemm_overhead_case(dtype, f"lora.{dtype}"))
        cases += benches.lora_cases(dtype, LORA_SHAPES[sizes], pool)
        cases += benches.attention_cases(dtype, ATTENTION_SHAPES[sizes])
    cases += benches.memory_cases(MEMORY_SIZES[mode])
    cases += benches.alloc_cases(ALLOC_SIZES[mode])
    if not executor_elementwise(mode, device):  # else measured on the executor's step
        cases += benches.elementwise_cases(ELEMENTWISE_SHAPES[mode], ["fp32", "bf16"])
    cases += benches.optimizer_cases(OPTIMIZER_SIZES[mode])
    cases += benches.optimizer_cases(OPTIMIZER_SIZES[mode], "adamw8bit")
    cases += benches.dequant_cases(DEQUANT_SIZES[mode])
    return cases


def _projected_seconds(case: Case, best_rate: dict[str, float]) -> float:
    rate = best_rate.get(case.op_class)
    return case.work / rate if rate else 0.0


def _measure(case: Case, device: str, settings: ModeSettings, wait_left: float,
             retries: int) -> tuple[Measurement, float]:
    """Time a case; if other processes disturbed it, wait for idle CPUs (within the run's wait
    budget) and re-time it, keeping the least disturbed timing. Returns it and the seconds
    waited."""
    fn = case.build(device)
    best: Measurement | None = None
    waited = 0.0
    for attempt in range(retries + 1):
        if attempt or (settings.wait_first and wait_left - waited > 0):
            start_wait = time.perf_counter()
            wait_until_idle(max(0.0, wait_left - waited))
            waited += time.perf_counter() - start_wait
        before = cpu_snapshot()
        timing = time_call(
            fn, device=device, warmup_seconds=settings.warmup_seconds,
            min_run_seconds=settings.min_run_seconds, min_samples=settings.min_samples,
            max_samples=settings.max_samples,
            clock=time.process_time if settings.cpu_clock else time.perf_counter,
        )
        disturbed = 0.0 if settings.cpu_clock else others_busy_fraction(before, cpu_snapshot())
        current = Measurement(case.op_class, case.label, case.work, timing, case.tiny, disturbed)
        if best is None or disturbed < best.disturbed_fraction:
            best = current
        if disturbed <= DISTURBED_FRACTION:
            break
    assert best is not None
    return best, waited


def run_cases(
    cases: list[Case], device: str, settings: ModeSettings, progress: Progress | None = None
) -> tuple[list[Measurement], list[tuple[str, str]]]:
    """Time every case (skipping ones projected too slow or failing); report progress."""
    measured: list[Measurement] = []
    skipped: list[tuple[str, str]] = []
    best_rate: dict[str, float] = {}
    wait_left = settings.max_wait_seconds
    started = time.perf_counter()
    for i, case in enumerate(cases):
        if progress is not None:
            progress(i, len(cases), case.label)
        projected = _projected_seconds(case, best_rate)
        if not case.tiny and projected > settings.max_call_seconds:
            skipped.append((case.label, f"projected {projected:.2f} s per call"))
            continue
        try:
            in_budget = wait_left > 0 and time.perf_counter() - started < (
                settings.retry_until_seconds)
            retries = settings.max_retries if in_budget else 0
            measurement, waited = _measure(case, device, settings, wait_left, retries)
        except (RuntimeError, NotImplementedError, TypeError) as exc:
            skipped.append((case.label, str(exc).splitlines()[0][:120] if str(exc) else "error"))
            continue
        wait_left -= waited
        timing = measurement.timing
        measured.append(measurement)
        if not case.tiny:
            rate = case.work / timing.median_seconds
            best_rate[case.op_class] = max(best_rate.get(case.op_class, 0.0), rate)
    if progress is not None:
        progress(len(cases), len(cases), "done")
    return measured, skipped


def fit_all(measured: list[Measurement]) -> dict[str, object]:
    """EfficiencyCurve per op class: points from the sized cases, overhead from the tiny probe."""
    classes = sorted({m.op_class for m in measured})
    curves = {}
    for op_class in classes:
        # overhead = the floor cost of a no-work call: p20, which resists scheduler spikes
        tiny = [m.timing.p20_seconds for m in measured if m.op_class == op_class and m.tiny]
        points = [(m.work, m.timing.median_seconds) for m in measured
                  if m.op_class == op_class and not m.tiny]
        if op_class == "dispatch":
            curves[op_class] = overhead_curve(op_class, min(tiny))
        elif op_class == "dispatch.autograd":  # the probe's work = aten calls per run
            per_call = min(m.timing.p20_seconds / m.work for m in measured
                           if m.op_class == op_class)
            curves[op_class] = overhead_curve(op_class, per_call)
        elif points:
            memory_bound = op_class in BYTES_CLASSES or op_class.split(".")[0] in BYTES_CLASSES
            curves[op_class] = fit_curve(op_class, "bytes" if memory_bound else "flops", points,
                                         min(tiny) if tiny else 0.0, monotone=not memory_bound)
    return curves


def preferred_dtype(measured: list[Measurement]) -> str:
    """Fastest of fp32/bf16/fp16 on the largest GEMM shapes all of them measured (≥ 1e9 FLOPs
    where possible); fp32 unless a 16-bit dtype measured faster."""
    seconds: dict[str, dict[str, float]] = {}
    for m in measured:
        if m.op_class.startswith("matmul.") and not m.tiny:
            shape = m.label.split(" ", 1)[1]
            seconds.setdefault(m.op_class.split(".")[1], {})[shape] = m.timing.median_seconds
    if "fp32" not in seconds:
        return "fp32"
    work = {m.label.split(" ", 1)[1]: m.work for m in measured if m.op_class == "matmul.fp32"}
    best, best_time = "fp32", None
    for dtype in ("fp32", "bf16", "fp16"):
        common = set(seconds.get(dtype, {})) & set(seconds["fp32"])
        large = {s for s in common if work.get(s, 0) >= 1e9} or common
        top = sorted(large, key=lambda s: work.get(s, 0))[-3:]
        if not top:
            continue
        fp32_time = sum(seconds["fp32"][s] for s in top)
        ratio = sum(seconds[dtype][s] for s in top) / fp32_time
        if best_time is None or ratio < best_time:
            best, best_time = dtype, ratio
    return best


def _device_name(machine: MachineInfo, backend: str) -> str:
    for acc in machine.accelerators:
        if acc.backend == backend:
            return acc.name
    return machine.cpu_brand


def calibrate(
    device: str = "cpu",
    mode: Mode = "full",
    *,
    progress: Progress | None = None,
    save: bool = True,
    machine: MachineInfo | None = None,
    patience_seconds: float | None = None,
    cpu_clock: bool = False,
) -> CalibrationResult:
    """Measure, fit and (by default) store a CalibrationProfile for `device`.

    patience_seconds: on a shared machine, wait up to this long in total for other processes
    to go idle before (re-)timing disturbed cases (up to 5 tries each) instead of the mode's
    bounded retries — slower, but the profile describes the machine, not its neighbours.
    cpu_clock: time with process CPU time, immune to time-sharing with other processes; only
    valid for a single-threaded CPU run (OMP_NUM_THREADS=1), NvfreeError otherwise."""
    start = time.perf_counter()
    busy = psutil.cpu_percent(interval=0.2)
    tdev = torch_device(device)
    backend = profile_backend(tdev)
    machine = machine or detect(probe_torch=tdev != "cpu")
    threads = training_threads(machine)
    if cpu_clock and (tdev != "cpu" or threads != 1):
        raise NvfreeError("CPU-time timing needs a single-threaded CPU run: OMP_NUM_THREADS=1")
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.enable_grad():  # attention backward needs autograd
            settings = SETTINGS[mode]
            if cpu_clock:
                settings = replace(settings, cpu_clock=True, max_retries=0)
            if patience_seconds is not None:
                settings = replace(settings, max_retries=5, max_wait_seconds=patience_seconds,
                                   retry_until_seconds=float("inf"), wait_first=True)
            measured, skipped = run_cases(plan(mode, tdev), tdev, settings, progress)
            executor_curves = {}
            if executor_elementwise(mode, tdev):  # the executor's own memory-bound calls
                from estimator.calibrate.block_rates import elementwise_curves

                executor_curves = elementwise_curves()
    finally:
        torch.set_num_threads(old_threads)
        benches.release_pools()
    curves = {**fit_all(measured), **executor_curves}
    if mode == "full" and tdev == "cpu":  # gloo all-reduce between 2 local processes
        from estimator.calibrate.collectives import collective_curves

        curves.update(collective_curves(quick=False))
    profile = CalibrationProfile(
        fingerprint=fingerprint(machine, backend),
        torch_version=machine.torch_version or torch.__version__,
        num_threads=threads,
        allocator=active_allocator(),
        backend=backend,
        device_name=_device_name(machine, backend),
        created_at=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        quick=mode != "full",
        curves=curves,  # type: ignore[arg-type]
        preferred_dtype=preferred_dtype(measured),  # type: ignore[arg-type]
        private_cache_bytes=benches.private_cache_bytes(threads) if tdev == "cpu" else None,
    )
    path = save_profile(profile) if save else None
    return CalibrationResult(profile, path, measured, skipped, time.perf_counter() - start, busy)

