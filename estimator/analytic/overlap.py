"""Compute/communication overlap: the part of each step's collectives that runs while the
device computes, one named term per mechanism (docs/methodology.md §6.4).

Every collective of a step (comms.py) falls in one slot:

- `exposed`: nothing hides it. ZeRO-1/2's all-gather of the updated parameters runs after
  the optimizer step and before the next forward needs them; the MoE all-to-all sits on the
  critical path (the expert GEMMs wait for the dispatched tokens and the combine waits for
  them: GShard, Lepikhin et al. 2021; overlapping it needs pipelining as in Tutel, Hwang et
  al. 2023, which the stacks nvfree models do not do by default); host transfers and the
  offloaded optimizer step (ZeRO-Offload, Ren et al. 2021, is stated as not overlapped here).
- `bucketed_grad_reduction` (DDP, ZeRO-1): the gradient all-reduce (reduce-scatter) of the
  step runs in buckets launched as soon as a bucket's gradients are ready in the backward of
  the last micro-batch (no_sync before it): PyTorch DDP docs ("DDP ... overlapping
  gradient computation with communication"), Li et al. VLDB 2020 "PyTorch Distributed" §3.2.3
  and §4 (bucket_cap_mb = 25 MB by default). The last bucket (the first layers' gradients,
  ready only when backward ends) cannot overlap: tail = min(1, 25 MiB / G).
- `prefetch_forward` (ZeRO-3/FSDP): the all-gather of block i+1 is issued while block i
  computes (FSDP forward prefetch; FSDP2 implicit prefetching, Zhao et al. VLDB 2023 "PyTorch
  FSDP" §3.3.2); only the first block's gather waits: tail = 1/L of the forward gathers.
- `backward_collectives` (ZeRO-2 and ZeRO-3): the backward's all-gathers (FSDP backward
  prefetch) and the per-block gradient reduce-scatters run during the next block's backward
  (Zhao et al. 2023 §3.3; DeepSpeed ZeRO-2 overlap_comm); the reduce-scatter of the first
  block's gradients, issued when backward ends, cannot overlap: tail = 1/L.

A slot's hidden time = min(T_slot · (1 − tail), window) and its exposed time the rest, so a
step is never faster than its compute alone. Windows, with C the step's compute other than
the optimizer step (summed over its m micro-batches) and f the forward's share of it:
forward slot f·C; backward slot (1 − f)·C (the collectives of each micro-batch behind its
own backward); bucketed reduction (1 − f)·C / m (only the last micro-batch's backward).
f = 2 / (2 + k_b) from the FLOPs per parameter and token: forward 2, backward k_b = 4 when
weight gradients are computed (full fine-tuning), 2 when the frozen base skips them
(LoRA/QLoRA), + 2 for the recomputed forward under checkpointing (Kaplan et al. 2020 §2.1;
Narayanan et al. SC 2021 §5.1, 4 passes with recomputation); inference f = 1.

Collectives in one slot share its window and the link (they are summed, never overlapped
with each other); the slowdown of compute by communication kernels (NCCL uses a few SMs) is
not modelled. On a CPU no overlap is assumed: gloo's collectives reduce on the same cores
and memory system that run the compute (the executor measures that case).

Slot seconds, compute and accumulation may be numpy arrays (the planner): the same formulas
elementwise.
"""

from estimator.analytic.comms import Collective, _minimum
from estimator.specs import Device, ModelSpec, TrainSetup

SLOTS = ("exposed", "bucketed_grad_reduction", "prefetch_forward", "backward_collectives")
"""The overlap slots, in this order everywhere (planner arrays have this leading axis)."""
DDP_BUCKET_BYTES = 25 * 2**20
"""DDP's bucket_cap_mb default, 25 MiB (torch.nn.parallel.DistributedDataParallel docs)."""


def overlaps(device: Device, setup: TrainSetup) -> bool:
    """Whether any communication may hide behind compute: several accelerators (not CPUs)."""
    return device.kind != "cpu" and setup.num_devices > 1


def slot_weights(c: Collective, setup: TrainSetup) -> tuple[float, float, float, float]:
    """The share of a collective's time in each slot (SLOTS order; sums to 1)."""
    name, stage = c.name, setup.zero_stage
    if setup.method == "inference":
        return (0.0, 0.0, 1.0, 0.0) if name == "param.all_gather" else (1.0, 0.0, 0.0, 0.0)
    if name in ("grad.all_reduce", "grad.reduce_scatter") and stage <= 1:
        return (0.0, 1.0, 0.0, 0.0)
    if name == "grad.reduce_scatter":  # ZeRO-2/3: every micro-batch, block by block
        return (0.0, 0.0, 0.0, 1.0)
    if name == "param.all_gather" and stage >= 3:  # m forward gathers, m backward gathers
        return (0.0, 0.0, 0.5, 0.5)
    return (1.0, 0.0, 0.0, 0.0)


def tails(model: ModelSpec, setup: TrainSetup, device: Device,
          collectives: list[Collective]) -> tuple:
    """The share of each slot that cannot overlap (SLOTS order): 1 for `exposed` and
    everywhere when overlaps() is false; the last DDP bucket over the gradient payload; one
    block of L for the ZeRO-3 prefetch and the per-block backward collectives."""
    if not overlaps(device, setup):
        return (1.0, 1.0, 1.0, 1.0)
    grads = [c.num_bytes for c in collectives if slot_weights(c, setup)[1] > 0]
    bucket = 1.0
    if grads:
        bucket = min(1.0, DDP_BUCKET_BYTES / (grads[0] or 1))  # the payload is a scalar
    block = 1.0 / max(1, model.num_layers)
    return (1.0, bucket, block, block)


def forward_share(setup: TrainSetup) -> float:
    """f: the forward's share of a micro-batch's compute, 2 / (2 + k_b) (module docstring)."""
    if setup.method == "inference":
        return 1.0
    backward = (4.0 if setup.method == "full" else 2.0) + (2.0 if setup.checkpointing else 0.0)
    return 2.0 / (2.0 + backward)


def hidden_seconds(slot_seconds, slot_tails, compute_seconds, accum, share) -> list:
    """Hidden seconds per slot (SLOTS order): min(T · (1 − tail), window), windows as in the
    module docstring. Scalars or arrays (broadcast elementwise)."""
    windows = (0.0, (1.0 - share) * compute_seconds / accum, share * compute_seconds,
               (1.0 - share) * compute_seconds)
    return [_minimum(seconds * (1.0 - tail), window)
            for seconds, tail, window in zip(slot_seconds, slot_tails, windows, strict=True)]
