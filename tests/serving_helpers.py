"""Start a real `earlyexit-serve` (uvicorn, subprocess) on 127.0.0.1 for tests.

    with running_server(bundle_dir) as base_url:            # just the URL
        ...
    with server_process(bundle_dir, env={...}) as server:   # URL, pid, logs, signals
        server.url, server.pid, server.logs()

The server runs `python -m serving.cli` from the repo root (the package need not be installed),
on one CPU thread, with every EARLYEXIT_* variable of the caller's environment removed.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

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
