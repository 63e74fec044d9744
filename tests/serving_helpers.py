"""Servers for tests: the app in process, or a real `earlyexit-serve` (uvicorn, subprocess).

    with app_client(bundle_dir, admin_token=...) as http:   # in process: TestClient, ready
        http.post("/classify", ...)
    with running_server(bundle_dir) as base_url:            # a process: just the URL
        ...
    with server_process(bundle_dir, env={...}) as server:   # a process: URL, pid, logs, signals
        server.url, server.pid, server.logs()

Route behaviour (status codes, query parsing, schemas, threshold and shadow endpoints) runs in
process: no interpreter to start, nothing to import twice. What needs a process (signals,
shutdown, start-up failures, connection limits, the access log's output, load and the page)
gets one. A server process runs `python -m serving.cli` from the repo root (the package need
not be installed), on one CPU thread; both kinds ignore the caller's EARLYEXIT_* variables.
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

if TYPE_CHECKING:
    from fastapi.testclient import TestClient

    from serving.settings import Settings

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EARLYEXIT_")}
    env.update(
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        EARLYEXIT_PROVIDERS="cpu",
        EARLYEXIT_INTRA_OP_THREADS="1",
    )
    env.update(extra or {})
    return env


@dataclass
class ServerProcess:
    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def logs(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def send_signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM (graceful: queued requests finish), then SIGKILL if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return int(self.process.returncode)


def wait_ready(server: ServerProcess, timeout: float = 300.0, path: str = "/readyz") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"server exited with {server.process.returncode}:\n{server.logs()[-4000:]}"
            )
        try:
            if httpx.get(server.url + path, timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"server not ready after {timeout}s:\n{server.logs()[-4000:]}")


def start_server(
    bundle_dir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    log_dir: str | os.PathLike[str] | None = None,
    wait: bool = True,
) -> ServerProcess:
    """Start the server on a free port; with `wait`, return once /readyz answers 200 (the
    generous limit is for CI machines starved of CPU: imports alone can take minutes there)."""
    log_root = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="earlyexit-server-"))
    log_path = log_root / "server.log"
    last_error: Exception | None = None
    for _ in range(3):  # a free port can be taken between probing and binding
        port = free_port()
        argv = [sys.executable, "-m", "serving.cli", "--bundle", str(bundle_dir),
                "--host", "127.0.0.1", "--port", str(port), *args]  # fmt: skip
        with open(log_path, "wb") as log_fh:
            process = subprocess.Popen(
                argv, stdout=log_fh, stderr=subprocess.STDOUT, env=server_env(env), cwd=REPO
            )
        server = ServerProcess(f"http://127.0.0.1:{port}", process, log_path)
        if not wait:
            return server
        try:
            wait_ready(server)
            return server
        except RuntimeError as exc:
            last_error = exc
            server.stop()
            if "address already in use" not in server.logs().lower():
                raise
    raise RuntimeError(f"could not start the server: {last_error}")


@contextlib.contextmanager
def server_process(
    bundle_dir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
    log_dir: str | os.PathLike[str] | None = None,
) -> Iterator[ServerProcess]:
    server = start_server(bundle_dir, env=env, args=args, log_dir=log_dir)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def running_server(
    bundle_dir: str | os.PathLike[str],
    env: Mapping[str, str] | None = None,
    args: Sequence[str] = (),
) -> Iterator[str]:
    """The base URL of a ready server on `bundle_dir`; stopped (SIGTERM) on exit."""
    with server_process(bundle_dir, env=env, args=args) as server:
        yield server.url


def app_settings(bundle_dir: str | os.PathLike[str], **overrides: Any) -> Settings:
    """Settings for an in-process app, as `server_env` sets up a process: CPU, one inference
    thread, no warm-up (nothing a test checks depends on it); EARLYEXIT_* variables of the
    caller's environment are not read."""
    from serving.settings import Settings

    values: dict[str, Any] = {"bundle": Path(bundle_dir), "providers": ["cpu"],
                              "intra_op_threads": 1, "warmup": False}  # fmt: skip
    values.update(overrides)
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("EARLYEXIT_")}
    try:
        return Settings(**values)
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def app_client(
    bundle_dir: str | os.PathLike[str], wait: bool = True, **overrides: Any
) -> Iterator[TestClient]:
    """`TestClient(create_app(app_settings(bundle_dir, **overrides)))` with its lifespan running
    (bundle load, batcher, shadow sampler); with `wait`, once /readyz answers 200. Requests
    from several threads at once run concurrently in the app's event loop."""
    with warnings.catch_warnings():
        # Starlette's own deprecation notice about the httpx it imports; nothing of ours.
        warnings.filterwarnings("ignore", "Using .httpx. with .starlette.testclient.")
        from fastapi.testclient import TestClient

    from serving.app import create_app

    with TestClient(create_app(app_settings(bundle_dir, **overrides))) as http:
        if wait:
            wait_until_ready(http)
        yield http


def wait_until_ready(http: httpx.Client | TestClient, timeout: float = 120.0) -> None:
    """Poll /readyz until 200; AssertionError with its last answer when it fails or times out."""
    deadline = time.monotonic() + timeout
    while True:
        ready = http.get("/readyz")
        if ready.status_code == 200:
            return
        assert ready.json().get("status") != "failed", ready.json()
        assert time.monotonic() < deadline, ready.json()
        time.sleep(0.02)


def png_bytes(array) -> bytes:
    """uint8 H×W×C (or H×W) → PNG bytes."""
    from PIL import Image

    buf = io.BytesIO()
    squeezed = array[:, :, 0] if array.ndim == 3 and array.shape[2] == 1 else array
    Image.fromarray(squeezed).save(buf, format="PNG")
    return buf.getvalue()


def metric_value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """A sample's value from Prometheus text (0.0 when absent)."""
    want = dict(labels or {})
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric != name:
            continue
        found = {}
        for part in filter(None, label_text.rstrip("}").split(",")):
            key, _, raw = part.partition("=")
            found[key] = raw.strip('"')
        if found == want:
            return float(value)
    return 0.0
