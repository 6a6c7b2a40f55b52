"""What the fuzz tests of issue 21 draw from and what they assert of every answer: values a
careless or hostile user gives (wrong types, out-of-range and non-finite numbers, garbage text)
mixed with plausible ones, and the check that an answer is strict JSON with no negative or
non-finite quantity.

Budget: NVFREE_FUZZ_EXAMPLES (default 100–200 per test in CI); benchmarks/fuzz_large.py sets
10,000."""

import copy
import json
import math
import os

from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("NVFREE_FUZZ_EXAMPLES", "0")) or None
"""The large budget when set (examples per fuzz test), else each test's CI default."""

HUGE_INT = 10**60
PRESETS = ["smollm2-135m", "llama-3.1-8b", "qwen2.5-7b", "mixtral-8x7b", "longcat-flash",
           "deepseek-v3"]
DEVICES = ["local", "h100-sxm", "mi300x", "m4-max", "tpu-v5e", "gaudi3", "cpu", "nope"]
WORDS = ["", " ", "x", "lora", "qlora", "full", "inference", "fp32", "bf16", "fp16", "auto", "hf",
         "nvfree", "torchtune", "litgpt", "adamw", "adamw8bit", "sgd", "sdpa", "eager",
         "optimizer", "optimizer_and_params", "none", "all-linear", "q_proj,v_proj", "time",
         "cost", "é" * 3, "x" * 300, "../../etc/passwd", "1e9", "nan", "-1", "0", "3"]
NUMBERS_TEXT = ["0", "1", "2", "3", "4", "8", "16", "256", "2048", "-1", "0.5", "1e-9", "7e9",
                "56e9", "1e6", "1e12", "nan", "inf", "-inf", "1e309", "9" * 60, "3.7", "1_000",
                "0x10", "", "abc"]

finite_numbers = st.one_of(st.integers(min_value=-5, max_value=5000),
                           st.sampled_from([0.0, 0.5, 1e-300, 1.5, 7e9, 56e9, 1e14, 1e16, 1e30]))
hostile_numbers = st.one_of(st.sampled_from([float("nan"), float("inf"), float("-inf"), -1e-9,
                                             -7e9, HUGE_INT, -HUGE_INT, 2**63, 1e309]),
                            st.floats(allow_nan=True, allow_infinity=True))
wrong_kinds = st.sampled_from([None, True, False, "", "x", "4", [], {}, [1, 2], {"a": 1},
                               b"\xff", object(), ("q_proj",)])
any_value = st.one_of(finite_numbers, hostile_numbers, wrong_kinds, st.sampled_from(WORDS),
                      st.sampled_from(PRESETS + DEVICES))

TYPICAL: dict[str, list] = {
    "params": [1e8, 7e9, 56e9], "active_params": [1e9, 5e9], "active_ratio": [0.1, 0.5],
    "method": ["lora", "qlora", "full"], "bits": [4, 8, 16, 32],
    "dtype": ["fp32", "bf16", "fp16", "auto"],
    "framework": ["hf", "nvfree", "torchtune", "litgpt"], "lora_rank": [8, 16, 64],
    "lora_alpha": [16, 32.0], "lora_targets": ["all-linear", "q_proj,v_proj"],
    "lora_dropout": [0.0, 0.05], "batch_size": [1, 2, 8], "seq_len": [256, 2048, 8192],
    "grad_accum": [1, 4], "optimizer": ["adamw", "sgd", "adamw8bit"],
    "attention": ["sdpa", "eager"],
    "num_devices": [1, 2, 8], "nodes": [1, 2], "zero": [0, 1, 2, 3],
    "offload": ["none", "optimizer"], "expert_parallel": [1, 2, 8], "tokens": [1e6, 1e8],
    "link_gbit_per_second": [10, 400], "link": [10, 400], "objective": ["time", "cost"],
    "max_hours": [1, 100], "max_cost": [10, 1000], "max_devices": [1, 8, 64],
    "device": ["h100-sxm", "mi300x", "m4-max", "local"], "device_memory": [24, 80],
    "devices": ["mi300x", "m4-max,h100-sxm"], "global_batch": [8, 64], "top": [1, 5],
    "memory_limit": [8, 16], "seed": [0, 3], "text_field": ["text"], "torch_device": ["cpu"],
    "max_steps": [1, 4], "lr": [1e-4], "warmup_steps": [0, 2], "max_grad_norm": [1.0],
    "checkpoint_every": [1, 10], "nproc": [1, 2], "nnodes": [1], "node_rank": [0],
    "amortise_years": [3], "usd_per_kwh": [0.2], "experts": [2],
}
"""Plausible values per argument (library names; a flag --lora-rank is lora_rank), drawn more
often than hostile ones so that many calls get past the first check and answer."""


