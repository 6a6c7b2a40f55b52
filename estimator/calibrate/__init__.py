"""TORCH zone: microbenchmarks of this machine and the fit of per-op-class efficiency curves.

Importing this package does not import torch; `estimator.calibrate.run.calibrate()` does.
"""
