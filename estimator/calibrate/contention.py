"""Was a measurement disturbed? CPU time of other processes, hypervisor steal and runnable
tasks around each timed point (/proc/stat, /proc/loadavg), and an interleaved reference GEMM
whose rate drops when the cores are shared.

Why both: the CPU accounting sees every process of this machine (and, as steal, the
hypervisor taking the vCPU away), and is exact over the point's interval; the reference kernel
sees what the accounting cannot (another VM on the same host sharing caches and memory
bandwidth, a clock that dropped) and says how much slower the machine ran, not only that
someone else ran. A 2-thread OpenMP kernel whose second core is taken waits a scheduler slice
at every barrier: a 32×128→128 GEMM measured 6.4 ms instead of ~10 µs (docs/calibration.md),
so one busy neighbour can slow a point 100×, and a disturbed point is re-timed or dropped,
never corrected by a factor.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

PROC_STAT = Path("/proc/stat")
PROC_LOADAVG = Path("/proc/loadavg")
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
"""USER_HZ: the unit of /proc/stat's CPU times (and of os.times(), in seconds)."""

DISTURBED_FRACTION = 0.2
"""A point during which other processes (steal included) used more than this share of all
CPUs is disturbed (fraction; on 2 cores one busy neighbour is 0.5)."""
SLOWDOWN_LIMIT = 2.0
"""A point whose neighbouring reference GEMM ran this many times slower than the run's
typical reference (quiet_rate: the median) is disturbed (ratio). Set above the reference's own
spread on a quiet machine: on a 2-core EPYC VM with nothing else running, a warmed 192³
reference timed next to calibration points ran 1.0–1.75× its run's median (and 1.0–3.2×
its fastest sample, which is why the fastest is no baseline: judged against it, 242 of 275
points of a quiet full calibration counted as disturbed); a neighbour on a core a 2-thread
kernel needs slows it 10–100×, and a neighbour inside this machine is also seen by the CPU
accounting (DISTURBED_FRACTION)."""
FASTEST_LIMIT = 5.0
"""A point whose reference ran this many times slower than the run's fastest sample is
disturbed too (ratio): when every point of a run is slowed the median is slowed with them,
but a 2-thread kernel next to a busy neighbour is slowed unevenly (a few samples slip between
its time slices), so the fastest stays near the quiet rate. Above the quiet spread (1.0–3.2×
the fastest, docs/calibration.md)."""
RUN_SLOWDOWN_LIMIT = 1.25
"""A whole run whose median reference ran this many times slower than the previous
profile's is disturbed throughout (ratio): a slowdown the CPU accounting cannot see (another
VM on the host, a lower clock). A median over a run's points is steady where one sample is
not."""
WARM_SECONDS = 0.01
"""Untimed reference calls before each timed sample (seconds). After an idle moment (the
wait for idle CPUs, the Python between points) the vCPU runs slow for ~5–10 ms of compute:
the reference measured 415 µs median after a 0.1 s sleep and 175 µs without; 10 ms of
warm-up brought it to 222 µs (docs/calibration.md, "The reference GEMM")."""


@dataclass(frozen=True)
class CpuSnapshot:
    """Clocks of the whole machine and of this process at one instant."""

    wall_seconds: float
    """perf_counter (seconds)."""
    machine_busy_seconds: float
    """Busy CPU seconds of all CPUs since boot, steal included (seconds)."""
    steal_seconds: float
    """CPU seconds the hypervisor gave to other guests (seconds; 0 outside a VM)."""
    own_seconds: float
    """CPU seconds of this process, its threads and its reaped children (seconds)."""
    num_running: int
    """Runnable tasks on the machine (procs_running of /proc/stat; -1 when unknown)."""


