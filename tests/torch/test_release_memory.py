"""The trainer gives freed heap memory back once per micro-batch, before the loss head
(measure.release_freed_memory through train._release_before_loss_head)."""

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


def test_trainer_trims_once_per_micro_batch_before_the_loss_head(tmp_path, monkeypatch) -> None:
    """One trim per micro-batch (grad_accum 2 → 2 per step), from the final norm's forward
    hook, i.e. after the decoder blocks and before the loss head; none after the step."""
    from estimator.executor import train as T
    from estimator.specs import ModelSpec, TrainSetup

    spec = ModelSpec(name="t", num_layers=2, hidden_size=32, intermediate_size=64, num_heads=2,
                     num_kv_heads=1, head_dim=16, vocab_size=258, max_seq_len=64)
    setup = TrainSetup(method="lora", compute_dtype="bf16", batch_size=1, seq_len=16,
                       grad_accum=2, lora_rank=4)
    run, *_ = T.prepare_run(spec, setup, T.TrainConfig(max_steps=1, output_dir=tmp_path,
                                                       predict=False))
    events: list[str] = []
    monkeypatch.setattr(measure, "release_freed_memory", lambda: events.append("trim"))
    run.model.layers[-1].register_forward_hook(lambda *_: events.append("last block"))
    T.train_step(run, 0, 1e-3)
    assert events == ["last block", "trim"] * 2
