"""The search space: constraints, structural choices, device counts, micro-batches, and the
index structures the scoring reads (groups, sweeps, the candidate index)."""

import functools
import math
from dataclasses import dataclass, field
from itertools import product

import numpy as np

from estimator.analytic.parallel import (
    rank_device,
)
from estimator.errors import SetupError
from estimator.specs import (
    CalibrationProfile,
    Device,
    TrainSetup,
)
from estimator.specs.plan import Candidate, Objective

Precision = tuple[str, bool]
"""(compute dtype, mixed precision)."""

AFFINE_TOLERANCE = 1e-6
"""Relative mismatch between an array score and estimate() above which the space is scored
exactly."""
PROBES = ((1, 1), (2, 1), (1, 2))
"""(micro-batch, accumulation) at which the analytic model is evaluated per structure."""


@dataclass(frozen=True)
class Constraints:
    """What the user fixed or limited; empty tuples mean 'search all'."""

    global_batch: int = 8
    """Sequences per optimizer step over all devices."""
    memory_limit_bytes: int | None = None
    """Memory per device the plan must fit (bytes); None = the device's capacity."""
    max_seconds: float | None = None
    """Wall-time budget for the token budget (seconds)."""
    max_cost_usd: float | None = None
    """Money budget for the token budget (USD)."""
    methods: tuple[str, ...] = ("full", "lora", "qlora")
    precisions: tuple[Precision, ...] = ()
    optimizers: tuple[str, ...] = ("adamw", "adamw8bit")
    checkpointing: tuple[bool, ...] = (False, True)
    zero_stages: tuple[int, ...] = (0,)
    """ZeRO stages searched when the setup has several devices (the executor runs 0, DDP)."""
    device_counts: tuple[int, ...] = ()
    """Device counts searched (devices_up_to); empty = the setup's num_devices. Counts the
    global batch or the expert-parallel degree does not divide are skipped."""
    micro_batches: tuple[int, ...] = ()
    """Micro-batches allowed (a user's fixed --batch-size); empty = every divisor."""
    objective: Objective = "time"
    top: int = 5
    """Candidates re-scored exactly and kept in the plan."""


@dataclass(frozen=True)
class Group:
    """One structural choice at one device count and ZeRO stage, over its micro-batches."""

    choice: TrainSetup
    """The structural choice at micro-batch 1 and accumulation 1, validated (its device
    layout and ZeRO stage are the group's fields below)."""
    num_devices: int
    num_nodes: int
    zero_stage: int
    batches: np.ndarray
    """Micro-batches (sequences)."""
    accums: np.ndarray
    """Accumulation of each micro-batch (count)."""

    structure: tuple = field(init=False)
    """What the compute op lists depend on besides (b, a) and the rank device: (method,
    compute dtype, mixed precision, optimizer, checkpointing)."""

    def __post_init__(self) -> None:
        s = self.choice
        object.__setattr__(self, "structure", (s.method, s.compute_dtype, s.mixed_precision,
                                               s.optimizer, s.checkpointing))

    @classmethod
    def of(cls, setup: TrainSetup, batches: np.ndarray, accums: np.ndarray) -> "Group":
        """The group of a setup at its own device count and stage."""
        return cls(setup, setup.num_devices, setup.num_nodes, setup.zero_stage, batches, accums)

    @functools.cached_property
    def setup(self) -> TrainSetup:
        """The setup at micro-batch 1 and accumulation 1: the choice at the group's device
        count and stage (built when first read; scoring reads it for one group per sweep)."""
        return self.choice.model_copy(update={"num_devices": self.num_devices,
                                              "num_nodes": self.num_nodes,
                                              "zero_stage": self.zero_stage})

    @property
    def ranks_per_node(self) -> int:
        """parallel.ranks_per_node of the setup (devices per node), without building it."""
        return self.num_devices // self.num_nodes


@dataclass
class Scored:
    """All candidates as parallel arrays (one row per candidate), by group."""

    groups: list[Group]
    group: np.ndarray
    """Index into `groups` of each candidate."""
    batch: np.ndarray
    accum: np.ndarray
    num_devices: np.ndarray
    peak_bytes: np.ndarray
    step_seconds: np.ndarray

    def setup(self, i: int) -> TrainSetup:
        """The setup of candidate i."""
        return _at(self.groups[self.group[i]].setup, self.batch[i], self.accum[i])


