"""Compare training recipes ("arms") trained with the same seed, schedule, steps and data:
per-exit test accuracy, the deepest exit's difference from a reference arm with an exact
McNemar test on the same test rows, and training step time measured side by side.

An arm is a YAML recipe (`configs/compare/*.yaml`); its run directory is `RUNS/ARM_sSEED`.
Runs are ordinary `earlyexit-train` runs, so they checkpoint every epoch and resume.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import sha256_file
from core.stats import mcnemar, pooled_difference

from .config import TrainConfig, read_config

logger = logging.getLogger(__name__)

PREDICTIONS = "test_predictions.npz"


@dataclass(frozen=True)
class Arm:
    name: str
    config: TrainConfig  # the recipe with the comparison's overrides applied (seed excluded)


def parse_arm_spec(spec: str) -> tuple[str, str, dict[str, Any]]:
    """An arm named by the loss registry: ``LOSS[:FIELD=VALUE,...][@LABEL]`` → (label, loss,
    config overrides). Values are YAML scalars or flow lists (``feature_exits=[1, 2]``); the
    label (default: LOSS) names the run directories and the report's row. ValueError on a
    malformed spec."""
    import re

    import yaml

    body, _, label = spec.partition("@")
    loss, _, rest = body.partition(":")
    loss, label = loss.strip(), (label.strip() or loss.strip())
    if not re.fullmatch(r"[A-Za-z0-9_]+", loss):
        raise ValueError(f"arm {spec!r}: expected LOSS[:FIELD=VALUE,...][@LABEL]")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", label):
        raise ValueError(f"arm {spec!r}: the label may hold letters, digits, '_', '.', '-'")
    overrides: dict[str, Any] = {}
    for item in re.split(r",(?=\s*[A-Za-z_]+\s*=)", rest) if rest.strip() else []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"arm {spec!r}: {item!r} is not FIELD=VALUE")
        try:
            overrides[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError as exc:
            raise ValueError(f"arm {spec!r}: cannot read {value!r} ({exc})") from None
    if "loss" in overrides:
        raise ValueError(f"arm {spec!r}: the loss is the name before ':'")
    return label, loss, overrides


def run_costs(run: Path) -> dict[str, int] | None:
    """Parameters and MACs of the network a run trained (its costs.json), or None."""
    path = run / "costs.json"
    if not path.is_file():
        return None
    costs = json.loads(path.read_text(encoding="utf-8"))
    return {
        "params": int(sum(costs["segment_params"])),
        "macs_deepest_path": int(costs["exit_path_macs"][-1]),
        "macs_all_exits": int(sum(costs["segment_macs"])),
    }


def exit_points(cfg: TrainConfig) -> list[str]:
    """The blocks the recipe's exits follow ("layer2.1", ...), the last the final exit."""
    import torch

    from .engine import network_from_config

    with torch.device("meta"):  # the layout only: no memory, no initialisation cost
        return list(network_from_config(cfg.resolved(), 10).exit_points)


def exit_columns(report: dict[str, Any]) -> list[str]:
    """Column names of the per-exit table: the exit points of the arm with the most exits."""
    widest = max(report["arms"].values(), key=lambda a: len(a["mean_exit_accuracy"]))
    points = widest.get("exit_points")
    count = len(widest["mean_exit_accuracy"])
    if "arch" in report.get("varied", ()):
        # Block names of different backbones are not comparable: exits counted back from the
        # deepest (arms are right-aligned, so the deepest exits share the last column).
        return [f"exit K−{count - 1 - k}" for k in range(count - 1)] + ["deepest"]
    return list(points) if points else [f"exit {k + 1}" for k in range(count)]


def exit_positions(arm: dict[str, Any], columns: list[str]) -> list[int]:
    """Where an arm's exits sit among `columns`: by exit point when every one of its exits is
    a column (DRG's stage-2 classifier under the stage-2 column), else right-aligned."""
    accs = arm["mean_exit_accuracy"]
    points = arm.get("exit_points") or []
    if len(points) == len(accs) and points and all(p in columns for p in points):
        return [columns.index(p) for p in points]
    return list(range(len(columns) - len(accs), len(columns)))


def run_dir(runs: Path, arm: str, seed: int) -> Path:
    return runs / f"{arm}_s{seed}"


