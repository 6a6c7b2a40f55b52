"""The process beyond the model's tensors: the framework's runtime (CUDA context, a CPU
process's resident set), the trainer's data, the kernel and oneDNN primitive caches, the heap
that glibc keeps resident after a step, and the share of a machine the OS keeps. Measured
constants, each with its measurement."""

import math
from collections.abc import Collection

from estimator.analytic.activations import EXPERT_ROW_GRANULE
from estimator.analytic.frameworks import hf
from estimator.analytic.params import layer_groups
from estimator.specs import Device, ModelSpec, TrainSetup
from estimator.units import GIB

RUNTIME_OVERHEAD_BYTES = {
    "cpu": 248 * 1024**2,
    "cuda": 650 * 1000**2,
    "rocm": 650 * 1000**2,
    "xpu": 650 * 1000**2,
    "mps": 0,
    "xla": 0,
    "hpu": 0,
    "neuron": 0,
}
"""Memory the framework itself holds before any tensor. cpu: resident set of a Python process
after `import torch` + the executor's imports (measured: benchmarks/bench_runtime_rss.py, torch
2.13 CPU, x86-64). cuda/rocm/xpu: context + kernels, 650 MB as gpu_poor uses (anchors.md §3;
vram.asmirnov.xyz measures 300 MiB–2 GiB); not visible to torch's allocator counters. mps/xla/
hpu/neuron: unknown, 0 (stated in the assumptions)."""


TRAINING_DATA_BYTES = 4 * 1024**2 * 4
"""The bundled trainer holds its whole tokenised corpus in host memory: the default corpus is
4 MiB of source text (executor/data.py DEFAULT_CORPUS_MAX_BYTES), one id per byte with the
byte-level tokenizer (fewer with a model's BPE tokenizer), stored as int32: 16 MiB."""


MODEL_BUILD_RESIDUE_BYTES = 70 * 1024**2
"""Host memory that building the model leaves resident beyond the model's tensors: the code
pages of the kernels it ran, the OpenMP worker threads and their malloc arenas (≈ 24 MiB of
live non-tensor allocations; the trainer trims the freed heap after the build). measured:
benchmarks/memory_table.py, the `runtime` row (memory after the build − weights) is
333–340 MiB in ten runs of three models (45 to 513 MiB of weights; full/LoRA/QLoRA;
fp32/bf16): 334 − 248 − 16 = 70 MiB."""


KERNEL_CACHE_BYTES = 40 * 1024**2
"""Host memory the first training step leaves resident for good beyond the optimizer states:
oneDNN's primitive cache (one JIT-compiled matmul kernel per shape × pass, up to 1024 kept) and
the code pages of the backward and optimizer kernels. measured (VmRSS after the step with the
heap trimmed, minus weights + optimizer states): 26 MiB (8-layer fp32 full fine-tune),
49 MiB (smollm2-135m bf16 LoRA); benchmarks/memory_table.py."""


EXPERT_PRIMITIVE_BYTES = 384 * 1024


PRIMITIVES_PER_ADAPTED_SHAPE = 8


PRIMITIVE_CACHE_CAPACITY = 1024
"""Primitives of adapted experts' GEMMs: per padded row count and distinct (in, out) expert
linear shape, 8 GEMMs (base forward and input gradient, LoRA A and B forward, their input
gradients and weight gradients), each a cached oneDNN primitive of ~0.37 MiB; oneDNN keeps at
most 1024 (ONEDNN_PRIMITIVE_CACHE_CAPACITY's default). measured: validate's tiny-moe LoRA bf16
(b·s = 512, granule 32) created 270 primitives in 6 steps (ONEDNN_VERBOSE=all, create:cache_miss
lines), 16 per row count for every one of the 16 row counts 32…512; its peak was 779 MiB with
the default cache and 679 MiB with ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 (100 MiB / 270)."""


PRIMITIVES_PER_SHAPE = (2, 3)
"""Primitives per row count and unadapted expert shape: forward and input gradient of frozen
experts, + the weight gradient of trained ones. measured: validate's tiny-moe full bf16 (b·s =
512, 2 expert shapes), with groups then cut into 32·k + r rows, created 297 primitives in 12
steps (ONEDNN_VERBOSE=all): 6 for each of its 47 row counts, + 15 of dense GEMMs."""


ALLOCATOR_RETENTION_BYTES = 35 * 1024**2


GRADIENT_RETENTION_FRACTION = 0.3
"""glibc keeps what a step frees resident in its heap (every tensor under the dynamic mmap
threshold, up to 32 MiB, is served from the heap), and tensors allocated after others were
freed do not all fit into the holes: the resident peak of a step exceeds its live-tensor peak.
Two parts: a constant for the forward's temporaries (35 MiB), and a share of the gradients
allocated during backward that lands in fresh heap instead of the freed activations' memory
(0.3 of the gradient bytes). The trainer trims the heap once per micro-batch, before the loss
head (executor/train.py `_release_before_loss_head`), so what earlier steps freed does not
accumulate. measured, not derived (a property of the
allocator): peak − baseline − optimizer states − the predicted activations, logits and weight
copies − KERNEL_CACHE_BYTES is 28–42 MiB (LoRA, 5–19 MiB of gradients), 66 MiB (fp32 full,
106 MiB of gradients) and 187 MiB (bf16 full, 513 MiB of gradients); benchmarks/
memory_table.py. The share is fitted on two full fine-tunes on one machine: for multi-GiB
gradients it is an extrapolation (tensors over glibc's 32 MiB mmap ceiling bypass the heap)."""