@dataclass(frozen=True)
class SearchResult:
    """Ranked candidates (exact numbers for the first `top`) and search statistics."""

    candidates: list[Candidate]
    num_candidates: int
    num_fitting: int
    memory_limit_bytes: int
    max_steps: int
    search_seconds: float


# ------------------------------------------------------------------ the space


def device_precisions(device: Device, profile: CalibrationProfile | None) -> list[Precision]:
    """fp32, plus mixed and pure 16-bit where the device computes in 16-bit: bf16 if it has
    a bf16 rate (or calibration measured bf16 GEMMs), else fp16."""
    out: list[Precision] = [("fp32", False)]
    measured = set(profile.curves) if profile else set()
    for dtype in ("bf16", "fp16"):
        if device.peak_for(dtype) or f"matmul.{dtype}" in measured:
            return [*out, (dtype, True), (dtype, False)]
    return out


def structural_setups(base: TrainSetup, precisions: list[Precision],
                      c: Constraints) -> list[TrainSetup]:
    """Every method × precision × optimizer × checkpointing (× ZeRO stage on several
    devices), at micro-batch 1 (validated once per choice; the stage is a plain copy)."""
    stages = c.zero_stages if base.num_devices > 1 else (base.zero_stage,)
    return [setup if s == setup.zero_stage else setup.model_copy(update={"zero_stage": s})
            for setup in _choices(base, precisions, c, stages[0]) for s in stages]


def _choices(base: TrainSetup, precisions: list[Precision], c: Constraints,
             zero_stage: int) -> list[TrainSetup]:
    """Every method × precision × optimizer × checkpointing at micro-batch 1, validated."""
    out = []
    for method, (dtype, mixed), optim, ckpt in product(
            c.methods, precisions, c.optimizers, c.checkpointing):
        bits = 4 if method == "qlora" else (32 if dtype == "fp32" else 16)
        update = {"method": method, "weight_bits": bits, "compute_dtype": dtype,
                  "mixed_precision": mixed, "optimizer": optim, "checkpointing": ckpt,
                  "zero_stage": zero_stage, "batch_size": 1, "grad_accum": 1}
        out.append(TrainSetup.model_validate({**base.model_dump(), **update}))
    return out


