"""The bundle format: `manifest.json` + chained ONNX segments + `thresholds.json`.

This module is the only contract between export (`training`), tuning (`thresholds`) and serving.
It imports neither torch nor onnxruntime: it parses, validates and writes the JSON files and
checks file hashes. See `../shared/CONTRACT.md` (section "Bundle") for the layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BUNDLE_FORMAT = "earlyexit-bundle/1"
MANIFEST_FILE = "manifest.json"
THRESHOLDS_FILE = "thresholds.json"
FALLBACKS = ("ensemble", "last")


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

    @property
    def num_exits(self) -> int:
        return len(self.segments)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    def segment_macs(self) -> list[int]:
        return [s.macs for s in self.segments]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Thresholds:
    """Per-exit acceptance thresholds: exit k accepts a row when max prob > values[k-1]."""

    values: tuple[float, ...]
    tuned: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"thresholds": list(self.values), "tuned": self.tuned}


# ----------------------------------------------------------------------------- parsing


def _require(mapping: dict[str, Any], key: str, where: str) -> Any:
    if not isinstance(mapping, dict) or key not in mapping:
        raise BundleError(f"manifest.json: missing field '{where}{key}'")
    return mapping[key]


def _int_tuple(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not all(isinstance(v, int) and v > 0 for v in value):
        raise BundleError(f"manifest.json: '{where}' must be a list of positive integers")
    return tuple(value)


def parse_manifest(data: dict[str, Any]) -> Manifest:
    """Validate a decoded manifest.json and return it typed; BundleError names the bad field."""
    fmt = _require(data, "format", "")
    if fmt != BUNDLE_FORMAT:
        raise BundleError(f"manifest.json: unsupported format {fmt!r} (expected {BUNDLE_FORMAT!r})")
    labels = _require(data, "labels", "")
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise BundleError("manifest.json: 'labels' must be a non-empty list of strings")
    inp = _require(data, "input", "")
    shape = _int_tuple(_require(inp, "shape", "input."), "input.shape")
    if len(shape) != 3:
        raise BundleError("manifest.json: 'input.shape' must be [C, H, W]")
    mean = tuple(float(v) for v in _require(inp, "mean", "input."))
    std = tuple(float(v) for v in _require(inp, "std", "input."))
    if len(mean) != shape[0] or len(std) != shape[0] or any(s <= 0 for s in std):
        raise BundleError("manifest.json: 'input.mean'/'input.std' must have C entries, std > 0")
    color_mode = inp.get("color_mode", "RGB" if shape[0] == 3 else "L")
    if color_mode not in ("RGB", "L"):
        raise BundleError(f"manifest.json: unsupported input.color_mode {color_mode!r}")
    input_spec = InputSpec(shape=shape, mean=mean, std=std, color_mode=color_mode)

    raw_segments = _require(data, "segments", "")
    if not isinstance(raw_segments, list) or not raw_segments:
        raise BundleError("manifest.json: 'segments' must be a non-empty list")
    segments = []
    for i, seg in enumerate(raw_segments, start=1):
        where = f"segments[{i - 1}]."
        last = i == len(raw_segments)
        feature_output = seg.get("feature_output")
        if not last and not feature_output:
            raise BundleError(f"manifest.json: missing field '{where}feature_output'")
        feature_shape = seg.get("feature_shape")
        segments.append(
            SegmentSpec(
                index=i,
                file=str(_require(seg, "file", where)),
                sha256=str(_require(seg, "sha256", where)),
                input_name=str(_require(seg, "input_name", where)),
                input_shape=_int_tuple(_require(seg, "input_shape", where), where + "input_shape"),
                probs_output=str(_require(seg, "probs_output", where)),
                feature_output=None if last else str(feature_output),
                feature_shape=None
                if last or feature_shape is None
                else _int_tuple(feature_shape, where + "feature_shape"),
                macs=int(_require(seg, "macs", where)),
                params=int(_require(seg, "params", where)),
                stage_file=seg.get("stage_file"),
                stage_sha256=seg.get("stage_sha256"),
                stage_macs=None if seg.get("stage_macs") is None else int(seg["stage_macs"]),
            )
        )
    if segments[0].input_shape != shape:
        raise BundleError(
            f"manifest.json: segment 1 input shape {list(segments[0].input_shape)} "
            f"!= input.shape {list(shape)}"
        )
    for prev, nxt in zip(segments, segments[1:], strict=False):
        if prev.feature_output != nxt.input_name:
            raise BundleError(
                f"manifest.json: segment {nxt.index} input '{nxt.input_name}' does not match "
                f"segment {prev.index} feature output '{prev.feature_output}'"
            )
        if prev.feature_shape is not None and prev.feature_shape != nxt.input_shape:
            raise BundleError(
                f"manifest.json: segment {nxt.index} input shape {list(nxt.input_shape)} does not "
                f"match segment {prev.index} feature shape {list(prev.feature_shape)}"
            )
    fallback = data.get("fallback", "ensemble")
    if fallback not in FALLBACKS:
        raise BundleError(f"manifest.json: 'fallback' must be one of {FALLBACKS}, got {fallback!r}")
    full = _require(data, "full_model", "")
    full_spec = FullModelSpec(
        file=str(_require(full, "file", "full_model.")),
        sha256=str(_require(full, "sha256", "full_model.")),
        macs=int(_require(full, "macs", "full_model.")),
        params=int(full.get("params", 0)),
        input_name=str(full.get("input_name", "input")),
        probs_output=str(full.get("probs_output", "probs")),
    )
    if full_spec.macs <= 0 or any(s.macs <= 0 for s in segments):
        raise BundleError("manifest.json: MAC counts must be positive")
    return Manifest(
        name=str(_require(data, "name", "")),
        version=str(_require(data, "version", "")),
        labels=tuple(labels),
        input=input_spec,
        segments=tuple(segments),
        fallback=fallback,
        full_model=full_spec,
        provenance=dict(data.get("provenance", {})),
    )


def sha256_file(path: str | os.PathLike[str]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_files(manifest: Manifest) -> list[tuple[str, str]]:
    """(file, expected sha256) for every file the manifest names."""
    files = [(s.file, s.sha256) for s in manifest.segments]
    files += [(s.stage_file, s.stage_sha256 or "") for s in manifest.segments if s.stage_file]
    files.append((manifest.full_model.file, manifest.full_model.sha256))
    return files


def load_manifest(bundle_dir: str | os.PathLike[str], verify: bool = True) -> Manifest:
    """Read and validate `manifest.json`; with `verify`, check every named file's sha256."""
    bundle = Path(bundle_dir)
    if not bundle.is_dir():
        raise BundleError(f"bundle directory not found: {bundle}")
    path = bundle / MANIFEST_FILE
    if not path.is_file():
        raise BundleError(f"no {MANIFEST_FILE} in bundle {bundle}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    manifest = parse_manifest(data)
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


def validate_threshold_values(values: Sequence[Any], num_exits: int) -> tuple[float, ...]:
    """Check length and range; returns floats. Raises BundleError with a user-facing message."""
    if not isinstance(values, list | tuple):
        raise BundleError("thresholds must be a list of numbers")
    if len(values) != num_exits:
        raise BundleError(f"expected {num_exits} thresholds (one per exit), got {len(values)}")
    out = []
    for i, v in enumerate(values, start=1):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise BundleError(f"threshold {i} is not a finite number: {v!r}")
        if not 0.0 <= float(v) <= 1.0:
            raise BundleError(f"threshold {i} must be in [0, 1], got {v}")
        out.append(float(v))
    return tuple(out)


def read_thresholds(bundle_dir: str | os.PathLike[str], num_exits: int) -> Thresholds:
    """Read `thresholds.json`; a missing file means full depth (every exit disabled but last)."""
    path = Path(bundle_dir) / THRESHOLDS_FILE
    if not path.is_file():
        logger.warning("%s not found: running at full depth", path)
        return Thresholds(values=(1.0,) * num_exits, tuned={"method": "default"})
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or "thresholds" not in data:
        raise BundleError(f"{path}: missing field 'thresholds'")
    values = validate_threshold_values(data["thresholds"], num_exits)
    tuned = data.get("tuned") or {}
    return Thresholds(values=values, tuned=tuned if isinstance(tuned, dict) else {})


def atomic_write_bytes(path: str | os.PathLike[str], payload: bytes) -> None:
    """Write via a temp file in the same directory + fsync + rename: readers see old or new."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        # mkstemp creates 0600; give the file the mode a plain open() would (a non-root server
        # in a container must be able to read what the tuner wrote).
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            fh.write(payload)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode("utf-8"))


def write_thresholds(bundle_dir: str | os.PathLike[str], thresholds: Thresholds) -> Path:
    path = Path(bundle_dir) / THRESHOLDS_FILE
    atomic_write_json(path, thresholds.to_dict())
    return path
