"""`earlyexit-serve`: start the HTTP server on a bundle.

Flags override `EARLYEXIT_*` environment variables. The bundle is checked (manifest, file
hashes, thresholds.json) before uvicorn starts, so a bad bundle is one line and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from serving.cli_common import OneLineParser, parse_or_exit

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="earlyexit-serve",
        description="Serve an early-exit bundle over HTTP (POST /classify, /metrics, web page "
        "at /). Every flag has an EARLYEXIT_* environment variable; flags win.",
    )
    parser.add_argument("--bundle", help="bundle directory (EARLYEXIT_BUNDLE)")
    parser.add_argument(
        "--full-model",
        action="store_true",
        default=None,
        help="serve the bundle's plain single graph (baseline.onnx when the manifest names "
        "one, else full_model.onnx) instead of the early-exit chain, for comparisons "
        "(EARLYEXIT_FULL_MODEL)",
    )
    parser.add_argument("--host", help="bind address (EARLYEXIT_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (EARLYEXIT_PORT, default 8000)")
    parser.add_argument(
        "--providers", help='execution providers in order, e.g. "cuda,cpu" (EARLYEXIT_PROVIDERS)'
    )
    parser.add_argument(
        "--strict-providers",
        action="store_true",
        default=None,
        help="fail instead of falling back when a provider is unavailable",
    )
    parser.add_argument("--intra-op-threads", type=int, help="onnxruntime threads (0 = default)")
    parser.add_argument("--max-batch-size", type=int, help="images per batch (default 32)")
    parser.add_argument("--max-batch-wait-ms", type=float, help="batch window (default 2 ms)")
    parser.add_argument(
        "--batch-wait",
        choices=["adaptive", "fixed"],
        help="adaptive (default): wait only while other requests are arriving; fixed: always",
    )
    parser.add_argument(
        "--inline-max-ms",
        type=float,
        help="run a lone image on the event loop when the model takes at most this (default 1)",
    )
    parser.add_argument("--max-body-bytes", type=int, help="request body limit (default 10 MiB)")
    parser.add_argument("--queue-size", type=int, help="images waiting before 503 (default 256)")
    parser.add_argument(
        "--max-connections",
        type=int,
        help="open connections; the longest idle one is closed to admit more (default 2048)",
    )
    parser.add_argument(
        "--state-dir",
        help="where the packaged default bundle is copied to be served writable "
        "(EARLYEXIT_STATE_DIR, default ~/.local/state/earlyexit)",
    )
    parser.add_argument(
        "--log-level", choices=("critical", "error", "warning", "info", "debug"), default=None
    )
    parser.add_argument(
        "--no-warmup", dest="warmup", action="store_false", default=None,
        help="skip running each batch size once before reporting ready",
    )  # fmt: skip
    parser.add_argument(
        "--no-access-log", dest="access_log", action="store_false", default=None,
        help="do not log one JSON line per request",
    )  # fmt: skip
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    keys = (
        "bundle", "full_model", "host", "port", "providers", "strict_providers", "intra_op_threads",
        "max_batch_size", "max_batch_wait_ms", "batch_wait", "inline_max_ms", "max_body_bytes",
        "queue_size", "max_connections", "state_dir", "warmup",
        "log_level", "access_log",
    )  # fmt: skip
    return {k: getattr(args, k) for k in keys if getattr(args, k) is not None}


def check_bundle(bundle_dir: Any, full_model: bool = False) -> str:
    """Validate the bundle as the server will load it; returns a one-line summary. Every
    problem is a BundleError (a one-line message). With `full_model` thresholds.json is not
    read: the plain model has none."""
    from core.bundle import load_manifest, plain_graph, read_thresholds

    manifest = load_manifest(bundle_dir, verify=True)
    if full_model:
        graph = plain_graph(manifest)
        return (
            f"{manifest.name} {manifest.version}: plain model {graph.file} ({graph.source}), "
            f"{manifest.num_classes} classes"
        )
    thresholds = read_thresholds(bundle_dir, manifest.num_exits)
    return (
        f"{manifest.name} {manifest.version}: {manifest.num_exits} exits, "
        f"{manifest.num_classes} classes, thresholds {list(thresholds.values)}"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_or_exit(build_parser(), argv)
    from pydantic import ValidationError

    from core.bundle import BundleError
    from serving.settings import Settings, settings_error_line

    try:
        settings = Settings(**_overrides(args))
    except ValidationError as exc:
        print(f"earlyexit-serve: {settings_error_line(exc)}", file=sys.stderr)
        return 2
    try:
        summary = check_bundle(settings.bundle, settings.full_model)
    except BundleError as exc:
        print(f"earlyexit-serve: bad bundle: {exc}", file=sys.stderr)
        return 2

    import uvicorn

    from serving.app import create_app
    from serving.connections import ConnectionLimits, bind_listener, guarded_protocol
    from serving.logs import configure_logging
    from serving.process_limits import (
        connection_capacity,
        freeze_startup_objects,
        raise_open_file_limit,
        return_large_allocations,
    )

    configure_logging(settings.log_level)
    # Bound first: a port in use is reported before anything is loaded or announced.
    try:
        listener = bind_listener(settings.host, settings.port)
    except OSError as exc:
        print(
            f"earlyexit-serve: cannot start server: cannot listen on "
            f"{settings.host}:{settings.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    return_large_allocations()
    limits = ConnectionLimits(
        max_connections=connection_capacity(settings.max_connections, raise_open_file_limit()),
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        max_header_bytes=settings.max_header_bytes,
    )
    logger.info(
        "starting",
        extra={"fields": {"bundle": str(settings.bundle), "model": summary,
                          "url": f"http://{settings.host}:{settings.port}",
                          "max_connections": limits.max_connections}},
    )  # fmt: skip
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(limits, app.state.serving.metrics),
        log_config=None,
        log_level=settings.log_level,
        access_log=False,
        # A float: int() would turn 0.5 s into 0, which cancels every in-flight request.
        timeout_graceful_shutdown=settings.shutdown_timeout_s,  # type: ignore[arg-type]
        # Longer than the idle timeout of common load balancers and HTTP client pools
        # (nginx 60 s): with uvicorn's default 5 s the server closes pooled connections
        # while a client reuses them, which surfaces as sporadic connection errors.
        timeout_keep_alive=settings.keep_alive_s,
        # Only used when httptools is missing and uvicorn parses with h11.
        h11_max_incomplete_event_size=settings.max_header_bytes,
        server_header=False,
    )
    server = uvicorn.Server(config)
    config.load()  # imports the protocol classes now, so they are frozen with the rest
    freeze_startup_objects()
    server.run(sockets=[listener])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
