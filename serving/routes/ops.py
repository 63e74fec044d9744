"""Operational endpoints: liveness, readiness, Prometheus metrics and the web page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

from serving.metrics import CONTENT_TYPE
from serving.routes.deps import RETRY_AFTER_S, StateDep
from serving.schemas import HealthResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
router = APIRouter()


# HEAD too: load balancers and uptime checkers probe with it, and a 405 reads as "down". It is
# left out of the OpenAPI schema, where it would repeat GET's operation under the same id.
@router.head("/healthz", include_in_schema=False)
@router.get(
    "/healthz",
    response_model=HealthResponse,
    response_model_exclude_none=True,
    tags=["ops"],
)
async def healthz() -> HealthResponse:
    """200 while the process lives (liveness)."""
    return HealthResponse(status="ok")


@router.head("/readyz", include_in_schema=False)
@router.get(
    "/readyz",
    response_model=HealthResponse,
    responses={503: {"description": "bundle loading or failed to load"}},
    tags=["ops"],
)
async def readyz(state: StateDep) -> Response:
    """200 once the bundle is loaded, 503 before (readiness)."""
    if state.ready:
        return JSONResponse({"status": "ready"})
    status = "failed" if state.load_error else "loading"
    detail = (
        f"bundle failed to load: {state.load_error}" if state.load_error else "model is loading"
    )
    return JSONResponse(
        {"status": status, "detail": detail},
        status_code=503,
        headers={"Retry-After": RETRY_AFTER_S},
    )


@router.get("/metrics", response_class=Response, tags=["ops"])
async def metrics(state: StateDep) -> Response:
    """Prometheus text format."""
    if state.batcher is not None:
        state.metrics.queue_depth.set(state.batcher.depth)
    return Response(state.metrics.render(), media_type=CONTENT_TYPE)


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html")
