"""Measure what a training run uses: peak memory per phase, tensor storage by role, step time.

Peak memory:
- Linux host (cpu device): write "5" to /proc/self/clear_refs to reset the resident high-water
  mark, read VmHWM from /proc/self/status at the end of the phase (proc(5); Linux ≥ 4.0). This
  sees every page the process touched, torch's allocator included; tracemalloc sees no tensors
  and ru_maxrss cannot be reset.
- other hosts, or where clear_refs is not writable: a thread samples psutil RSS every 2 ms and
  keeps the maximum (can miss spikes shorter than the interval).
- accelerators (cuda, rocm, xpu, mps): torch.accelerator's peak allocated bytes, reset per phase.
"""

import contextlib
import ctypes
import functools
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import Protocol

import psutil
import torch

from estimator.specs.estimate import Estimate
from estimator.specs.model import ModelSpec
from estimator.specs.run import RunReport, TermComparison
from estimator.specs.setup import TrainSetup

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
RSS_SAMPLE_SECONDS = 0.002
"""Interval of the RSS sampling thread (seconds)."""


class TrainConfigLike(Protocol):
    """The TrainConfig fields the report reads."""

    seed: int
    max_steps: int
    predict: bool


def read_vmhwm_bytes() -> int | None:
    """VmHWM (peak resident set since the last reset) of this process (bytes); None off Linux."""
    try:
        text = _STATUS.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # reported in kB
    return None


