"""Communication of data-parallel training: collective times and the per-step collectives of
DDP, ZeRO-1/2/3 (FSDP), MoE expert parallelism and CPU offload.

Every collective is an α–β model: seconds = steps · latency + bytes_on_the_wire / bandwidth,
with the ring algorithm's wire volume (Patarasuk & Yuan 2009, "Bandwidth optimal all-reduce
algorithms for clusters of workstations"; NCCL-tests doc/PERFORMANCE.md, "bus bandwidth":
all-reduce 2(n−1)/n · B, all-gather and reduce-scatter (n−1)/n · B). Over several nodes the
collective is hierarchical (NCCL's tree/ring over nodes): the intra-node part runs at the device
interconnect, the inter-node part at the per-device network bandwidth. Bandwidths are per
direction; a measured `collective.all_reduce` curve replaces the model for local runs.

Rank counts, node layouts and payloads may be numpy arrays (the planner's device-count axis):
the same formulas elementwise; with scalars the results are the scalar ones, bit for bit.
"""

from collections.abc import Mapping
from dataclasses import dataclass

from estimator.analytic.efficiency import curve_seconds
from estimator.analytic.precision import dtype_bytes
from estimator.analytic.sharding import is_array
from estimator.specs import CalibrationProfile, Device, EfficiencyCurve, ModelSpec, TrainSetup

GB = 1e9
DEFAULT_NETWORK_BYTES_PER_SECOND = {"cpu": 100e9 / 8, "gpu": 400e9 / 8, "tpu": 400e9 / 8,
                                    "accelerator": 400e9 / 8}
"""Inter-node bandwidth per device when the catalogue has none: 100 Gb/s Ethernet per CPU node;
400 Gb/s InfiniBand NDR per accelerator (DGX H100: one ConnectX-7 400 Gb/s port per GPU)."""
DESKTOP_NETWORK_BYTES_PER_SECOND = 10e9 / 8
"""Network between desktop machines (Device.desktop) when none is given: 10 GbE (IEEE 802.3ae),
the fast end of what desktops ship with (1–10 GbE; onboard 1/2.5 GbE is common, so this is
optimistic); `--link` sets another."""
DEFAULT_INTERCONNECT_BYTES_PER_SECOND = 31.5e9
"""Intra-node bandwidth when the catalogue has none: PCIe 4.0 x16 per direction
(16 GT/s · 16 lanes · 128/130 / 8 = 31.5 GB/s, PCI-SIG)."""
DEFAULT_PCIE_BYTES_PER_SECOND = 31.5e9
"""Device ↔ host link for offload: PCIe 4.0 x16 per direction (31.5 GB/s)."""
DEFAULT_HOST_BANDWIDTH_BYTES_PER_SECOND = 200e9
"""Host memory bandwidth the offloaded optimizer step reaches: ~200 GB/s (a dual-socket
server with 8 DDR4-3200 channels per socket reaches 200–300 GB/s in STREAM; stated)."""
LINK_EFFICIENCY = 0.7
"""Share of the per-direction peak a large collective reaches (nccl-tests busbw: 195 GB/s of
300 GB/s on 8×A100 NVLink, li-plus/playground cuda/nccl.md; stated, not calibrated)."""
LATENCY_SECONDS = {"intra": 5e-6, "inter": 15e-6, "cpu": 50e-6}
"""Per-step latency α: NVLink/xGMI hop ~5 µs, InfiniBand ~15 µs (NCCL-tests small-message
times), gloo over TCP ~50 µs (stated defaults)."""


def default_network(device: Device) -> float:
    """Inter-node bytes/s per device when the catalogue has none: 10 GbE between desktop
    machines (DESKTOP_NETWORK_BYTES_PER_SECOND), else DEFAULT_NETWORK_BYTES_PER_SECOND."""
    if device.desktop:
        return DESKTOP_NETWORK_BYTES_PER_SECOND
    return DEFAULT_NETWORK_BYTES_PER_SECOND[device.kind]