def _proc_stat() -> tuple[float, float, int] | None:
    """(busy, steal, procs_running) from /proc/stat; None where there is none (not Linux).

    The aggregate `cpu` line counts user, nice, system, idle, iowait, irq, softirq, steal,
    guest, guest_nice in USER_HZ ticks; guest time is already inside user/nice (so it is not
    added twice), idle and iowait are not busy."""
    try:
        text = PROC_STAT.read_text()
    except OSError:
        return None
    busy = steal = 0.0
    running = -1
    hz = CLOCK_TICKS_PER_SECOND
    for line in text.splitlines():
        if line.startswith("cpu "):
            ticks = [float(v) for v in line.split()[1:]]
            ticks += [0.0] * (8 - len(ticks))
            busy = (ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6] + ticks[7]) / hz
            steal = ticks[7] / hz
        elif line.startswith("procs_running"):
            running = int(line.split()[1])
    return busy, steal, running


def cpu_snapshot() -> CpuSnapshot:
    """Snapshot for `others_busy_fraction` (~30 µs on Linux; psutil elsewhere)."""
    times = os.times()
    own = times.user + times.system + times.children_user + times.children_system
    stat = _proc_stat()
    if stat is None:
        import psutil

        cpu = psutil.cpu_times()
        busy = sum(cpu) - cpu.idle - getattr(cpu, "iowait", 0.0)
        stat = (busy, getattr(cpu, "steal", 0.0), -1)
    return CpuSnapshot(time.perf_counter(), stat[0], stat[1], own, stat[2])


def num_cpus() -> int:
    """CPUs the machine's busy time is spread over (/proc/stat counts all of them)."""
    return os.cpu_count() or 1


TICK_ALLOWANCE = 1
"""Clock ticks of the others' CPU time not counted (count): /proc/stat and os.times() both
count whole ticks (10 ms at USER_HZ 100), read at different instants, so their difference is
off by a tick now and then. Over a 20 ms point on 2 CPUs one stray tick read as 25 % of the
machine: 5 of 91 points of a quick calibration on a quiet machine counted as disturbed that
way (others 24–28 %, their reference GEMM at full speed). One tick, not two: with two, a
25 ms point next to a neighbour on every CPU (others ≈ 25 ms) fell under the 20 % limit."""


def others_busy_fraction(start: CpuSnapshot, end: CpuSnapshot) -> float:
    """Share of all CPUs used by OTHER processes (and stolen by the hypervisor) between two
    snapshots (0…1), less TICK_ALLOWANCE ticks of clock granularity: how much a measurement
    was disturbed."""
    wall = max(end.wall_seconds - start.wall_seconds, 1e-9)
    others = (end.machine_busy_seconds - start.machine_busy_seconds) - (
        end.own_seconds - start.own_seconds)
    others -= TICK_ALLOWANCE / CLOCK_TICKS_PER_SECOND
    return min(1.0, max(0.0, others / (wall * num_cpus())))


