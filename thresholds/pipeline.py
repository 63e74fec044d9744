"""The whole `earlyexit-tune` job as a library call: bundle + data in, thresholds.json out.

Steps: read the manifest; get calibration arrays (a saved `.npz`, or collected through the
runtime and cached); check they fit the bundle; build the cost model; tune; score on the
held-out split; write `thresholds.json` atomically with provenance, plots and the Pareto front;
optionally push the thresholds to a running server.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from core.bundle import (
    BundleError,
    Manifest,
    Thresholds,
    load_manifest,
    plain_graph,
    validate_threshold_values,
    write_thresholds,
)
from core.drift import confidence_reference
from core.paths import portable_path
from thresholds.calibrate import (
    Calibration,
    bundle_sha256,
    check_against_manifest,
    load_or_collect,
    read_calibration_file,
)
from thresholds.costs import cost_model
from thresholds.errors import TuningError
from thresholds.evaluate import ExitTable, build_exit_table
from thresholds.notify import NotifyError, admin_token, push_thresholds
from thresholds.report import DataInfo, result_json, tuned_provenance, write_pareto_files
from thresholds.runner import RuntimeOptions
from thresholds.tuning import TuneOptions, tune

logger = logging.getLogger(__name__)

HELD_OUT_SPLIT = "test"


@dataclass(frozen=True)
class TuneRequest:
    bundle: Path
    options: TuneOptions = field(default_factory=TuneOptions)
    dataset: str | None = None
    data_dir: Path | None = None
    split: str = "val"
    limit: int | None = None  # tune on the first `limit` rows of the tuning split only
    calibration: Path | None = None
    test_calibration: Path | None = None
    cost: str = "macs"
    batch_size: int = 32
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    latency_repeats: int = 20
    cache_dir: Path | None = None
    plots: Path | None = None
    dry_run: bool = False
    notify: str | None = None
    # What --max-drop and β are measured against, by precedence: options.baseline (a number),
    # a bundle of the plain model (its final exit on the same splits), the manifest's
    # `baseline` block (the plain model's recorded accuracy per split), the final exit.
    baseline_bundle: Path | None = None
    against_final_exit: bool = False

    def check(self) -> None:
        """Everything that can be rejected before reading data; TuningError names the problem."""
        if self.calibration is None and (self.dataset is None or self.data_dir is None):
            raise TuningError("give --dataset and --data-dir, or --calibration FILE.npz")
        if self.test_calibration is not None and self.calibration is None:
            raise TuningError("--test-calibration goes with --calibration")
        if self.limit is not None and self.limit < 1:
            raise TuningError(f"--limit must be a positive integer, got {self.limit}")
        if self.runtime.intra_op_threads < 0:
            raise TuningError(f"--threads must be >= 0, got {self.runtime.intra_op_threads}")
        if self.latency_repeats < 1:
            raise TuningError(f"--latency-repeats must be >= 1, got {self.latency_repeats}")
        if self.batch_size < 1:
            raise TuningError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.cost not in ("macs", "latency"):
            raise TuningError(f"--cost must be macs or latency, got {self.cost!r}")
        if self.notify is not None and not self.dry_run and admin_token() is None:
            raise TuningError("--notify needs the admin token in $EARLYEXIT_ADMIN_TOKEN")
        for path in (self.calibration, self.test_calibration):
            if path is not None and not path.is_file():
                raise TuningError(f"calibration file not found: {path}")
        given = [
            name
            for name, on in (
                ("--baseline", self.options.baseline is not None),
                ("--baseline-bundle", self.baseline_bundle is not None),
                ("--against-final-exit", self.against_final_exit),
            )
            if on
        ]
        if len(given) > 1:
            raise TuningError(f"give one of {', '.join(given)}")
        if self.baseline_bundle is not None and self.calibration is not None:
            raise TuningError("--baseline-bundle needs --dataset/--data-dir, not --calibration")


def _collect(
    request: TuneRequest, bundle: Path, manifest: Manifest, split: str, plain: bool = False
) -> Calibration:
    """One split's calibration arrays for `bundle` (with `plain`, for its plain model), from
    its cache or run through the runtime."""
    return load_or_collect(
        bundle,
        manifest,
        request.dataset or "",
        request.data_dir or Path("."),
        split,
        batch_size=request.batch_size,
        cache_dir=request.cache_dir,
        options=request.runtime,
        write_cache=not request.dry_run,
        plain=plain,
    )


def _calibrations(
    request: TuneRequest, manifest: Manifest
) -> tuple[Calibration, Calibration | None, str | None]:
    """Tuning calibration, held-out calibration (or None) and the held-out split's name."""
    if request.calibration is not None:
        tune_cal = read_calibration_file(request.calibration)
        test_cal = None
        if request.test_calibration is not None:
            test_cal = read_calibration_file(request.test_calibration)
        test_split = None
        if test_cal is not None:
            test_split = str(test_cal.meta.get("split") or HELD_OUT_SPLIT)
        return tune_cal, test_cal, test_split

    def get(split: str) -> Calibration:
        return _collect(request, request.bundle, manifest, split)

    tune_cal = get(request.split)
    if request.split == HELD_OUT_SPLIT:
        logger.warning("tuning on the test split: there is no held-out split to report")
        return tune_cal, None, None
    return tune_cal, get(HELD_OUT_SPLIT), HELD_OUT_SPLIT


