"""`create_app(settings)`: the FastAPI application. Nothing heavy happens at import; the lifespan
loads the bundle (in a thread, so /healthz answers meanwhile and /readyz says 503 until done),
starts the batcher, installs the SIGHUP threshold reload, and drains the queue on shutdown.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from serving.middleware import AccessLogMiddleware, BodyLimitMiddleware, BodyTooLargeError
from serving.routes import admin_router, classify_router, ops_router, shadow_router
from serving.routes.ops import STATIC_DIR
from serving.service import ServingState
from serving.settings import Settings

logger = logging.getLogger(__name__)
CLASSIFY_PATHS = ("/classify", "/classify/batch")
# nginx's "client closed request": the status a request is counted under (metrics, access log)
# when its client went away before the body was read. Nobody receives it.
CLIENT_CLOSED_REQUEST = 499


def _install_sighup(state: ServingState) -> bool:
    """SIGHUP re-reads thresholds.json; uvicorn's SIGINT/SIGTERM handlers are left alone."""
    if not hasattr(signal, "SIGHUP"):
        return False
    loop = asyncio.get_running_loop()
    pending: set[asyncio.Task[None]] = set()  # strong references until each reload finishes

    def on_sighup() -> None:
        task = loop.create_task(state.reload_from_signal())
        pending.add(task)
        task.add_done_callback(pending.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, on_sighup)
    except (RuntimeError, ValueError, NotImplementedError) as exc:
        # Not the main thread (e.g. an in-process test client): no signals, the API still works.
        logger.debug("SIGHUP handler not installed: %s", exc)
        return False
    return True


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServingState = app.state.serving
    load_task = asyncio.create_task(state.load(), name="earlyexit-load")
    sighup = _install_sighup(state)
    try:
        yield
    finally:
        if sighup:
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
        state.begin_stopping()
        await load_task  # a thread cannot be cancelled; let the load finish
        await state.shutdown()
        logger.info("server stopped", extra={"fields": {"batches": _batches(state)}})


def _batches(state: ServingState) -> int:
    return state.batcher.batches_run if state.batcher is not None else 0


def _detail_text(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


def _install_error_handlers(app: FastAPI) -> None:
    """Every error is JSON {"detail": ...}: 404, 405 and 500 included. (FastAPI's decorator
    registers each handler: it types a handler for its own exception class, which
    `add_exception_handler`'s signature cannot.)"""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            {"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # A bad query parameter is the contract's 400; a malformed body stays 422.
        locations = {err.get("loc", ("body",))[0] for err in exc.errors()}
        status = 400 if locations <= {"query", "path"} else 422
        return JSONResponse({"detail": _detail_text(exc)}, status_code=status)

    @app.exception_handler(BodyTooLargeError)
    async def body_too_large(_request: Request, exc: BodyTooLargeError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413, headers={"Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def client_disconnected(request: Request, _exc: ClientDisconnect) -> Response:
        # Not a server error: one line, no traceback, and a status code of its own.
        logger.info(
            "client disconnected before its request was read",
            extra={"fields": {"method": request.method, "path": request.url.path}},
        )
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return JSONResponse({"detail": "internal server error"}, status_code=500)


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for `settings` (default: read EARLYEXIT_* variables now)."""
    settings = settings if settings is not None else Settings()
    state = ServingState(settings)
    app = FastAPI(
        title="earlyexit",
        summary="Dynamic early-exit image classification",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.serving = state
    _install_error_handlers(app)
    app.include_router(ops_router)
    app.include_router(classify_router)
    app.include_router(admin_router)
    app.include_router(shadow_router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Added last = outermost: the access log sees the body limit's 413 too.
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    app.add_middleware(
        AccessLogMiddleware,
        metrics=state.metrics,
        counted_paths=CLASSIFY_PATHS,
        enabled=settings.access_log,
    )
    return app
