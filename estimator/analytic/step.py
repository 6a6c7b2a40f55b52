"""One training step on one setup: peak memory (memory.py) on the rank device, compute
(throughput.py) at the rank's calibrated rates, composed with communication (parallel.py).
The single function that `estimate`, the planner's exact re-scoring and compare share."""

from estimator.analytic.memory import memory_breakdown
from estimator.analytic.parallel import compose_throughput, rank_device, rank_profile
from estimator.analytic.params import count_params
from estimator.analytic.throughput import throughput
from estimator.specs import (
    CalibrationProfile,
    Device,
    MemoryBreakdown,
    ModelSpec,
    Throughput,
    TrainSetup,
)


def step_throughput(model: ModelSpec, setup: TrainSetup, device: Device,
                    profile: CalibrationProfile | None,
                    memory: MemoryBreakdown | None = None) -> Throughput:
    """Step time and rates: the compute of one rank (parallel.rank_device / rank_profile)
    composed with communication (parallel.compose_throughput)."""
    rank, params = rank_device(device, setup), count_params(model, setup)
    memory = memory or memory_breakdown(model, setup, rank, params)
    perf = throughput(model, setup, rank, params, rank_profile(profile, device, setup),
                      weight_storage_bytes=memory.components["weights"]
                      + memory.components["quant_scales"],
                      kv_bytes=memory.components["kv_cache"])
    return compose_throughput(model, setup, rank, params, profile, perf)
