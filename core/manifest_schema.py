"""The schema of `manifest.json` as pydantic models: types, ranges and cross-field rules.

`core.bundle.parse_manifest` validates a decoded manifest against `ManifestModel` and turns
it into the frozen dataclasses the rest of the code uses. Models are strict: a number given as a
string, a float where a count belongs or a non-finite float is refused, never coerced. Unknown
keys are kept out of the way (allowed and ignored) so newer writers stay readable.

File names are checked here as text (relative, no `..`, no drive or backslash); that they
resolve inside the bundle directory, symlinks included, is checked by `core.bundle`, which
knows the directory.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

BUNDLE_FORMAT = "earlyexit-bundle/1"
# Generous bounds that still keep every later float conversion and product finite.
MAX_COUNT = 2**63 - 1
MAX_DIM = 1 << 20
_SHA256 = re.compile(r"^[0-9a-fA-F]{64}$")


def _relative_file(name: str) -> str:
    """A bundle-relative file name: no absolute path, drive, backslash, `..` or empty part."""
    if not name or "\x00" in name:
        raise ValueError("must be a non-empty file name")
    if "\\" in name or PureWindowsPath(name).drive:
        raise ValueError(f"{name!r}: use a plain relative path with '/' separators")
    path = PurePosixPath(name)
    if path.is_absolute():
        raise ValueError(f"{name!r}: absolute paths are not allowed, name a file in the bundle")
    if any(part in ("..", "") for part in name.split("/")) or path.name in ("", "."):
        raise ValueError(f"{name!r}: '..' and empty path parts are not allowed")
    return name


def _sha256(value: str) -> str:
    if not _SHA256.match(value):
        raise ValueError("must be 64 hexadecimal digits")
    return value.lower()


FileName = Annotated[str, AfterValidator(_relative_file)]
Sha256 = Annotated[str, AfterValidator(_sha256)]
Name = Annotated[str, Field(min_length=1, max_length=4096)]
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
PositiveCount = Annotated[int, Field(gt=0, le=MAX_COUNT)]
Dim = Annotated[int, Field(gt=0, le=MAX_DIM)]
Shape = Annotated[list[Dim], Field(min_length=1, max_length=8)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
Percent = Annotated[float, Field(ge=0.0, le=100.0, allow_inf_nan=False)]


class _Strict(BaseModel):
    # extra="allow": a newer writer's fields do not make an older server refuse the bundle.
    model_config = ConfigDict(strict=True, extra="allow", frozen=True)


class InputModel(_Strict):
    shape: Annotated[list[Dim], Field(min_length=3, max_length=3)]
    mean: list[FiniteFloat]
    std: list[Annotated[float, Field(gt=0.0, allow_inf_nan=False)]]
    color_mode: Literal["RGB", "L"] | None = None

    @model_validator(mode="after")
    def _channels(self) -> InputModel:
        channels = self.shape[0]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"'mean' and 'std' must have C = {channels} entries each")
        mode = self.color_mode or ("RGB" if channels == 3 else "L")
        if (mode, channels) not in (("RGB", 3), ("L", 1)):
            raise ValueError(f"color_mode {mode} needs {3 if mode == 'RGB' else 1} channels")
        return self


class SegmentModel(_Strict):
    file: FileName
    sha256: Sha256
    input_name: Name
    input_shape: Shape
    probs_output: Name
    feature_output: Name | None = None
    feature_shape: Shape | None = None
    macs: PositiveCount
    params: Count
    stage_file: FileName | None = None
    stage_sha256: Sha256 | None = None
    stage_macs: Count | None = None


class FullModelModel(_Strict):
    file: FileName
    sha256: Sha256
    macs: PositiveCount
    params: Count = 0
    input_name: Name = "input"
    probs_output: Name = "probs"


class BaselineModel(_Strict):
    """The plain model early exit is compared with (CONTRACT.md, "Newer fields")."""

    recipe: Name
    accuracy: dict[str, Percent]
    file: FileName | None = None
    sha256: Sha256 | None = None

    @model_validator(mode="after")
    def _splits(self) -> BaselineModel:
        missing = [split for split in ("val", "test") if split not in self.accuracy]
        if missing:
            raise ValueError(f"'accuracy' needs the splits val and test (missing {missing})")
        if self.file is not None and self.sha256 is None:
            raise ValueError("'file' needs its 'sha256'")
        return self


ExitPoint = Annotated[str, Field(min_length=1, max_length=256)] | Count


class ManifestModel(_Strict):
    format: Literal["earlyexit-bundle/1"]
    name: Name
    # Some writers put a bare number here; it names a release, so it is kept as text.
    version: Name | Count
    labels: Annotated[list[Name], Field(min_length=1, max_length=1_000_000)]
    input: InputModel
    segments: Annotated[list[SegmentModel], Field(min_length=1, max_length=1024)]
    fallback: Literal["ensemble", "last", "plain"] = "ensemble"
    full_model: FullModelModel
    provenance: dict[str, Any] = Field(default_factory=dict)
    baseline: BaselineModel | None = None
    exit_points: list[ExitPoint] | None = None

    @model_validator(mode="after")
    def _chain(self) -> ManifestModel:
        segments = self.segments
        for i, seg in enumerate(segments[:-1]):
            if not seg.feature_output:
                raise ValueError(f"missing field 'segments[{i}].feature_output'")
        if segments[0].input_shape != self.input.shape:
            raise ValueError(
                f"segment 1 input shape {segments[0].input_shape} != input.shape {self.input.shape}"
            )
        for k, (prev, nxt) in enumerate(zip(segments, segments[1:], strict=False), start=2):
            if prev.feature_output != nxt.input_name:
                raise ValueError(
                    f"segment {k} input '{nxt.input_name}' does not match segment {k - 1} "
                    f"feature output '{prev.feature_output}'"
                )
            if prev.feature_shape is not None and prev.feature_shape != nxt.input_shape:
                raise ValueError(
                    f"segment {k} input shape {nxt.input_shape} does not match segment {k - 1} "
                    f"feature shape {prev.feature_shape}"
                )
        if self.exit_points is not None and len(self.exit_points) != len(segments):
            raise ValueError(
                f"'exit_points' has {len(self.exit_points)} entries for {len(segments)} exits"
            )
        return self


def error_line(errors: Sequence[Mapping[str, Any]]) -> str:
    """The first pydantic error as one line naming the field, e.g. `segments[1].macs: ...`."""
    if not errors:
        return "invalid manifest"
    err = errors[0]
    where = ""
    for part in err.get("loc", ()):
        where += f"[{part}]" if isinstance(part, int) else (f".{part}" if where else str(part))
    message = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
    if err.get("type") == "missing":
        return f"missing field '{where}'{more}"
    if not where:  # a cross-field rule of the whole manifest: its message names the fields
        return message + more
    shown = repr(err.get("input"))
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return f"'{where}': {message} (got {shown}){more}"