@dataclass(frozen=True)
class Links:
    """The bandwidths (bytes/s, per direction, already × efficiency) and latencies (s) one
    device's collectives run over, and how the devices are spread over nodes
    (devices_per_node and num_nodes may be arrays of layouts)."""

    intra_bytes_per_second: float
    inter_bytes_per_second: float
    intra_latency_seconds: float
    inter_latency_seconds: float
    devices_per_node: int
    num_nodes: int


def links_for(device: Device, setup: TrainSetup) -> Links:
    """The device's catalogue interconnect and network (or the stated defaults)."""
    intra = device.interconnect_bytes_per_second or DEFAULT_INTERCONNECT_BYTES_PER_SECOND
    inter = device.network_bytes_per_second or default_network(device)
    cpu = device.kind == "cpu"
    if cpu and device.interconnect_bytes_per_second is None:
        intra = inter
    return Links(intra_bytes_per_second=intra * LINK_EFFICIENCY,
                 inter_bytes_per_second=inter * LINK_EFFICIENCY,
                 intra_latency_seconds=LATENCY_SECONDS["cpu" if cpu else "intra"],
                 inter_latency_seconds=LATENCY_SECONDS["cpu" if cpu else "inter"],
                 devices_per_node=setup.num_devices // setup.num_nodes,
                 num_nodes=setup.num_nodes)


# ------------------------------------------------------------------ flat ring collectives


def _moves_nothing(num_bytes, num_ranks) -> bool:
    """One rank or an empty buffer, for scalars (arrays are masked by _where_moved)."""
    return not is_array(num_bytes) and not is_array(num_ranks) and (
        num_ranks <= 1 or num_bytes <= 0)


def _where_moved(seconds, num_bytes, num_ranks):
    """Scalars pass through (_moves_nothing returned 0 before); arrays get 0 where one rank
    or an empty buffer moves nothing (numpy imported only then)."""
    if not is_array(seconds):
        return seconds
    import numpy as np

    return np.where((np.asarray(num_ranks) > 1) & (np.asarray(num_bytes) > 0), seconds, 0.0)


def ring_all_reduce_seconds(num_bytes: float, num_ranks: int, bytes_per_second: float,
                            latency_seconds: float = 0.0) -> float:
    """Ring all-reduce of a B-byte buffer over n ranks:
    2(n−1)·α + 2(n−1)/n · B / β (reduce-scatter then all-gather; Patarasuk & Yuan 2009; NCCL-
    tests PERFORMANCE.md: busbw = algbw · 2(n−1)/n). 0 for one rank."""
    if _moves_nothing(num_bytes, num_ranks):
        return 0.0
    n = num_ranks
    return _where_moved(2 * (n - 1) * latency_seconds
                        + 2 * (n - 1) / n * num_bytes / bytes_per_second, num_bytes, n)


def ring_all_gather_seconds(num_bytes: float, num_ranks: int, bytes_per_second: float,
                            latency_seconds: float = 0.0) -> float:
    """Ring all-gather producing a B-byte buffer (each rank holds B/n):
    (n−1)·α + (n−1)/n · B / β (NCCL-tests PERFORMANCE.md: busbw = algbw · (n−1)/n)."""
    if _moves_nothing(num_bytes, num_ranks):
        return 0.0
    n = num_ranks
    return _where_moved((n - 1) * latency_seconds + (n - 1) / n * num_bytes / bytes_per_second,
                        num_bytes, n)


def ring_reduce_scatter_seconds(num_bytes: float, num_ranks: int, bytes_per_second: float,
                                latency_seconds: float = 0.0) -> float:
    """Ring reduce-scatter of a B-byte buffer (each rank keeps B/n reduced):
    (n−1)·α + (n−1)/n · B / β, the mirror of all-gather (NCCL-tests PERFORMANCE.md)."""
    return ring_all_gather_seconds(num_bytes, num_ranks, bytes_per_second, latency_seconds)


