"""The whole `earlyexit-tune` job as a library call: bundle + data in, thresholds.json out.

Steps: read the manifest; get calibration arrays (a saved `.npz`, or collected through the
runtime and cached); check they fit the bundle; build the cost model; tune; score on the
held-out split; write `thresholds.json` atomically with provenance, plots and the Pareto front;
optionally push the thresholds to a running server.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from serving.bundle import (
    Manifest,
    Thresholds,
    load_manifest,
    validate_threshold_values,
    write_thresholds,
)
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
        return load_or_collect(
            request.bundle,
            manifest,
            request.dataset or "",
            request.data_dir or Path("."),
            split,
            batch_size=request.batch_size,
            cache_dir=request.cache_dir,
            options=request.runtime,
            write_cache=not request.dry_run,
        )

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


def _table(calibration: Calibration, manifest: Manifest, what: str) -> ExitTable:
    check_against_manifest(calibration, manifest, what)
    return build_exit_table(calibration.exit_probs, calibration.labels, manifest.fallback)


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
    table = _table(tune_cal, manifest, "calibration data")
    test_table = None if test_cal is None else _table(test_cal, manifest, "test calibration data")
    costs = cost_model(
        request.cost,
        request.bundle,
        manifest,
        request.batch_size,
        request.runtime,
        request.latency_repeats,
        write=not request.dry_run,
    )
    outcome = tune(table, costs, request.options, test_table)

    data = DataInfo(
        dataset=request.dataset or tune_cal.meta.get("dataset"),
        split=split,
        source=tune_cal.source,
        test_split=test_split,
        test_source=None if test_cal is None else test_cal.source,
        bundle_sha256=bundle_sha256(manifest),
        limit=request.limit,
        split_rows=whole_cal.num_rows,
    )
    tuned = tuned_provenance(outcome, request.options, costs, data)
    values = validate_threshold_values(list(outcome.thresholds), manifest.num_exits)
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
