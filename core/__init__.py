"""What every package shares, torch-free: the bundle format and its verification, atomic
writers, the early-exit decision rule, costs and acceleration, calibration I/O, normalisation
and the dataset readers.

Dependencies point one way: `core` imports numpy, pydantic and the standard library only (and
matplotlib lazily, in `core.plots`), never `training`, `thresholds`, `serving` or `benchmarks`.
The server image ships `core` without `core.datasets` (docker/Dockerfile): serving never reads a
dataset.
"""