def all_to_all_seconds(num_bytes: float, num_ranks: int, bytes_per_second: float,
                       latency_seconds: float = 0.0) -> float:
    """All-to-all where each rank sends B bytes spread evenly over n ranks: (n−1)/n · B leaves
    the rank; (n−1)·α + (n−1)/n · B / β (NCCL-tests PERFORMANCE.md: alltoall busbw =
    algbw · (n−1)/n)."""
    return ring_all_gather_seconds(num_bytes, num_ranks, bytes_per_second, latency_seconds)


# ------------------------------------------------------------------ hierarchical (nodes)


def all_reduce_seconds(num_bytes: float, links: Links) -> float:
    """Hierarchical all-reduce: reduce-scatter inside the node (g ranks), all-reduce of the
    B/g shard across the k nodes, all-gather inside the node. One node: the flat ring."""
    g, k = links.devices_per_node, links.num_nodes
    intra = 2 * ring_reduce_scatter_seconds(num_bytes, g, links.intra_bytes_per_second,
                                            links.intra_latency_seconds)
    inter = ring_all_reduce_seconds(num_bytes / g, k, links.inter_bytes_per_second,
                                    links.inter_latency_seconds)
    return intra + inter


def all_gather_seconds(num_bytes: float, links: Links) -> float:
    """Hierarchical all-gather of a B-byte buffer: across nodes (B/g per node group), then
    inside the node (B). One node: the flat ring."""
    g, k = links.devices_per_node, links.num_nodes
    inter = ring_all_gather_seconds(num_bytes / g, k, links.inter_bytes_per_second,
                                    links.inter_latency_seconds)
    intra = ring_all_gather_seconds(num_bytes, g, links.intra_bytes_per_second,
                                    links.intra_latency_seconds)
    return inter + intra


def reduce_scatter_seconds(num_bytes: float, links: Links) -> float:
    """Hierarchical reduce-scatter: the mirror of all_gather_seconds."""
    return all_gather_seconds(num_bytes, links)


