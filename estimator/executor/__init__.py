"""The bundled PyTorch executor: builds the ModelSpec, applies LoRA/NF4/checkpointing, trains.

Submodules import torch; this package module imports nothing heavy, so ``import estimator.executor``
stays cheap. Use ``from estimator.executor.model import build_model`` and friends directly.
"""
