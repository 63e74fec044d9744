"""The bundle format: `manifest.json` + chained ONNX segments + `thresholds.json`.

This module is the only contract between export (`training`), tuning (`thresholds`), serving
and the benchmarks. It imports neither torch nor onnxruntime: it parses the JSON files,
validates the manifest against its schema (`core.manifest_schema`), writes them atomically and
checks file hashes. See `../shared/CONTRACT.md` (section "Bundle") for the layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core.atomic import atomic_write_json
from core.manifest_schema import BUNDLE_FORMAT, ManifestModel, error_line

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
THRESHOLDS_FILE = "thresholds.json"


class BundleError(ValueError):
    """A bundle is missing, malformed or fails verification; the message names the problem."""


@dataclass(frozen=True)
class InputSpec:
    """How an image becomes the float32 NCHW tensor segment 1 expects."""

    shape: tuple[int, int, int]  # C, H, W
    mean: tuple[float, ...]
    std: tuple[float, ...]
    color_mode: str = "RGB"  # "RGB" or "L"


@dataclass(frozen=True)
class SegmentSpec:
    """Segment k: backbone stage k (+ stem for k = 1) and exit head k."""

    index: int  # 1-based
    file: str
    sha256: str
    input_name: str
    input_shape: tuple[int, ...]  # without the batch axis
    probs_output: str
    feature_output: str | None  # None for the last segment
    feature_shape: tuple[int, ...] | None
    macs: int  # stage k + head k
    params: int
    stage_file: str | None = None  # stage k without the head: features only
    stage_sha256: str | None = None
    stage_macs: int | None = None


@dataclass(frozen=True)
class FullModelSpec:
    """The plain single-graph backbone (no exit heads): what users would deploy otherwise."""

    file: str
    sha256: str
    macs: int
    params: int
    input_name: str = "input"
    probs_output: str = "probs"


@dataclass(frozen=True)
class BaselineSpec:
    """The plain model early exit is compared with: its recipe, accuracy (percent) per split,
    and its single-graph ONNX when that is not `full_model`."""

    recipe: str
    accuracy: dict[str, float]
    file: str | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    labels: tuple[str, ...]
    input: InputSpec
    segments: tuple[SegmentSpec, ...]
    fallback: str
    full_model: FullModelSpec
    provenance: dict[str, Any] = field(default_factory=dict)
    format: str = BUNDLE_FORMAT
    baseline: BaselineSpec | None = None
    exit_points: tuple[str | int, ...] | None = None  # the backbone block each exit follows

    @property
    def num_exits(self) -> int:
        return len(self.segments)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def segment_macs(self) -> list[int]:
        return [s.macs for s in self.segments]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for optional in ("baseline", "exit_points"):  # absent, not null, when not given
            if data[optional] is None:
                del data[optional]
        if data.get("baseline") is not None:
            data["baseline"] = {k: v for k, v in data["baseline"].items() if v is not None}
        return data


@dataclass(frozen=True)
class Thresholds:
    """Per-exit acceptance thresholds: exit k accepts a row when max prob > values[k-1]."""

    values: tuple[float, ...]
    tuned: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": list(self.values), "tuned": self.tuned}


# ----------------------------------------------------------------------------- parsing

# manifest.json and thresholds.json are a few KiB; the caps refuse a wrong file quickly instead
# of reading gigabytes, and the depth cap refuses JSON nested deeper than any real manifest.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_THRESHOLDS_BYTES = 16 * 1024 * 1024
MAX_JSON_DEPTH = 64


def _json_depth(value: Any, limit: int) -> int:
    """Nesting depth of decoded JSON, counted without recursion; stops once past `limit`."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return deepest


def _baseline_spec(model: Any) -> BaselineSpec | None:
    if model is None:
        return None
    return BaselineSpec(
        recipe=model.recipe,
        accuracy={split: float(value) for split, value in model.accuracy.items()},
        file=model.file,
        sha256=model.sha256,
    )


