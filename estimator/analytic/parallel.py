"""Step time on several devices: the single-device compute time (throughput.py, one
micro-batch per device) plus the communication of comms.py, and the sharded optimizer step.

step_seconds = compute (with the optimizer step of this device's shard) + communication −
the part of it hidden behind compute (overlap.py: DDP's bucketed gradient reduction behind the
last backward, ZeRO-3/FSDP prefetch, per-block reduce-scatters; moved from each 'comm.*' row's
seconds to its hidden_seconds). tokens_per_second counts all devices (global_tokens_per_step);
cost = devices × price × hours."""

from estimator.analytic import comms as C
from estimator.analytic import overlap as O
from estimator.analytic.loss_optim import optimizer_bytes_per_param
from estimator.analytic.memory import device_gradient_bytes
from estimator.analytic.model_state import (
    autocast_copy_params,
    trainable_bytes_per_param,
    weight_bytes,
)
from estimator.analytic.precision import dtype_bytes
from estimator.analytic.sharding import routed_fractions, sharded_bytes
from estimator.specs import (
    CalibrationProfile,
    Device,
    ModelSpec,
    OpTime,
    ParamCounts,
    Throughput,
    TrainSetup,
)
from estimator.units import SECONDS_PER_HOUR


def ranks_per_node(setup: TrainSetup) -> int:
    """Devices (processes) per node (count)."""
    return setup.num_devices // setup.num_nodes