def load_average() -> float | None:
    """1-minute load average (runnable + uninterruptible tasks), None where unknown."""
    try:
        return float(PROC_LOADAVG.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except (OSError, AttributeError):
            return None


def wait_until_idle(max_wait_seconds: float, busy_fraction: float = 0.15) -> float:
    """Sleep in 0.25 s steps (up to max_wait_seconds) while other processes keep more than
    busy_fraction of the CPUs busy; returns the last measured fraction."""
    deadline = time.perf_counter() + max_wait_seconds
    while True:
        start = cpu_snapshot()
        time.sleep(min(0.25, max(0.05, max_wait_seconds)))
        fraction = others_busy_fraction(start, cpu_snapshot())
        if fraction <= busy_fraction or time.perf_counter() >= deadline:
            return fraction


class ReferenceKernel:
    """A fixed fp32 GEMM timed next to every point: its median rate over the run is the quiet
    machine (quiet_rate), a point whose reference ran SLOWDOWN_LIMIT× slower than that was
    disturbed. Each sample first warms the core (WARM_SECONDS).

    192×192 @ 192×192 (14 MFLOP, ~0.1–0.3 ms on 2 cores) is large enough to run on every
    OpenMP thread (so a taken core stalls it like any measured kernel) and small enough to
    cost ~1 ms per point (median of 5 calls: one lucky call cannot hide a busy core)."""

    SIZE = 192
    CALLS = 5

    def __init__(self, device: str = "cpu") -> None:
        import torch

        from estimator.calibrate.timing import synchronize

        self._device = device
        self._sync = synchronize
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.rand((self.SIZE, self.SIZE), generator=gen).to(device)
        self._a, self._b = a, a.t().contiguous()
        self.flops = 2.0 * self.SIZE ** 3
        self.rates: list[float] = []
        self.sample()  # first call: thread pool and kernel selection
        self.rates.clear()

    @property
    def quiet_rate(self) -> float:
        """The run's typical reference rate: the median of its samples (FLOP/s; 0 if none)."""
        return statistics.median(self.rates) if self.rates else 0.0

    @property
    def fastest_rate(self) -> float:
        """The run's fastest reference sample (FLOP/s; 0 if none)."""
        return max(self.rates, default=0.0)

    def sample(self) -> float:
        """Time the reference now, after WARM_SECONDS of untimed calls; its rate (FLOP/s,
        median of CALLS calls)."""
        import torch

        start = time.perf_counter()
        while time.perf_counter() - start < WARM_SECONDS:
            torch.mm(self._a, self._b)
        self._sync(self._device)
        seconds = []
        for _ in range(self.CALLS):
            start = time.perf_counter()
            torch.mm(self._a, self._b)
            self._sync(self._device)
            seconds.append(time.perf_counter() - start)
        rate = self.flops / max(sorted(seconds)[self.CALLS // 2], 1e-12)
        self.rates.append(rate)
        return rate


@dataclass(frozen=True)
class Disturbance:
    """What other processes did to one timed point."""

    others_fraction: float = 0.0
    """Share of all CPUs other processes and steal used while it was timed (0…1)."""
    reference_rate: float = 0.0
    """Rate of the reference GEMM timed next to it (FLOP/s; 0 = not sampled)."""
    max_running: int = -1
    """Most runnable tasks seen on the machine around the point (count; -1 unknown)."""

    def slowdown(self, quiet_rate: float) -> float:
        """How much slower the reference ran than `quiet_rate` (ratio ≥ 1; 1 if unknown)."""
        if self.reference_rate <= 0 or quiet_rate <= 0:
            return 1.0
        return max(1.0, quiet_rate / self.reference_rate)

    def disturbed(self, quiet_rate: float = 0.0, fastest_rate: float = 0.0) -> bool:
        """Other processes took more than DISTURBED_FRACTION of the CPUs, or the reference
        ran more than SLOWDOWN_LIMIT× slower than the quiet machine or FASTEST_LIMIT× slower
        than the run's fastest sample."""
        return (self.others_fraction > DISTURBED_FRACTION
                or self.slowdown(quiet_rate) > SLOWDOWN_LIMIT
                or self.slowdown(fastest_rate) > FASTEST_LIMIT)

    def score(self, quiet_rate: float = 0.0) -> float:
        """One number to compare two timings of a point (lower = quieter)."""
        return self.others_fraction + max(0.0, self.slowdown(quiet_rate) - 1.0)


class Monitor:
    """Brackets a timed point: CPU accounting over its interval, the reference before and
    after it (the lower of the two rates: a neighbour that arrived mid-point shows in one)."""

    def __init__(self, reference: ReferenceKernel | None) -> None:
        self.reference = reference
        self._start: CpuSnapshot | None = None
        self._rate = 0.0

    def __enter__(self) -> Monitor:
        self._rate = self.reference.sample() if self.reference else 0.0
        self._start = cpu_snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def result(self) -> Disturbance:
        """The point's disturbance (call after the timed block)."""
        assert self._start is not None
        end = cpu_snapshot()
        rate = self._rate
        if self.reference is not None:
            rate = min(rate, self.reference.sample())
        return Disturbance(others_busy_fraction(self._start, end), rate,
                           max(self._start.num_running, end.num_running))
