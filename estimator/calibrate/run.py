"""Run the calibration suite on one device, fit the curves and store the profile — unless the
run was disturbed by other processes.

Every timed point is bracketed by contention checks (calibrate/contention.py: other processes'
CPU time and steal from /proc/stat, and a reference GEMM before and after it); a disturbed
point is re-timed after waiting for idle CPUs, then merged with the previous profile point by
point (calibrate/merge.py: a quiet old timing beats a disturbed new one). A profile that still
holds disturbed points is not stored (one-line `refusal`) unless `force=True`.

Cases of one op class run from small to large work; a case whose projected time per call
(work / the rate its kind last measured) exceeds the mode's limit is skipped, and a case that
runs far slower than projected is cut at `max_case_seconds`, so a slow path (bf16 on an
AVX2-only CPU is 40×+ slower than fp32) cannot stall the run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from estimator.allocator import active_allocator
from estimator.calibrate import benches, suite
from estimator.calibrate.contention import ReferenceKernel, load_average
from estimator.calibrate.fit import fit_curve, overhead_curve
from estimator.calibrate.merge import merge_points, quality_of, refusal
from estimator.calibrate.runner import Progress, Runner
from estimator.calibrate.suite import BYTES_CLASSES, SETTINGS, Mode, ModeSettings
from estimator.errors import NvfreeError, ProfileError
from estimator.hardware import detect, fingerprint, training_threads
from estimator.hardware.profiles import load_profile, profile_path, save_profile
from estimator.specs import ModelSpec
from estimator.specs.calibration import CalibrationPoint, CalibrationProfile
from estimator.specs.machine import MachineInfo

plan = suite.plan  # the case list of a mode (kept here for callers of run.plan)
FAST_16BIT_RATIO = 2.0
"""A 16-bit dtype whose GEMMs take more than this × the fp32 time is 'slow' (emulated: no
AVX512_BF16/AMX): its elementwise curve comes from the synthetic cases, not from recording
the executor's bf16 step (whose emulated GEMMs cost minutes on an AVX2-only CPU)."""


@dataclass
class CalibrationResult:
    """What a calibration run produced."""

    profile: CalibrationProfile
    """The profile of this run, merged with the previous one point by point."""
    path: Path | None
    """Where it was stored; None when not (save=False, or refused)."""
    measurements: list[CalibrationPoint]
    """This run's own timings (after re-timing), before the merge."""
    skipped: list[tuple[str, str]] = field(default_factory=list)
    """(case label, reason) of cases not run."""
    wall_seconds: float = 0.0
    busy_percent: float = 0.0
    """Mean CPU share other processes used while this run measured (%)."""
    refusal: str | None = None
    """Why the profile was not stored (one line); None when stored or not asked to."""
    previous: CalibrationProfile | None = None
    """The profile this run was merged with (the one it replaces)."""

    @property
    def num_disturbed(self) -> int:
        """Points of the profile kept although other processes disturbed them (count)."""
        return self.profile.quality.num_disturbed if self.profile.quality else 0

    @property
    def stored(self) -> bool:
        """Whether the profile was written to the profile store."""
        return self.path is not None


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


def fit_all(points: list[CalibrationPoint]) -> dict[str, object]:
    """EfficiencyCurve per op class: knots from the sized points, overhead from the tiny
    probe; executor-recorded elementwise bins pooled by their calls."""
    from estimator.calibrate.block_rates import binned_counts

    curves = {}
    for op_class in sorted({p.op_class for p in points}):
        mine = [p for p in points if p.op_class == op_class]
        tiny = [p.p20_seconds for p in mine if p.tiny]
        recorded = [p for p in mine if " executor " in p.label]
        if op_class == "dispatch":
            curves[op_class] = overhead_curve(op_class, min(tiny))
        elif op_class == "dispatch.autograd":  # the probe's work = aten calls per run
            curves[op_class] = overhead_curve(op_class, min(p.p20_seconds / p.work
                                                            for p in mine))
        elif recorded:
            bins = binned_counts([(p.work, p.seconds, p.num_calls) for p in recorded])
            curves[op_class] = fit_curve(op_class, "bytes", [(w, t) for _, w, t, _ in bins],
                                         monotone=False)
        elif any(not p.tiny for p in mine):
            sized = [(p.work, p.seconds) for p in mine if not p.tiny]
            memory_bound = op_class in BYTES_CLASSES or op_class.split(".")[0] in BYTES_CLASSES
            curves[op_class] = fit_curve(op_class, "bytes" if memory_bound else "flops", sized,
                                         min(tiny) if tiny else 0.0, monotone=not memory_bound)
            if op_class.startswith("lora."):
                curves.update(rank_curves(op_class, mine, min(tiny) if tiny else 0.0))
    return curves


