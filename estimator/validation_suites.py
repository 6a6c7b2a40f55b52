"""The configurations `nvfree validate` runs: the fixed suites (quick, full) and the random
suite — configurations drawn from a seed over architecture, method, precision, optimizer,
batch, sequence, checkpointing and LoRA targets, so that accuracy is measured on
configurations nobody chose. Pure (no torch).

The random suite draws a configuration, predicts its run with the estimate of this machine
(`estimate`, the profile in use) and keeps it only when the predicted peak fits the memory
budget and the predicted run (start-up + steps × step time) the time budget; drawing goes on
until `count` are kept (at most MAX_DRAWS_PER_CASE × count draws). The draws are a
function of the seed alone; which of them are kept also depends on the machine and its
profile (its predictions decide what is too large or too slow).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from estimator.errors import ConfigError
from estimator.specs import LINEAR_TARGETS, ModelSpec, TrainSetup

TINY_MODELS: dict[str, dict] = {
    "small-vocab": {"model_type": "llama", "hidden_size": 512, "intermediate_size": 1408,
                    "num_hidden_layers": 8, "num_attention_heads": 8,
                    "num_key_value_heads": 4, "vocab_size": 8192,
                    "tie_word_embeddings": True},
    "large-vocab": {"model_type": "qwen2", "hidden_size": 256, "intermediate_size": 704,
                    "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 2, "vocab_size": 151936,
                    "tie_word_embeddings": True},
    "tiny-moe": {"model_type": "mixtral", "hidden_size": 384, "intermediate_size": 768,
                 "num_hidden_layers": 6, "num_attention_heads": 6, "num_key_value_heads": 2,
                 "vocab_size": 8192, "num_local_experts": 8, "num_experts_per_tok": 2,
                 "tie_word_embeddings": False},
}
"""Models written as config.json for the suite: small and large vocabularies, and an MoE."""

MOE_STEPS = 12
"""MoE runs take more steps: oneDNN compiles a kernel the first time an expert receives a new
(padded or cut) row count, which happens through the first ~6 steps (all 16 row counts of the
tiny MoE appeared within 6 steps); the median of 10 measured steps is then a steady step.
Measured: tiny-moe LoRA bf16 0.29–0.32 s per step after 4 warm-up steps, 0.47 s as the median
of steps 3–5."""
DENSE_STEPS = 6


@dataclass(frozen=True)
class Case:
    """One validation run: a model and the `nvfree train` flags of its setup."""

    case_id: str
    model: str
    """Preset name or a TINY_MODELS key (fixed suites), or the case id (random suite)."""
    flags: tuple[str, ...]
    max_steps: int = DENSE_STEPS
    config: dict[str, Any] | None = field(default=None, compare=False)
    """The HF config.json of a drawn model (random suite); None for presets and TINY_MODELS."""


def _case(model: str, method: str, dtype: str, *extra: str, steps: int = DENSE_STEPS,
          batch: int = 2, seq: int = 256) -> Case:
    flags = ("--method", method, "--dtype", dtype, "-b", str(batch), "-s", str(seq), *extra)
    name = "-".join([model, method, dtype, f"b{batch}s{seq}",
                     *(e.strip("-") for e in extra)])
    return Case(name, model, flags, steps)


def fixed_suite(name: str) -> list[Case]:
    """The quick suite (3 small runs, about a minute) or the full one (dense and MoE; full,
    LoRA, QLoRA; fp32, bf16 mixed and pure; checkpointing; vocabularies; batch/sequence)."""
    quick = [_case("small-vocab", "full", "fp32", steps=5),
             _case("small-vocab", "lora", "bf16", steps=5),
             _case("tiny-moe", "lora", "bf16", steps=MOE_STEPS)]
    if name == "quick":
        return quick
    if name != "full":
        raise ConfigError(f"unknown suite '{name}': quick, full or random")
    dense = "smollm2-135m"
    return [
        *quick,
        _case(dense, "full", "fp32"),
        _case(dense, "full", "bf16"),
        _case(dense, "full", "bf16", "--no-mixed-precision"),
        _case(dense, "full", "bf16", "--checkpointing"),
        _case(dense, "full", "bf16", "--optimizer-in-backward"),
        _case(dense, "lora", "fp32"),
        _case(dense, "lora", "bf16"),
        _case(dense, "lora", "bf16", "--checkpointing"),
        _case(dense, "lora", "bf16", batch=4, seq=128),
        _case(dense, "lora", "bf16", batch=1, seq=512),
        _case(dense, "qlora", "bf16"),
        _case("small-vocab", "full", "bf16", "--optimizer", "adamw8bit"),
        _case("large-vocab", "full", "bf16"),
        _case("large-vocab", "lora", "fp32"),
        _case("tiny-moe", "full", "fp32", steps=MOE_STEPS),
        _case("tiny-moe", "full", "bf16", steps=MOE_STEPS),
        _case("tiny-moe", "qlora", "bf16", steps=MOE_STEPS),
    ]


# ----------------------------------------------------------------------------- random suite

@dataclass(frozen=True)
class Bounds:
    """What the random suite draws from (architecture and setup ranges)."""

    hidden: tuple[int, int] = (128, 1024)
    """Width range (multiples of 64: NF4 quantises blocks of 64)."""
    layers: tuple[int, int] = (2, 16)
    vocab: tuple[int, int] = (8_000, 152_000)
    """Drawn log-uniformly (8k-word tokenizers to Qwen's 151,936)."""
    head_dims: tuple[int, ...] = (32, 64, 64, 128)
    ffn_ratio: tuple[float, float] = (2.0, 4.0)
    experts: tuple[int, ...] = (4, 8, 16)
    experts_per_token: tuple[int, ...] = (1, 2)
    moe_share: float = 0.3
    dense_types: tuple[str, ...] = ("llama", "qwen2", "qwen3")
    moe_types: tuple[str, ...] = ("mixtral", "qwen3_moe")
    methods: tuple[str, ...] = ("full", "full", "lora", "lora", "qlora")
    precisions: tuple[tuple[str, bool], ...] = (("fp32", False), ("bf16", True),
                                                ("bf16", False))
    """(compute dtype, mixed precision); QLoRA draws its compute dtype from fp32 and bf16."""
    optimizers: tuple[str, ...] = ("adamw", "adamw", "adamw", "adamw8bit", "adamw8bit", "sgd",
                                   "sgd_momentum", "adafactor")
    batches: tuple[int, ...] = (1, 2, 4, 8)
    seqs: tuple[int, ...] = (64, 128, 256, 512, 1024)
    checkpointing_share: float = 0.35
    ranks: tuple[int, ...] = (4, 8, 16, 32, 64)
    target_sets: tuple[tuple[str, ...], ...] = (
        LINEAR_TARGETS, ("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "o_proj"),
        ("gate_proj", "up_proj", "down_proj"), ())
    """LoRA targets: all-linear, q+v, attention, MLP, or () = a random non-empty subset."""


BOUNDS = Bounds()


def _round64(value: float) -> int:
    return max(64, 64 * round(value / 64))


def draw_model(rng: random.Random, bounds: Bounds = BOUNDS) -> dict[str, Any]:
    """An HF config.json (dict) of a random decoder: dense or MoE, width, depth, heads and KV
    heads, FFN width, vocabulary, tied embeddings."""
    hidden = 64 * rng.randint(bounds.hidden[0] // 64, bounds.hidden[1] // 64)
    head_dim = rng.choice([d for d in bounds.head_dims if hidden % d == 0 and hidden // d <= 32])
    heads = hidden // head_dim
    kv = rng.choice([k for k in range(1, heads + 1) if heads % k == 0])
    vocab = round(math.exp(rng.uniform(math.log(bounds.vocab[0]), math.log(bounds.vocab[1]))))
    moe = rng.random() < bounds.moe_share
    config: dict[str, Any] = {
        "model_type": rng.choice(bounds.moe_types if moe else bounds.dense_types),
        "hidden_size": hidden, "num_hidden_layers": rng.randint(*bounds.layers),
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
        "vocab_size": vocab, "tie_word_embeddings": rng.random() < 0.5,
        "intermediate_size": _round64(hidden * rng.uniform(*bounds.ffn_ratio)),
        "max_position_embeddings": 4096}
    if moe:
        experts = rng.choice(bounds.experts)
        per_token = rng.choice(bounds.experts_per_token)
        expert_ffn = _round64(hidden * rng.uniform(0.5, 2.0))
        if config["model_type"] == "mixtral":
            config.update(num_local_experts=experts, num_experts_per_tok=per_token,
                          intermediate_size=expert_ffn)
        else:
            config.update(num_experts=experts, num_experts_per_tok=per_token,
                          moe_intermediate_size=expert_ffn, norm_topk_prob=True)
    return config


def draw_setup(rng: random.Random, model: ModelSpec, bounds: Bounds = BOUNDS) -> TrainSetup:
    """A random setup of the bundled trainer, as `nvfree train` builds it from its flags."""
    method = rng.choice(bounds.methods)
    if method == "qlora":
        compute, mixed = rng.choice([("fp32", False), ("bf16", True)])
    else:
        compute, mixed = rng.choice(bounds.precisions)
    targets = rng.choice(bounds.target_sets) or tuple(
        t for t in LINEAR_TARGETS if rng.random() < 0.5) or ("q_proj",)
    rank = min(rng.choice(bounds.ranks), model.hidden_size)
    return TrainSetup(
        framework="nvfree", method=method,  # type: ignore[arg-type]
        weight_bits=4 if method == "qlora" else (32 if compute == "fp32" else 16),
        compute_dtype=compute, mixed_precision=mixed and compute != "fp32",  # type: ignore[arg-type]
        optimizer=rng.choice(bounds.optimizers),  # type: ignore[arg-type]
        batch_size=rng.choice(bounds.batches), seq_len=rng.choice(bounds.seqs),
        checkpointing=rng.random() < bounds.checkpointing_share, lora_rank=rank,
        lora_alpha=2.0 * rank, lora_targets=targets)


def setup_flags(setup: TrainSetup) -> tuple[str, ...]:
    """The `nvfree train` flags that build `setup` (cli/options.resolve_setup's inverse)."""
    flags = ["--method", setup.method, "--dtype", setup.compute_dtype,
             "-b", str(setup.batch_size), "-s", str(setup.seq_len),
             "--optimizer", setup.optimizer]
    if setup.compute_dtype != "fp32" and not setup.mixed_precision:
        flags.append("--no-mixed-precision")
    if setup.checkpointing:
        flags.append("--checkpointing")
    if setup.method != "full":
        flags += ["--lora-rank", str(setup.lora_rank), "--lora-alpha", f"{setup.lora_alpha:g}",
                  "--lora-targets", ",".join(setup.lora_targets)]
    return tuple(flags)


def describe(index: int, config: dict[str, Any], setup: TrainSetup) -> str:
    """A case id that says what was drawn: r03-qwen3_moe8x2-d384x6-h6kv2-v53421-tied-lora-
    bf16-adamw-b2s256-ckpt-r16qv."""
    moe = config.get("num_local_experts") or config.get("num_experts")
    arch = config["model_type"] + (f"{moe}x{config['num_experts_per_tok']}" if moe else "")
    precision = setup.compute_dtype + ("" if setup.mixed_precision or setup.compute_dtype ==
                                       "fp32" else "pure")
    parts = [f"r{index:02d}", arch, f"d{config['hidden_size']}x{config['num_hidden_layers']}",
             f"h{config['num_attention_heads']}kv{config['num_key_value_heads']}",
             f"v{config['vocab_size']}", "tied" if config["tie_word_embeddings"] else "untied",
             setup.method, precision, setup.optimizer, f"b{setup.batch_size}s{setup.seq_len}"]
    if setup.checkpointing:
        parts.append("ckpt")
    if setup.method != "full":
        short = "".join(t[0] if t.endswith("_proj") else t for t in setup.lora_targets)
        parts.append(f"r{setup.lora_rank}{'all' if len(setup.lora_targets) == 7 else short}")
    return "-".join(parts)


@dataclass(frozen=True)
class Budget:
    """What a drawn configuration may cost on this machine, by its own prediction."""

    memory_bytes: int
    """Largest predicted peak (bytes)."""
    case_seconds: float
    """Largest predicted run: start-up + steps × step time (seconds)."""
    startup_seconds: float = 15.0
    """Process start, imports, data and model build before the first step (seconds)."""


MAX_DRAWS_PER_CASE = 50

Predict = Callable[[ModelSpec, TrainSetup], tuple[int, float]]
"""(predicted peak bytes, predicted step seconds) of a configuration on this machine."""


def random_suite(seed: int, count: int, budget: Budget, predict: Predict,
                 bounds: Bounds = BOUNDS) -> tuple[list[Case], list[str]]:
    """`count` configurations drawn from `seed` that fit the budget by their own prediction:
    (cases, one line per draw that was skipped and why)."""
    from estimator.catalog.hf import spec_from_hf_dict
    from estimator.checks import trainer_limits
    from estimator.errors import NvfreeError

    rng = random.Random(seed)
    cases: list[Case] = []
    skipped: list[str] = []
    for _ in range(MAX_DRAWS_PER_CASE * count):
        if len(cases) == count:
            break
        config = draw_model(rng, bounds)
        index = len(cases) + len(skipped)
        try:
            model = spec_from_hf_dict(config, source="nvfree validate --suite random",
                                      name=f"random-{seed}-{index}")
            setup = draw_setup(rng, model, bounds)
            limits = trainer_limits(model, setup)
            if limits:
                skipped.append(f"draw {index}: the trainer cannot run {limits[0]}")
                continue
            peak, step = predict(model, setup)
        except (NvfreeError, ValueError) as exc:
            skipped.append(f"draw {index}: {str(exc).splitlines()[0]}")
            continue
        steps = MOE_STEPS if model.moe is not None else DENSE_STEPS
        seconds = budget.startup_seconds + steps * step
        label = describe(index, config, setup)
        if peak > budget.memory_bytes:
            skipped.append(f"{label}: predicted peak {peak / 2**30:.1f} GiB over the budget")
        elif seconds > budget.case_seconds:
            skipped.append(f"{label}: predicted run {seconds:.0f} s over the budget")
        else:
            cases.append(Case(label, label, setup_flags(setup), steps, config))
    return cases, skipped
