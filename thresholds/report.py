"""What a tuning run tells people: the `--json` object, the `tuned` provenance written into
`thresholds.json`, a short text summary, and the Pareto front as JSON/CSV."""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_bytes, atomic_write_json
from thresholds.costs import CostModel
from thresholds.evaluate import Metrics
from thresholds.tuning import SplitReport, TuneOptions, TuneOutcome, mcnemar_dict

PARETO_JSON = "pareto_front.json"
PARETO_CSV = "pareto_front.csv"


@dataclass(frozen=True)
class DataInfo:
    """Where the calibration rows came from, for provenance."""

    dataset: str | None
    split: str
    source: str  # calibration file, or "runtime"
    test_split: str | None = None
    test_source: str | None = None
    bundle_sha256: str | None = None
    limit: int | None = None  # --limit: only the split's first `limit` rows were tuned on
    split_rows: int | None = None  # rows in the tuning split before --limit

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "dataset": self.dataset,
            "split": self.split,
            "calibration": self.source,
        }
        if self.limit is not None:
            out["limit"] = self.limit
            out["split_rows"] = self.split_rows
        if self.test_split is not None:
            out["test_split"] = self.test_split
            out["test_calibration"] = self.test_source
        return out


def _objective_fields(outcome: TuneOutcome) -> dict[str, Any]:
    objective = outcome.objective
    if objective.max_drop is None:
        return {"mode": "beta", "beta": objective.beta}
    return {
        "mode": "max_drop",
        "max_drop": objective.max_drop,
        "confidence": objective.confidence,
        "paired": objective.paired,
    }


def _search_fields(outcome: TuneOutcome, options: TuneOptions) -> dict[str, Any]:
    ga = options.ga
    done = outcome.search or outcome.pareto
    fields: dict[str, Any] = {
        "bits": ga.bits,
        "encoding": "gray" if ga.gray else "binary",
        "population": ga.population,
        "generations": done.generations if done else 0,
        "max_generations": ga.generations,
        "seed": ga.seed,
        "restarts": ga.restarts,
        "evaluations": done.evaluations if done else 0,
        "seconds": outcome.seconds,
    }
    if outcome.search is not None and len(outcome.search.restart_fitness) > 1:
        fields["restart_fitness"] = list(outcome.search.restart_fitness)
    return fields


