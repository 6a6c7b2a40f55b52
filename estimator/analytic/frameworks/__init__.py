"""Per-framework memory terms: what each training code saves and allocates.

`nvfree` is the bundled trainer (estimator/analytic/activations.py and memory.py derive its
terms from estimator/executor/); `hf` is Transformers' Trainer + PEFT + bitsandbytes
(frameworks/hf.py); `torchtune` and `litgpt` are those projects' recipes and finetune scripts
(frameworks/torchtune.py, frameworks/litgpt.py). docs/frameworks.md says where each term comes
from.
"""

import importlib
from types import ModuleType

FRAMEWORKS = ("nvfree", "hf", "torchtune", "litgpt")
"""Every framework an estimate can describe."""
OWN_TERMS = ("torchtune", "litgpt")
"""Frameworks whose terms module the shared term functions dispatch to (hf has its own lines)."""


def terms(framework: str) -> ModuleType:
    """The terms module of a framework in OWN_TERMS (imported on first use)."""
    return importlib.import_module(f"estimator.analytic.frameworks.{framework}")


def as_run(setup):
    """The setup as its framework runs it (e.g. torchtune trains in one dtype without
    autocast, whatever mixed_precision says): each OWN_TERMS module's `as_run`; other
    frameworks' setups unchanged. The shared terms (weights, master copy, gradients, optimizer
    states) then read the framework's real precision."""
    if setup.framework not in OWN_TERMS:
        return setup
    return terms(setup.framework).as_run(setup)
