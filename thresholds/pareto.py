"""NSGA-II over binary threshold genes: the accuracy × acceleration trade-off front.

Same genes, seeding, crossover and mutation as the GA in `thresholds.search`; selection is
DEAP's `selNSGA2` (non-dominated sorting + crowding distance) over parents and offspring, mates
chosen by `selTournamentDCD`. Every distinct vector scored is kept, and the result is the
non-dominated subset of all of them, one vector per (accuracy, acceleration) point.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from thresholds.costs import CostModel
from thresholds.evaluate import ExitTable, Metrics, PopulationMetrics, evaluate_population
from thresholds.frontier import nondominated
from thresholds.genes import make_types, private_random, variation_toolbox
from thresholds.objectives import Objective
from thresholds.search import GAConfig, PopulationScorer, progress_bar, seed_genes

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParetoResult:
    front: list[Metrics]  # non-dominated, by falling acceleration
    generations: int
    evaluations: int
    seconds: float

    def choose(self, objective: Objective) -> tuple[Metrics, float]:
        """The front point that best meets `objective` (ties: the more accurate).

        With a confidence margin this is the best *front* point under the bound; a dominated
        vector with fewer discordant rows (a smaller paired SE) could meet it at a higher
        acceleration, so the GA is the exact tool for that mode.
        """
        accuracy = np.array([m.accuracy for m in self.front])
        acceleration = np.array([m.acceleration for m in self.front])
        discordant = np.array([m.discordant_rows for m in self.front])
        score = objective.score(accuracy, acceleration, discordant)
        candidates = np.flatnonzero(score == score.max())
        best = int(candidates[np.argmax(accuracy[candidates])])
        return self.front[best], float(score[best])

    def to_rows(self) -> list[dict[str, Any]]:
        return [m.to_dict() for m in self.front]


def run_nsga2(table: ExitTable, costs: CostModel, config: GAConfig | None = None) -> ParetoResult:
    """Search the (accuracy, acceleration) front; deterministic for a given `config.seed`.

    The population is rounded up to a multiple of 4 (a requirement of `selTournamentDCD`).
    """
    from deap import algorithms, tools

    config = config or GAConfig()
    start = time.perf_counter()
    k, bits = table.num_exits, config.bits
    length = k * bits
    size = -(-config.population // 4) * 4
    _, individual_cls = make_types((1.0, 1.0))

    def fitness_of(scored: PopulationMetrics) -> list[tuple[float, float]]:
        pairs = zip(scored.accuracy, scored.acceleration, strict=True)
        return [(float(a), float(s)) for a, s in pairs]

    scorer = PopulationScorer(table, costs, bits, fitness_of, config.gray)
    toolbox = variation_toolbox(length, config.bit_flip_prob)
    rng = random.Random(config.seed)
    generation = 0
    with private_random(rng), progress_bar(config.generations, config.progress, "NSGA-II") as bar:
        population = [individual_cls(g) for g in seed_genes(k, bits, config.gray)]
        while len(population) < size:
            population.append(individual_cls(random.getrandbits(1) for _ in range(length)))
        evaluations = scorer(population)
        population = tools.selNSGA2(population, size)  # assigns crowding distances
        front_signature, stale = b"", 0
        for generation in range(1, config.generations + 1):
            offspring = algorithms.varAnd(
                tools.selTournamentDCD(population, size),
                toolbox,
                config.crossover_prob,
                config.mutation_prob,
            )
            nevals = scorer([i for i in offspring if not i.fitness.valid])
            evaluations += nevals
            population = tools.selNSGA2(population + offspring, size)
            bar.update(1)
            # Stop once the archive's front has not changed for `patience` generations.
            explored = scorer.explored()
            keep = nondominated(explored[:, k], explored[:, k + 1])
            signature = explored[keep, k:].tobytes()
            bar.set_postfix(front=len(keep))
            stale = stale + 1 if signature == front_signature else 0
            front_signature = signature
            if config.patience and stale >= config.patience:
                logger.info("NSGA-II stopped early at generation %d", generation)
                break
    explored = scorer.explored()
    keep = nondominated(explored[:, k], explored[:, k + 1])
    thresholds = explored[keep, :k]
    scored = evaluate_population(table, thresholds, costs)
    front = [scored.row(i) for i in range(len(scored))]
    seconds = time.perf_counter() - start
    logger.info(
        "NSGA-II: %d front points after %d generations (%d vectors), %.2fs",
        len(front),
        generation,
        evaluations,
        seconds,
    )
    return ParetoResult(
        front=front, generations=generation, evaluations=evaluations, seconds=seconds
    )