def rank_device(device: Device, setup: TrainSetup) -> Device:
    """What one rank gets: a catalogue CPU is a whole machine, so g processes on one node split
    its memory, peak rates, bandwidth and cores evenly (the executor's gloo DDP on one host);
    any other device is one rank."""
    g = ranks_per_node(setup)
    if device.kind != "cpu" or g <= 1:
        return device
    return device.model_copy(update={
        "memory_bytes": device.memory_bytes // g,
        "memory_bandwidth_bytes_per_second": device.memory_bandwidth_bytes_per_second / g,
        "peak_flops_per_second": {k: v / g for k, v in device.peak_flops_per_second.items()},
        "num_cores": max(1, device.num_cores // g) if device.num_cores else None})


def rank_profile(profile: CalibrationProfile | None, device: Device,
                 setup: TrainSetup) -> CalibrationProfile | None:
    """A CPU profile measured with the whole machine, with every compute and memory rate
    divided by the g processes that share it (collective curves are kept as measured)."""
    g = ranks_per_node(setup)
    if profile is None or device.kind != "cpu" or g <= 1:
        return profile
    curves = {k: c if k.startswith("collective.") else c.model_copy(
        update={"rates": tuple(r / g for r in c.rates)}) for k, c in profile.curves.items()}
    return profile.model_copy(update={"curves": curves})


def frozen_storage_bytes(model: ModelSpec, setup: TrainSetup, params: ParamCounts) -> int:
    """Bytes of the frozen base that ZeRO-3 gathers too (LoRA/QLoRA: the base in its storage
    format, scales included; 0 for a full fine-tune)."""
    if setup.method == "full":
        return 0
    weights = weight_bytes(model, setup, params)
    copies = autocast_copy_params(model, setup, params) * dtype_bytes(setup.compute_dtype)
    return weights["weights"] - copies + weights["quant_scales"]


def step_collectives(model: ModelSpec, setup: TrainSetup, params: ParamCounts, *,
                     num_devices=None) -> list[C.Collective]:
    """Every collective and host transfer of one optimizer step on one device.

    `num_devices`: an array of device counts to evaluate at instead of setup.num_devices, all
    on the same side of 1 as it (the offloaded shards are then arrays)."""
    if setup.method == "inference":
        frozen = frozen_storage_bytes(model, setup, params)
        return (C.data_parallel_collectives(setup, 0, 0, frozen, C.fsdp_units(model))
                + C.expert_parallel_collectives(model, setup))
    _, t_share = routed_fractions(model, setup, params)
    ep_scale = 1 - t_share + t_share / setup.expert_parallel
    grads = device_gradient_bytes(setup, params) * ep_scale
    per_param = C.gather_bytes_per_param(setup, trainable_bytes_per_param(setup))
    param_bytes = params.trainable * per_param * ep_scale
    out = C.data_parallel_collectives(setup, round(grads), round(param_bytes),
                                      frozen_storage_bytes(model, setup, params),
                                      C.fsdp_units(model))
    out += C.expert_parallel_collectives(model, setup)
    if setup.offload == "none":  # no host transfers: the shards need not be sized
        return out
    grad_shard = sharded_bytes(device_gradient_bytes(setup, params), setup, min_stage=1,
                               routed_fraction=t_share, num_devices=num_devices)
    param_shard = sharded_bytes(params.trainable * per_param, setup, min_stage=1,
                                routed_fraction=t_share, num_devices=num_devices)
    return out + C.offload_collectives(setup, grad_shard, param_shard)


def communication_ops(model: ModelSpec, setup: TrainSetup, device: Device,
                      params: ParamCounts, profile: CalibrationProfile | None,
                      collectives: list[C.Collective] | None = None) -> list[OpTime]:
    """The collectives of one step (`collectives`, else step_collectives) as OpTime rows
    (op_class 'collective.<kind>' or 'host.pcie'), each its whole time (overlap_ops says how
    much of it is hidden); the measured collective.* curves are used on the local machine."""
    links = C.links_for(device, setup)
    curves = C.measured_curves(device, profile)
    rows = []
    for c in collectives if collectives is not None else step_collectives(model, setup, params):
        klass = "host.pcie" if c.kind == "host_transfer" else f"collective.{c.kind}"
        rows.append(OpTime(name=f"comm.{c.name}", op_class=klass, flops=0,
                           bytes_moved=round(c.num_bytes * c.num_calls),
                           seconds=C.collective_seconds(c, links, curves)))
    return rows


def optimizer_share(model: ModelSpec, setup: TrainSetup, params: ParamCounts, *,
                    num_devices=None) -> float:
    """Fraction of the trainable parameters this device's optimizer steps (1/N from ZeRO-1 on,
    routed experts 1/E); at an array of device counts `num_devices`, an array."""
    if params.trainable == 0:
        return 1.0
    _, t_share = routed_fractions(model, setup, params)
    return sharded_bytes(params.trainable, setup, min_stage=1, routed_fraction=t_share,
                         num_devices=num_devices) / params.trainable


def device_compute_ops(model: ModelSpec, setup: TrainSetup, params: ParamCounts,
                       ops: list[OpTime]) -> list[OpTime]:
    """The single-device ops with the optimizer step scaled to this device's shard, and
    removed when offloaded (the host runs it: host_optimizer_op)."""
    share = optimizer_share(model, setup, params)
    out = []
    for op in ops:
        if op.op_class.startswith("optimizer"):
            if setup.offload != "none":
                continue
            op = op.model_copy(update={"bytes_moved": round(op.bytes_moved * share),
                                       "seconds": op.seconds * share})
        out.append(op)
    return out


def host_optimizer_op(model: ModelSpec, setup: TrainSetup, params: ParamCounts) -> list[OpTime]:
    """The offloaded optimizer step on the host CPU (comms.host_optimizer_seconds)."""
    if setup.offload == "none" or params.trainable == 0:
        return []
    moved = params.trainable * optimizer_share(model, setup, params) * (
        optimizer_bytes_per_param(setup))
    return [OpTime(name="offload.optimizer_step", op_class="host.memory", flops=0,
                   bytes_moved=round(moved), seconds=C.host_optimizer_seconds(moved, setup))]


def overlap_ops(model: ModelSpec, setup: TrainSetup, device: Device,
                collectives: list[C.Collective], comm: list[OpTime],
                compute_ops: list[OpTime]) -> list[OpTime]:
    """The communication rows with the part hidden behind compute (overlap.hidden_seconds)
    moved from `seconds` to `hidden_seconds`: each mechanism's hidden time is shared among
    the collectives that feed it in proportion to their time there. Unchanged on one device,
    on a CPU, or where nothing is hidden. The window is the step's compute other than the
    optimizer step (the planner's OpTable rows not marked optimizer)."""
    if not collectives or not O.overlaps(device, setup):
        return comm
    weights = [O.slot_weights(c, setup) for c in collectives]
    slots = [0.0] * len(O.SLOTS)
    for w, row in zip(weights, comm, strict=True):
        for i, share in enumerate(w):
            slots[i] += share * row.seconds
    compute = sum(op.seconds for op in compute_ops if not op.op_class.startswith("optimizer"))
    hidden = O.hidden_seconds(slots, O.tails(model, setup, device, collectives), compute,
                              setup.grad_accum, O.forward_share(setup))
    out = []
    for w, row in zip(weights, comm, strict=True):
        hide = sum(share * row.seconds / slots[i] * float(hidden[i])
                   for i, share in enumerate(w) if slots[i] > 0)
        hide = min(row.seconds, max(0.0, hide))
        out.append(row.model_copy(update={"seconds": row.seconds - hide,
                                          "hidden_seconds": hide}))
    return out


def compose_throughput(model: ModelSpec, setup: TrainSetup, device: Device,
                       params: ParamCounts, profile: CalibrationProfile | None,
                       compute: Throughput) -> Throughput:
    """Multi-device step time, rates and cost from the single-device compute Throughput."""
    compute_ops = device_compute_ops(model, setup, params, compute.ops)
    host = host_optimizer_op(model, setup, params)
    collectives = step_collectives(model, setup, params)
    comm = communication_ops(model, setup, device, params, profile, collectives)
    comm = overlap_ops(model, setup, device, collectives, comm, compute_ops)
    ops = compute_ops + host + comm
    step = sum(op.seconds for op in ops)
    comm_seconds = sum(op.seconds for op in comm)
    tokens_per_second = setup.global_tokens_per_step / step
    total = cost = None
    if setup.num_tokens is not None:
        total = setup.num_tokens / tokens_per_second
        if device.price_per_hour_usd is not None:
            cost = setup.num_devices * device.price_per_hour_usd * total / SECONDS_PER_HOUR
    decode = compute.decode_tokens_per_second
    if decode is not None:
        decode *= setup.num_devices
    return compute.model_copy(update={
        "step_seconds": step, "tokens_per_second": tokens_per_second, "ops": ops,
        "total_seconds": total, "cost_usd": cost, "decode_tokens_per_second": decode,
        "num_devices": setup.num_devices, "communication_seconds": comm_seconds})