def parse_manifest(data: Any) -> Manifest:
    """Validate a decoded manifest.json against `core.manifest_schema` and return it typed;
    BundleError names the first bad field in one line."""
    if not isinstance(data, dict):
        raise BundleError("manifest.json: must be a JSON object")
    if _json_depth(data, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise BundleError(f"manifest.json: nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        model = ManifestModel.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"manifest.json: {error_line(exc.errors())}") from None
    inp = model.input
    channels = inp.shape[0]
    input_spec = InputSpec(
        shape=(inp.shape[0], inp.shape[1], inp.shape[2]),
        mean=tuple(float(v) for v in inp.mean),
        std=tuple(float(v) for v in inp.std),
        color_mode=inp.color_mode or ("RGB" if channels == 3 else "L"),
    )
    last = len(model.segments)
    segments = tuple(
        SegmentSpec(
            index=i,
            file=seg.file,
            sha256=seg.sha256,
            input_name=seg.input_name,
            input_shape=tuple(seg.input_shape),
            probs_output=seg.probs_output,
            feature_output=None if i == last else seg.feature_output,
            feature_shape=None
            if i == last or seg.feature_shape is None
            else tuple(seg.feature_shape),
            macs=seg.macs,
            params=seg.params,
            stage_file=seg.stage_file,
            stage_sha256=seg.stage_sha256,
            stage_macs=seg.stage_macs,
        )
        for i, seg in enumerate(model.segments, start=1)
    )
    full = model.full_model
    return Manifest(
        name=model.name,
        version=str(model.version),
        labels=tuple(model.labels),
        input=input_spec,
        segments=segments,
        fallback=model.fallback,
        full_model=FullModelSpec(
            file=full.file,
            sha256=full.sha256,
            macs=full.macs,
            params=full.params,
            input_name=full.input_name,
            probs_output=full.probs_output,
        ),
        provenance=dict(model.provenance),
        format=model.format,
        baseline=_baseline_spec(model.baseline),
        exit_points=None if model.exit_points is None else tuple(model.exit_points),
    )


def _read_json(path: Path, limit: int, what: str) -> Any:
    """Decode a small JSON file; every way it can fail is a BundleError naming the file."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise BundleError(f"{path}: {size} bytes, more than the {limit} a {what} may have")
        text = path.read_text(encoding="utf-8")
        return json.loads(text)
    except RecursionError:
        raise BundleError(f"{path}: not valid JSON (nested too deeply)") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        # ValueError covers JSONDecodeError and integers too long to convert.
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(manifest: Manifest) -> list[tuple[str, str]]:
    """(file, expected sha256) for every file the manifest names, the optional baseline
    model's included: `earlyexit-serve --full-model` serves it, so it is verified like the
    segments."""
    files = [(s.file, s.sha256) for s in manifest.segments]
    files += [(s.stage_file, s.stage_sha256 or "") for s in manifest.segments if s.stage_file]
    files.append((manifest.full_model.file, manifest.full_model.sha256))
    baseline = manifest.baseline
    if baseline is not None and baseline.file:
        # The schema refuses a `file` without its `sha256`.
        files.append((baseline.file, baseline.sha256 or ""))
    return files


def named_files(manifest: Manifest) -> list[str]:
    """Every file name the manifest holds."""
    return [name for name, _ in bundle_files(manifest)]


@dataclass(frozen=True)
class PlainGraph:
    """The plain single-graph model of a bundle: what early exit is compared with."""

    file: str
    sha256: str
    source: str  # "baseline" (the manifest's baseline block) or "full_model"
    macs: int | None  # None when the manifest does not record it


def plain_graph(manifest: Manifest) -> PlainGraph:
    """The baseline block's `file` when it names one (the plain model trained on its own; a
    jointly trained self-distilled backbone is not it), else `full_model`."""
    baseline = manifest.baseline
    if baseline is not None and baseline.file:
        # The baseline block has no `macs`; export records every graph's counted MACs in
        # provenance.onnx_macs, which is the best figure there is.
        recorded = manifest.provenance.get("onnx_macs")
        counted = recorded.get(baseline.file) if isinstance(recorded, dict) else None
        macs = counted if isinstance(counted, int) and not isinstance(counted, bool) else None
        return PlainGraph(baseline.file, baseline.sha256 or "", "baseline", macs)
    full = manifest.full_model
    return PlainGraph(full.file, full.sha256, "full_model", full.macs)


def plain_macs(manifest: Manifest) -> int:
    """MACs per row of the plain graph (`plain_graph`): what a fallback "plain" row pays for it,
    the full model's count when the baseline's was not recorded."""
    return plain_graph(manifest).macs or manifest.full_model.macs


def check_paths(bundle_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    """Refuse a file name that resolves outside the bundle directory, through a symlink too:
    a manifest must not make the server read files it was not shipped with."""
    root = Path(bundle_dir).resolve()
    for name in named_files(manifest):
        try:
            target = (root / name).resolve()
        except (OSError, RuntimeError) as exc:  # RuntimeError: a symlink loop
            raise BundleError(f"manifest.json: file {name!r} cannot be resolved ({exc})") from exc
        if not target.is_relative_to(root):
            raise BundleError(f"manifest.json: file {name!r} resolves outside the bundle directory")


def load_manifest(bundle_dir: str | os.PathLike[str], verify: bool = True) -> Manifest:
    """Read and validate `manifest.json` (schema, file names inside the bundle); with `verify`,
    check every named file's sha256. Every problem is a one-line BundleError."""
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"bundle directory not found: {bundle}")
    path = bundle / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"no {MANIFEST_FILE} in bundle {bundle}")
    manifest = parse_manifest(_read_json(path, MAX_MANIFEST_BYTES, "manifest"))
    check_paths(bundle, manifest)
    if verify:
        verify_files(bundle, manifest)
    return manifest


