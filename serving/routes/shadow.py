"""Online retuning over HTTP: the live shadow sample's signals and the guarded retune."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from core.bundle import BundleError
from serving.routes.deps import ReadyDep, require_admin
from serving.schemas import ErrorResponse
from serving.service import (
    NoThresholdsError,
    PersistError,
    RetuneBusyError,
    RetuneInputError,
    ShadowSampleTooSmallError,
    ShadowUnavailableError,
    TuneUnavailableError,
)

router = APIRouter(prefix="/v1")
# Rows one GET /v1/shadow?rows=N may return (the offline tuner pages nothing: it asks for the
# window, and the window is bounded by EARLYEXIT_SHADOW_WINDOW).
MAX_EXPORT_ROWS = 1_000_000


class RetuneRequest(BaseModel):
    """POST /v1/thresholds/retune body; every field optional (defaults from the settings)."""

    model_config = ConfigDict(extra="forbid")
    eps: float | None = Field(
        None, ge=0.0, le=100.0, description="points of agreement with full depth to give up"
    )
    confidence: float | None = Field(None, ge=0.0, le=10.0, description="one-sided Z")
    held_out_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    seed: int = Field(0, ge=0)
    generations: int | None = Field(None, ge=1, le=10_000, description="GA generations")


_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in (
        (401, "missing or wrong bearer token"),
        (403, "admin endpoints disabled: no EARLYEXIT_ADMIN_TOKEN configured"),
        (409, "no live sample (sampling off, --full-model), too few rows, or a retune running"),
        (422, "malformed body, EPS or Z out of range"),
        (500, "thresholds.json could not be written; old thresholds stay"),
        (501, "the tune extra (deap) is not installed on this server"),
        (503, "model loading"),
    )
}


@router.get("/shadow", responses=_ERRORS, tags=["shadow"])
async def shadow(
    request: Request,
    ready: ReadyDep,
    rows: int = Query(0, ge=0, le=MAX_EXPORT_ROWS, description="also return the newest N rows"),
) -> dict[str, Any]:
    """Live signals from the shadow sample: rows, window, per-exit agreement with the final exit,
    estimated drop vs full depth with its bound, drift vs the tuned window. `?rows=N` adds the
    newest N rows' per-exit probabilities (admin token; what `earlyexit-tune --from-server`
    reads)."""
    state = ready.state
    if rows:
        # Per-row outputs of users' traffic are more than a dashboard needs: admin only.
        await require_admin(request)
    try:
        signals = await state.shadow_signals()
        if rows:
            sample = await asyncio.to_thread(state.shadow_rows_sync, rows)
            signals["sample"] = {
                "times": sample.times.tolist(),
                "served_exits": sample.served_exits.tolist(),
                "exit_probs": sample.exit_probs.tolist(),
                "fallback": state.manifest.fallback,
            }
            if sample.plain_probs is not None:
                signals["sample"]["plain_probs"] = sample.plain_probs.tolist()
    except NoThresholdsError as exc:
        raise HTTPException(409, str(exc)) from exc
    except ShadowUnavailableError as exc:
        raise HTTPException(409, str(exc)) from exc
    return signals


@router.post(
    "/thresholds/retune",
    responses=_ERRORS,
    dependencies=[Depends(require_admin)],
    tags=["admin"],
)
async def retune(request: Request, ready: ReadyDep) -> dict[str, Any]:
    """Tune on the live sample (agreement with full depth ≥ 100 − EPS at confidence Z) and swap
    atomically only if the guard holds on the held-out rows; `swapped` says whether it did."""
    state = ready.state
    raw = await request.body()
    try:
        body = RetuneRequest.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'body'}: {err['msg']}"
            for err in exc.errors()
        )
        raise HTTPException(422, f"malformed retune body: {problems}") from exc
    except (ValueError, json.JSONDecodeError) as exc:
        raise HTTPException(422, f"malformed retune body: {exc}") from exc
    settings = state.settings
    try:
        return await state.retune(
            eps=settings.shadow_drop_budget if body.eps is None else body.eps,
            confidence=settings.shadow_confidence if body.confidence is None else body.confidence,
            held_out_fraction=body.held_out_fraction,
            seed=body.seed,
            generations=body.generations,
        )
    except (NoThresholdsError, ShadowUnavailableError, RetuneBusyError) as exc:
        raise HTTPException(409, str(exc)) from exc
    except TuneUnavailableError as exc:
        raise HTTPException(501, str(exc)) from exc
    except RetuneInputError as exc:
        raise HTTPException(422, str(exc)) from exc
    except BundleError as exc:
        raise HTTPException(400, str(exc)) from exc
    except PersistError as exc:
        raise HTTPException(500, str(exc)) from exc
    except ShadowSampleTooSmallError as exc:
        raise HTTPException(409, str(exc)) from exc