def reset_vmhwm() -> bool:
    """Reset VmHWM to the current RSS by writing '5' to /proc/self/clear_refs; False if the
    kernel or sandbox does not allow it."""
    try:
        with _CLEAR_REFS.open("w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def current_rss_bytes() -> int:
    """Resident set size of this process now (bytes)."""
    return psutil.Process().memory_info().rss


class _RssSampler:
    """Background thread keeping the maximum RSS seen since start()."""

    def __init__(self) -> None:
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.peak_bytes = current_rss_bytes()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        process = psutil.Process()
        while not self._stop.wait(RSS_SAMPLE_SECONDS):
            self.peak_bytes = max(self.peak_bytes, process.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, current_rss_bytes())
        return self.peak_bytes


def _accelerator_memory(name: str, backend: str) -> Callable:
    """torch.accelerator.<name> (torch ≥ 2.9), else the backend's own (torch.cuda.<name> …)."""
    return getattr(torch.accelerator, name, None) or getattr(getattr(torch, backend), name)


def _accelerator_peak_works(device: torch.device) -> bool:
    """True if the backend keeps peak-allocation statistics (MPS, for one, may not)."""
    try:
        _accelerator_memory("reset_peak_memory_stats", device.type)(device)
        _accelerator_memory("max_memory_allocated", device.type)(device)
    except (AttributeError, RuntimeError, NotImplementedError):
        return False
    return True


class PeakMemory:
    """Peak memory of one phase at a time: reset() at the start, peak_bytes() at the end."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type != "cpu" and _accelerator_peak_works(device):
            self.method = "accelerator"
        elif device.type == "cpu" and read_vmhwm_bytes() is not None and reset_vmhwm():
            self.method = "vmhwm"
        else:
            self.method = "rss_sampled"
        self._sampler = _RssSampler() if self.method == "rss_sampled" else None

    def current_bytes(self) -> int:
        """Memory in use now (bytes): RSS on the host, allocated bytes on an accelerator."""
        if self.method == "accelerator":
            return int(_accelerator_memory("memory_allocated", self.device.type)(self.device))
        return current_rss_bytes()

    def reset(self) -> None:
        """Start a new phase: the next peak_bytes() covers only what follows."""
        if self.method == "accelerator":
            synchronize(self.device)
            _accelerator_memory("reset_peak_memory_stats", self.device.type)(self.device)
        elif self.method == "vmhwm":
            reset_vmhwm()
        else:
            assert self._sampler is not None
            self._sampler.stop()
            self._sampler.start()

    def peak_bytes(self) -> int:
        """Peak since the last reset() (bytes)."""
        if self.method == "accelerator":
            synchronize(self.device)
            return int(_accelerator_memory("max_memory_allocated", self.device.type)(self.device))
        if self.method == "vmhwm":
            return read_vmhwm_bytes() or current_rss_bytes()
        assert self._sampler is not None
        return max(self._sampler.peak_bytes, current_rss_bytes())

    def close(self) -> None:
        """Stop the sampling thread, if any."""
        if self._sampler is not None:
            self._sampler.stop()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None off glibc (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc malloc_trim(0)). glibc serves every
    tensor under its dynamic mmap threshold (up to 32 MiB) from the heap and keeps what is
    freed resident, in holes later tensors do not always fill. Called after the model is built
    and before each micro-batch's loss head (train._release_before_loss_head); a returned page
    costs a page fault when it is written again. No-op off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


M_MMAP_THRESHOLD = -3
"""mallopt's parameter number for the mmap threshold (glibc malloc.h)."""
SHARDED_MMAP_THRESHOLD_BYTES = 1 << 20
"""The fixed mmap threshold of a distributed (DDP or ZeRO-3) CPU rank (bytes)."""


def fix_mmap_threshold(num_bytes: int = SHARDED_MMAP_THRESHOLD_BYTES) -> bool:
    """Serve every allocation of num_bytes or more with its own mmap, returned to the OS when
    freed (glibc mallopt(M_MMAP_THRESHOLD); a fixed value also stops glibc raising the
    threshold to each freed block's size, up to 32 MiB). For FSDP2 on the CPU: its all-gather
    and reduce-scatter buffers (a block's parameters and gradients, allocated and freed per
    block, also on gloo's threads, in other arenas) otherwise stay resident in heap holes —
    measured on 2 ranks of a 76M-parameter fp32 full fine-tune: a per-rank peak of 1798 MiB
    with glibc's dynamic threshold, 1074 MiB with 1 MiB fixed (docs/distributed.md). DDP
    ranks too: a QLoRA rank's dequantised weights (6 MiB each, freed per linear) with gloo's
    threads allocating in other arenas peaked at 670/682 MiB per rank, 555/554 MiB with the
    threshold fixed, 559 predicted (76M-parameter Llama, 2 ranks; docs/distributed.md). The
    cost is a page fault per page of each such buffer, each time. False off glibc."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, num_bytes))


def tensor_storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind `tensors` (shared storage counted once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        for part in _plain_tensors(t):
            storage = part.untyped_storage()
            key = (str(part.device), storage.data_ptr())
            if key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
    return total


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors inside a tensor subclass (e.g. NF4 codes and scales), or [t]."""
    to_local = getattr(t, "to_local", None)
    if to_local is not None:  # a DTensor (FSDP2's sharded parameters): this rank's shard
        return _plain_tensors(to_local())
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None or type(t) in (torch.Tensor, torch.nn.Parameter):
        return [t]
    names, _ = flatten()
    return [p for n in names for p in _plain_tensors(getattr(t, n))]


def weights_bytes(model: torch.nn.Module) -> int:
    """Storage of every parameter and buffer of the model (bytes)."""
    return tensor_storage_bytes([*model.parameters(), *model.buffers()])


def gradient_bytes(model: torch.nn.Module) -> int:
    """Storage of the gradients currently held by the model's parameters (bytes)."""
    return tensor_storage_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Storage of every tensor in the optimizer's state (bytes): moments, codes, scales, step."""
    return tensor_storage_bytes(
        v for state in optimizer.state.values() for v in state.values()
        if isinstance(v, torch.Tensor)
    )


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (no-op on the CPU) so that wall time covers it."""
    if device.type != "cpu":
        _accelerator_memory("synchronize", device.type)(device)


def median_step_seconds(step_seconds: list[float], *, num_warmup: int = 2,
                        skip: Collection[int] = ()) -> float | None:
    """Median step time after dropping the first num_warmup steps and the steps whose index is
    in `skip` (e.g. those that ran torch.compile) (seconds); with too few steps, the last one;
    None with none."""
    steady = [s for i, s in enumerate(step_seconds) if i >= num_warmup and i not in skip]
    steady = steady or step_seconds[-1:]
    return statistics.median(steady) if steady else None


class StepTimer:
    """Wall time per step; synchronises the device before each reading. Steps marked as
    compiling (mark_compiled) are left out of the median like the warm-up steps."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.step_seconds: list[float] = []
        self.compiled_steps: set[int] = set()
        """Indices into step_seconds of steps that ran a torch.compile (count from 0)."""
        self._start = 0.0

    def mark_compiled(self) -> None:
        """The last recorded step compiled: leave it out of the median."""
        self.compiled_steps.add(len(self.step_seconds) - 1)

    def median_seconds(self) -> float | None:
        """Median step time past the warm-up and compiling steps (seconds); None with none."""
        return median_step_seconds(self.step_seconds, skip=self.compiled_steps)

    def start(self) -> None:
        synchronize(self.device)
        self._start = time.perf_counter()

    def stop(self) -> float:
        synchronize(self.device)
        seconds = time.perf_counter() - self._start
        self.step_seconds.append(seconds)
        return seconds


def device_display_name(device: torch.device) -> str:
    """Human name of a torch device: the CPU brand string, or the accelerator's name."""
    if device.type == "cpu":
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return platform.processor() or "cpu"
    backend = getattr(torch, device.type, None)
    get_name = getattr(backend, "get_device_name", None)
    if get_name is not None:
        with contextlib.suppress(Exception):
            return str(get_name(device))
    return str(device)


def num_threads() -> int:
    """torch intra-op threads (count)."""
    return torch.get_num_threads() or os.cpu_count() or 1


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted − measured) / measured (fraction); None if either is missing or measured 0."""
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured


def predict(spec: ModelSpec, setup: TrainSetup, device: torch.device
            ) -> tuple[Estimate | None, str | None]:
    """The analytic estimate for the run's config on this machine (with its calibration
    profile when one exists), or (None, why not), plus a note on what was used. Advisory: any
    failure is recorded, never raised after a finished run. A data-parallel rank on a CPU
    shares the machine with the other local ranks: the profile looked up is the whole
    machine's (this rank's threads × local ranks), which the estimate splits per rank
    (parallel.rank_profile), as `nvfree plan` does."""
    try:
        from estimator.analytic.parallel import ranks_per_node
        from estimator.hardware import cpu_device, detect, local_device
        from estimator.hardware.profiles import lookup_profile
        from estimator.planner.estimate import estimate
    except ImportError as e:
        return None, f"no analytic model in this build ({e})"
    try:
        machine = detect(probe_torch=device.type != "cpu")
        dev = cpu_device(machine) if device.type == "cpu" else local_device(machine)
        threads = torch.get_num_threads()
        if device.type == "cpu":
            threads *= ranks_per_node(setup)
        found = lookup_profile(machine, dev.backend, num_threads=threads)
        if found.profile is not None:
            dev = cpu_device(machine, found.profile) if device.type == "cpu" else dev
        return estimate(spec, setup, dev, found.profile), found.reason
    except Exception as e:  # a run's report must survive a failing prediction
        return None, f"analytic estimate failed: {type(e).__name__}: {e}"


_WEIGHT_TERMS = ("weights", "quant_scales", "master_weights", "adapter_weights")


def memory_terms(estimate: Estimate | None, *, method: str, baseline_bytes: int,
                 peak_bytes: int, weights: int, gradients: int | None,
                 optimizer_states: int | None) -> tuple[TermComparison, ...]:
    """Predicted vs measured memory, term by term (see docs/training.md, 'Measurement').
    The measured runtime is what the process holds after the model is built beyond the
    model's own tensors (interpreter, torch, lazily loaded kernels, tokenised data)."""
    c = estimate.memory.components if estimate is not None else {}
    predicted_weights = sum(c.get(k, 0) for k in _WEIGHT_TERMS) if c else None
    predicted_grads = _full_gradient_bytes(estimate)
    listed = (predicted_weights or 0) + c.get("optimizer_states", 0) + c.get("runtime_overhead", 0)
    runtime: int | None = max(0, baseline_bytes - weights)
    transient = peak_bytes - baseline_bytes - (optimizer_states or 0)
    predicted_total = estimate.memory.total_bytes if c else None
    total_how = f"peak of the training steps ({method}), runtime included"
    runtime_how = ("memory after the model was built minus its weights: interpreter, torch, "
                   "kernels, tokenised data")
    if method == "accelerator":  # the allocator sees no backend context: compare without it
        runtime, runtime_how = None, "not visible to the accelerator's allocator statistics"
        if predicted_total is not None:
            predicted_total -= c.get("runtime_overhead", 0)
        total_how = "allocator peak of the training steps; predicted total minus runtime"
    rows = [
        ("runtime", c.get("runtime_overhead"), runtime, runtime_how),
        ("weights", predicted_weights, weights,
         "storage of every parameter and buffer (autocast's transient 16-bit copies are "
         "predicted here but not stored)"),
        ("gradients", predicted_grads, gradients,
         "storage of .grad tensors after the first backward (the largest one with the "
         "optimizer step in backward)"),
        ("optimizer_states", c.get("optimizer_states"), optimizer_states,
         "storage of every optimizer state tensor after the first step"),
        ("activations_and_transients", estimate.memory.total_bytes - listed if c else None,
         transient, "peak − memory after model build − optimizer states (activations, logits, "
         "gradients, dequantised weights, allocator slack)"),
        ("total_peak", predicted_total, peak_bytes, total_how),
    ]
    return tuple(
        TermComparison(name=name, predicted_bytes=p, measured_bytes=m,
                       relative_error=relative_error(p, m), method=how)
        for name, p, m, how in rows
    )