def runtime_overhead_bytes(device: Device, setup: TrainSetup | None = None) -> int:
    """Framework/runtime memory for the device's backend (RUNTIME_OVERHEAD_BYTES); on a CPU
    the whole process baseline of the bundled trainer before its first step: imports +
    tokenised corpus (training_data_bytes) + what building the model leaves beyond its tensors
    (MODEL_BUILD_RESIDUE_BYTES) — what a run report's `runtime` row measures."""
    if device.backend != "cpu":
        return RUNTIME_OVERHEAD_BYTES[device.backend]
    if setup is not None and setup.framework == "hf":
        return hf.PROCESS_BYTES
    return (RUNTIME_OVERHEAD_BYTES["cpu"] + training_data_bytes(device, setup)
            + MODEL_BUILD_RESIDUE_BYTES)


def training_data_bytes(device: Device, setup: TrainSetup | None) -> int:
    """The trainer's tokenised corpus, held in host memory (TRAINING_DATA_BYTES); 0 off the
    CPU, where it is not in device memory, and for inference."""
    if device.backend != "cpu" or setup is None or setup.method == "inference":
        return 0
    return TRAINING_DATA_BYTES


def routed_expert_shapes(model: ModelSpec, names: Collection[str] | None = None
                         ) -> set[tuple[int, int]]:
    """(in, out) features of the routed expert linears, of those named `names` when given
    (empty for dense models)."""
    if model.moe is None:
        return set()
    return {(lin.in_features, lin.out_features)
            for linears, _ in layer_groups(model, routed_all=False) for lin in linears
            if lin.routed and (names is None or lin.name in names)}


def adapted_expert_shapes(model: ModelSpec, setup: TrainSetup) -> set[tuple[int, int]]:
    """(in, out) features of the routed expert linears LoRA adapts (empty for dense models and
    methods without adapters)."""
    if not setup.trains_adapters:
        return set()
    return routed_expert_shapes(model, setup.lora_targets)


def pads_expert_rows(model: ModelSpec, setup: TrainSetup, backend: str) -> bool:
    """Whether the executor pads expert token groups to EXPERT_ROW_GRANULE rows: an MoE
    trained on a CPU with 16-bit matmuls (executor/model.py `_reuses_shapes`)."""
    return (model.moe is not None and backend == "cpu" and setup.method != "inference"
            and setup.compute_dtype in ("bf16", "fp16"))


def expert_kernel_cache_bytes(model: ModelSpec, setup: TrainSetup, backend: str) -> int:
    """oneDNN primitives of the padded routed-expert GEMMs (CPU, 16-bit: pads_expert_rows): an
    expert can receive 1 … b·s tokens, so up to ⌈b·s / 32⌉ padded row counts, each with one
    cached primitive of ~0.37 MiB (EXPERT_PRIMITIVE_BYTES) per GEMM of every distinct expert
    linear shape — 8 for an adapted shape (PRIMITIVES_PER_ADAPTED_SHAPE), else 3 when the
    experts train and 2 when frozen (PRIMITIVES_PER_SHAPE) — at most the cache's 1024
    entries. The upper bound is the prediction: with a skewed router every row count appeared
    within 6 steps here; a balanced router visits fewer."""
    if not pads_expert_rows(model, setup, backend):
        return 0
    adapted = adapted_expert_shapes(model, setup)
    plain = routed_expert_shapes(model) - adapted
    per_row_count = (len(adapted) * PRIMITIVES_PER_ADAPTED_SHAPE
                     + len(plain) * PRIMITIVES_PER_SHAPE[setup.method == "full"])
    row_counts = math.ceil(setup.tokens_per_micro_batch / EXPERT_ROW_GRANULE)
    return min(row_counts * per_row_count, PRIMITIVE_CACHE_CAPACITY) * EXPERT_PRIMITIVE_BYTES


def step_runtime_bytes(setup: TrainSetup, device: Device, gradient_bytes: int) -> dict[str, int]:
    """Host memory of a training step that is no tensor of the model (CPU only; an
    accelerator's allocator statistics do not see it): kernel caches the first step leaves
    resident (KERNEL_CACHE_BYTES) and what the allocator keeps of freed tensors within a step
    (ALLOCATOR_RETENTION_BYTES + GRADIENT_RETENTION_FRACTION × gradient_bytes)."""
    if device.backend != "cpu" or setup.method == "inference":
        return {"kernel_caches": 0, "allocator_retention": 0}
    if setup.framework == "hf":  # its glibc heap: heap_retention_bytes
        return {"kernel_caches": KERNEL_CACHE_BYTES, "allocator_retention": 0}
    retained = ALLOCATOR_RETENTION_BYTES + round(GRADIENT_RETENTION_FRACTION * gradient_bytes)
    return {"kernel_caches": KERNEL_CACHE_BYTES, "allocator_retention": retained}


def heap_retention_bytes(model: ModelSpec, setup: TrainSetup, device: Device) -> int:
    """What glibc's heap keeps resident of memory the training code freed, on a CPU (the
    bundled trainer trims its heap and runs under tcmalloc where it can: 0 there; its
    within-step retention is step_runtime_bytes'). HF: hf.heap_retention_bytes."""
    if device.backend != "cpu" or setup.framework != "hf" or setup.method == "inference":
        return 0
    return hf.heap_retention_bytes(model, setup)


def os_reserve_bytes(device: Device) -> int:
    """Memory a unified-memory device keeps for the OS and other programs: max(2 GiB, 10 %)
    on CPUs (a heuristic: desktop sessions use 1.5–4 GiB), 25 % on Apple GPUs (Metal's default
    recommendedMaxWorkingSetSize is ≈ 75 % of RAM). Discrete devices: 0."""
    if not device.unified_memory:
        return 0
    if device.backend == "mps":
        return device.memory_bytes // 4
    return max(2 * GIB, device.memory_bytes // 10)