def tuned_provenance(
    outcome: TuneOutcome, options: TuneOptions, costs: CostModel, data: DataInfo
) -> dict[str, Any]:
    """The `tuned` object of thresholds.json: method, β or max_drop (with its confidence Z),
    data, both splits' metrics (each with its margin: drop, SE, lower bound)."""
    metrics = {data.split: outcome.tune.to_dict()}
    if outcome.test is not None and data.test_split is not None:
        metrics[data.test_split] = _held_out(outcome)
    tuned: dict[str, Any] = {"method": outcome.method, **_objective_fields(outcome)}
    tuned.update(
        {
            "baseline_accuracy": outcome.objective.baseline,
            "cost": costs.to_dict(),
            "data": data.to_dict(),
            "metrics": metrics,
            "search": _search_fields(outcome, options),
            "tuned_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        }
    )
    if outcome.certification is not None:
        tuned["certification"] = outcome.certification.to_dict()
    if data.bundle_sha256:
        tuned["bundle_sha256"] = data.bundle_sha256
    return tuned


def _binomial_se(accuracy: float, rows: int) -> float:
    """Standard error of an accuracy (percent) measured on `rows` rows, in points."""
    p = accuracy / 100.0
    return 100.0 * math.sqrt(max(p * (1.0 - p), 0.0) / max(rows, 1))


def transfer(tune: SplitReport, held_out: SplitReport) -> dict[str, Any]:
    """How far the held-out split lands from the tuning split's prediction (points), beside
    the difference two independent samples of these sizes show by chance: its SE is that of
    the two accuracies combined. The final exit's own difference is the part no choice of
    thresholds can move."""
    difference = held_out.metrics.accuracy - tune.metrics.accuracy
    se = math.hypot(
        _binomial_se(tune.metrics.accuracy, tune.rows),
        _binomial_se(held_out.metrics.accuracy, held_out.rows),
    )
    return {
        "accuracy_difference": difference,
        "se": se,
        "z": difference / se if se > 0 else 0.0,
        "final_exit_difference": held_out.final_exit.accuracy - tune.final_exit.accuracy,
        "drop_difference": held_out.drop - tune.drop,
        "acceleration_ratio": held_out.metrics.acceleration / tune.metrics.acceleration,
    }


def _held_out(outcome: TuneOutcome) -> dict[str, Any]:
    """The held-out split's report with how far it moved from the tuning split's."""
    assert outcome.test is not None  # callers check; not user input
    return {**outcome.test.to_dict(), "vs_tuning": transfer(outcome.tune, outcome.test)}


def _comparison(outcome: TuneOutcome, which: str) -> dict[str, Any] | None:
    baseline = outcome.grid if which == "grid" else outcome.global_threshold
    if baseline is None:
        return None
    out = baseline.summary()
    ratio = outcome.ratio_to(baseline)
    out[f"{outcome.method}_over_{which}"] = ratio
    out["ratio"] = ratio
    return out


def result_json(
    outcome: TuneOutcome,
    options: TuneOptions,
    costs: CostModel,
    data: DataInfo,
    **extra: Any,
) -> dict[str, Any]:
    """The one object `earlyexit-tune --json` prints."""
    tune = outcome.tune
    out: dict[str, Any] = {
        "thresholds": list(outcome.thresholds),
        "accuracy": tune.metrics.accuracy,
        "baseline_accuracy": tune.baseline_accuracy,
        "acceleration": tune.metrics.acceleration,
        "fitness": tune.fitness,
        "exit_fractions": list(tune.metrics.exit_fractions),
        "method": outcome.method,
        "seconds": outcome.seconds,
        **_objective_fields(outcome),
        "split": data.split,
        "rows": tune.rows,
        "limit": data.limit,
        "split_rows": data.split_rows,
        "exit_accuracies": tune.exit_accuracies,
        "margin": tune.margin(),
        "ceiling": tune.ceiling.to_dict(),
        "consistency_ceiling": None if tune.consistency is None else tune.consistency.to_dict(),
        "mcnemar": mcnemar_dict(tune.mcnemar),
        "cost": costs.to_dict(),
        "search": _search_fields(outcome, options),
        "test": None if outcome.test is None else {"split": data.test_split, **_held_out(outcome)},
        "grid": _comparison(outcome, "grid"),
        "global": _comparison(outcome, "global"),
    }
    if outcome.objective.max_drop is not None:
        out["min_accuracy"] = outcome.objective.min_accuracy
    if outcome.certification is not None:
        out["certification"] = outcome.certification.to_dict()
    if outcome.pareto is not None:
        out["pareto"] = {
            "points": len(outcome.pareto.front),
            "seconds": outcome.pareto.seconds,
            "front": outcome.pareto.to_rows(),
        }
    out.update(extra)
    return out


def _pct(x: float) -> str:
    return f"{x:.2f}%"


# Matches thresholds.objectives: a floor met to float rounding is met.
_ALLOWANCE_TOLERANCE = 1e-9


def _points(x: float) -> str:
    return f"{round(x, 2) + 0.0:.2f}"  # + 0.0: no "-0.00"


def _one_sided_level(z: float) -> str:
    """The confidence a one-sided normal bound at `z` standard errors carries, e.g. "95"."""
    level = 50.0 * (1.0 + math.erf(z / math.sqrt(2.0)))
    return ">99.9" if level >= 99.95 else f"{level:.1f}".rstrip("0").rstrip(".")


def _margin_lines(split: str, report: dict[str, Any], max_drop: float) -> list[str]:
    """The max-drop verdict for one split in plain words, then the statistics behind it.

    `margin` holds drop = baseline − accuracy and lower_bound = (accuracy − baseline) − Z·SE,
    so −lower_bound is the largest drop the data allow at Z standard errors (the measured drop
    itself at Z = 0); the search keeps it within max_drop on the tuning split.
    """
    margin = report["margin"]
    z, drop, se, worst = margin["confidence"], margin["drop"], margin["se"], -margin["lower_bound"]
    versus = {
        "final_exit": "the final exit",
        "reference": f"the plain model ({report['baseline_accuracy']:.2f}% on these rows)",
    }.get(margin.get("paired_with") or "", f"the baseline {report['baseline_accuracy']:.2f}%")
    measured = (
        f"{_points(drop)} points"
        if round(drop, 2) >= 0
        else f"none, {_points(-drop)} points above it"
    )
    within = worst <= max_drop + _ALLOWANCE_TOLERANCE
    verdict = "within the allowance" if within else "over the allowance"
    head = f"{split}: accuracy drop vs {versus}: {measured} (allowed {_points(max_drop)})"
    if z > 0:
        bound = (
            f"the drop is at most {_points(worst)} points"
            if round(worst, 2) >= 0
            else f"accuracy is at least {_points(-worst)} points above it"
        )
        plain = f"{head}; at {_one_sided_level(z)}% confidence {bound}: {verdict}"
    else:
        plain = (
            f"{head}, {verdict}; from {report['rows']} rows, so uncertain by about "
            f"±{_points(se)} points (one standard error; --confidence adds a safety margin)"
        )
    kind = "paired" if margin["paired"] else "binomial"
    details = (
        f"{split}: statistics: {kind} standard error {_points(se)} points; lower bound on the "
        f"difference (accuracy - baseline) {-worst:+.2f} at Z = {z:g}, floor {0.0 - max_drop:+.2f}"
    )
    return [plain, details]


def _mcnemar_lines(split: str, report: dict[str, Any]) -> list[str]:
    """The exact McNemar test against the baseline's answers on the same rows, when paired."""
    test = report.get("mcnemar")
    if not test:
        return []
    versus = (
        "the plain model" if report["margin"]["paired_with"] == "reference" else "the final exit"
    )
    return [
        f"{split}: exact McNemar vs {versus}: right for the thresholds alone on "
        f"{test['only_early_exit']} rows, for {versus} alone on {test['only_baseline']}, "
        f"p = {test['p_value']:.3g}"
    ]


def _rows_text(result: dict[str, Any]) -> str:
    rows, limit, whole = result["rows"], result.get("limit"), result.get("split_rows")
    text = f"{rows} rows of '{result['split']}'"
    if limit is None or whole is None:
        return text
    if rows < whole:
        return f"{text} (the first {rows} of {whole}: --limit)"
    return f"{text} (all of them: --limit {limit} is more)"


def _certification_lines(result: dict[str, Any]) -> list[str]:
    """--certify: what the held-back rows said about the written thresholds."""
    cert = result.get("certification")
    if not cert:
        return []
    check = cert["check"]
    return [
        f"certified on {cert['check_rows']} held-back rows (searched on {cert['search_rows']}): "
        f"{cert['passed']} of {cert['candidates']} candidates passed in sequence; the fastest "
        f"of them, written, drops {_points(check['drop'])} points there, at most "
        f"{_points(-check['lower_bound'])} at {_one_sided_level(cert['confidence'])}% confidence "
        f"(allowed {result['max_drop']:g})"
    ]


def summary_text(result: dict[str, Any]) -> str:
    """A few human-readable lines about a `result_json` object."""
    lines = [
        f"method {result['method']} ({result['mode']}), {_rows_text(result)}, "
        f"search {result['seconds']:.2f}s",
        "thresholds " + ", ".join(f"{t:.4f}" for t in result["thresholds"]),
        f"accuracy {_pct(result['accuracy'])} (baseline {_pct(result['baseline_accuracy'])}), "
        f"acceleration {result['acceleration']:.3f}x, fitness {result['fitness']:.4f}",
        "exit fractions "
        + ", ".join(f"{f:.3f}" for f in result["exit_fractions"])
        + " (last: fallback)",
    ]
    if result["mode"] == "max_drop":
        lines += _margin_lines(result["split"], result, result["max_drop"])
    lines += _mcnemar_lines(result["split"], result)
    lines += _certification_lines(result)
    ceiling = result.get("ceiling")
    if ceiling and ceiling["acceleration"]:
        lines.append(
            f"{result['split']}: an oracle that knows the labels reaches "
            f"{ceiling['acceleration']:.3f}x at this accuracy over the same exits; these "
            f"thresholds reach {100 * result['acceleration'] / ceiling['acceleration']:.0f}% of it"
        )
    consistency = result.get("consistency_ceiling")
    if consistency:
        lines.append(
            f"{result['split']}: stopping at the first exit that agrees with the "
            f"{consistency.get('agrees_with', 'final exit')} reaches "
            f"{consistency['acceleration']:.3f}x at its accuracy "
            f"({_pct(consistency['accuracy'])}); these thresholds reach "
            f"{100 * result['acceleration'] / consistency['acceleration']:.0f}% of it"
        )
    test = result.get("test")
    if test:
        lines.append(
            f"{test['split']}: accuracy {_pct(test['accuracy'])} (baseline "
            f"{_pct(test['baseline_accuracy'])}), acceleration {test['acceleration']:.3f}x"
        )
        if result["mode"] == "max_drop":
            lines += _margin_lines(test["split"], test, result["max_drop"])
        lines += _mcnemar_lines(test["split"], test)
        moved = test["vs_tuning"]
        lines.append(
            f"{test['split']} - {result['split']}: accuracy {moved['accuracy_difference']:+.2f} "
            f"points (chance alone: ± {1.96 * moved['se']:.2f} at 95 %), of which the final exit "
            f"{moved['final_exit_difference']:+.2f}; acceleration x{moved['acceleration_ratio']:.3f}"
        )
    for key, name in (("grid", "grid search"), ("global", "global threshold")):
        comp = result.get(key)
        if comp:
            ratio = comp.get("ratio")
            share = "n/a" if ratio is None else f"{100 * ratio:.2f}%"
            lines.append(
                f"{name}: fitness {comp['fitness']:.4f} in {comp['seconds']:.2f}s "
                f"({comp['points']} points); {result['method']} reaches {share} of it"
            )
    for key in ("thresholds_file", "notified"):
        if result.get(key):
            lines.append(f"{key.replace('_', ' ')}: {result[key]}")
    return "\n".join(lines)


def write_pareto_files(directory: str | os.PathLike[str], front: list[Metrics]) -> list[Path]:
    """The front as JSON and CSV (one row per point, by falling acceleration), atomically."""
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = folder / PARETO_JSON, folder / PARETO_CSV
    atomic_write_json(json_path, {"front": [m.to_dict() for m in front]})
    num_exits = len(front[0].thresholds) if front else 0
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(
        [f"t{k + 1}" for k in range(num_exits)]
        + ["accuracy", "acceleration", "mean_cost"]
        + [f"exit{k + 1}_fraction" for k in range(num_exits)]
        + ["fallback_fraction"]
    )
    for m in front:
        writer.writerow([*m.thresholds, m.accuracy, m.acceleration, m.mean_cost, *m.exit_fractions])
    atomic_write_bytes(csv_path, buffer.getvalue().encode("utf-8"))
    return [json_path, csv_path]
