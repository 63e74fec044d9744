"""Push freshly tuned thresholds to a running server (`PUT {URL}/v1/thresholds`, see CONTRACT).

Standard library only (urllib), so tuning needs no HTTP client dependency.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from typing import Any

logger = logging.getLogger(__name__)

TOKEN_ENV = "EARLYEXIT_ADMIN_TOKEN"


class NotifyError(RuntimeError):
    """The server could not be reached or refused the thresholds; the message says which."""


def admin_token() -> str | None:
    token = os.environ.get(TOKEN_ENV, "").strip()
    return token or None


def push_thresholds(
    url: str,
    thresholds: list[float],
    tuned: dict[str, Any],
    token: str,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """PUT the thresholds with the admin bearer token; returns the server's JSON answer."""
    endpoint = url.rstrip("/") + "/v1/thresholds"
    if not endpoint.startswith(("http://", "https://")):
        raise NotifyError(f"--notify needs an http(s) URL, got {url!r}")
    body = json.dumps({"thresholds": thresholds, "tuned": tuned}).encode("utf-8")
    request = urllib.request.Request(
        endpoint,
        data=body,
        method="PUT",
        headers={
            "Content-Type": "application/json",
            "Accept": "application/json",
            "Authorization": f"Bearer {token}",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = response.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:300]
        raise NotifyError(f"{endpoint} answered {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise NotifyError(f"could not reach {endpoint}: {reason}") from exc
    logger.info("thresholds pushed to %s", endpoint)
    try:
        answer = json.loads(payload or b"{}")
    except json.JSONDecodeError:
        return {}
    return answer if isinstance(answer, dict) else {"answer": answer}