@st.composite
def value_for(draw, name: str):
    """A value for one argument: TYPICAL three times in four, else anything (hypothesis draws
    the simplest integer, 0, most often: 3 is the rare branch)."""
    typical = TYPICAL.get(name)
    if not typical or draw(st.integers(0, 3)) == 3:
        return draw(any_value)
    return draw(st.sampled_from(typical))


def bad_numbers(value, path: str = "") -> list[tuple[str, float]]:
    """Every non-finite or negative number in a JSON-like value, as (path, value): every
    number of estimate's, compare's and plan's answers is a quantity (bytes, seconds, tokens,
    dollars, counts, ratios)."""
    out, stack = [], [(path, value)]
    while stack:
        where, item = stack.pop()
        if isinstance(item, dict):
            stack += [(f"{where}.{k}", v) for k, v in item.items()]
        elif isinstance(item, list):
            stack += [(f"{where}[{i}]", v) for i, v in enumerate(item)]
        elif isinstance(item, float | int) and not isinstance(item, bool) and (
                not math.isfinite(item) or item < 0):
            out.append((where, item))
    return out


def strict_json(text: str):
    """The parsed JSON, refusing NaN and Infinity (Python's json accepts them by default)."""
    def refuse(token: str):
        raise ValueError(f"non-strict JSON token {token}")
    return json.loads(text, parse_constant=refuse)


def paths_of(value, prefix=()) -> list[tuple]:
    """Every key path into a JSON value (objects and arrays, the root excluded)."""
    out = []
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, child in items:
        out.append((*prefix, key))
        out += paths_of(child, (*prefix, key))
    return out


WRONG_TYPES = [None, True, False, "x", "", [], {}, [1, 2], {"a": 1}, 1.5, 0, -1]
OUT_OF_RANGE = [-1, 0, -(10**30), 10**30, 2**63, 2**64, 10**400, 1e308, -1e308,
                float("inf"), float("-inf"), float("nan"), 1e-320]
MUTATIONS = ["type", "range", "nesting", "delete", "extra", "non_utf8", "string"]


def _set(data, path, value) -> None:
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value


def _delete(data, path) -> None:
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]


@st.composite
def mutated_json(draw, base: dict) -> bytes:
    """A JSON file (a plan, a config.json, a profile, a checkpoint's state) with one field
    changed: a wrong type, a value out of range, deep nesting, the
    key removed, an unknown key beside it, or its text made invalid UTF-8."""
    data = copy.deepcopy(base)
    path = draw(st.sampled_from(paths_of(data)))
    kind = draw(st.sampled_from(MUTATIONS))
    if kind == "type":
        _set(data, path, draw(st.sampled_from(WRONG_TYPES)))
    elif kind == "range":
        _set(data, path, draw(st.sampled_from(OUT_OF_RANGE)))
    elif kind == "nesting":
        depth = draw(st.sampled_from([2, 50, 65, 200, 5000, 100_000]))
        _set(data, path, "\u0000NEST\u0000")
    elif kind == "delete":
        _delete(data, path)
    elif kind == "extra":
        _set(data, (*path[:-1], "unexpected_field"), 1) if isinstance(path[-1], str) else \
            _set(data, path, {"unexpected_field": 1})
    elif kind == "string":
        _set(data, path, draw(st.text(max_size=300)))
    else:
        _set(data, path, "\u0000MARK\u0000")
    raw = json.dumps(data, indent=1).encode()  # NaN/Infinity as the non-strict tokens
    if kind == "nesting":
        raw = raw.replace(b'"\\u0000NEST\\u0000"', b"[" * depth + b"1" + b"]" * depth)
    return raw.replace(b'"\\u0000MARK\\u0000"', b'"\xff\xfe\xc3"')
