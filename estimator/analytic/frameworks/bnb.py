"""bitsandbytes' paged AdamW: which of its states the device allocator sees.

bitsandbytes 0.42–0.44 `optim/optimizer.py` (Optimizer2State.init_state, get_state_buffer):
a paged optimizer (`PagedAdamW`, `PagedAdamW8bit`) allocates the moments of every tensor of at
least 1e5 elements with `F.get_paged` — CUDA unified memory (cudaMallocManaged), which the
driver moves to host memory when the device fills and which torch.cuda.memory_stats does not
count; smaller tensors get ordinary device tensors (`torch.zeros_like`). The 8-bit variant
keeps fp32 moments for tensors under `min_8bit_size` (4096 elements) and two fp32 absmax
vectors per tensor (one value per 256-element block), always on the device.
"""

import math
from collections.abc import Iterable

FP32_BYTES = 4
PAGED_MIN_ELEMENTS = 100_000
MIN_8BIT_ELEMENTS = 4096
STATE_BLOCK = 256


def paged_adamw_device_bytes(tensors: Iterable[tuple[int, float]], *, bits: int) -> int:
    """Device bytes of a paged AdamW's states over `tensors` ((elements, count) pairs): both
    moments of the tensors under PAGED_MIN_ELEMENTS (1 B each at 8 bits, else 4 B), plus the
    8-bit absmax vectors; the paged moments are not device-allocator memory."""
    total = 0.0
    for numel, count in tensors:
        eight = bits == 8 and numel >= MIN_8BIT_ELEMENTS
        moments = 2 * numel * (1 if eight else FP32_BYTES) if numel < PAGED_MIN_ELEMENTS else 0
        absmax = 2 * FP32_BYTES * math.ceil(numel / STATE_BLOCK) if eight else 0
        total += (moments + absmax) * count
    return round(total)
