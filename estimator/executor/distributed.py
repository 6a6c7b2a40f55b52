"""Data-parallel training over processes started by torchrun (torch.distributed), and the
launcher that starts them.

Inside a worker: `process_group(device)` reads torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT), joins the process group with the device's
collective backend (gloo on the CPU, nccl on CUDA — RCCL on ROCm builds —, xccl on XPU), splits
the CPU cores between the local ranks and tears the group down on every exit path. Without
torchrun's environment it is a single process and nothing is initialised.

DDP (every rank holds the whole model; gradients are averaged by an all-reduce after each
optimizer step's last micro-batch) is wrapped here; ZeRO-3 (setup.zero_stage 3) shards with
FSDP2 instead (estimator/executor/fsdp.py, proven equal to one process by
tests/torch/test_fsdp.py). ZeRO-1/2, offloading the optimizer alone and expert parallelism
are refused (executor/checks.py).

Outside a worker, estimator/executor/launcher.py starts the workers under torchrun.
"""

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from estimator.errors import SetupError
from estimator.executor.checks import check_parallelism
from estimator.specs.model import ModelSpec
from estimator.specs.setup import TrainSetup

BACKENDS = {"cpu": "gloo", "cuda": "nccl", "xpu": "xccl"}
"""Collective backend per torch device type (ROCm builds expose AMD GPUs as 'cuda'; their
'nccl' backend is RCCL)."""
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
"""Variables torchrun sets in every worker (a process is a worker when all are present)."""


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the data-parallel group."""

    rank: int = 0
    """Global rank (0 … world_size − 1)."""
    world_size: int = 1
    """Processes in the group (count)."""
    local_rank: int = 0
    """Rank on this machine."""
    local_world_size: int = 1
    """Processes on this machine (count)."""
    backend: str | None = None
    """Collective backend; None for a single process."""

    @property
    def is_distributed(self) -> bool:
        """True when more than one process trains."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only rank that writes files."""
        return self.rank == 0


def in_worker() -> bool:
    """True inside a process started by torchrun."""
    return all(name in os.environ for name in TORCHRUN_ENV)