def rank_curves(op_class: str, points: list[CalibrationPoint],
                overhead_seconds: float) -> dict[str, object]:
    """One adapter-GEMM curve per measured rank, 'lora.r<rank>.<dtype>' (the analytic model
    reads the nearest rank's: efficiency.profile_curve), beside the class's curve over all
    ranks. A skinny GEMM's rate follows its rank more than its FLOPs: over all ranks, the
    isotonic fit pooled dyᵀ·z at r = 8 (1.5–3.7 GFLOP/s here, 1 thread) with the r = 16 and
    r = 64 shapes (14–73 GFLOP/s), and read 7 GFLOP/s for every call below 1.3·10⁸ FLOPs."""
    dtype = op_class.split(".", 1)[1]
    by_rank: dict[int, list[tuple[float, float]]] = {}
    for p in points:
        rank = benches.lora_rank(p.label)
        if rank is not None and not p.tiny:
            by_rank.setdefault(rank, []).append((p.work, p.seconds))
    return {f"lora.r{rank}.{dtype}": fit_curve(f"lora.r{rank}.{dtype}", "flops", sized,
                                               overhead_seconds)
            for rank, sized in sorted(by_rank.items())}


def _gemm_seconds(points: list[CalibrationPoint]) -> dict[str, dict[str, tuple[float, float]]]:
    """{dtype: {shape label: (work, seconds)}} of the sized hot GEMM points."""
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for p in points:
        if p.op_class.startswith("matmul.") and not p.tiny:
            shape = p.label.split(" ", 1)[1]
            out.setdefault(p.op_class.split(".")[1], {})[shape] = (p.work, p.seconds)
    return out


def dtype_time_ratios(points: list[CalibrationPoint]) -> dict[str, float]:
    """Time of each dtype's largest GEMMs (≥ 1e9 FLOPs where possible, up to 3 shapes all
    dtypes measured) relative to fp32's: 1 = as fast, 40 = emulated."""
    seconds = _gemm_seconds(points)
    if "fp32" not in seconds:
        return {}
    ratios = {}
    for dtype, mine in seconds.items():
        common = set(mine) & set(seconds["fp32"])
        large = {s for s in common if mine[s][0] >= 1e9} or common
        top = sorted(large, key=lambda s: mine[s][0])[-3:]
        if top:
            ratios[dtype] = sum(mine[s][1] for s in top) / sum(seconds["fp32"][s][1] for s in top)
    return ratios


def preferred_dtype(points: list[CalibrationPoint]) -> str:
    """Fastest of fp32/bf16/fp16 on the largest GEMM shapes all of them measured (≥ 1e9 FLOPs
    where possible); fp32 unless a 16-bit dtype measured faster."""
    ratios = dtype_time_ratios(points)
    best = min(("fp32", "bf16", "fp16"), key=lambda d: ratios.get(d, float("inf")))
    return best if ratios.get(best, float("inf")) < ratios.get("fp32", 1.0) else "fp32"


def _device_name(machine: MachineInfo, backend: str) -> str:
    for acc in machine.accelerators:
        if acc.backend == backend:
            return acc.name
    return machine.cpu_brand


def _previous(profile: CalibrationProfile) -> CalibrationProfile | None:
    """The stored profile this one would replace (same machine, torch, threads, allocator)."""
    path = profile_path(profile)
    try:
        return load_profile(path) if path.exists() else None
    except ProfileError:
        return None


def _elementwise_points(runner: Runner, mode: Mode, ratios: dict[str, float],
                        progress: Progress | None) -> tuple[list[CalibrationPoint],
                                                           list[tuple[str, str]]]:
    """elementwise.fp32/bf16 on the executor's own calls (block_rates), or — for a 16-bit
    dtype whose GEMMs are emulated (FAST_16BIT_RATIO) — on the synthetic cases."""
    from estimator.calibrate import block_rates

    quick = mode == "quick"
    tokens = block_rates.QUICK_TOKENS if quick else block_rates.TOKENS
    steps = 2 if quick else 3
    probe = block_rates.QUICK_PROBE_MODEL if quick else block_rates.PROBE_MODEL
    points: list[CalibrationPoint] = []
    skipped: list[tuple[str, str]] = []
    for dtype in block_rates.REGIMES:
        if ratios.get(dtype, 1.0) > FAST_16BIT_RATIO:
            cases = [c for c in benches.elementwise_cases(suite.ELEMENTWISE_SHAPES[mode],
                                                          [dtype])
                     if c.op_class.startswith("elementwise.")]
            more, why, _ = runner.run_cases(cases)
            points, skipped = points + more, skipped + why
            continue
        for t in tokens:
            if progress is not None:
                progress(0, 1, f"elementwise.{dtype} executor step, {t} tokens")
            points += runner.record(
                lambda d=dtype, t=t: block_rates.recorded_points(d, t, steps, probe),
                f"elementwise.{dtype}")
    return points, skipped


