"""The one exception type tuning raises for bad user input (the CLI turns it into exit 2)."""

from __future__ import annotations


class TuningError(ValueError):
    """Bad calibration data, options or constraints; the message is one user-facing line."""
