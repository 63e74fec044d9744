"""Threshold tuning for early-exit bundles (seed 004 §3.3, Alg. 1-2, eq. 7).

Pure numpy + DEAP over calibration arrays: `evaluate` scores threshold vectors, `search` runs the
genetic algorithm, `pareto` the NSGA-II front, `baselines` the grid and global-threshold
comparisons, `tuning` ties them together for `earlyexit-tune` (`cli`). Importing this package is
cheap; submodules pull in DEAP and matplotlib only when used.
"""

from thresholds.errors import TuningError

__all__ = ["TuningError"]