@dataclass(frozen=True)
class RunPredictions:
    """The per-row test predictions a finished run wrote."""

    exits: np.ndarray  # K×N
    labels: np.ndarray  # N
    ensemble: np.ndarray | None  # N; None for one exit or a run written before it was recorded


def read_predictions(run: Path) -> RunPredictions:
    with np.load(run / PREDICTIONS) as data:
        exits = data["predictions"].astype(np.int64)
        has_ensemble = "ensemble" in data.files and exits.shape[0] > 1
        return RunPredictions(
            exits,
            data["labels"].astype(np.int64),
            data["ensemble"].astype(np.int64) if has_ensemble else None,
        )


def _difference_summary(tests: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, per-seed differences and the largest p-value of per-seed McNemar answers."""
    diffs = [mc["difference_points"] for mc in tests]
    return {
        "mean": statistics.fmean(diffs),
        "per_seed": diffs,
        "max_p_value": max(mc["p_value"] for mc in tests),
    }


def run_finished(run: Path, epochs: int) -> bool:
    metrics = run / "metrics.jsonl"
    if not (run / PREDICTIONS).is_file() or not metrics.is_file():
        return False
    lines = [x for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
    return bool(lines) and json.loads(lines[-1]).get("epoch") == epochs


def epochs_done(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        return 0
    lines = [x for x in metrics.read_text(encoding="utf-8").splitlines() if x.strip()]
    return int(json.loads(lines[-1]).get("epoch", 0)) if lines else 0


def same_weights(a: Path | None, b: Path | None) -> bool:
    """Whether two `init` paths name the same starting weights: the same path, or two files
    with the same bytes (a run started from a copy, e.g. before a recipe named its starting
    point per seed)."""
    if a is None or b is None or a == b:
        return a == b
    if not (a.is_file() and b.is_file()):
        return False
    return bool(sha256_file(a) == sha256_file(b))


def check_recipe(run: Path, arm: Arm, seed: int) -> TrainConfig:
    """The run's saved config; RuntimeError when it is not this arm's recipe at this seed (a
    stale run directory from another recipe would otherwise be reported under this arm's
    name). Starting weights (`init`) are compared as the files they name for this seed."""
    from .engine import RUN_ENVIRONMENT_FIELDS

    saved = read_config(run / "config.json")
    wanted = replace(arm.config, seed=seed)
    differ = [
        f
        for f in saved.to_dict()
        if f not in RUN_ENVIRONMENT_FIELDS
        and f != "init"
        and getattr(saved, f) != getattr(wanted, f)
    ]
    if not same_weights(saved.init_path(), wanted.init_path()):
        differ.append("init")
    if differ:
        raise RuntimeError(
            f"{run.name} was trained with another recipe ({', '.join(differ)} differ from "
            f"{arm.name}'s); move it away or use another --runs"
        )
    return saved


def measure_step_times(
    arms: list[Arm],
    steps: int = 10,
    threads: int = 1,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    num_classes: int = 10,
) -> dict[str, dict[str, float]]:
    """Median seconds of one SGD step per arm, the arms' steps interleaved round by round in
    one process (the same batch, the same threads), so machine noise hits them alike."""
    import torch

    from .engine import forward_for_loss, loss_from_config, network_from_config
    from .teacher import Teacher

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    variants = {}
    for arm in arms:
        cfg = arm.config.resolved()
        model = network_from_config(cfg, num_classes, input_shape[0]).train()
        if cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if cfg.freeze_backbone:  # as the engine does: no backbone gradient, BN statistics kept
            for param in model.backbone.parameters():
                param.requires_grad_(False)
            model.backbone.eval()
        loss = loss_from_config(cfg, model, train_rows=cfg.batch_size)
        needs = frozenset(getattr(loss, "needs", ()))
        # A teacher's forward is part of what its arm's step costs.
        teacher = (
            Teacher(str(cfg.teacher), num_classes, input_shape, "cpu", "stage_maps" in needs)
            if "teacher" in needs
            else None
        )
        opt = torch.optim.SGD(
            [p for p in (*model.parameters(), *loss.parameters()) if p.requires_grad],
            lr=0.01,
            momentum=0.9,
            nesterov=True,
        )
        x = torch.randn(cfg.batch_size, *input_shape)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, num_classes, (cfg.batch_size,))
        variants[arm.name] = (model, opt, loss, needs, teacher, x, y)
    times: dict[str, list[float]] = {name: [] for name in variants}
    rows = torch.arange(max(arm.config.batch_size for arm in arms))
    for step in range(steps + 2):  # two warm-up rounds
        for name, (model, opt, loss_fn, needs, teacher, x, y) in variants.items():
            t0 = time.perf_counter()
            # a new view of the batch each step: the teacher's per-batch cache does not hide
            # its forward's cost
            inputs, _ = forward_for_loss(
                model, model, needs, x.view_as(x), y, teacher=teacher, rows=rows[: len(y)]
            )
            loss_fn(inputs).total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if step >= 2:
                times[name].append(time.perf_counter() - t0)
    return {
        name: {"step_s": statistics.median(t), "steps": len(t), "threads": threads}
        for name, t in times.items()
    }


def summarize(
    arms: list[Arm],
    seeds: list[int],
    runs: Path,
    reference: str,
    step_times: dict[str, dict[str, float]] | None = None,
    varied: tuple[str, ...] = (),
    latency: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    """The comparison report (JSON-ready) from finished runs' per-row test predictions.
    `varied`: protocol fields the arms were allowed to differ in (recorded per arm);
    `latency`: `measure_chain_latency`'s answer."""
    table: dict[str, Any] = {}
    ref_correct: dict[int, np.ndarray] = {}
    for seed in seeds:
        ref = read_predictions(run_dir(runs, reference, seed))
        ref_correct[seed] = ref.exits[-1] == ref.labels
    for arm in arms:
        per_seed = {}
        deepest_correct: dict[int, np.ndarray] = {}
        for seed in seeds:
            run = run_dir(runs, arm.name, seed)
            saved = check_recipe(run, arm, seed)
            got = read_predictions(run)
            labels = got.labels
            correct = got.exits == labels[None, :]
            entry: dict[str, Any] = {
                "exit_accuracy": [100.0 * float(c.mean()) for c in correct],
                "rows": int(labels.size),
            }
            if saved.init:
                entry["init"] = saved.init  # as the run recorded it: where this seed started
            deepest_correct[seed] = correct[-1]
            if arm.name != reference:
                entry["deepest_vs_reference"] = mcnemar(ref_correct[seed], correct[-1]).to_dict()
            if got.ensemble is not None:
                # The mean of the exits' softmax: what the runtime answers, with the `ensemble`
                # fallback, for a row no exit accepts.
                ens_correct = got.ensemble == labels
                entry["ensemble_accuracy"] = 100.0 * float(ens_correct.mean())
                if arm.name != reference:
                    entry["ensemble_vs_reference"] = mcnemar(
                        ref_correct[seed], ens_correct
                    ).to_dict()
            test = run / "test_metrics.json"
            if test.is_file():
                final = json.loads(test.read_text(encoding="utf-8")).get("final", {})
                if "tta_flip_acc_last" in final:
                    entry["tta_flip_deepest"] = final["tta_flip_acc_last"]
            metrics = [
                json.loads(x)
                for x in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
                if x.strip()
            ]
            entry["epoch_seconds_median"] = statistics.median(m["epoch_seconds"] for m in metrics)
            entry["train_last_accuracy"] = metrics[-1].get("train_acc_last")
            per_seed[str(seed)] = entry
        exits = len(next(iter(per_seed.values()))["exit_accuracy"])
        mean_acc = [
            statistics.fmean(per_seed[str(s)]["exit_accuracy"][k] for s in seeds)
            for k in range(exits)
        ]
        summary: dict[str, Any] = {"per_seed": per_seed, "mean_exit_accuracy": mean_acc}
        costs = run_costs(run_dir(runs, arm.name, seeds[0]))
        if costs is not None:
            summary["costs"] = costs
        summary["exit_points"] = exit_points(arm.config)
        if varied:
            recipe = arm.config.to_dict()  # JSON-ready: tuples as lists
            summary["protocol"] = {f: recipe[f] for f in varied}
        if latency and arm.name in latency:
            summary["latency"] = latency[arm.name]
        if arm.name != reference:
            summary["deepest_difference_points"] = _difference_summary(
                [per_seed[str(s)]["deepest_vs_reference"] for s in seeds]
            )
            if len(seeds) > 1:
                # One test over the seeds, the test image as the unit (core.stats).
                summary["deepest_pooled_vs_reference"] = pooled_difference(
                    [ref_correct[s] for s in seeds], [deepest_correct[s] for s in seeds]
                ).to_dict()
            if all("ensemble_vs_reference" in per_seed[str(s)] for s in seeds):
                summary["ensemble_difference_points"] = _difference_summary(
                    [per_seed[str(s)]["ensemble_vs_reference"] for s in seeds]
                )
        if step_times and arm.name in step_times:
            summary["step_seconds"] = step_times[arm.name]["step_s"]
        if step_times and reference in step_times and arm.name in step_times:
            summary["step_time_ratio"] = (
                step_times[arm.name]["step_s"] / step_times[reference]["step_s"]
            )
        table[arm.name] = summary
    first = arms[0].config
    return {
        "reference": reference,
        "seeds": seeds,
        "budget": {
            "epochs": first.epochs,
            "batch_size": first.batch_size,
            "train_subset": first.train_subset,
            "schedule": first.schedule,
            "dataset": first.dataset,
            "arch": first.arch,
            "width": first.width,
        },
        "varied": list(varied),
        "arms": table,
        "recipes": {arm.name: arm.config.to_dict() for arm in arms},
        "step_times": step_times,
    }


def paired_tests(
    pairs: list[tuple[str, str]], seeds: list[int], runs: Path
) -> list[dict[str, Any]]:
    """McNemar of the deepest exits of arm pairs other than against the reference (e.g. SD vs
    plain at each pruning ratio): per seed, B's difference from A and the exact p-value."""
    out = []
    for a, b in pairs:
        per_seed = {}
        for seed in seeds:
            got_a = read_predictions(run_dir(runs, a, seed))
            got_b = read_predictions(run_dir(runs, b, seed))
            labels = got_a.labels
            if not np.array_equal(labels, got_b.labels):
                raise RuntimeError(f"arms {a} and {b} were tested on different rows")
            per_seed[str(seed)] = mcnemar(
                got_a.exits[-1] == labels, got_b.exits[-1] == labels
            ).to_dict()
        diffs = [per_seed[str(s)]["difference_points"] for s in seeds]
        out.append({"a": a, "b": b, "per_seed": per_seed, "mean_difference_points":
                    statistics.fmean(diffs)})  # fmt: skip
    return out


def measure_chain_latency(
    arms: list[Arm], seed: int, runs: Path, rounds: int = 30, repeats: int = 5, threads: int = 1
) -> dict[str, dict[str, float]]:
    """Batch-1 latency of each arm's exported bundle (its `seed` run's best.pt, exported to a
    temporary directory), on onnxruntime CPU with `threads` intra-op threads: the exit chain at
    full depth (every segment and exit head, as a row that no exit accepts), and the plain
    single graph (`full_model.onnx`: the backbone and final head only). Timed as every speed
    ratio here is (`core.timing.time_variant_runs`): per round each variant runs `repeats`
    calls in a warm block, the blocks in an order rotated from round to round; medians over
    `rounds` rounds."""
    import tempfile

    from core.timing import time_variant_runs
    from serving.runtime import EarlyExitRuntime

    from .export import CheckpointError, ExportError, ExportOptions, export_checkpoint

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="compare-latency-") as tmp:
        variants: dict[str, Callable[[np.ndarray], Any]] = {}
        for arm in arms:
            bundle = Path(tmp) / arm.name
            try:
                export_checkpoint(
                    run_dir(runs, arm.name, seed) / "best.pt",
                    bundle,
                    ExportOptions(name=arm.name, version="compare", progress=False),
                )
            except (CheckpointError, ExportError) as exc:
                raise RuntimeError(f"arm {arm.name}: cannot export for latency: {exc}") from exc
            runtime = EarlyExitRuntime(bundle, providers=("cpu",), intra_op_threads=threads)
            shape = runtime.manifest.input.shape
            x = runtime.preprocess(rng.integers(0, 256, (1, *shape[1:], shape[0]), np.uint8))
            full_depth = [1.0] * (runtime.manifest.num_exits - 1) + [0.0]
            # Each arm runs its own input (its bundle's normalisation); the batch passed in
            # only counts the calls.
            variants[f"{arm.name}:chain"] = partial(
                _call, runtime.classify, x, thresholds=full_depth
            )
            variants[f"{arm.name}:plain"] = partial(_call, runtime.run_full_model, x)
        seconds = time_variant_runs(variants, [np.empty(0)] * repeats, rounds)
    per_call = {name: statistics.median(t) / repeats for name, t in seconds.items()}
    return {
        arm.name: {
            "chain_full_depth_ms": 1e3 * per_call[f"{arm.name}:chain"],
            "plain_ms": 1e3 * per_call[f"{arm.name}:plain"],
            "chain_over_plain": per_call[f"{arm.name}:chain"] / per_call[f"{arm.name}:plain"],
            "rounds": rounds,
            "threads": threads,
        }
        for arm in arms
    }


