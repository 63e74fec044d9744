"""Genetic threshold search with DEAP (seed 004 Alg. 2).

Binary genes (Gray-coded by default, see `thresholds.genes`), tournament selection, two-point crossover, bit-flip
mutation and a hall of fame whose members are carried into every generation (elitism). The
population is seeded with the all-disabled vectors [1, …, 1] and [1, …, 1, 0] (every row answered
at full depth: the final exit's accuracy), so a max-drop search always holds a feasible
individual. Fitness is a pair (objective, accuracy) compared lexicographically: ties in the
objective go to the more accurate vector. Each generation's individuals are scored together in
one vectorised call; the loop stops early once the best has not improved for `patience`
generations.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np

from thresholds.costs import CostModel
from thresholds.errors import TuningError
from thresholds.evaluate import (
    ExitTable,
    Metrics,
    PopulationMetrics,
    evaluate,
    evaluate_population,
)
from thresholds.genes import (
    check_bits,
    clone,
    decode,
    encode,
    make_types,
    private_random,
    variation_toolbox,
)
from thresholds.objectives import Objective

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GAConfig:
    bits: int = 10
    population: int = 100
    generations: int = 100
    crossover_prob: float = 0.7  # per pair
    mutation_prob: float = 0.3  # per individual
    bit_flip_prob: float | None = None  # per gene of a mutated individual; None = 2 / length
    tournament_size: int = 3
    elite: int = 2
    patience: int = 25  # generations without improvement before stopping; 0 = never stop early
    gray: bool = True  # Gray-coded genes: neighbouring levels differ by one bit
    seed: int = 0
    # Independent runs (seeds seed, seed + 1, ...), the best kept: one run can settle on a local
    # optimum a few percent below another seed's (docs/results/tuning).
    restarts: int = 1
    progress: bool | None = None  # tqdm bar; None = only on a terminal

    def __post_init__(self) -> None:
        check_bits(self.bits)
        if self.population < 4:
            raise TuningError(f"--population must be >= 4, got {self.population}")
        if self.generations < 1:
            raise TuningError(f"--generations must be >= 1, got {self.generations}")
        for name in ("crossover_prob", "mutation_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise TuningError(f"{name} must be in [0, 1]")
        if self.bit_flip_prob is not None and not 0.0 < self.bit_flip_prob <= 1.0:
            raise TuningError("bit_flip_prob must be in (0, 1]")
        if self.tournament_size < 1 or not 0 <= self.elite < self.population:
            raise TuningError("tournament_size must be >= 1 and elite in [0, population)")
        if self.patience < 0:
            raise TuningError("patience must be >= 0")
        if self.restarts < 1:
            raise TuningError(f"--restarts must be >= 1, got {self.restarts}")


@dataclass(frozen=True)
class SearchResult:
    """The best vector found, its metrics on the tuning rows and how the search went."""

    thresholds: tuple[float, ...]
    metrics: Metrics
    fitness: float  # the objective's score
    generations: int
    evaluations: int  # distinct threshold vectors scored
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    # Every distinct vector scored: K thresholds, accuracy, acceleration (for plots).
    explored: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    # With restarts: each run's fitness in seed order. Generations and history are the kept
    # run's; evaluations, seconds and explored cover every run.
    restart_fitness: tuple[float, ...] = ()

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {
            "fitness": self.fitness,
            "generations": self.generations,
            "evaluations": self.evaluations,
            "seconds": self.seconds,
        }
        if len(self.restart_fitness) > 1:
            summary["restart_fitness"] = list(self.restart_fitness)
        return summary


# P scored vectors -> one DEAP fitness tuple per vector
FitnessOf = Callable[[PopulationMetrics], list[tuple[float, float]]]


class PopulationScorer:
    """Scores DEAP individuals in bulk, remembering every distinct gene string seen."""

    def __init__(
        self,
        table: ExitTable,
        costs: CostModel,
        bits: int,
        fitness_of: FitnessOf,
        gray: bool = False,
    ) -> None:
        self.table = table
        self.costs = costs
        self.bits = bits
        self.fitness_of = fitness_of
        self.gray = gray
        self.cache: dict[bytes, tuple[float, ...]] = {}
        self.points: list[np.ndarray] = []

    def __call__(self, individuals: list[Any]) -> int:
        """Set the fitness of every individual; returns how many new vectors were scored."""
        if not individuals:
            return 0
        genes = np.asarray(individuals, dtype=np.uint8)
        keys = [row.tobytes() for row in genes]
        new_rows = {}
        for i, key in enumerate(keys):
            if key not in self.cache and key not in new_rows:
                new_rows[key] = i
        if new_rows:
            rows = list(new_rows.values())
            thresholds = decode(genes[rows], self.table.num_exits, self.bits, self.gray)
            scored = evaluate_population(self.table, thresholds, self.costs)
            values = self.fitness_of(scored)
            for key, value in zip(new_rows, values, strict=True):
                self.cache[key] = value
            self.points.append(np.column_stack([thresholds, scored.accuracy, scored.acceleration]))
        for individual, key in zip(individuals, keys, strict=True):
            individual.fitness.values = self.cache[key]
        return len(new_rows)

    def explored(self) -> np.ndarray:
        if not self.points:
            return np.zeros((0, self.table.num_exits + 2))
        return np.concatenate(self.points)


def seed_genes(num_exits: int, bits: int, gray: bool = False) -> list[list[int]]:
    """All exits disabled, and the same with the last exit answering every row."""
    seeds = [encode([1.0] * num_exits, bits, gray)]
    seeds.append(encode([1.0] * (num_exits - 1) + [0.0], bits, gray))
    return seeds


def progress_bar(total: int, enabled: bool | None, desc: str) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="gen",
        disable=None if enabled is None else not enabled,
        leave=False,
    )


def run_ga(
    table: ExitTable, costs: CostModel, objective: Objective, config: GAConfig | None = None
) -> SearchResult:
    """Maximise `objective` over threshold vectors; deterministic for a given `config.seed`.
    With `config.restarts` > 1, that many independent runs (seeds seed, seed + 1, ...); the one
    with the best (fitness, accuracy) is kept, the first on a tie.

    In max-drop mode the returned vector is verified to meet the accuracy floor (or its lower
    confidence bound, with `objective.confidence` > 0) on `table`; TuningError if no evaluated
    vector does (only possible with a baseline other than the final exit on the same rows: the
    seeded full-depth vector meets a floor relative to the final exit with any margin, its
    paired SE being 0).
    """
    config = config or GAConfig()
    start = time.perf_counter()
    runs = [
        _run_once(table, costs, objective, replace(config, seed=config.seed + i))
        for i in range(config.restarts)
    ]
    best = max(runs, key=lambda run: run.fitness)  # (score, accuracy); the first on a tie
    thresholds, generation = best.thresholds, best.generations
    metrics = evaluate(table, thresholds, costs)
    if not bool(objective.feasible(metrics.accuracy, metrics.discordant_rows)):
        raise TuningError(
            f"no thresholds reach {objective.floor_text()} (best found "
            f"{metrics.accuracy:.2f}%); lower the baseline or --confidence, or raise --max-drop"
        )
    fitness = objective.score_of(metrics)
    seconds = time.perf_counter() - start
    evaluations = sum(run.evaluations for run in runs)
    logger.info(
        "GA: fitness %.4f, accuracy %.2f%%, acceleration %.3fx after %d generations, "
        "%d vectors scored, %.2fs%s",
        fitness,
        metrics.accuracy,
        metrics.acceleration,
        generation,
        evaluations,
        seconds,
        "" if len(runs) == 1 else f" (best of {len(runs)} runs)",
    )
    return SearchResult(
        thresholds=tuple(float(t) for t in thresholds),
        metrics=metrics,
        fitness=fitness,
        generations=generation,
        evaluations=evaluations,
        seconds=seconds,
        history=best.history,
        explored=np.concatenate([run.explored for run in runs]),
        restart_fitness=tuple(run.fitness[0] for run in runs),
    )


class _Run(NamedTuple):
    thresholds: np.ndarray  # K
    fitness: tuple[float, float]  # (objective score, accuracy) of the best individual
    generations: int
    history: list[dict[str, Any]]  # one record per generation
    evaluations: int  # distinct vectors scored
    explored: np.ndarray  # every vector scored: K thresholds, accuracy, acceleration


def _run_once(table: ExitTable, costs: CostModel, objective: Objective, config: GAConfig) -> _Run:
    """One GA run from `config.seed`."""
    from deap import algorithms, tools

    k, bits = table.num_exits, config.bits
    length = k * bits
    _, individual_cls = make_types((1.0, 1.0))

    def fitness_of(scored: PopulationMetrics) -> list[tuple[float, float]]:
        scores = objective.score_population(scored)
        return [(float(s), float(a)) for s, a in zip(scores, scored.accuracy, strict=True)]

    scorer = PopulationScorer(table, costs, bits, fitness_of, config.gray)
    toolbox = variation_toolbox(length, config.bit_flip_prob)
    toolbox.register("select", tools.selTournament, tournsize=config.tournament_size)
    hall = tools.HallOfFame(max(1, config.elite), similar=lambda a, b: a == b)
    logbook = tools.Logbook()
    logbook.header = ["gen", "nevals", "best", "mean", "best_accuracy"]  # the record's keys
    rng = random.Random(config.seed)
    history: list[dict[str, Any]] = []
    generation = 0
    with private_random(rng), progress_bar(config.generations, config.progress, "GA") as bar:
        population = [individual_cls(g) for g in seed_genes(k, bits, config.gray)]
        while len(population) < config.population:
            population.append(individual_cls(random.getrandbits(1) for _ in range(length)))
        evaluations = scorer(population)
        hall.update(population)
        best_so_far = hall[0].fitness.values
        stale = 0
        for generation in range(1, config.generations + 1):
            elites = [clone(h) for h in hall[: config.elite]]
            chosen = toolbox.select(population, config.population - len(elites))
            offspring = algorithms.varAnd(
                chosen, toolbox, config.crossover_prob, config.mutation_prob
            )
            fresh = [i for i in offspring if not i.fitness.valid]
            nevals = scorer(fresh)
            evaluations += nevals
            population = offspring + elites
            hall.update(population)
            best = hall[0].fitness.values
            scores = np.array([i.fitness.values[0] for i in population])
            record = {
                "gen": generation,
                "nevals": nevals,
                "best": best[0],
                "mean": float(scores.mean()),
                "best_accuracy": best[1],
            }
            logbook.record(**record)
            history.append(record)
            bar.update(1)
            bar.set_postfix(best=f"{best[0]:.4f}")
            if best > best_so_far:
                best_so_far, stale = best, 0
            else:
                stale += 1
            if config.patience and stale >= config.patience:
                logger.info(
                    "GA stopped early at generation %d: no improvement in %d generations",
                    generation,
                    config.patience,
                )
                break
    logger.debug("GA log\n%s", logbook)
    thresholds = decode(np.asarray(hall[0], dtype=np.uint8), k, bits, config.gray)[0]
    score, accuracy = hall[0].fitness.values
    return _Run(
        thresholds,
        (float(score), float(accuracy)),
        generation,
        history,
        evaluations,
        scorer.explored(),
    )
