"""Dependencies shared by the routers: the serving state, readiness and admin auth.

Routes declare them as `Annotated` parameters (`state: StateDep`, `ready: ReadyDep`); the
dependencies are `async def` so FastAPI calls them on the event loop, not through its thread
pool. The classify routes call `ready_or_503` themselves (see `serving.routes.classify`).
"""

from __future__ import annotations

import hmac
from typing import Annotated, NamedTuple

from fastapi import Depends, HTTPException, Request

from serving.batching import DynamicBatcher
from serving.service import NotReadyError, ServedRuntime, ServingState

RETRY_AFTER_S = "1"


class Ready(NamedTuple):
    """A loaded server: its state, the runtime answering requests and the batcher feeding it."""

    state: ServingState
    runtime: ServedRuntime
    batcher: DynamicBatcher


def serving_state(request: Request) -> ServingState:
    """The app's `ServingState` (set by `create_app`)."""
    state: ServingState = request.app.state.serving
    return state


def ready_or_503(state: ServingState) -> Ready:
    """The loaded runtime and batcher, or 503 with Retry-After while the bundle loads."""
    try:
        runtime, batcher = state.require_ready()
    except NotReadyError as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": RETRY_AFTER_S}) from exc
    return Ready(state, runtime, batcher)


async def get_state(request: Request) -> ServingState:
    return serving_state(request)


async def require_ready(request: Request) -> Ready:
    return ready_or_503(serving_state(request))


async def require_admin(request: Request) -> None:
    """403 when no admin token is configured, 401 when the bearer token is missing or wrong."""
    token = serving_state(request).settings.admin_token
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


StateDep = Annotated[ServingState, Depends(get_state)]
ReadyDep = Annotated[Ready, Depends(require_ready)]
