"""`POST /classify` and `POST /classify/batch`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from starlette.datastructures import FormData, UploadFile

from core.bundle import Manifest
from core.decision import accepts
from serving.batching import (
    BatcherClosedError,
    BatchTooLargeError,
    DynamicBatcher,
    QueueFullError,
    RowResult,
)
from serving.imaging import (
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
    structure_check,
)
from serving.metrics import FULL, FULL_EXIT
from serving.routes.deps import RETRY_AFTER_S, ready_or_503, serving_state
from serving.schemas import (
    BatchClassifyResponse,
    ClassifyResponse,
    ClassScore,
    ErrorResponse,
    ExitAnswer,
    ModelRef,
)
from serving.service import ServingState
from serving.settings import Settings

router = APIRouter(tags=["classify"])

_RAW_TYPES = ("application/octet-stream",)
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": why}
    for code, why in (
        (400, "undecodable image or bad parameter"),
        (413, "body or image too large, or more images than the queue holds"),
        (415, "unsupported media type"),
        (422, "malformed request (e.g. missing multipart field)"),
        (503, "queue full, model loading or shutting down (see Retry-After)"),
    )
}
_IMAGE_BODY = {
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "image/*": {"schema": {"type": "string", "format": "binary"}},
    },
    "required": True,
}
_BATCH_BODY = {
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                },
                "required": ["files"],
            }
        }
    },
    "required": True,
}


def _media_type(value: str | None) -> str:
    return (value or "").split(";", 1)[0].strip().lower()


def _check_part_type(content_type: str | None, where: str) -> None:
    media = _media_type(content_type)
    if media and not media.startswith("image/") and media not in _RAW_TYPES:
        raise HTTPException(415, f"{where}: unsupported media type {media!r}; send an image")


async def _read_form(request: Request, settings: Settings) -> FormData:
    # max_part_size bounds non-file fields; file parts are bounded by the body limit, and the
    # per-request file limit is checked after parsing so it answers 413, not 400.
    return await request.form(max_files=max(1000, settings.max_batch_files + 1), max_fields=64)


async def _upload_bytes(value: Any, field: str) -> bytes:
    if not isinstance(value, UploadFile):
        raise HTTPException(422, f"multipart field {field!r} must be a file")
    _check_part_type(value.content_type, field)
    return await value.read()


async def _read_raw(request: Request) -> bytes:
    """A raw image body, refused as soon as its structure breaks a decoding limit (too many
    PNG chunks or JPEG scans): a 10 MB file of empty chunks costs the first 120 KB, not the
    whole upload. The connection is closed then, the rest of the body is never read."""
    check = structure_check()
    chunks = []
    async for chunk in request.stream():
        problem = check.feed(chunk)
        if problem is not None:
            raise HTTPException(400, f"could not decode image: {problem}",
                                headers={"Connection": "close"})  # fmt: skip
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_single(request: Request, settings: Settings) -> bytes:
    """The image bytes of `/classify`: multipart field `file`, or a raw image/* body."""
    media = _media_type(request.headers.get("content-type"))
    if media == "multipart/form-data":
        form = await _read_form(request, settings)
        try:
            parts = form.getlist("file")
            if not parts:
                raise HTTPException(422, "missing multipart field 'file'")
            if len(parts) > 1:
                raise HTTPException(
                    422,
                    f"multipart field 'file' appears {len(parts)} times; /classify takes one "
                    "image (send several as field 'files' to /classify/batch)",
                )
            return await _upload_bytes(parts[0], "file")
        finally:
            await form.close()
    if media.startswith("image/") or media in _RAW_TYPES:
        return await _read_raw(request)
    shown = media or "none"
    raise HTTPException(
        415,
        f"unsupported media type {shown!r}: send multipart field 'file' or a raw body with "
        "Content-Type image/*",
    )


async def _decode(
    payloads: Sequence[bytes], manifest: Manifest, state: ServingState, batcher: DynamicBatcher
) -> list[np.ndarray]:
    """Decode on the event loop or the decode pool (serving.decode_pool); the batcher counts
    a request as arriving only while a worker decodes its fully received image."""
    try:
        return await state.decoder.decode(payloads, manifest.input, batcher.arriving)
    except ImageTooLargeError as exc:
        raise HTTPException(413, str(exc)) from exc
    except UnsupportedImageError as exc:
        raise HTTPException(415, str(exc)) from exc
    except ImageError as exc:
        raise HTTPException(400, str(exc)) from exc


async def _run(batcher: DynamicBatcher, images: list[np.ndarray], full: bool) -> list[RowResult]:
    # The plain model runs the same graph with or without ?full=true: routes pass full=False
    # for it, so both kinds of request share batches.
    try:
        return await batcher.classify(images, full=full)
    except BatchTooLargeError as exc:
        raise HTTPException(413, str(exc)) from exc
    except QueueFullError as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": RETRY_AFTER_S}) from exc
    except BatcherClosedError as exc:
        raise HTTPException(503, str(exc), headers={"Retry-After": RETRY_AFTER_S}) from exc


def build_answer(
    row: RowResult, manifest: Manifest, latency_ms: float, full: bool, top_k: int | None
) -> ClassifyResponse:
    """One image's JSON answer from its row of the batch result. A plain-model row (exit
    FULL_EXIT) answers `"exit": "full"`, and with `full` an empty `exits` list: it has none."""
    labels = manifest.labels
    probs = row.probs
    index = int(np.argmax(probs))
    exits = None
    if full:
        exits = []
    if full and row.exit_probs is not None:
        for k, exit_row in enumerate(row.exit_probs, start=1):
            best = int(np.argmax(exit_row))
            confidence = float(exit_row[best])
            threshold = row.thresholds[k - 1] if k <= len(row.thresholds) else 1.0
            exits.append(
                ExitAnswer(
                    exit=k,
                    label=labels[best],
                    class_index=best,
                    confidence=confidence,
                    threshold=threshold,
                    accepted=accepts(confidence, threshold),
                )
            )
    ranked = None
    if top_k is not None:
        order = np.argsort(-probs, kind="stable")[: min(top_k, len(labels))]
        ranked = [
            ClassScore(label=labels[int(i)], class_index=int(i), confidence=float(probs[int(i)]))
            for i in order
        ]
    return ClassifyResponse(
        label=labels[index],
        class_index=index,
        confidence=float(probs[index]),
        exit=row.exit if row.exit > 0 else FULL if row.exit == FULL_EXIT else "fallback",
        num_exits=manifest.num_exits,
        latency_ms=round(latency_ms, 3),
        model=ModelRef(name=manifest.name, version=manifest.version),
        exits=exits,
        top_k=ranked,
    )


# The two query options are parsed here rather than declared as FastAPI parameters: in a
# profile of this route, FastAPI's parameter solving was its largest framework cost, and the
# event loop's per-request CPU is what bounds throughput when inference takes under a
# millisecond (the measured saving is small, tens of µs). Their OpenAPI description is kept
# through `openapi_extra`; bad values answer 400 as before. Readiness is checked the same way
# (`ready_or_503`), not as a `ReadyDep` parameter, so these two routes solve no dependencies.
TOP_K_MAX = 10_000
_TRUE = frozenset({"1", "true", "t", "yes", "y", "on"})
_FALSE = frozenset({"0", "false", "f", "no", "n", "off"})
_QUERY_DOCS = [
    {
        "name": "full",
        "in": "query",
        "required": False,
        "description": "run every exit and report each one's answer (the plain model of a "
        "--full-model server has none: its answer is unchanged, with an empty list)",
        "schema": {"type": "boolean", "default": False},
    },
    {
        "name": "top_k",
        "in": "query",
        "required": False,
        "description": "add the N most likely classes",
        "schema": {"type": "integer", "minimum": 1, "maximum": TOP_K_MAX},
    },
]


def query_options(request: Request) -> tuple[bool, int | None]:
    """(full, top_k) from the query string; HTTP 400 naming the parameter when invalid."""
    query = request.query_params
    full = False
    raw = query.get("full")
    if raw is not None:
        value = raw.strip().lower()
        if value not in _TRUE and value not in _FALSE:
            raise HTTPException(400, f"query.full: expected a boolean, got {raw!r}")
        full = value in _TRUE
    top_k = None
    raw = query.get("top_k")
    if raw is not None:
        try:
            top_k = int(raw)
        except ValueError:
            raise HTTPException(400, f"query.top_k: expected an integer, got {raw!r}") from None
        if not 1 <= top_k <= TOP_K_MAX:
            raise HTTPException(400, f"query.top_k: must be between 1 and {TOP_K_MAX}")
    return full, top_k


@router.post(
    "/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
    openapi_extra={"requestBody": _IMAGE_BODY, "parameters": _QUERY_DOCS},
)
async def classify(request: Request) -> ClassifyResponse:
    """Classify one image with the early-exit model (or the plain model with --full-model)."""
    started = time.perf_counter()
    full, top_k = query_options(request)
    state, runtime, batcher = ready_or_503(serving_state(request))
    manifest = runtime.manifest
    payload = await _read_single(request, state.settings)
    images = await _decode([payload], manifest, state, batcher)
    (row,) = await _run(batcher, images, full and not state.serves_plain_model)
    answer = build_answer(row, manifest, (time.perf_counter() - started) * 1000.0, full, top_k)
    request.state.exit = answer.exit
    return answer


@router.post(
    "/classify/batch",
    response_model=BatchClassifyResponse,
    response_model_exclude_none=True,
    responses=_ERRORS,
    openapi_extra={"requestBody": _BATCH_BODY, "parameters": _QUERY_DOCS},
)
async def classify_batch(request: Request) -> BatchClassifyResponse:
    """Classify several images (multipart field `files`, repeated); answers keep their order."""
    started = time.perf_counter()
    full, top_k = query_options(request)
    state, runtime, batcher = ready_or_503(serving_state(request))
    settings = state.settings
    media = _media_type(request.headers.get("content-type"))
    if media != "multipart/form-data":
        raise HTTPException(415, "send the images as multipart/form-data, field 'files'")
    manifest = runtime.manifest
    form = await _read_form(request, settings)
    try:
        uploads = form.getlist("files")
        if not uploads:
            raise HTTPException(422, "missing multipart field 'files'")
        if len(uploads) > settings.max_batch_files:
            raise HTTPException(
                413,
                f"{len(uploads)} files; the limit is {settings.max_batch_files} per request",
            )
        payloads = [await _upload_bytes(u, f"files[{i}]") for i, u in enumerate(uploads)]
    finally:
        await form.close()
    images = await _decode(payloads, manifest, state, batcher)
    rows = await _run(batcher, images, full and not state.serves_plain_model)
    latency_ms = (time.perf_counter() - started) * 1000.0
    results = [build_answer(row, manifest, latency_ms, full, top_k) for row in rows]
    request.state.exit = [r.exit for r in results]
    return BatchClassifyResponse(results=results)
