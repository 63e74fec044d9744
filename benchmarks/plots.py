"""PNG plots for benchmark reports (matplotlib, Agg backend, imported on first use)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from core.plots import pyplot, save_png


def exit_histogram(
    fractions: Sequence[float], path: str | os.PathLike[str], title: str = ""
) -> Path:
    """Bar chart of the fraction of rows answered at each exit, then the fallback."""
    plt = pyplot()
    names = [f"exit {k}" for k in range(1, len(fractions))] + ["fallback"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bars = ax.bar(names, [100.0 * f for f in fractions], color="#4c72b0")
    bars[-1].set_color("#c44e52")
    for bar, f in zip(bars, fractions, strict=True):
        ax.annotate(
            f"{100.0 * f:.1f}%",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_ylabel("rows (%)")
    ax.set_title(title or "Where rows exit")
    return save_png(fig, path)


def accuracy_vs_speedup(
    sweep: Sequence[dict[str, float]],
    path: str | os.PathLike[str],
    point: dict[str, float] | None = None,
    baseline_accuracy: float | None = None,
    title: str = "",
) -> Path:
    """Accuracy against MAC speedup over a global-threshold sweep (each dict: threshold,
    accuracy, acceleration); `point` marks the bundle's own thresholds."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    xs = [row["acceleration"] for row in sweep]
    ys = [row["accuracy"] for row in sweep]
    ax.plot(xs, ys, marker="o", markersize=3, label="single global threshold")
    # Label a point only where the curve has moved on, so labels do not pile up.
    x_span = (max(xs) - min(xs)) or 1.0
    y_span = (max(ys) - min(ys)) or 1.0
    last = None
    for row in sweep:
        here = (row["acceleration"] / x_span, row["accuracy"] / y_span)
        if last is None or max(abs(here[0] - last[0]), abs(here[1] - last[1])) > 0.08:
            label = f"t={row['threshold']:g}"
            ax.annotate(label, (row["acceleration"], row["accuracy"]), fontsize=7)
            last = here
    if point is not None:
        ax.scatter(
            [point["acceleration"]], [point["accuracy"]], color="#c44e52", zorder=3, label="bundle"
        )
    if baseline_accuracy is not None:
        ax.axhline(baseline_accuracy, color="grey", linestyle="--", linewidth=1, label="final exit")
    ax.set_xlabel("MAC speedup (×)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title or "Accuracy vs speedup")
    ax.legend(fontsize=8)
    return save_png(fig, path)
