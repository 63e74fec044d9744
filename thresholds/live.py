"""`earlyexit-tune --from-server URL`: tune offline on a running server's live shadow sample.

The server's `GET /v1/shadow?rows=N` returns the newest N sampled rows' per-exit probabilities.
They are saved as calibration arrays whose labels are the final exit's own predictions, so the
usual search and modes tune for agreement with full depth (`--max-drop EPS --confidence Z`
bounds the agreement given up) and the final exit scores 100 %.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from core.calibration import save_calibration
from thresholds.errors import TuningError
from thresholds.notify import admin_token

logger = logging.getLogger(__name__)
DEFAULT_LIVE_ROWS = 100_000


class LiveSampleError(RuntimeError):
    """The server could not be reached or answered something unusable (exit 1)."""


def fetch_live_sample(
    url: str, rows: int = DEFAULT_LIVE_ROWS, timeout_s: float = 60.0
) -> dict[str, Any]:
    """The `/v1/shadow` answer with its `sample` (sent with $EARLYEXIT_ADMIN_TOKEN: the rows
    are admin-only). TuningError when the server refuses (no sample: sampling off,
    --full-model; no or a wrong token); LiveSampleError when it cannot be reached."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise TuningError(f"--from-server needs an http(s) URL, got {url!r}")
    endpoint = f"{url.rstrip('/')}/v1/shadow?rows={int(rows)}"
    token = admin_token()
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(endpoint, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("detail", exc.reason)
        except (ValueError, AttributeError):
            detail = exc.reason
        raise TuningError(f"{endpoint}: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise LiveSampleError(f"{endpoint}: {exc}") from exc
    if not isinstance(answer, dict) or not isinstance(answer.get("sample"), dict):
        raise LiveSampleError(f"{endpoint}: the answer has no sample")
    return answer


def save_live_calibration(url: str, target: Path, rows: int = DEFAULT_LIVE_ROWS) -> Path:
    """Fetch the live sample and save it as calibration arrays (labels = final exit's answer).
    TuningError when it is empty."""
    answer = fetch_live_sample(url, rows)
    sample = answer["sample"]
    if sample.get("fallback") == "plain":
        # A saved calibration holds no plain-model answers, which such a bundle's tuning needs.
        raise TuningError(
            f"{url}: the served bundle falls back to its plain model; retune it on the server "
            "(POST /v1/thresholds/retune), which pairs the sample with that model's answers"
        )
    exit_probs = np.asarray(sample["exit_probs"], dtype=np.float32)
    if exit_probs.ndim != 3 or exit_probs.shape[0] == 0:
        raise TuningError(f"{url}: the live sample is empty; wait for traffic")
    times = sample.get("times") or []
    meta = {
        "dataset": "live",
        "split": "live",
        "label": "final exit's prediction (agreement with full depth)",
        "server": url,
        "window": {
            "from": min(times, default=None),
            "to": max(times, default=None),
            "rows": int(exit_probs.shape[0]),
        },  # fmt: skip
        "fetched_at": dt.datetime.now(dt.timezone.utc).isoformat(),
    }
    labels = exit_probs[:, -1, :].argmax(axis=1)
    path = save_calibration(target, exit_probs, labels, meta)
    logger.info("saved %d live rows from %s to %s", exit_probs.shape[0], url, path)
    return path