def expert_all_to_all_seconds(num_bytes: float, num_ranks: int, links: Links) -> float:
    """All-to-all over an expert-parallel group of n ranks laid out node by node: the share
    (g−1)/n goes over the interconnect, (n−g)/n over the network (both paths counted one after
    the other: no overlap assumed)."""
    if _moves_nothing(num_bytes, num_ranks):
        return 0.0
    g = _minimum(links.devices_per_node, num_ranks)
    intra = all_to_all_seconds(num_bytes * g / num_ranks, g, links.intra_bytes_per_second,
                               links.intra_latency_seconds)
    remote = num_bytes * (num_ranks - g) / num_ranks
    inter = _unless_zero(remote, remote / links.inter_bytes_per_second
                         + (num_ranks - g) // g * links.inter_latency_seconds)
    return _where_moved(intra + inter, num_bytes, num_ranks)


def _minimum(a, b):
    """min of scalars; np.minimum where either is an array."""
    if not (is_array(a) or is_array(b)):
        return min(a, b)
    import numpy as np

    return np.minimum(a, b)


def _unless_zero(amount, seconds):
    """`seconds`, or 0 where `amount` is 0 (elementwise for arrays)."""
    if not (is_array(amount) or is_array(seconds)):
        return seconds if amount else 0.0
    import numpy as np

    return np.where(amount != 0, seconds, 0.0)


def measured_seconds(curve: EfficiencyCurve, num_bytes: float, share: float) -> float:
    """A collective timed from a measured curve (bytes of the whole buffer per rank): `share`
    1 on its own kind's curve; ½ on an all-reduce curve for a reduce-scatter or an all-gather
    (a ring all-reduce is one of each; the curve's overhead counted once) where that kind was
    not measured. The curve was measured at the benchmark's world size; other sizes are
    assumed to behave alike. An array of payloads: each timed so."""
    if is_array(num_bytes):
        import numpy as np

        return np.array([measured_seconds(curve, float(b), share)
                         for b in np.ravel(num_bytes)]).reshape(np.shape(num_bytes))
    if num_bytes <= 0:
        return 0.0
    return curve.overhead_seconds + share * (curve_seconds(curve, num_bytes)
                                             - curve.overhead_seconds)


# ------------------------------------------------------------------ per-step payloads


@dataclass(frozen=True)
class Collective:
    """One collective of a training step: name, kind, payload per call (bytes), calls/step."""

    name: str
    kind: str
    """all_reduce, all_gather, reduce_scatter, all_to_all or host_transfer."""
    num_bytes: float
    """Payload per call (bytes); an array over device counts where the caller passed one."""
    num_calls: int
    num_ranks: int = 0
    """Group size for all_to_all (count); 0 = all devices."""


def gather_bytes_per_param(setup: TrainSetup, trainable_bytes: int) -> int:
    """Bytes per parameter when parameters are gathered or sent to the device: the 16-bit
    compute dtype under mixed precision (FSDP2 MixedPrecisionPolicy(param_dtype=bf16),
    DeepSpeed bf16), else the trainable dtype."""
    if setup.mixed_precision and setup.compute_dtype != "fp32":
        return dtype_bytes(setup.compute_dtype)
    return trainable_bytes


def fsdp_units(model: ModelSpec) -> int:
    """The groups ZeRO-3 gathers and reduce-scatters one at a time (count): one per decoder
    block and the root (embeddings, final norm, lm_head) — FSDP2's per-block fully_shard plus
    the root, as torchtitan's apply_fsdp and this trainer (executor/fsdp.py) wrap; DeepSpeed
    ZeRO-3 fetches per submodule, at a similar or finer grain."""
    return model.num_layers + 1


def data_parallel_collectives(setup: TrainSetup, grad_bytes: int, param_bytes: int,
                              frozen_bytes: int, units: int = 1) -> list[Collective]:
    """Gradient/parameter collectives of one optimizer step.

    DDP (stage 0): one all-reduce of the gradients per step (no_sync while accumulating).
    ZeRO-1: reduce-scatter of the gradients + all-gather of the updated parameters, once per
    step (the same 2Ψ volume as DDP; Rajbhandari et al. 2020 §7). ZeRO-2: gradients are
    sharded, so they are reduce-scattered every micro-batch. ZeRO-3/FSDP: parameters
    all-gathered in the forward and again in the backward of every micro-batch (3Ψ with the
    gradient reduce-scatter; ZeRO paper §7.2.2); the frozen base of LoRA is gathered too.
    Inference: only ZeRO-3's forward gather of the (frozen) weights. ZeRO-3's collectives run
    per gathered group, `units` of them (fsdp_units), each 1/units of the payload (an equal
    split: the root's size is not told apart), which matters where a collective's rate
    depends on its size (a measured curve)."""
    if setup.num_devices <= 1:
        return []
    accum = setup.grad_accum
    if setup.method == "inference":  # ZeRO-3 inference gathers the weights once per forward
        gather = Collective("param.all_gather", "all_gather", frozen_bytes / units,
                            accum * units)
        return [gather] if setup.zero_stage >= 3 else []
    if setup.zero_stage == 0:
        return [Collective("grad.all_reduce", "all_reduce", grad_bytes, 1)]
    if setup.zero_stage < 3:
        scatters = accum if setup.zero_stage >= 2 else 1
        return [Collective("grad.reduce_scatter", "reduce_scatter", grad_bytes, scatters),
                Collective("param.all_gather", "all_gather", param_bytes, 1)]
    gathered = param_bytes + frozen_bytes
    return [Collective("grad.reduce_scatter", "reduce_scatter", grad_bytes / units,
                       accum * units),
            Collective("param.all_gather", "all_gather", gathered / units, 2 * accum * units)]


def expert_parallel_collectives(model: ModelSpec, setup: TrainSetup) -> list[Collective]:
    """MoE expert parallelism: each MoE layer dispatches and combines its tokens with an
    all-to-all in the forward (×2) and again in the backward (×2) (GShard, Lepikhin et al.
    2021; DeepSpeed-MoE). Payload per rank: b·s tokens × top-k × h × c bytes."""
    if setup.expert_parallel <= 1 or model.moe is None:
        return []
    per_call = (setup.tokens_per_micro_batch * model.moe.routed_experts_per_token
                * model.hidden_size * dtype_bytes(setup.compute_dtype))
    passes = 2 if setup.method == "inference" else 4
    calls = passes * model.num_moe_layers * setup.grad_accum
    return [Collective("moe.all_to_all", "all_to_all", per_call, calls, setup.expert_parallel)]


def offload_collectives(setup: TrainSetup, grad_shard_bytes: int,
                        param_shard_bytes: int) -> list[Collective]:
    """ZeRO-Offload (Ren et al. 2021): each step the gradient shard goes device → host and the
    updated parameter shard host → device over PCIe. ZeRO-Infinity parameter offload also
    streams the parameter shard to the device in every forward and backward."""
    if setup.offload == "none":
        return []
    out = [Collective("offload.grad_to_host", "host_transfer", grad_shard_bytes, 1),
           Collective("offload.param_to_device", "host_transfer", param_shard_bytes, 1)]
    if setup.offload == "optimizer_and_params":
        out.append(Collective("offload.param_stream", "host_transfer", param_shard_bytes,
                              2 * setup.grad_accum))
    return out


def host_optimizer_seconds(optimizer_bytes: float, setup: TrainSetup,
                           host_bytes_per_second: float = DEFAULT_HOST_BANDWIDTH_BYTES_PER_SECOND
                           ) -> float:
    """Offloaded optimizer step on the host CPU, memory-bound: the bytes the step reads and
    writes for this rank's shard × the ranks sharing the node's host memory / host bandwidth
    (ZeRO-Offload runs the CPU Adam for all devices of the node at once)."""
    ranks_per_host = setup.num_devices // setup.num_nodes
    return optimizer_bytes * ranks_per_host / host_bytes_per_second


def collective_seconds(c: Collective, links: Links,
                       curves: Mapping[str, EfficiencyCurve] | None) -> float:
    """Time of all calls of one collective: its own measured curve where there is one (the
    local machine's `collective.<kind>`), else half of a measured all-reduce for an
    all-gather or reduce-scatter (measured_seconds), else the α–β ring model over the
    links."""
    curves = curves or {}
    own, all_reduce = curves.get(f"collective.{c.kind}"), curves.get("collective.all_reduce")
    if c.kind == "host_transfer":
        one = c.num_bytes / DEFAULT_PCIE_BYTES_PER_SECOND
    elif own is not None:
        one = measured_seconds(own, c.num_bytes, 1.0)
    elif all_reduce is not None and c.kind in ("all_gather", "reduce_scatter"):
        one = measured_seconds(all_reduce, c.num_bytes, 0.5)
    elif c.kind == "all_reduce":
        one = all_reduce_seconds(c.num_bytes, links)
    elif c.kind == "all_to_all":
        one = expert_all_to_all_seconds(c.num_bytes, c.num_ranks, links)
    else:
        one = all_gather_seconds(c.num_bytes, links)
    return one * c.num_calls


def measured_curves(device: Device, profile: CalibrationProfile | None
                    ) -> dict[str, EfficiencyCurve]:
    """The measured `collective.*` curves (estimator/calibrate/collectives.py), for the local
    machine only; empty without them."""
    if profile is None or device.name != "local":
        return {}
    return {k: c for k, c in profile.curves.items() if k.startswith("collective.")}
