"""Per-framework memory terms: what each training code saves and allocates.

`nvfree` is the bundled trainer (estimator/analytic/activations.py and memory.py derive its
terms from estimator/executor/); `hf` is Transformers' Trainer + PEFT + bitsandbytes
(frameworks/hf.py). docs/frameworks.md says where each term comes from.
"""

FRAMEWORKS = ("nvfree", "hf")
"""Every framework an estimate can describe."""
