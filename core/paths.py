"""Paths written into artifacts (manifests, thresholds.json, reports) carry no trace of the
machine that made them: relative to the artifact's own directory when inside it, otherwise
just the file's name."""

from __future__ import annotations

import os
from pathlib import Path
from typing import overload


@overload
def portable_path(
    path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None
) -> str: ...
@overload
def portable_path(path: None, base: str | os.PathLike[str] | None = None) -> None: ...
@overload
def portable_path(
    path: str | os.PathLike[str] | None, base: str | os.PathLike[str] | None = None
) -> str | None: ...


def portable_path(
    path: str | os.PathLike[str] | None, base: str | os.PathLike[str] | None = None
) -> str | None:
    """`path` as an artifact may record it: relative to `base` when it lies inside it (so a
    bundle's cache reads the same wherever the bundle was tuned from), else unchanged when
    relative, else its last name. None and "" pass through."""
    if path is None:
        return None
    if str(path) == "":
        return ""
    p = Path(path)
    if base is not None:
        try:
            return p.resolve().relative_to(Path(base).resolve()).as_posix()
        except ValueError:
            pass
    if not p.is_absolute():
        return os.fspath(path)
    return p.name