def micro_batches(global_batch: int, num_devices: int) -> np.ndarray:
    """Micro-batches b that divide the per-device batch (so accumulation is whole)."""
    if global_batch % num_devices:
        raise SetupError(f"global batch {global_batch} is not divisible by "
                         f"{num_devices} devices")
    per_device = global_batch // num_devices
    small = [b for b in range(1, math.isqrt(per_device) + 1) if per_device % b == 0]
    return np.array(sorted({*small, *(per_device // b for b in small)}))


def devices_up_to(max_devices: int) -> tuple[int, ...]:
    """The device counts a search up to N tries: 1, 2, 4, … below N, and N."""
    counts = [2**k for k in range(max_devices.bit_length()) if 2**k < max_devices]
    return (*counts, max_devices)


def nodes_for(base: TrainSetup, num_devices: int) -> int | None:
    """Nodes for num_devices with the setup's devices per node (fewer devices: one node);
    None when they do not fill whole nodes."""
    per_node = base.num_devices // base.num_nodes
    if num_devices <= per_node:
        return 1
    return num_devices // per_node if num_devices % per_node == 0 else None


def setups_at_device_counts(base: TrainSetup, c: Constraints) -> list[TrainSetup]:
    """The base setup at every searched device count that divides the global batch, holds
    whole expert-parallel groups and fills whole nodes."""
    if not c.device_counts:
        micro_batches(c.global_batch, base.num_devices)  # the divisibility error
        return [base]
    out = [base.model_copy(update={"num_devices": n, "num_nodes": nodes_for(base, n)})
           for n in c.device_counts
           if c.global_batch % n == 0 and n % base.expert_parallel == 0
           and nodes_for(base, n) is not None]
    if not out:
        raise SetupError(f"global batch {c.global_batch} is not divisible by any of "
                         f"{', '.join(map(str, c.device_counts))} devices")
    return out


def search_space(base: TrainSetup, precisions: list[Precision], c: Constraints) -> list[Group]:
    """Every structural choice at every device count and ZeRO stage, with its micro-batches
    (structural_setups at each device count; each choice validated once, at the first count:
    setups_at_device_counts keeps only counts the setup's checks accept)."""
    groups, choices = [], None
    for at_n in setups_at_device_counts(base, c):
        batches = micro_batches(c.global_batch, at_n.num_devices)
        if c.micro_batches:
            batches = batches[np.isin(batches, c.micro_batches)]
            if not len(batches):
                continue
        accums = (c.global_batch // at_n.num_devices) // batches
        stages = c.zero_stages if at_n.num_devices > 1 else (at_n.zero_stage,)
        choices = choices or _choices(at_n, precisions, c, stages[0])
        groups += [Group(choice, at_n.num_devices, at_n.num_nodes, s, batches, accums)
                   for choice in choices for s in stages]
    if not groups:
        raise SetupError(f"no micro-batch {c.micro_batches} divides the per-device batch")
    return groups


def _at(setup: TrainSetup, batch: int, accum: int = 1) -> TrainSetup:
    return setup.model_copy(update={"batch_size": int(batch), "grad_accum": int(accum)})


@dataclass(frozen=True)
class Sweep:
    """Groups that differ only in their device count (same structure, rank device, ZeRO
    stage and side of one device: the branches of the analytic model read these), scored
    together with the device count as an array."""

    groups: list[Group]
    members: np.ndarray
    """Index of each group in the space's group list."""
    rank: Device
    """The device one rank gets (parallel.rank_device)."""
    split: int | None
    """Ranks sharing a CPU machine (rank_device split it), else None."""
    counts: np.ndarray
    """Device count of each group."""

    @property
    def setup(self) -> TrainSetup:
        return self.groups[0].setup

    @property
    def structure(self) -> tuple:
        return self.groups[0].structure


@dataclass(frozen=True)
class Space:
    """Where the candidates of a list of groups are: per candidate its group and distinct
    micro-batch, per group its structure-and-rank key, and the sweeps. Scores are
    assembled from per-group terms (sweeps), per-key and micro-batch terms (op tables,
    batch rows) and per-candidate accumulation in one gather."""

    sweeps: list[Sweep]
    starts: np.ndarray
    """First candidate of each group, and the number of candidates at the end."""
    group: np.ndarray
    """Group of each candidate."""
    accum: np.ndarray
    """Accumulation of each candidate."""
    batch_values: np.ndarray
    """The distinct micro-batches of the space."""
    batch_index: np.ndarray
    """Index into batch_values of each candidate's micro-batch."""
    keys: list[tuple]
    """(structure, CPU split) of the op tables and batch rows."""
    key: np.ndarray
    """Index into keys of each group."""

    def candidates(self, members: np.ndarray) -> np.ndarray:
        """Indices of the candidates of the groups `members`, group by group."""
        return np.concatenate([np.arange(self.starts[i], self.starts[i + 1])
                               for i in members.tolist()])


def index_space(groups: list[Group], device: Device) -> Space:
    """The groups' sweeps and candidate indices (rank_device once per number of ranks per
    node)."""
    ranks, members, keys = {}, {}, {}
    key = np.empty(len(groups), dtype=int)
    for i, g in enumerate(groups):
        per_node = g.ranks_per_node
        if per_node not in ranks:
            rank = rank_device(device, g.setup)
            ranks[per_node] = rank, (None if rank is device else per_node)
        rank, split = ranks[per_node]
        key[i] = keys.setdefault((g.structure, split), len(keys))
        members.setdefault((g.structure, split, g.zero_stage, g.num_devices > 1),
                           (rank, split, []))[2].append(i)
    sweeps = [Sweep(groups=[groups[i] for i in idx], members=np.array(idx), rank=rank,
                    split=split, counts=np.array([groups[i].num_devices for i in idx]))
              for rank, split, idx in members.values()]
    sizes = [len(g.batches) for g in groups]
    values, index = np.unique(np.concatenate([g.batches for g in groups]), return_inverse=True)
    return Space(sweeps=sweeps, starts=np.concatenate([[0], np.cumsum(sizes)]).astype(int),
                 group=np.repeat(np.arange(len(groups)), sizes),
                 accum=np.concatenate([g.accums for g in groups]), batch_values=values,
                 batch_index=index, keys=list(keys), key=key)
