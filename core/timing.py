"""Wall-clock timing of variants side by side, the one protocol every measured speed ratio in
this project uses (`earlyexit-bench`, `earlyexit-compare --latency`, the scripts): warm blocks,
turns rotated from repeat to repeat, medians. The host is noisy; ratios measured this way in one
process are what the results report."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def time_variants(
    variants: dict[str, Callable[[np.ndarray], Any]],
    batches: list[np.ndarray],
    repeats: int,
) -> dict[str, float]:
    """Median over repeats of the seconds each variant takes for all `batches`
    (`time_variant_runs`)."""
    runs = time_variant_runs(variants, batches, repeats)
    return {name: float(np.median(values)) for name, values in runs.items()}


def time_variant_runs(
    variants: dict[str, Callable[[np.ndarray], Any]],
    batches: list[np.ndarray],
    repeats: int,
) -> dict[str, list[float]]:
    """The seconds each variant takes for all `batches`, one entry per repeat.

    Each variant runs every batch back to back (one block, its caches warm, as a server running
    only that variant), and the blocks take turns in an order rotated from repeat to repeat, so
    slow drifts in load fall on all variants alike. Interleaving the variants batch by batch
    instead is biased: variants that share onnxruntime sessions keep each other's weights in
    cache while the single-graph model always starts cold (batch 1, default bundle: 1.53× speedup
    interleaved against 1.22–1.39× in warm blocks, same rows, same process).
    """
    names = list(variants)
    for name in names:  # warm-up: first-run allocations are not what we measure
        variants[name](batches[0])
    totals: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        turn = r % len(names)
        for name in names[turn:] + names[:turn]:
            fn = variants[name]
            start = time.perf_counter()
            for batch in batches:
                fn(batch)
            totals[name].append(time.perf_counter() - start)
    return totals
