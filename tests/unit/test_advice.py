"""advise(): the greedy combination drops earlier changes that later ones make unneeded."""

from estimator.planner.advice import advise
from estimator.specs import MemoryBreakdown, TrainSetup

GIB = 2**30


def toy(capacity_gib: int):
    """A toy memory model on a device of `capacity_gib`: 100 GiB, checkpointing −10, 8-bit
    AdamW −50, LoRA −60, the optimizer step in backward −5, a micro-batch above 1 +1; its
    band's upper end is the estimate itself."""

    def memory_of(setup: TrainSetup) -> MemoryBreakdown:
        total = 100 - 10 * setup.checkpointing - 50 * (setup.optimizer == "adamw8bit") - 60 * (
            setup.method != "full") - 5 * setup.optimizer_in_backward - (setup.batch_size > 1)
        return MemoryBreakdown(components={"weights": total * GIB}, total_bytes=total * GIB,
                               capacity_bytes=capacity_gib * GIB, notes={},
                               upper_bytes=total * GIB)

    return memory_of


def test_a_single_change_that_fits_is_not_repeated_as_a_combination():
    advice = advise(TrainSetup(method="full"), toy(80))
    changes = [a.change for a in advice]
    assert "--checkpointing --optimizer adamw8bit" not in changes
    assert "--optimizer adamw8bit" in changes and "--checkpointing" in changes


def test_a_needed_combination_is_kept():
    advice = advise(TrainSetup(method="full"), toy(45))
    assert advice[0].change == "--checkpointing --optimizer adamw8bit" and advice[0].fits


def test_the_optimizer_step_in_backward_is_advised_only_where_the_setup_can_take_it():
    """It cannot accumulate micro-batches: not offered with --grad-accum 2, and never combined
    with the smaller micro-batch that adds accumulation."""
    nvfree = {"framework": "nvfree", "method": "full"}
    flags = [a.change for a in advise(TrainSetup(**nvfree, batch_size=4), toy(5))]
    assert "--optimizer-in-backward" in flags
    assert not any("--optimizer-in-backward" in f and "--grad-accum" in f for f in flags)
    accumulating = advise(TrainSetup(**nvfree, grad_accum=2), toy(80))
    assert all("--optimizer-in-backward" not in a.change for a in accumulating)
    inside = TrainSetup(**nvfree, batch_size=4, optimizer_in_backward=True)
    assert all("--grad-accum" not in a.change for a in advise(inside, toy(80)))


def test_device_advice_never_keeps_the_optimizer_step_in_backward():
    """Sharded advice drops it (one device only), and says so when the user's setup had it."""
    from estimator import estimate
    from estimator.catalog import load_model

    model = load_model("llama-3.1-8b")
    for setup in (TrainSetup(framework="nvfree", method="full", seq_len=512),
                  TrainSetup(framework="nvfree", method="full", seq_len=512,
                             optimizer_in_backward=True)):
        advice = [a.change for a in estimate(model, setup, "rtx-4090").advice]
        sharded = [a for a in advice if "--num-devices" in a]
        assert sharded
        assert not any("--optimizer-in-backward --num-devices" in a for a in sharded)
    assert any(a.endswith("(without --optimizer-in-backward)") for a in sharded)


def test_advice_is_a_setup_change_without_rows_that_save_nothing():
    """Each Advice carries its TrainSetup update; a change that does not lower the peak (here
    the optimizer step in backward, which HF Trainer does not have) is not shown."""
    advice = advise(TrainSetup(method="full"), toy(45))
    assert advice[0].update == {"checkpointing": True, "optimizer": "adamw8bit"}
    assert all("--optimizer-in-backward" not in a.change for a in advice)
    assert all(a.total_bytes < 100 * GIB for a in advice)


def test_a_32_bit_lora_base_is_advised_a_16_bit_one_in_the_bundled_trainer():
    """fp32 LoRA on the bundled trainer: `--bits 16` (a bf16 base upcast per matmul) is
    offered, with the real memory model, and saves half the base; HF has no such path."""
    from estimator.analytic.memory import memory_breakdown
    from estimator.analytic.params import count_params
    from estimator.catalog import load_device, load_model

    model, device = load_model("smollm2-135m"), load_device("ryzen-9-7950x")

    def memory_of(setup: TrainSetup) -> MemoryBreakdown:
        return memory_breakdown(model, setup, device, count_params(model, setup))

    setup = TrainSetup(framework="nvfree", method="lora", weight_bits=32, compute_dtype="fp32",
                       mixed_precision=False)
    advice = {a.change: a for a in advise(setup, memory_of)}
    assert "--bits 16" in advice
    before, after = memory_of(setup), memory_of(setup.model_copy(update={"weight_bits": 16}))
    assert advice["--bits 16"].total_bytes == after.total_bytes < before.total_bytes
    assert after.components["weights"] * 2 == before.components["weights"]
    assert after.components["dequant_transient"] == 4 * 49152 * 576  # lm_head upcast
    hf = setup.model_copy(update={"framework": "hf"})
    assert "--bits 16" not in {a.change for a in advise(hf, memory_of)}