def context_from_env() -> DistContext:
    """DistContext from torchrun's environment; a single process when it is absent."""
    if not in_worker():
        return DistContext()
    world = int(os.environ["WORLD_SIZE"])
    return DistContext(rank=int(os.environ["RANK"]), world_size=world,
                       local_rank=int(os.environ["LOCAL_RANK"]),
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def backend_for(device_type: str) -> str:
    """The collective backend for a torch device type; SetupError where there is none."""
    if device_type not in BACKENDS:
        raise SetupError(f"no collective backend for --device {device_type} (data-parallel "
                         "training runs on cpu, cuda/rocm or xpu)")
    return BACKENDS[device_type]


def available_cores() -> int:
    """CPU cores this process may run on (count)."""
    with contextlib.suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_rank(local_world_size: int, cores: int | None = None) -> int:
    """Intra-op threads of each local rank: cores // local ranks, at least 1 (count)."""
    return max(1, (cores or available_cores()) // max(1, local_world_size))


def rank_device(device: str, ctx: DistContext) -> str:
    """The device string of this rank: an accelerator without an index gets the local rank's."""
    if ctx.is_distributed and device in ("cuda", "xpu"):
        return f"{device}:{ctx.local_rank}"
    return device


def check_setup(setup: TrainSetup, ctx: DistContext) -> None:
    """Refuse, with one line, what this executor would not run as the setup says."""
    check_parallelism(setup)
    if setup.num_devices != ctx.world_size:
        how = "launch with nvfree train --nproc N (torchrun)" if ctx.world_size == 1 else \
            "pass --nproc/--nnodes matching the processes torchrun starts"
        raise SetupError(f"the setup trains on {setup.num_devices} devices but "
                         f"{ctx.world_size} process(es) run; {how}")


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM outside the training loop raises SystemExit(143), so `finally` blocks (the
    process-group teardown) run; the loop installs its own graceful handler inside."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def process_group(device: str) -> Iterator[tuple[DistContext, str]]:
    """Join torchrun's process group (if any) for the run; yields (context, this rank's device).
    A group that is already initialised (by the caller) is used and left to the caller."""
    ctx = context_from_env()
    if not ctx.is_distributed:
        yield ctx, device
        return
    local = rank_device(device, ctx)
    device_type = torch.device(local).type
    backend = backend_for(device_type)
    owned = not dist.is_initialized()
    torch.set_num_threads(threads_per_rank(ctx.local_world_size))
    with _sigterm_exits():
        try:
            if owned:
                if device_type != "cpu":
                    torch.accelerator.set_device_index(torch.device(local).index)
                dist.init_process_group(backend=backend)
            yield DistContext(rank=ctx.rank, world_size=ctx.world_size,
                              local_rank=ctx.local_rank, local_world_size=ctx.local_world_size,
                              backend=dist.get_backend()), local
        finally:
            if owned and dist.is_initialized():
                dist.destroy_process_group()


class LossModule(torch.nn.Module):
    """model → loss, as one forward: DDP hooks its gradient reduction into forward(), so the
    fused loss (Transformer.loss) must be reached through it."""

    def __init__(self, model: torch.nn.Module, fused_loss: bool) -> None:
        super().__init__()
        self.model = model
        self.fused_loss = fused_loss

    def forward(self, inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
        if self.fused_loss:
            return self.model.loss(inputs_BT, targets_BT)
        logits_BTV = self.model(inputs_BT)
        return torch.nn.functional.cross_entropy(logits_BTV.float().flatten(0, 1),
                                                 targets_BT.flatten())


@dataclass
class CommTimer:
    """Wall time of a step's collectives (DDP's gradient all-reduce from a comm hook; FSDP2's
    all-gathers and reduce-scatters from its custom-comm hooks, executor/fsdp.py): per call,
    launch to completion (waiting for slower ranks included); per step, the union of the
    calls' intervals (calls that overlap each other count once; time overlapping compute is
    included). Honest on gloo (a future completes when the data arrived); not used on
    accelerators, where completion is asynchronous to the host."""

    world_size: int
    intervals: list[tuple[float, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, started: float) -> None:
        """One collective that was launched at `started` (perf_counter) has completed now."""
        with self._lock:
            self.intervals.append((started, time.perf_counter()))

    def timed(self, started: float, work: dist.Work | None) -> dist.Work | None:
        """`work` (or a completed synchronous call, None) recorded when it completes."""
        if work is None:
            self.record(started)
        else:
            work.get_future().then(lambda _: self.record(started))
        return work

    def hook(self, state: object, bucket: dist.GradBucket
             ) -> torch.futures.Future[torch.Tensor]:
        """DDP comm hook: average the bucket (as DDP's default allreduce_hook) and time it."""
        started = time.perf_counter()
        buffer = bucket.buffer().div_(self.world_size)
        future = dist.all_reduce(buffer, async_op=True).get_future()

        def done(fut: torch.futures.Future) -> torch.Tensor:
            self.record(started)
            return fut.value()[0]

        return future.then(done)

    def end_step(self) -> float:
        """Close the step: record and return its communication seconds (union of
        intervals)."""
        with self._lock:
            spans, self.intervals = sorted(self.intervals), []
        total, end = 0.0, float("-inf")
        for a, b in spans:
            total += max(0.0, b - max(a, end))
            end = max(end, b)
        self.step_seconds.append(total)
        return total


def wrap_ddp(model: torch.nn.Module, spec: ModelSpec, setup: TrainSetup, ctx: DistContext,
             device: torch.device) -> tuple[torch.nn.Module, CommTimer | None]:
    """The model wrapped for data parallelism: LossModule in DDP. Only parameters that require
    grad are reduced (LoRA: the adapters); frozen ones are not broadcast either (every rank
    built them identically from the seed), nor are buffers (RoPE tables, NF4 codes: the same
    on every rank by construction). find_unused_parameters only for MoE (routing can
    leave experts unused in a micro-batch). Returns (module, all-reduce timer or None)."""
    from torch.nn.parallel import DistributedDataParallel

    wrapper = LossModule(model, setup.fused_loss)
    identical = [f"model.{n}" for n, p in model.named_parameters() if not p.requires_grad]
    identical += [f"model.{n}" for n, _ in model.named_buffers()]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(wrapper, identical)
    ddp = DistributedDataParallel(
        wrapper, device_ids=None if device.type == "cpu" else [device.index],
        find_unused_parameters=spec.is_moe, gradient_as_bucket_view=True)
    timer = None
    if ctx.backend == "gloo":
        timer = CommTimer(ctx.world_size)
        ddp.register_comm_hook(None, timer.hook)
    return ddp, timer


def gather_floats(values: list[float], ctx: DistContext) -> list[list[float]]:
    """Every rank's `values` (same length on all ranks), in rank order."""
    if not ctx.is_distributed:
        return [list(values)]
    local = torch.tensor(values, dtype=torch.float64)
    parts = [torch.empty_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(parts, local)
    return [p.tolist() for p in parts]


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (no-op for a single process)."""
    if ctx.is_distributed:
        dist.barrier()
