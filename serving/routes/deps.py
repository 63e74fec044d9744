"""Dependencies shared by the routers: the serving state, readiness and admin auth."""

from __future__ import annotations

import hmac
from typing import Any

from fastapi import HTTPException, Request

from serving.batching import DynamicBatcher
from serving.service import NotReadyError, ServingState

RETRY_AFTER_S = "1"


def get_state(request: Request) -> ServingState:
    return request.app.state.serving


def require_ready(request: Request) -> tuple[ServingState, Any, DynamicBatcher]:
    """(state, runtime, batcher), or 503 with Retry-After while the bundle loads."""
    state = get_state(request)
    try:
        runtime, batcher = state.require_ready()
    except NotReadyError as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": RETRY_AFTER_S}) from exc
    return state, runtime, batcher


def require_admin(request: Request) -> None:
    """403 when no admin token is configured, 401 when the bearer token is missing or wrong."""
    token = get_state(request).settings.admin_token
    if token is None:
        raise HTTPException(403, "admin endpoints are disabled: set EARLYEXIT_ADMIN_TOKEN")
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode("utf-8")
    given = credentials.strip().encode("utf-8")
    # compare_digest on every path: the time taken says nothing about the token.
    matches = hmac.compare_digest(given, expected)
    if scheme.lower() != "bearer" or not matches:
        raise HTTPException(
            401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