def _full_gradient_bytes(estimate: Estimate | None) -> int | None:
    """The whole gradient term (the breakdown lists it only when it is live at the peak):
    with the optimizer step in backward, the one tensor's gradient that exists at a time."""
    if estimate is None:
        return None
    from estimator.analytic import model_state
    from estimator.analytic.sharding import ZERO_MIN_STAGE, sharded_bytes

    if estimate.setup.optimizer_in_backward:
        return model_state.backward_step_gradient_bytes(estimate.model, estimate.setup,
                                                        estimate.params)
    whole = model_state.gradient_bytes(estimate.setup, estimate.params)
    return sharded_bytes(whole, estimate.setup,  # this rank's shard under ZeRO-2/3
                         min_stage=ZERO_MIN_STAGE["gradients"])


def build_run_report(spec: ModelSpec, setup: TrainSetup, *, config: TrainConfigLike,
                     device: torch.device, data_source: str, num_data_tokens: int,
                     start_step: int, losses: list[float], step_seconds: list[float],
                     stop_reason: str, message: str, checkpoint_dir: Path | None,
                     memory_method: str, runtime_bytes: int, baseline_bytes: int,
                     peak_bytes: int, weights_bytes: int, gradient_bytes: int | None,
                     optimizer_bytes: int | None, world_size: int = 1,
                     peak_bytes_per_rank: Iterable[int] = (),
                     comm_step_seconds: list[float] | None = None,
                     compiled_steps: Collection[int] = ()) -> RunReport:
    """Assemble the RunReport: measurement, and the prediction for the same config beside it.
    Data parallel: peak_bytes is the largest rank's; tokens count all ranks. The step time is
    the median past the warm-up steps and the `compiled_steps` (indices into step_seconds)."""
    estimate, note = predict(spec, setup, device) if config.predict else (None, "not requested")
    median = median_step_seconds(step_seconds, skip=compiled_steps)
    predicted_seconds = estimate.throughput.step_seconds if estimate is not None else None
    communication = median_step_seconds(comm_step_seconds or [])
    return RunReport(
        model=spec, setup=setup, device_name=str(device),
        device_display_name=device_display_name(device), torch_version=torch.__version__,
        num_threads=num_threads(), seed=config.seed, data_source=data_source,
        num_data_tokens=num_data_tokens, start_step=start_step, num_steps=len(losses),
        max_steps=config.max_steps, losses=tuple(losses),
        num_tokens=len(step_seconds) * setup.global_tokens_per_step, stop_reason=stop_reason,
        message=message, checkpoint_dir=None if checkpoint_dir is None else str(checkpoint_dir),
        memory_method=memory_method, runtime_bytes=runtime_bytes,
        baseline_bytes=baseline_bytes, peak_bytes=peak_bytes,
        step_seconds=median,
        tokens_per_second=setup.global_tokens_per_step / median if median else None,
        memory_terms=memory_terms(estimate, method=memory_method, baseline_bytes=baseline_bytes,
                                  peak_bytes=peak_bytes, weights=weights_bytes,
                                  gradients=gradient_bytes, optimizer_states=optimizer_bytes),
        predicted_step_seconds=predicted_seconds,
        step_seconds_relative_error=relative_error(predicted_seconds, median),
        prediction_note=note, world_size=world_size,
        peak_bytes_per_rank=tuple(peak_bytes_per_rank), communication_seconds=communication,
        predicted_communication_seconds=predicted_communication_seconds(estimate),
    )


def predicted_communication_seconds(estimate: Estimate | None) -> float | None:
    """The estimate's collective time per optimizer step (seconds): its 'comm.*' ops of a
    'collective.*' class (estimator/analytic/parallel.py; offload's host transfers are not
    collectives), whole — the part hidden behind compute included, as the measurement
    includes it; None for one device or without an estimate."""
    if estimate is None:
        return None
    seconds = [op.seconds + op.hidden_seconds for op in estimate.throughput.ops
               if op.name.startswith("comm.") and op.op_class.startswith("collective.")]
    return sum(seconds) if seconds else None
