"""PNG plots of a tuning run (matplotlib, Agg backend, imported only when plotting).

- `tradeoff.png`: accuracy vs acceleration — the global-threshold sweep, the grid's
  non-dominated points, the vectors the search scored, the final exit alone, and the chosen point.
- `pareto_front.png`: the NSGA-II front (pareto mode).
- `exit_distribution.png`: the share of rows each exit answers, tuning and test splits.
Files are written atomically.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from core.plots import pyplot, save_png
from thresholds.costs import CostModel
from thresholds.tuning import TuneOutcome

logger = logging.getLogger(__name__)

TRADEOFF_PNG = "tradeoff.png"
PARETO_PNG = "pareto_front.png"
EXITS_PNG = "exit_distribution.png"


def plot_tradeoff(path: Path, outcome: TuneOutcome, costs: CostModel) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    if outcome.search is not None and outcome.search.explored.size:
        explored = outcome.search.explored
        ax.scatter(
            explored[:, -1],
            explored[:, -2],
            s=4,
            alpha=0.25,
            color="0.6",
            label=f"{outcome.method} evaluated",
        )
    if outcome.global_threshold is not None:
        curve = outcome.global_threshold.curve
        order = curve[:, 1].argsort()
        ax.plot(
            curve[order, 1],
            curve[order, 0],
            color="tab:orange",
            lw=1.2,
            label="one global threshold",
        )
    if outcome.grid is not None and outcome.grid.curve.size:
        curve = outcome.grid.curve
        order = curve[:, 1].argsort()
        ax.plot(
            curve[order, 1],
            curve[order, 0],
            color="tab:green",
            lw=1.2,
            drawstyle="steps-post",
            label=f"grid front ({outcome.grid.steps} steps/exit)",
        )
    if outcome.pareto is not None:
        ax.plot(
            [m.acceleration for m in outcome.pareto.front],
            [m.accuracy for m in outcome.pareto.front],
            color="tab:purple",
            lw=1.2,
            label="NSGA-II front",
        )
    final = outcome.tune.final_exit
    ax.scatter(
        [final.acceleration],
        [final.accuracy],
        marker="s",
        color="black",
        zorder=5,
        label="final exit only",
    )
    chosen = outcome.tune.metrics
    ax.scatter(
        [chosen.acceleration],
        [chosen.accuracy],
        marker="*",
        s=220,
        color="tab:red",
        zorder=6,
        label=f"chosen ({chosen.accuracy:.2f}%, {chosen.acceleration:.2f}x)",
    )
    if outcome.objective.max_drop is not None:
        # With a margin the bound, not the accuracy, must clear this line: points just above it
        # can still be infeasible.
        floor = "accuracy floor"
        if outcome.objective.uses_bound:
            floor += f" (bound at Z = {outcome.objective.confidence:g} must clear it)"
        ax.axhline(outcome.objective.min_accuracy, color="tab:red", ls="--", lw=0.8, label=floor)
    ax.set_xlabel(f"acceleration (cost: {costs.unit})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Accuracy vs acceleration (tuning split)")
    low = max(0.0, min(chosen.accuracy, final.accuracy) - 10)
    ax.set_ylim(bottom=low)
    # Zoom on the useful part: the low-accuracy tail of a sweep can stretch far to the right.
    shown = [
        x
        for line in ax.get_lines()
        for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True)
        if y >= low and np.isfinite(x)
    ]
    if shown:
        ax.set_xlim(right=max(*shown, chosen.acceleration, final.acceleration) * 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return save_png(fig, path)


def plot_pareto(path: Path, outcome: TuneOutcome, costs: CostModel) -> Path:
    if outcome.pareto is None:
        raise ValueError("plot_pareto needs a pareto-mode outcome")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    front = outcome.pareto.front
    ax.plot(
        [m.acceleration for m in front],
        [m.accuracy for m in front],
        "o-",
        ms=3,
        color="tab:purple",
        label=f"front ({len(front)} points)",
    )
    chosen = outcome.tune.metrics
    ax.scatter(
        [chosen.acceleration],
        [chosen.accuracy],
        marker="*",
        s=220,
        color="tab:red",
        zorder=6,
        label="chosen",
    )
    ax.set_xlabel(f"acceleration (cost: {costs.unit})")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("NSGA-II Pareto front (tuning split)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def plot_exit_distribution(
    path: Path, outcome: TuneOutcome, split: str, test_split: str | None
) -> Path:
    plt = pyplot()
    fractions = outcome.tune.metrics.exit_fractions
    names = [f"exit {k + 1}" for k in range(len(fractions) - 1)] + ["fallback"]
    series = [(split, fractions)]
    if outcome.test is not None:
        series.append((test_split or "test", outcome.test.metrics.exit_fractions))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        xs = [x + (i - (len(series) - 1) / 2) * width for x in range(len(names))]
        bars = ax.bar(xs, [100 * v for v in values], width=width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("rows answered (%)")
    ax.set_title("Where rows exit, thresholds " + ", ".join(f"{t:.3f}" for t in outcome.thresholds))
    ax.legend(fontsize=8)
    return save_png(fig, path)


def write_plots(
    directory: str | os.PathLike[str],
    outcome: TuneOutcome,
    costs: CostModel,
    split: str,
    test_split: str | None = None,
) -> list[Path]:
    """All plots for this run into `directory` (created); returns the files written."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [plot_tradeoff(folder / TRADEOFF_PNG, outcome, costs)]
    if outcome.pareto is not None:
        paths.append(plot_pareto(folder / PARETO_PNG, outcome, costs))
    paths.append(plot_exit_distribution(folder / EXITS_PNG, outcome, split, test_split))
    logger.info("plots written to %s", folder)
    return paths
