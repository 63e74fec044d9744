"""matplotlib on the file-only Agg backend, imported on first use (nothing heavy at import
time), and PNGs written atomically: what every report and study in the project plots with."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from core.atomic import atomic_write_bytes


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, imported on first use (nothing heavy at
    import time)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_png(fig: Any, path: str | os.PathLike[str], *, dpi: int = 120, tight: bool = True) -> Path:
    """Write `fig` as a PNG atomically (a crash never leaves half a file) and close it."""
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight" if tight else None)
        atomic_write_bytes(path, buffer.getvalue())
        return Path(path)
    finally:
        pyplot().close(fig)
