"""planner/fit.py: compare's rows come from the planner's search (issue 17, item 1)."""

from estimator.catalog import load_device, load_model
from estimator.planner.compare import compare_request
from estimator.planner.fit import Fixed, best_at, global_batch, searched_plan
from estimator.request import build_setup


def test_longcat_qlora_on_mi300x_uses_batching_and_expert_parallelism() -> None:
    """The LongCat question: the search batches and shards the experts (expert parallelism,
    or ZeRO-3 whose gathers overlap compute since analytic/overlap.py) instead of running
    micro-batch 1 (was 2.19 days)."""
    option = compare_request("longcat-flash", tokens=1e8, devices=["mi300x"],
                             method="qlora").options[0]
    assert option.batch_size * option.grad_accum * option.num_devices >= 64
    assert option.batch_size > 1
    assert option.expert_parallel > 1 or option.zero_stage == 3
    assert option.total_seconds < 12 * 3600


def test_a_fixed_micro_batch_is_kept() -> None:
    device = load_device("h100-sxm")
    setup = build_setup(device, None, tokens=1e7, method="lora")
    found = best_at(load_model("llama-3.1-8b"), [setup], device, None, 1, Fixed(batch_size=2))
    assert found is not None and found.setup.batch_size == 2


def test_global_batch_is_whole_per_device() -> None:
    assert global_batch(56, Fixed()) % 56 == 0 and global_batch(1, Fixed()) == 64
    assert global_batch(4, Fixed(batch_size=2, grad_accum=3)) == 24


def test_cost_objective_is_never_dearer_than_time() -> None:
    device = load_device("mi300x")
    model = load_model("mixtral-8x7b")
    setup = build_setup(device, None, tokens=1e8, method="full")
    time, _ = searched_plan(model, [setup], device, None, max_devices=64, objective="time",
                            fixed=Fixed())
    cost, _ = searched_plan(model, [setup], device, None, max_devices=64, objective="cost",
                            fixed=Fixed())
    assert cost.cost_usd <= time.cost_usd + 1e-9


def test_a_fixed_accumulation_keeps_micro_batch_one() -> None:
    option = compare_request("mixtral-8x7b", devices=["gaudi3"], grad_accum=4,
                             checkpointing=True).options[0]
    assert (option.batch_size, option.grad_accum, option.checkpointing) == (1, 4, True)


def test_smaller_models_skip_presets_the_setup_does_not_apply_to() -> None:
    """gpt2 has 1024 positions: a 2048-token setup is skipped, not an error."""
    result = compare_request("llama-3.1-8b", tokens=1e9, max_hours=1.0,
                             devices=["rtx-4090"])
    assert all(m.model != "gpt2" for m in result.smaller_models)


def test_a_tpu_slice_is_one_interconnect_domain() -> None:
    """The catalogue's devices_per_node (a v5p slice: 6,144 chips on ICI) is the planner's
    node: 512 chips are one node, not 64 boards of 8 over the 50 Gb/s DCN; without it the
    default rule holds."""
    from estimator.catalog import load_device
    from estimator.planner.fit import per_node

    assert per_node(load_device("tpu-v5p")) == 6144
    assert per_node(load_device("tpu-v6e")) == 256
    assert per_node(load_device("mi300x")) == 8