def _call(fn: Callable[..., Any], x: np.ndarray, _batch: np.ndarray, **kwargs: Any) -> Any:
    return fn(x, **kwargs)


def with_overrides(cfg: TrainConfig, **overrides: Any) -> TrainConfig:
    """The recipe with the comparison's shared settings (None = keep the recipe's)."""
    return replace(cfg, **{k: v for k, v in overrides.items() if v is not None})


def _per_seed_tests(tests: Any) -> str:
    """Per-seed McNemar answers as one table cell: "+0.12 (p=0.5); -0.30 (p=0.1)"."""
    return "; ".join(f"{mc['difference_points']:+.2f} (p={mc['p_value']:.3g})" for mc in tests)


def render_markdown(report: dict[str, Any], command: str) -> str:
    ref = report["reference"]
    seeds = report["seeds"]
    budget = report["budget"]
    dataset = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}.get(
        budget.get("dataset", "cifar10"), budget.get("dataset", "")
    )
    lines = [
        f"# Training recipes compared on the {dataset} test split",
        "",
        f"Produced by: `{command}`",
        "",
        f"Budget: {budget['epochs']} epochs, batch {budget['batch_size']}, "
        f"schedule {budget['schedule']}"
        + (f", {budget['train_subset']} training rows" if budget["train_subset"] else "")
        + f"; seeds {', '.join(map(str, seeds))}; reference arm `{ref}`.",
        "",
        "Accuracy (%) per exit, mean over seeds; the deepest exit's difference from the "
        "reference per seed with the exact McNemar p-value on the same test rows. Parameters: "
        "the trained network with every exit; MACs: one image through the deepest exit's path; "
        "step time: one SGD step (a teacher's forward included), the arms interleaved in one "
        "process.",
        "",
    ]
    varied = report.get("varied") or []
    if varied:
        lines += [
            f"Arms differ in {', '.join(varied)} (column `varies`); everything else is one "
            "protocol. Exits are counted back from the deepest (K = an arm's exit count): "
            "block names differ across backbones.",
            "",
        ]
    has_latency = any("latency" in a for a in report["arms"].values())
    if has_latency:
        lines += [
            "Latency: batch 1, onnxruntime CPU, the first seed's run exported as a bundle; "
            "`chain ms` runs every segment and exit head (a row no exit accepts), `plain ms` the "
            "single graph without exit heads (`full_model.onnx`); medians of rounds with the "
            "arms interleaved.",
            "",
        ]
    if any("deepest_pooled_vs_reference" in a for a in report["arms"].values()):
        lines += [
            "`pooled`: one test over every seed, with the test image as the unit: per image, "
            "the mean over seeds of (arm right) − (reference right); its mean ± standard error "
            "and a two-sided normal p-value (summing the seeds' McNemar counts would count each "
            "image once per seed). It covers these seeds, not the spread of further ones.",
            "",
        ]
    has_ensemble = any("ensemble_difference_points" in a for a in report["arms"].values())
    if has_ensemble:
        lines += [
            "`ensemble − ref`: the mean of every exit's softmax (what a bundle with the "
            "`ensemble` fallback answers for a row no exit accepts) against the reference's "
            "deepest exit, exact McNemar per seed.",
            "",
        ]
    starts = [
        f"`{name}` seed {seed}: `{entry['init']}`"
        for name, arm in report["arms"].items()
        for seed, entry in arm["per_seed"].items()
        if entry.get("init")
    ]
    if starts:
        lines += ["Starting weights (`init`): " + "; ".join(starts) + ".", ""]
    columns = exit_columns(report)
    head = ["arm", *(["varies"] if varied else []), *columns, "deepest − ref (per seed, p)"]
    head += ["ensemble − ref (per seed, p)"] if has_ensemble else []
    head += ["params", "MACs", "step ms", "step time ÷ ref"]
    head += ["chain ms", "plain ms"] if has_latency else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, arm in report["arms"].items():
        cells = [""] * len(columns)
        for k, acc in zip(exit_positions(arm, columns), arm["mean_exit_accuracy"], strict=True):
            cells[k] = f"{acc:.2f}"
        if name == ref:
            diff = "reference"
        else:
            diff = f"**{arm['deepest_difference_points']['mean']:+.2f}**: " + _per_seed_tests(
                arm["per_seed"][str(s)]["deepest_vs_reference"] for s in seeds
            )
            pooled = arm.get("deepest_pooled_vs_reference")
            if pooled:
                diff += (
                    f"; pooled {pooled['difference_points']:+.2f} ± {pooled['se_points']:.2f} "
                    f"(p={pooled['p_value']:.3g})"
                )
        ens_cell = []
        if has_ensemble:
            ens = arm.get("ensemble_difference_points")
            ens_cell = [
                f"**{ens['mean']:+.2f}**: "
                + _per_seed_tests(arm["per_seed"][str(s)]["ensemble_vs_reference"] for s in seeds)
                if ens
                else "–"
            ]
        ratio = arm.get("step_time_ratio")
        costs = arm.get("costs") or {}
        step = arm.get("step_seconds")
        extra = [
            f"{costs['params'] / 1e6:.3f} M" if costs else "–",
            f"{costs['macs_deepest_path'] / 1e6:.1f} M" if costs else "–",
            f"{1e3 * step:.1f}" if step else "–",
            f"{ratio:.2f}" if ratio else "–",
        ]
        if has_latency:
            lat = arm.get("latency") or {}
            extra += [
                f"{lat['chain_full_depth_ms']:.2f}" if lat else "–",
                f"{lat['plain_ms']:.2f}" if lat else "–",
            ]
        varies = (
            [", ".join(f"{k}={v}" for k, v in (arm.get("protocol") or {}).items())]
            if varied
            else []
        )
        lines.append(
            "| " + " | ".join([f"`{name}`", *varies, *cells, diff, *ens_cell, *extra]) + " |"
        )
    if report.get("pairs"):
        lines += [
            "",
            "Paired tests between other arms (deepest exit, B − A, exact McNemar per seed):",
            "",
            "| A | B | B − A (per seed, p) |",
            "|---|---|---|",
        ]
        for pair in report["pairs"]:
            parts = _per_seed_tests(pair["per_seed"].values())
            lines.append(
                f"| `{pair['a']}` | `{pair['b']}` | **{pair['mean_difference_points']:+.2f}**: "
                f"{parts} |"
            )
    lines += ["", "![per-exit accuracy](compare.png)", ""]
    if all("costs" in arm for arm in report["arms"].values()):
        lines += ["![deepest exit vs parameters](accuracy_vs_params.png)", ""]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    from core.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    columns = exit_columns(report)
    for name, arm in report["arms"].items():
        accs = arm["mean_exit_accuracy"]
        # each exit at its block's position (a single-exit arm at the deepest exit's)
        xs = [k + 1 for k in exit_positions(arm, columns)]
        (line,) = ax.plot(xs, accs, "o-", label=name)
        for seed_entry in arm["per_seed"].values():
            ax.plot(xs, seed_entry["exit_accuracy"], ".", color=line.get_color(), alpha=0.5)
    ax.set_xticks(range(1, len(columns) + 1), columns)
    ax.set_xlabel("exit (the block it follows)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path, tight=False)


def plot_params(report: dict[str, Any], path: Path) -> bool:
    """Deepest-exit accuracy against trained parameters, one labelled point per arm (per-seed
    accuracies as dots): where pruning, group convolutions or another backbone trade size for
    accuracy. False (nothing written) when an arm has no costs."""
    arms = report["arms"]
    if not arms or any("costs" not in arm for arm in arms.values()):
        return False
    from core.plots import pyplot, save_png

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, arm in arms.items():
        params = arm["costs"]["params"] / 1e6
        (point,) = ax.plot([params], [arm["mean_exit_accuracy"][-1]], "o")
        for seed_entry in arm["per_seed"].values():
            ax.plot([params], [seed_entry["exit_accuracy"][-1]], ".", color=point.get_color())
        ax.annotate(name, (params, arm["mean_exit_accuracy"][-1]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("parameters of the trained network, every exit (M)")
    ax.set_ylabel("deepest exit, test accuracy (%)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_png(fig, path, tight=False)
    return True
