"""Model description and threshold administration (`/v1/...`)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import ValidationError

from core.bundle import BundleError
from serving.routes.deps import ReadyDep, require_admin
from serving.schemas import (
    ErrorResponse,
    InputSummary,
    ModelResponse,
    SegmentSummary,
    ServedGraph,
    ThresholdsResponse,
    ThresholdsUpdate,
)
from serving.service import NO_THRESHOLDS, NoThresholdsError, PersistError, ServingState

router = APIRouter(prefix="/v1")
_ADMIN_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in (
        (400, "invalid thresholds (wrong count, outside [0, 1]), tuned record or file"),
        (401, "missing or wrong bearer token"),
        (403, "admin endpoints disabled: no EARLYEXIT_ADMIN_TOKEN configured"),
        (409, "the server serves the plain model (--full-model): no thresholds to change"),
        (422, "malformed JSON body"),
        (500, "thresholds.json could not be written (or the bundle is read-only); old stay"),
        (503, "model loading"),
    )
}
_UPDATE_BODY = {
    "content": {"application/json": {"schema": ThresholdsUpdate.model_json_schema()}},
    "required": True,
}


@router.get("/model", response_model=ModelResponse, tags=["model"])
async def model_info(ready: ReadyDep) -> ModelResponse:
    """Manifest summary, what is served (mode, and the plain graph in full_model mode) and the
    thresholds in force now."""
    state = ready.state
    manifest = ready.runtime.manifest
    spec = manifest.input
    graph = state.served_graph()
    return ModelResponse(
        name=manifest.name,
        version=manifest.version,
        format=manifest.format,
        labels=list(manifest.labels),
        num_classes=manifest.num_classes,
        num_exits=manifest.num_exits,
        input=InputSummary(
            shape=list(spec.shape),
            mean=list(spec.mean),
            std=list(spec.std),
            color_mode=spec.color_mode,
        ),
        fallback=manifest.fallback,
        segments=[
            SegmentSummary(index=s.index, file=s.file, macs=s.macs, params=s.params)
            for s in manifest.segments
        ],
        full_model_macs=manifest.full_model.macs,
        mode=state.mode,
        served_graph=None if graph is None else ServedGraph(**graph),
        thresholds=list(state.thresholds),
        tuned=state.tuned,
        providers=state.providers,
        provenance=manifest.provenance,
    )


@router.put(
    "/thresholds",
    response_model=ThresholdsResponse,
    responses=_ADMIN_ERRORS,
    dependencies=[Depends(require_admin)],
    openapi_extra={"requestBody": _UPDATE_BODY},
    tags=["admin"],
)
async def put_thresholds(request: Request, ready: ReadyDep) -> ThresholdsResponse:
    """Validate, persist thresholds.json atomically and swap between batches."""
    state = ready.state
    _refuse_plain_model(state)
    # The body is parsed after the auth check, so anonymous callers learn nothing from it.
    raw = await request.body()
    try:
        update = ThresholdsUpdate.model_validate_json(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        raise HTTPException(422, f"malformed thresholds body: {problems}") from exc
    except (ValueError, json.JSONDecodeError) as exc:
        raise HTTPException(422, f"malformed thresholds body: {exc}") from exc
    try:
        new, previous, tuned, path = await state.update_thresholds(update.thresholds, update.tuned)
    except BundleError as exc:
        raise HTTPException(400, str(exc)) from exc
    except PersistError as exc:
        raise HTTPException(500, str(exc)) from exc
    except NoThresholdsError as exc:
        raise HTTPException(409, str(exc)) from exc
    return ThresholdsResponse(
        thresholds=list(new), previous=list(previous), tuned=tuned, persisted=True, path=str(path)
    )


@router.post(
    "/thresholds/reload",
    response_model=ThresholdsResponse,
    responses=_ADMIN_ERRORS,
    dependencies=[Depends(require_admin)],
    tags=["admin"],
)
async def reload_thresholds(ready: ReadyDep) -> ThresholdsResponse:
    """Re-read thresholds.json from the bundle (what SIGHUP does)."""
    state = ready.state
    _refuse_plain_model(state)
    previous = state.thresholds
    try:
        values = await state.reload_thresholds(source="api-reload")
    except BundleError as exc:
        raise HTTPException(400, f"thresholds.json not reloaded, old ones stay: {exc}") from exc
    except NoThresholdsError as exc:
        raise HTTPException(409, str(exc)) from exc
    return ThresholdsResponse(
        thresholds=list(values), previous=list(previous), tuned=state.tuned, persisted=False
    )


def _refuse_plain_model(state: ServingState) -> None:
    """409 before the body is read: a plain-model server has no thresholds, whatever is sent."""
    if state.serves_plain_model:
        raise HTTPException(409, NO_THRESHOLDS)
