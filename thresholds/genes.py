"""Binary genes for thresholds (seed 004 Alg. 2) and the DEAP plumbing shared by both searches.

An individual is a flat list of K·bits 0/1 genes; each group of `bits` genes is one threshold
level i, most significant bit first, decoded to i / (2**bits − 1) so that both 0.0 and 1.0
(exit disabled) are reachable. The level is Gray-coded by default: adjacent thresholds then
differ by a single bit flip, which removes the "Hamming cliffs" of plain binary (0.4999 → 0.5
flips every bit) and makes the search reliably reach the grid optimum; `gray=False` gives the
plain binary code of the paper.

DEAP's operators draw from the module-level `random`. So that a search is reproducible from its
own seed and leaves the caller's random state untouched, `private_random` swaps the search's own
`random.Random` state in for the duration of the search (under a lock, so concurrent searches do
not interleave their streams).
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from thresholds.errors import TuningError

MAX_BITS = 30
_RANDOM_LOCK = threading.Lock()


def check_bits(bits: int) -> int:
    if not isinstance(bits, int) or not 2 <= bits <= MAX_BITS:
        raise TuningError(f"--bits must be an integer in [2, {MAX_BITS}], got {bits}")
    return bits


def decode(genes: np.ndarray, num_exits: int, bits: int, gray: bool = False) -> np.ndarray:
    """P×(K·bits) 0/1 genes -> P×K thresholds in [0, 1]."""
    matrix = np.asarray(genes, dtype=np.int64)
    if matrix.ndim == 1:
        matrix = matrix[None, :]
    if matrix.shape[1] != num_exits * bits:
        raise TuningError(f"expected {num_exits * bits} genes, got {matrix.shape[1]}")
    groups = matrix.reshape(matrix.shape[0], num_exits, bits)
    if gray:
        groups = np.bitwise_xor.accumulate(groups, axis=2)
    weights = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    levels = groups @ weights
    return levels / float((1 << bits) - 1)


def encode(thresholds: np.ndarray | list[float], bits: int, gray: bool = False) -> list[int]:
    """K thresholds -> K·bits genes (nearest level)."""
    top = (1 << bits) - 1
    genes: list[int] = []
    for t in np.asarray(thresholds, dtype=np.float64).ravel():
        level = int(round(float(np.clip(t, 0.0, 1.0)) * top))
        if gray:
            level ^= level >> 1
        genes.extend((level >> shift) & 1 for shift in range(bits - 1, -1, -1))
    return genes


def make_types(weights: tuple[float, ...]) -> tuple[type, type]:
    """Fresh Fitness and Individual classes, the equivalent of `deap.creator.create`.

    Built per call, never registered on the global `deap.creator` module, so repeated or
    concurrent searches with different weights cannot clash.
    """
    from deap import base

    fitness_cls = type("ThresholdFitness", (base.Fitness,), {"weights": weights})

    class ThresholdIndividual(list[int]):
        def __init__(self, genes: Iterable[int] = ()) -> None:
            super().__init__(genes)
            self.fitness = fitness_cls()

    return fitness_cls, ThresholdIndividual


def variation_toolbox(length: int, bit_flip_prob: float | None) -> Any:
    """A DEAP toolbox with the variation operators both searches use: cheap clone, two-point
    crossover, bit-flip mutation (default rate: two flipped bits per individual)."""
    from deap import base, tools

    toolbox = base.Toolbox()
    toolbox.register("clone", clone)
    toolbox.register("mate", tools.cxTwoPoint)
    flip = bit_flip_prob if bit_flip_prob is not None else min(1.0, 2.0 / length)
    toolbox.register("mutate", tools.mutFlipBit, indpb=flip)
    return toolbox


def clone(individual: Any) -> Any:
    """A cheap copy (genes and fitness) — much faster than deepcopy in the inner loop."""
    twin = type(individual)(individual)
    if individual.fitness.valid:
        twin.fitness.values = individual.fitness.values
    return twin


@contextmanager
def private_random(rng: random.Random) -> Iterator[None]:
    """Run DEAP's operators on `rng`'s stream; restores the global random state afterwards."""
    with _RANDOM_LOCK:
        saved = random.getstate()
        random.setstate(rng.getstate())
        try:
            yield
        finally:
            rng.setstate(random.getstate())
            random.setstate(saved)