def first_rows(calibration: Calibration, limit: int | None) -> Calibration:
    """The first `limit` rows of `calibration` (all of them when `limit` is None or not
    smaller than the row count)."""
    if limit is None:
        return calibration
    if limit >= calibration.num_rows:
        logger.info("--limit %d: the split has %d rows; tuning on all", limit, calibration.num_rows)
        return calibration
    kept = Calibration(
        calibration.exit_probs[:limit],
        calibration.labels[:limit],
        calibration.meta,
        calibration.source,
    )
    logger.info("tuning on the first %d of %d rows (--limit)", limit, calibration.num_rows)
    # Image-folder splits are stored class by class, so their first rows can miss whole
    # classes; thresholds tuned on such rows say little about the rest.
    classes, kept_classes = np.unique(calibration.labels).size, np.unique(kept.labels).size
    if kept_classes < classes:
        logger.warning(
            "--limit %d: the first %d rows hold %d of the split's %d classes; "
            "thresholds tuned on them may not transfer",
            limit,
            limit,
            kept_classes,
            classes,
        )
    return kept


@dataclass(frozen=True)
class BaselineChoice:
    """The accuracy each split is measured against, where it came from, and (when the plain
    model was run on the same rows) its correctness on each row, for the paired bound."""

    source: str  # "given", "bundle", "manifest" or "final_exit"
    tune: float | None  # None: the final exit on the same rows (paired)
    test: float | None
    detail: dict[str, Any] = field(default_factory=dict)
    # N bool per split: the plain model right on row n of the whole split (None: not run).
    tune_correct: np.ndarray | None = None
    test_correct: np.ndarray | None = None
    # split -> the bundle's own plain graph run on it (manifest source with data), which
    # fallback "plain" answers with too: collected once.
    own_plain: dict[str, Calibration] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        paired = self.source == "final_exit" or self.tune_correct is not None
        return {
            "source": self.source,
            "tune": self.tune,
            "test": self.test,
            "paired": paired,
            **self.detail,
        }


def plain_correct(
    calibration: Calibration, labels: np.ndarray, what: str
) -> tuple[float, np.ndarray]:
    """(accuracy in percent, N bool correctness) of a plain model's last output on a split
    whose labels must be the tuned bundle's, row for row: the pairing needs the same rows."""
    if not np.array_equal(calibration.labels, labels):
        raise TuningError(f"{what} was not run on the same rows as the bundle")
    correct = calibration.exit_probs[:, -1].argmax(axis=1) == calibration.labels
    return 100.0 * int(np.count_nonzero(correct)) / correct.shape[0], correct


