"""The trainer gives freed heap memory back between steps (measure.release_freed_memory)."""

import sys

import pytest
import torch

from estimator.executor import measure

pytestmark = pytest.mark.torch


@pytest.mark.skipif(not sys.platform.startswith("linux") or measure._malloc_trim() is None,
                    reason="glibc only")
def test_release_freed_memory_returns_heap_pages() -> None:
    """64 KiB tensors come from glibc's heap (under any mmap threshold); freeing all but the
    topmost keeps them resident until the heap is trimmed."""
    tensors = [torch.ones(16 * 1024) for _ in range(1600)]  # 1600 × 64 KiB = 100 MiB
    last = tensors[-1]
    del tensors
    before = measure.current_rss_bytes()
    measure.release_freed_memory()
    after = measure.current_rss_bytes()
    assert before - after > 50 * 2**20, (before, after)
    assert float(last.sum()) == 16 * 1024