def _collective_points(runner: Runner) -> list[CalibrationPoint]:
    """gloo all-reduce, all-gather and reduce-scatter between 2 local processes (full CPU
    runs), one recording each."""
    from estimator.calibrate.collectives import KINDS, collective_points

    return [point for kind in KINDS for point in runner.record(
        lambda k=kind: [(label, w, t, 1) for label, w, t, _ in
                        collective_points(k, quick=False)],
        f"collective.{kind}", tiny_first=True)]


def measure(device: str, mode: Mode, settings: ModeSettings, model: ModelSpec | None,
            progress: Progress | None) -> tuple[Runner, list[CalibrationPoint],
                                                list[tuple[str, str]], bool]:
    """Every point of a run: (runner, points, skipped, whether it gave up on a busy machine)."""
    reference = None if settings.cpu_clock else ReferenceKernel(device)
    runner = Runner(device, settings, reference)
    cases = plan(mode, device, model)
    points, skipped, aborted = runner.run_cases(cases, progress)
    if aborted:
        return runner, points, skipped, True
    if suite.executor_elementwise(mode, device):
        more, why = _elementwise_points(runner, mode, dtype_time_ratios(points), progress)
        points, skipped = points + more, skipped + why
    if mode == "full" and device == "cpu":
        points += _collective_points(runner)
    runner.second_pass(cases, points)
    return runner, points, skipped, False


def _settings(mode: Mode, cpu_clock: bool, patience_seconds: float | None) -> ModeSettings:
    settings = SETTINGS[mode]
    if cpu_clock:
        settings = replace(settings, cpu_clock=True, max_retries=0, second_pass_seconds=0.0,
                           abort_disturbed_share=1.1)
    if patience_seconds is not None:
        settings = replace(settings, max_retries=5, max_wait_seconds=patience_seconds,
                           retry_until_seconds=float("inf"), wait_first=True)
    return settings


BUSY = ("machine busy: other processes slowed {n} of the first {k} timings (load average "
        "{load}); calibration stopped, {kept} — rerun when the machine is quiet")


def calibrate(
    device: str = "cpu",
    mode: Mode = "full",
    *,
    progress: Progress | None = None,
    save: bool = True,
    machine: MachineInfo | None = None,
    patience_seconds: float | None = None,
    cpu_clock: bool = False,
    force: bool = False,
    model: ModelSpec | None = None,
) -> CalibrationResult:
    """Measure, fit and (by default) store a CalibrationProfile for `device`, merged point by
    point with the stored one it replaces (a quiet old timing beats a disturbed new one).

    The profile is not stored when points stay disturbed after re-timing and merging
    (`result.refusal` says why, one line) unless `force`; a quick run on a plainly busy
    machine gives up after its first points. patience_seconds: wait up to this long in total
    for other processes to go idle before (re-)timing (up to 5 tries per case). cpu_clock:
    time with process CPU time (immune to time-sharing); single-threaded CPU runs only.
    model: the model whose shapes a quick run measures (default: smollm2-135m)."""
    start = time.perf_counter()
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
            settings = _settings(mode, cpu_clock, patience_seconds)
            runner, points, skipped, aborted = measure(tdev, mode, settings, model, progress)
    finally:
        torch.set_num_threads(old_threads)
        benches.release_pools()
    profile = CalibrationProfile(
        fingerprint=fingerprint(machine, backend),
        torch_version=machine.torch_version or torch.__version__,
        num_threads=threads, allocator=active_allocator(), backend=backend,
        device_name=_device_name(machine, backend), created_at=runner.measured_at,
        quick=mode != "full", curves={},
        private_cache_bytes=benches.private_cache_bytes(threads) if tdev == "cpu" else None)
    previous = _previous(profile)
    merged, from_previous = merge_points(points, previous)
    quality = quality_of(merged, num_retimed=runner.num_retimed, from_previous=from_previous,
                         run_points=points, load=load_average())
    profile = profile.model_copy(update={
        "curves": fit_all(merged), "points": tuple(merged), "quality": quality,
        "preferred_dtype": preferred_dtype(merged)})
    refused = refusal(quality, has_previous=previous is not None) if not force else None
    if aborted:
        first = points[:suite.ABORT_AFTER]
        refused = BUSY.format(n=sum(p.disturbed for p in first), k=len(first),
                              load=f"{load_average() or 0:.1f}",
                              kept="the previous profile is kept" if previous
                              else "no profile stored")
    path = save_profile(profile) if save and refused is None else None
    busy = 100 * quality.mean_others_fraction
    return CalibrationResult(profile, path, points, skipped, time.perf_counter() - start, busy,
                             refused if save else None, previous)
