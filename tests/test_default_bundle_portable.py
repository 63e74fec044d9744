"""The shipped bundle's JSON artifacts carry no path of the machine that built them."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from core.paths import portable_path

BUNDLE = Path(__file__).resolve().parents[1] / "serving" / "default_bundle"
ABSOLUTE = re.compile(r"^(/|[A-Za-z]:[\\/]|\\\\)")


def _strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield str(k)
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, str):
        yield value


@pytest.mark.parametrize("name", ["manifest.json", "thresholds.json"])
def test_no_absolute_paths_in_shipped_artifacts(name):
    data = json.loads((BUNDLE / name).read_text(encoding="utf-8"))
    offenders = [s for s in _strings(data) if ABSOLUTE.match(s)]
    assert offenders == []


def test_portable_path(tmp_path):
    inside = tmp_path / "bundle" / "calibration_cache" / "x.npz"
    assert portable_path(inside, tmp_path / "bundle") == "calibration_cache/x.npz"
    assert portable_path(tmp_path / "elsewhere" / "y.npz", tmp_path / "bundle") == "y.npz"
    assert portable_path("relative/z.npz") == "relative/z.npz"
    # a relative path inside the bundle is recorded relative to the bundle, not the cwd
    (tmp_path / "bundle" / "calibration_cache").mkdir(parents=True)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert (
            portable_path("bundle/calibration_cache/x.npz", "bundle") == "calibration_cache/x.npz"
        )
    finally:
        os.chdir(cwd)
    assert portable_path(None) is None and portable_path("") == ""
