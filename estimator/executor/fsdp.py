"""ZeRO-3 on PyTorch's own engine: FSDP2 (`torch.distributed.fsdp.fully_shard`).

`wrap_fsdp` shards the built model (after LoRA and activation checkpointing) over the ranks of
torchrun's process group: one `fully_shard` per decoder block, then one on the root (the
LossModule around the model: embeddings, final norm and lm_head form the root's group, and the
fused loss runs inside the root's forward, so its parameters are gathered for it). Every
parameter — trainable or frozen — is split in dim-0 shards, one per rank; a block's full
parameters exist only while its forward or backward runs (reshard_after_forward=True: the
ZeRO-3 layout the analytic model assumes, estimator/analytic/memory.py model_state_terms).

Mixed precision: under setup.mixed_precision with a 16-bit compute dtype the sharded
parameters stay in their storage dtype (fp32 master weights for a full fine-tune, fp32
adapters and the 16-bit frozen base for LoRA) and are gathered in the compute dtype
(MixedPrecisionPolicy param_dtype); gradients are reduce-scattered in fp32 (reduce_dtype).
Without mixed precision parameters are gathered and reduced as stored.

Gradient averaging on gloo: FSDP2 reduce-scatters fp32/bf16 gradients with ReduceOp.AVG, which
gloo summed without dividing in the torch of pytorch#162338 (each gradient world_size × too
large, silently). With torch 2.13 gloo's AVG reduce-scatter measures right here (ranks holding
1 and 2 get 1.5), but the fix is not guaranteed across versions, so on gloo every FSDP module
sums and divides by the world size itself (`set_force_sum_reduction_for_comms`: ReduceOp.SUM
and FSDP2's own post-division). The equivalence test (tests/torch/test_fsdp.py) uses SGD
without clipping — AdamW and norm clipping cannot see a scaled gradient — and fails when the
division is removed (checked: 2 % off at step 3).

Gradient accumulation: every micro-batch's backward reduce-scatters its gradients into the
sharded accumulator (torchtitan's choice for FSDP). Skipping the sync on all but the last
micro-batch (set_requires_gradient_sync(False)) would keep a full unsharded gradient per rank
between micro-batches — the memory ZeRO-3 is chosen to avoid — and keeping the gathered
parameters across micro-batches (reshard_after_backward=False) would hold the whole model per
rank; both would run another layout than the plan's, so neither is done: a micro-batch costs
one all-gather per block in forward and backward and one reduce-scatter per block.

CPU offload (setup.offload "optimizer_and_params", ZeRO-Infinity's layout): every fully_shard
gets CPUOffloadPolicy — the sharded parameters and gradients live in host memory, each block's
shards are copied to the device before its all-gather and its reduced gradient shards back
after the reduce-scatter, and the optimizer, built over the shards, steps on the CPU with CPU
states (torch's fused AdamW on the CPU). Host memory is pinned on accelerators only (a CPU
rank has nothing to pin for). Offloading the optimizer alone (ZeRO-Offload) has no FSDP2
policy and is planned only; QLoRA is not offloaded (the NF4 buffers would stay on the
device): estimator/checks.py offload_problem.

QLoRA: the NF4 codes and block scales are non-persistent buffers (executor/nf4.py), which
fully_shard leaves alone, so every rank keeps the whole 4-bit base; the adapters (and the
embeddings, norms and lm_head) are sharded. The analytic model counts the base replicated
(analytic/sharding.py replicated_nf4_bytes), so a plan predicts what runs (docs/distributed.md).
"""

import time

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.fsdp._fully_shard._fsdp_collectives import (  # no public name yet
    DefaultAllGather,
    DefaultReduceScatter,
)

from estimator.executor.build import TORCH_DTYPES
from estimator.executor.distributed import CommTimer, DistContext, LossModule
from estimator.specs.setup import TrainSetup


def mixed_precision_policy(setup: TrainSetup) -> MixedPrecisionPolicy:
    """Gather in the compute dtype and reduce in fp32 under 16-bit mixed precision; else as
    stored (see the module docstring)."""
    if setup.mixed_precision and setup.compute_dtype != "fp32":
        return MixedPrecisionPolicy(param_dtype=TORCH_DTYPES[setup.compute_dtype],
                                    reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def offload_policy(setup: TrainSetup, device: torch.device) -> OffloadPolicy:
    """CPUOffloadPolicy for --offload optimizer_and_params (pinned host memory on an
    accelerator), else no offload (see the module docstring)."""
    if setup.offload == "optimizer_and_params":
        return CPUOffloadPolicy(pin_memory=device.type != "cpu")
    return OffloadPolicy()


def fsdp_modules(module: torch.nn.Module) -> list[FSDPModule]:
    """Every module of `module` (itself included) that fully_shard has sharded."""
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


class TimedAllGather(DefaultAllGather):
    """FSDP2's default all-gather, each call recorded in a CommTimer."""

    def __init__(self, timer: CommTimer) -> None:
        super().__init__()
        self.timer = timer

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, async_op: bool = False) -> dist.Work | None:
        started = time.perf_counter()
        return self.timer.timed(started, super().__call__(output_tensor, input_tensor, group,
                                                          async_op))


class TimedReduceScatter(DefaultReduceScatter):
    """FSDP2's default reduce-scatter, each call recorded in a CommTimer."""

    def __init__(self, timer: CommTimer) -> None:
        super().__init__()
        self.timer = timer

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor,
                 group: dist.ProcessGroup, op: object, async_op: bool = False
                 ) -> dist.Work | None:
        started = time.perf_counter()
        return self.timer.timed(started, super().__call__(output_tensor, input_tensor, group,
                                                          op, async_op))


def wrap_fsdp(model: torch.nn.Module, setup: TrainSetup, ctx: DistContext,
              device: torch.device) -> tuple[LossModule, CommTimer | None]:
    """The model sharded ZeRO-3 over the ranks: LossModule(model) with fully_shard on every
    decoder block, then on the root. Parameters become DTensors in place (build the
    optimizer after this). On gloo the reduction sums and divides (pytorch#162338) and every
    all-gather and reduce-scatter is timed (returned CommTimer; None elsewhere)."""
    mesh = init_device_mesh(device.type, (ctx.world_size,))
    policies = {"mp_policy": mixed_precision_policy(setup),
                "offload_policy": offload_policy(setup, device)}
    wrapper = LossModule(model, setup.fused_loss)
    for block in model.layers:
        fully_shard(block, mesh=mesh, reshard_after_forward=True, **policies)
    fully_shard(wrapper, mesh=mesh, **policies)
    if dist.get_backend() != "gloo":
        return wrapper, None
    timer = CommTimer(ctx.world_size)
    for module in fsdp_modules(wrapper):
        module.set_force_sum_reduction_for_comms(True)
        module.set_custom_all_gather(TimedAllGather(timer))
        module.set_custom_reduce_scatter(TimedReduceScatter(timer))
    return wrapper, timer


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t