def resolve_baseline(
    request: TuneRequest,
    manifest: Manifest,
    split: str,
    test_split: str | None,
    labels: dict[str, np.ndarray] | None = None,
) -> BaselineChoice:
    """What 'no accuracy loss' means for this run: the plain model a user would otherwise
    deploy when the bundle or the user names one, else the bundle's own final exit.

    `labels` (split -> the bundle's labels on the whole split) is given when the data can be
    read: the plain model (another bundle's final exit, or the graph the manifest's baseline
    block names) then runs on the same rows, and the bound is paired with its answers."""
    given = request.options.baseline
    if given is not None:
        return BaselineChoice("given", given, given)
    splits = [split] + ([test_split] if test_split else [])
    if request.baseline_bundle is not None:
        plain = load_manifest(request.baseline_bundle)
        if list(plain.labels) != list(manifest.labels):
            raise TuningError(
                f"--baseline-bundle {request.baseline_bundle}: its labels differ from the bundle's"
            )
        accuracy, correct = {}, {}
        for name in splits:
            cal = _collect(request, request.baseline_bundle, plain, name)
            check_against_manifest(cal, plain, "baseline bundle data")
            accuracy[name], correct[name] = plain_correct(
                cal, (labels or {}).get(name, cal.labels), "the baseline bundle"
            )
        return BaselineChoice(
            "bundle",
            accuracy[split],
            accuracy.get(test_split) if test_split else None,
            {"name": plain.name, "version": plain.version, "accuracy": accuracy},
            correct[split] if labels else None,
            correct.get(test_split) if labels and test_split else None,
        )
    block = manifest.baseline
    if block is not None and not request.against_final_exit:
        missing = [s for s in splits if s not in block.accuracy]
        if missing and not labels:
            raise TuningError(
                f"the manifest's baseline block has no accuracy for split {', '.join(missing)}; "
                "give --baseline PCT or --against-final-exit"
            )
        detail: dict[str, Any] = {"recipe": block.recipe, "accuracy": dict(block.accuracy)}
        if not labels:
            return BaselineChoice(
                "manifest",
                block.accuracy[split],
                block.accuracy[test_split] if test_split else None,
                detail,
            )
        # The data is here: run the plain graph (baseline.onnx, or full_model.onnx when the
        # bundle's backbone is the plain model) on the same rows, so the accuracy compared with
        # is measured where the early exits are, and the bound pairs the answers row by row.
        graph = plain_graph(manifest).file
        measured, correct, collected = {}, {}, {}
        for name in splits:
            cal = collected[name] = _collect(request, request.bundle, manifest, name, plain=True)
            measured[name], correct[name] = plain_correct(cal, labels[name], graph)
            recorded = block.accuracy.get(name)
            if recorded is not None and abs(recorded - measured[name]) > 0.1:
                logger.warning(
                    "%s scores %.2f%% on %s here, the manifest records %.2f%%: is this the "
                    "data it was trained for?",
                    graph,
                    measured[name],
                    name,
                    recorded,
                )
        detail["measured"] = measured
        return BaselineChoice(
            "manifest",
            measured[split],
            measured[test_split] if test_split else None,
            detail,
            correct[split],
            correct[test_split] if test_split else None,
            collected,
        )
    return BaselineChoice("final_exit", None, None)


def _table(
    calibration: Calibration,
    manifest: Manifest,
    what: str,
    reference_correct: np.ndarray | None = None,
    own_plain: Calibration | None = None,
) -> ExitTable:
    """The exit table of `calibration`; `reference_correct` (the plain model's correctness on
    the whole split) and `own_plain` (the bundle's own plain graph on the whole split, for
    fallback "plain") are cut to the calibration's rows, which are the split's first ones."""
    check_against_manifest(calibration, manifest, what)
    rows = calibration.num_rows
    plain = None if own_plain is None else own_plain.exit_probs[:rows, -1].argmax(axis=1)
    return build_exit_table(
        calibration.exit_probs,
        calibration.labels,
        manifest.fallback,
        None if reference_correct is None else reference_correct[:rows],
        plain_predictions=plain,
    )


def own_plain_answers(
    request: TuneRequest,
    manifest: Manifest,
    splits: dict[str, str | None],
    labels: dict[str, np.ndarray] | None,
    collected: dict[str, Calibration] | None = None,
) -> dict[str, Calibration | None]:
    """Fallback "plain": per role ("tune", "test"), the bundle's own plain graph run on the
    whole split (cached beside the calibration), which answers every row no exit accepts. None
    for every role with another fallback. `collected` (split -> that graph's calibration,
    already checked against the labels by `resolve_baseline`) is reused, not read again."""
    if manifest.fallback != "plain":
        return dict.fromkeys(splits)
    if labels is None:
        raise TuningError(
            "this bundle falls back to its plain model: tune it on a dataset split (--dataset "
            "and --data-dir), not a saved calibration file, so that model runs on the same rows"
        )
    graph = plain_graph(manifest).file
    out: dict[str, Calibration | None] = {}
    for role, name in splits.items():
        out[role] = None
        if name is None:
            continue
        cal = (collected or {}).get(name)
        if cal is None:
            cal = _collect(request, request.bundle, manifest, name, plain=True)
            plain_correct(cal, labels[name], graph)  # the same rows, or a TuningError
        out[role] = cal
    return out