def verify_files(bundle_dir: str | os.PathLike[str], manifest: Manifest) -> None:
    bundle = Path(bundle_dir)
    for name, expected in bundle_files(manifest):
        file_path = bundle / name
        if not file_path.is_file():
            raise BundleError(f"bundle file missing: {name}")
        actual = sha256_file(file_path)
        if actual != expected:
            raise BundleError(
                f"sha256 mismatch for {name}: manifest says {expected[:12]}…, file is "
                f"{actual[:12]}… (corrupted or replaced file)"
            )


# ----------------------------------------------------------------------------- thresholds

# The tuning record is provenance, not a data store: a bound keeps thresholds.json small.
MAX_TUNED_BYTES = 64 * 1024


def validate_threshold_values(values: Sequence[Any], num_exits: int) -> tuple[float, ...]:
    """Check length and range; returns floats. Raises BundleError with a user-facing message,
    also for integers too large for a float (JSON allows them)."""
    if not isinstance(values, list | tuple):
        raise BundleError("thresholds must be a list of numbers")
    if len(values) != num_exits:
        raise BundleError(f"expected {num_exits} thresholds (one per exit), got {len(values)}")
    out = []
    for i, v in enumerate(values, start=1):
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise BundleError(f"threshold {i} is not a finite number: {_short(v)}")
        # Integers are compared as integers: float() of a 400-digit one raises OverflowError.
        if isinstance(v, float) and not math.isfinite(v):
            raise BundleError(f"threshold {i} is not a finite number: {v!r}")
        if not 0 <= v <= 1:
            raise BundleError(f"threshold {i} must be in [0, 1], got {_short(v)}")
        out.append(float(v))
    return tuple(out)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}…({len(text)} characters)"


def standard_json(value: Any) -> Any:
    """`value` with every non-finite float replaced by None: `json.dumps` writes NaN and
    Infinity as bare words, which are not JSON and which other parsers refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: standard_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [standard_json(v) for v in value]
    return value


def check_tuned_record(tuned: Any) -> dict[str, Any]:
    """A `tuned` record a client sent: a JSON object of standard JSON values (no NaN or
    Infinity), at most MAX_TUNED_BYTES once written. BundleError otherwise."""
    if not isinstance(tuned, dict):
        raise BundleError("'tuned' must be a JSON object")
    try:
        text = json.dumps(tuned, allow_nan=False)
    except (ValueError, TypeError, RecursionError) as exc:
        raise BundleError(f"'tuned' must hold standard JSON values only ({exc})") from None
    if len(text) > MAX_TUNED_BYTES:
        raise BundleError(f"'tuned' is {len(text)} bytes written; the limit is {MAX_TUNED_BYTES}")
    return tuned


def read_thresholds(
    bundle_dir: str | os.PathLike[str], num_exits: int, missing_ok: bool = True
) -> Thresholds:
    """Read `thresholds.json`. A missing file means full depth (every exit disabled but the
    last) when `missing_ok` (a bundle before tuning); otherwise, and for anything that is not a
    regular file (a directory, a FIFO), a BundleError: a re-read never changes what is served
    because a file went away."""
    path = Path(bundle_dir) / THRESHOLDS_FILE
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        if not missing_ok:
            raise BundleError(f"{path} not found") from None
        logger.warning("%s not found: running at full depth", path)
        return Thresholds(values=(1.0,) * num_exits, tuned={"method": "default"})
    except OSError as exc:
        raise BundleError(f"{path}: cannot be read ({exc})") from exc
    if not stat.S_ISREG(mode):
        raise BundleError(f"{path} is not a regular file")
    data = _read_json(path, MAX_THRESHOLDS_BYTES, "thresholds file")
    if not isinstance(data, dict) or "thresholds" not in data:
        raise BundleError(f"{path}: missing field 'thresholds'")
    values = validate_threshold_values(data["thresholds"], num_exits)
    tuned = data.get("tuned") or {}
    return Thresholds(values=values, tuned=tuned if isinstance(tuned, dict) else {})


def write_thresholds(bundle_dir: str | os.PathLike[str], thresholds: Thresholds) -> Path:
    """Write `thresholds.json` atomically, as standard JSON (a NaN in the record becomes null)."""
    path = Path(bundle_dir) / THRESHOLDS_FILE
    atomic_write_json(path, standard_json(thresholds.to_dict()))
    return path
