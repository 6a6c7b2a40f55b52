"""The cold-operand pool: cache sizes of this CPU and one buffer larger than its caches that
the cold GEMM and LoRA cases carve their operands from."""

from __future__ import annotations

from collections.abc import Callable

import torch

FALLBACK_POOL_BYTES = 256 * 2**20
"""Operand pool when the last-level cache size is unknown (bytes)."""
MAX_POOL_BYTES = 1024 * 2**20


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache (bytes): Linux /sys (index*/size of cpu0, largest
    level), else py-cpuinfo's l3/l2 cache size; None when neither says."""
    from pathlib import Path

    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            size = int(text.rstrip("KMG")) * unit
        except (OSError, ValueError):
            continue
        best = max(best or 0, size)
    if best:
        return best
    try:
        import cpuinfo

        info = cpuinfo.get_cpu_info()
        size = info.get("l3_cache_size") or info.get("l2_cache_size")
        return int(size) if size else None
    except Exception:  # py-cpuinfo raises assorted errors on exotic platforms
        return None


def private_cache_bytes(num_cores: int) -> int | None:
    """Per-core cache (the largest level not shared with other cores: L2 here) × cores."""
    from pathlib import Path

    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            shared = (index / "shared_cpu_list").read_text().strip()
            text = (index / "size").read_text().strip().upper()
            unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
            if shared in ("0", "0-0"):
                sizes.append(int(text.rstrip("KMG")) * unit)
        except (OSError, ValueError):
            continue
    return max(sizes) * num_cores if sizes else None


def cold_pool_bytes() -> int:
    """Operand pool of the cold GEMMs: the next power of two ≥ the last-level cache, at least
    256 MiB (fallback when unknown), at most 1 GiB."""
    llc = last_level_cache_bytes() or FALLBACK_POOL_BYTES
    size = FALLBACK_POOL_BYTES
    while size < llc and size < MAX_POOL_BYTES:
        size *= 2
    return size


_POOLS: dict[tuple[str, int], torch.Tensor] = {}
POOL_PATTERN = 0x3F803F80
"""The pool's 32-bit fill: 1.0039 as fp32, two 1.0s as bf16, two 1.875s as fp16 — one buffer,
written once (a memset-speed fill, not an RNG pass), serves every dtype. GEMM time does not
depend on the values while none is zero, subnormal or NaN; the 512 MiB pool of random values
cost 0.8 s of CPU per dtype."""


def operand_pool(device: str, dtype: torch.dtype, num_bytes: int) -> torch.Tensor:
    """One shared buffer per (device, size), allocated and written once per process and
    viewed as `dtype` (a cold GEMM case carves its operands from it, so it costs no extra
    allocation time)."""
    key = (device, num_bytes)
    if key not in _POOLS:
        _POOLS.clear()  # keep at most one pool alive
        _POOLS[key] = torch.full((num_bytes // 4,), POOL_PATTERN, dtype=torch.int32,
                                 device=device)
    return _POOLS[key].view(dtype)


def release_pools() -> None:
    """Free the cold-GEMM operand pool."""
    _POOLS.clear()


def _rotating(pool: torch.Tensor, shapes: tuple[tuple[int, int], ...],
              op: Callable[..., object]) -> Callable[[], object]:
    """A callable that runs `op` on the next slot's operands each call: slots of the given
    shapes laid back to back through the pool, so consecutive calls never reuse an operand
    until the whole pool has been read."""
    per_slot = sum(r * c for r, c in shapes)
    num_slots = max(1, pool.numel() // per_slot)
    slots = []
    for i in range(num_slots):
        offset, operands = i * per_slot, []
        for r, c in shapes:
            operands.append(pool[offset:offset + r * c].view(r, c))
            offset += r * c
        slots.append(operands)
    state = {"i": 0}

    def call() -> object:
        i = state["i"]
        state["i"] = (i + 1) % num_slots
        return op(*slots[i])

    return call