def run(request: TuneRequest) -> dict[str, Any]:
    """Run the job; returns the `--json` object. TuningError/BundleError/DatasetError on bad
    input, NotifyError when the server push fails (thresholds.json is written by then)."""
    started = time.perf_counter()
    request.check()
    # Segments are only executed when collecting calibration or timing latency; a saved
    # calibration with MAC costs needs nothing but the manifest.
    needs_runtime = request.calibration is None or request.cost == "latency"
    manifest = load_manifest(request.bundle, verify=needs_runtime)
    whole_cal, test_cal, test_split = _calibrations(request, manifest)
    # The whole split is collected and cached; --limit only narrows what is tuned on, so a
    # later run without it reuses the same cache.
    tune_cal = first_rows(whole_cal, request.limit)
    split = str(tune_cal.meta.get("split") or request.split)
    costs = cost_model(
        request.cost,
        request.bundle,
        manifest,
        request.batch_size,
        request.runtime,
        request.latency_repeats,
        write=not request.dry_run,
    )
    # Calibration files hold no images, so only collected splits can run the plain model.
    labels = None
    if request.calibration is None:
        labels = {split: whole_cal.labels}
        if test_cal is not None and test_split is not None:
            labels[test_split] = test_cal.labels
    try:
        baseline = resolve_baseline(request, manifest, split, test_split, labels)
    except BundleError as exc:
        where = "--baseline-bundle: " if request.baseline_bundle is not None else ""
        raise TuningError(f"{where}{exc}") from exc
    if baseline.source != "final_exit":
        logger.info(
            "measuring against the %s baseline: %s%% on %s%s%s",
            baseline.source,
            baseline.tune,
            split,
            f", {baseline.test}% on {test_split}" if test_split else "",
            " (paired row by row)" if baseline.tune_correct is not None else "",
        )
    own = own_plain_answers(
        request, manifest, {"tune": split, "test": test_split}, labels, baseline.own_plain
    )
    table = _table(tune_cal, manifest, "calibration data", baseline.tune_correct, own["tune"])
    test_table = None
    if test_cal is not None:
        test_table = _table(
            test_cal, manifest, "test calibration data", baseline.test_correct, own["test"]
        )
    # Paired: baseline None = the table's reference model on the very rows tuned on (with
    # --limit, its accuracy on those rows, not on the whole split).
    paired = baseline.tune_correct is not None
    outcome = tune(
        table,
        costs,
        replace(request.options, baseline=None if paired else baseline.tune),
        test_table,
        replace(request.options, baseline=None if paired else baseline.test),
    )

    data = DataInfo(
        dataset=request.dataset or tune_cal.meta.get("dataset"),
        split=split,
        # Names relative to the bundle (or bare file names): no machine paths in artifacts.
        source=portable_path(tune_cal.source, request.bundle),
        test_split=test_split,
        test_source=None if test_cal is None else portable_path(test_cal.source, request.bundle),
        bundle_sha256=bundle_sha256(manifest),
        limit=request.limit,
        split_rows=whole_cal.num_rows,
    )
    tuned = tuned_provenance(outcome, request.options, costs, data)
    tuned["baseline"] = baseline.to_dict()
    values = validate_threshold_values(list(outcome.thresholds), manifest.num_exits)
    # What the server's drift statistic and drop alert compare live traffic with (core.drift).
    plain = own["tune"]
    tuned["reference"] = confidence_reference(
        tune_cal.exit_probs,
        split,
        thresholds=values,
        fallback=manifest.fallback,
        plain_probs=None if plain is None else plain.exit_probs[: tune_cal.num_rows, -1],
    )
    files: dict[str, Any] = {
        "thresholds_file": None,
        "plots": [],
        "pareto_files": [],
        "dry_run": request.dry_run,
        "notified": None,
    }
    if not request.dry_run:
        path = write_thresholds(request.bundle, Thresholds(values=values, tuned=tuned))
        files["thresholds_file"] = str(path)
        logger.info("wrote %s", path)
    # Plots and the front go where the user pointed --plots, also in a dry run; into the bundle
    # only for a real run.
    artifacts = request.plots or (None if request.dry_run else request.bundle)
    if outcome.pareto is not None and artifacts is not None:
        files["pareto_files"] = [
            str(p) for p in write_pareto_files(artifacts, outcome.pareto.front)
        ]
    if request.plots is not None:
        from thresholds.plots import write_plots

        files["plots"] = [
            str(p) for p in write_plots(request.plots, outcome, costs, split, test_split)
        ]
    result = result_json(outcome, request.options, costs, data, **files)
    result["baseline"] = baseline.to_dict()
    if request.notify is not None and not request.dry_run:
        token = admin_token()
        if token is None:  # checked in check(); the environment may have changed meanwhile
            raise NotifyError("EARLYEXIT_ADMIN_TOKEN is not set")
        try:
            push_thresholds(request.notify, list(values), tuned, token)
        except NotifyError as exc:
            written = files["thresholds_file"]
            raise NotifyError(f"{exc} (thresholds.json was written: {written})") from exc
        result["notified"] = request.notify.rstrip("/") + "/v1/thresholds"
    result["total_seconds"] = time.perf_counter() - started
    return result
