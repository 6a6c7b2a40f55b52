"""An exact second opinion: one training step of the framework's real model code, traced under
FakeTensorMode (no memory, no compute, any model size), every tensor allocation tracked.

TORCH ZONE: this package imports torch, transformers, peft and bitsandbytes. Only the `trace`
command body (and torch tests) import it; `nvfree estimate` never does.

    from estimator.trace import trace_step, trace_report
    result = trace_step("llama-3.1-8b", TrainSetup(method="qlora", weight_bits=4))
    report = trace_report("llama-3.1-8b", setup, device="h100-sxm")   # + analytic side

What is real and what is faked is listed in docs/trace.md and in each result's `assumptions`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from estimator.errors import MissingDependencyError, SetupError
from estimator.specs import TrainSetup
from estimator.specs.trace import TraceReport, TraceResult

TOP_MODULES = 12
"""Modules listed in a result's top_modules (count)."""


def require_libraries(setup: TrainSetup) -> None:
    """MissingDependencyError (one line) when transformers / peft / bitsandbytes are absent."""
    needed = ["torch", "transformers"]
    if setup.trains_adapters:
        needed.append("peft")
    if setup.method == "qlora" or setup.optimizer == "adamw8bit":
        needed.append("bitsandbytes")
    import importlib.util

    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise MissingDependencyError(f"nvfree trace needs {', '.join(missing)}: "
                                     "pip install 'nvfree[trace]'")


def trace_step(model: str | dict[str, Any], setup: TrainSetup, *, framework: str = "hf",
               fake: bool = True, experts: str = "grouped_mm") -> TraceResult:
    """Build `model` (preset name, config.json path / model directory, or a config dict) with
    transformers + PEFT + bitsandbytes as `setup` says, run one step, return where memory peaked.

    fake=False runs the same code on real CPU tensors (reference runs of tiny models).
    experts: 'grouped_mm' (transformers' default MoE path), 'eager' (the per-expert loop with
    balanced routing), or 'routed' (transformers' own eager loop, real tensors only)."""
    if framework != "hf":
        raise SetupError(f"nvfree trace supports framework 'hf' (transformers + PEFT), not "
                         f"'{framework}'")
    if experts not in ("grouped_mm", "eager", "routed"):
        raise SetupError(f"--experts must be grouped_mm or eager, not {experts}")
    if experts == "routed" and fake:
        raise SetupError("routed experts read the router's values: real tensors only")
    require_libraries(setup)
    from estimator.trace.hf import check_supported
    from estimator.trace.hf_config import build_config, load_config_dict

    check_supported(setup)
    name, config = ("config", model) if isinstance(model, dict) else load_config_dict(model)
    start = time.perf_counter()
    hf_config = build_config(config)
    with grouped_mm_dtype_error():
        run, counts, modules = _build_and_step(hf_config, setup, fake=fake, experts=experts)
    return _result(name, hf_config, setup, run, counts, modules, fake=fake, experts=experts,
                   seconds=time.perf_counter() - start)


@contextlib.contextmanager
def quiet():
    """The library never prints: silence Python warnings and transformers' logger (deprecation
    notes, 'use_cache=True is incompatible with gradient checkpointing') while tracing."""
    import warnings

    from transformers.utils import logging

    level = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.set_verbosity(level)


@contextlib.contextmanager
def grouped_mm_dtype_error():
    """torch's _grouped_mm (CUDA kernel and its meta twin) takes bf16 only: transformers'
    default MoE path then fails on fp32 expert weights (fp32 training, mixed-precision full
    fine-tunes, and QLoRA, whose k-bit preparation casts the unquantized experts to fp32).
    Say so in one line."""
    try:
        yield
    except RuntimeError as exc:
        if "Expected inputs of BF16 type" not in str(exc):
            raise
        raise SetupError("transformers' grouped_mm MoE experts need bf16 expert weights (torch "
                         "_grouped_mm), and this setup keeps them in fp32: HF would fail the "
                         "same way; trace the per-expert loop with --experts eager") from None


def _build_and_step(hf_config, setup: TrainSetup, *, fake: bool, experts: str):
    """(StepRun, (num_parameters, num_trainable), module peaks) of one step inside the tensor
    mode (module peaks are read while the model lives: the tracker holds modules weakly)."""
    import torch

    from estimator.trace.fake import tensor_mode
    from estimator.trace.hf import PEFT_PREFIX, build_model, make_optimizer, trainable
    from estimator.trace.quantize import quant_state_tensors
    from estimator.trace.step import run_step
    from estimator.trace.tracker import module_peaks

    torch.manual_seed(0)
    with quiet(), tensor_mode(fake):
        net = build_model(hf_config, setup, fake=fake, experts=experts)
        params = trainable(net)
        counts = (sum(p.numel() for p in net.parameters()), sum(p.numel() for p in params))
        optimizer = make_optimizer(params, setup.optimizer)
        run = run_step(net, optimizer, setup, vocab_size=hf_config.vocab_size, fake=fake,
                       extra_params=list(quant_state_tensors(net)))
        modules = module_peaks(run.tracker, PEFT_PREFIX if setup.trains_adapters else "")
    return run, counts, modules


def _result(name: str, hf_config, setup: TrainSetup, run, counts, modules, *, fake: bool,
            experts: str, seconds: float) -> TraceResult:
    """The TraceResult of a finished step."""
    from estimator.trace.hf import PEFT_PREFIX
    from estimator.trace.notes import assumptions
    from estimator.trace.tracker import display_name, peak_bytes, peak_components, top_modules

    tracker = run.tracker
    prefix = PEFT_PREFIX if setup.trains_adapters else ""
    return TraceResult(
        model_name=name, model_type=hf_config.model_type, framework="hf", setup=setup,
        fake=fake, peak_bytes=peak_bytes(tracker), peak_phase=tracker.peak_phase,
        peak_module=display_name(tracker.peak_module, prefix),
        peak_components=peak_components(tracker), phase_peaks=dict(tracker.phase_peaks),
        top_modules=top_modules(modules, TOP_MODULES),
        num_parameters=counts[0], num_trainable_parameters=counts[1],
        assumptions=assumptions(setup, hf_config, run, fake=fake, experts=experts),
        trace_seconds=round(seconds, 3))


def trace_report(model: str, setup: TrainSetup, *, device: str = "h100-sxm",
                 framework: str = "hf", experts: str = "grouped_mm") -> TraceReport:
    """trace_step beside estimator.api.estimate of the same model and setup on `device`."""
    from estimator.trace.analytic import analytic_side

    result = trace_step(model, setup, framework=framework, experts=experts)
    side, note = analytic_side(model, setup, device)
    return TraceReport(trace=result, estimate=side, estimate_note=note)
