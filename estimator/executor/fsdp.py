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

QLoRA: the NF4 codes and block scales are non-persistent buffers (executor/nf4.py), which
fully_shard leaves alone, so every rank keeps the whole 4-bit base; the adapters (and the
embeddings, norms and lm_head) are sharded. The analytic model counts the base replicated
(analytic/sharding.py replicated_nf4_bytes), so a plan predicts what runs (docs/distributed.md).
"""

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from estimator.executor.build import TORCH_DTYPES
from estimator.executor.distributed import DistContext, LossModule
from estimator.specs.setup import TrainSetup


def mixed_precision_policy(setup: TrainSetup) -> MixedPrecisionPolicy:
    """Gather in the compute dtype and reduce in fp32 under 16-bit mixed precision; else as
    stored (see the module docstring)."""
    if setup.mixed_precision and setup.compute_dtype != "fp32":
        return MixedPrecisionPolicy(param_dtype=TORCH_DTYPES[setup.compute_dtype],
                                    reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def fsdp_modules(module: torch.nn.Module) -> list[FSDPModule]:
    """Every module of `module` (itself included) that fully_shard has sharded."""
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


def wrap_fsdp(model: torch.nn.Module, setup: TrainSetup, ctx: DistContext,
              device: torch.device) -> LossModule:
    """The model sharded ZeRO-3 over the ranks: LossModule(model) with fully_shard on every
    decoder block, then on the root. Parameters become DTensors in place (build the
    optimizer after this). On gloo the reduction sums and divides (pytorch#162338)."""
    mesh = init_device_mesh(device.type, (ctx.world_size,))
    policy = mixed_precision_policy(setup)
    wrapper = LossModule(model, setup.fused_loss)
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
    fully_shard(wrapper, mesh=mesh, mp_policy=policy)
    if dist.get_backend() == "gloo":
        for module in fsdp_modules(wrapper):
            module.set_force_sum_reduction_for_comms(True)
    return wrapper


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor, or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None else t
