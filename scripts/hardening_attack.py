"""Attack a real `earlyexit-serve` on loopback and measure what a well-behaved client gets.

    python scripts/hardening_attack.py --out docs/results/hardening
    python scripts/hardening_attack.py --sockets 2000 --attack-seconds 5 --out /tmp/h  # quick

The script starts its own server on 127.0.0.1 (a free port; the packaged default bundle unless
--bundle; default settings but --decode-memory-mb and --server-env), then:
1. idle: a client probes GET /healthz (a new connection each time, like a health checker) and
   POST /classify (one keep-alive connection, a 32×32 PNG) for --idle-seconds;
2. attack: the same probes for --attack-seconds while, in other processes at the lowest CPU
   priority,
   - --sockets connections (20 000, or what the open-file limit allows) have been opened, at
     most --open-per-s a second, each sending a header it never finishes (source addresses
     127.0.0.2-9 so the attack does not run out of ephemeral ports); probing starts once all
     are open,
   - one client sends an endless header line (reconnecting whenever the server cuts it off),
   - two clients upload, back to back, a 10 MB PNG of ~870 000 empty chunks and a 10 MB
     progressive 128×128 JPEG of ~4 800 scans;
3. flood (unless --flood-per-s 0): the same, but every socket the server closes is reopened at
   up to --flood-per-s a second, a connection flood; probing starts after --ramp-seconds;
4. memory: the server's resident memory before, at the peak of, and --settle-seconds after 16
   concurrent uploads of a 32 KB 16-bit 4096×4096 PNG (the decompression ratio is ~1000:1).

Everything is loopback, bounded in time (each attacker stops after 180 s whatever happens; a
default run takes about 90 s) and uses only the
standard library, numpy and Pillow. It writes `hardening.json` to --out (the server's log stays
in a temporary directory; its warnings are counted in the report); exit code 0 when every
target below holds, 1 otherwise:
- /healthz answers within 50 ms throughout the attack phase (max latency);
- /classify's p99 under attack ≤ 3 × its idle p99;
- peak memory above the idle baseline ≤ the decode memory budget, and ≤ 64 MiB above it again
  after idle.
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import multiprocessing as mp
import os
import platform
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HEALTHZ_TARGET_MS = 50.0
CLASSIFY_P99_FACTOR = 3.0
SETTLE_SLACK_MIB = 64.0
MAX_ATTACK_S = 180.0  # every attacker stops by then, whatever happens to the script

# ----------------------------------------------------------------------------- payloads


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_many_chunks(size: int, side: int = 128) -> bytes:
    """A valid side×side PNG padded to `size` bytes with empty private chunks before its data."""
    rows = b"".join(b"\0" + bytes(side * 3) for _ in range(side))
    head = b"\x89PNG\r\n\x1a\n" + _chunk(
        b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    )
    tail = _chunk(b"IDAT", zlib.compress(rows, 9)) + _chunk(b"IEND", b"")
    filler = _chunk(b"prVt", b"")
    return head + filler * max(0, (size - len(head) - len(tail)) // len(filler)) + tail


def _jpeg_segments(data: bytes) -> list[tuple[int, bytes]]:
    """(marker, bytes) of each header segment and each scan of a baseline/progressive JPEG."""
    out, pos = [], 2
    while pos < len(data):
        marker = data[pos + 1]
        if marker == 0xD9:
            out.append((marker, data[pos : pos + 2]))
            break
        end = pos + 2 + struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        if marker == 0xDA:  # entropy-coded data runs to the next real marker
            while True:
                end = data.find(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        out.append((marker, data[pos:end]))
        pos = end
    return out


def jpeg_many_scans(
    size: int,
    side: int = 128,
    scan_bytes: int = 2400,
    quality: int = 100,
    max_scans: int | None = None,
) -> bytes:
    """A progressive side×side JPEG padded towards `size` bytes by repeating the refinement
    scan closest to `scan_bytes` (libjpeg decodes every one): 10 MB hold about 4 800 scans.
    `max_scans` caps the total number of scans."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality, progressive=True, subsampling=0)
    segments = _jpeg_segments(buf.getvalue())
    scans = [s for m, s in segments if m == 0xDA]
    head = b"\xff\xd8" + b"".join(s for m, s in segments if m not in (0xDA, 0xD9))
    repeat = min(scans[1:], key=lambda scan: abs(len(scan) - scan_bytes))
    body = b"".join(scans)
    count = max(0, (size - len(head) - len(body) - 2) // len(repeat))
    if max_scans is not None:
        count = min(count, max(0, max_scans - len(scans)))
    return head + body + repeat * count + b"\xff\xd9"


def png16_gray(side: int = 4096) -> bytes:
    """A black 16-bit greyscale side×side PNG: ~32 KB at 4096, 32 MiB once decoded."""
    rows = zlib.compressobj(9)
    line = b"\0" + bytes(side * 2)
    data = b"".join(rows.compress(line) for _ in range(side)) + rows.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")
    )


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 64×48 JPEG whose header claims width×height (the rest of the data never came)."""
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def small_png(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


# ----------------------------------------------------------------------------- measuring


def _percentiles(values_ms: list[float]) -> dict[str, float]:
    if not values_ms:
        return {"count": 0}
    arr = np.asarray(values_ms)
    return {
        "count": int(arr.size),
        "p50_ms": round(float(np.percentile(arr, 50)), 3),
        "p99_ms": round(float(np.percentile(arr, 99)), 3),
        "max_ms": round(float(arr.max()), 3),
        "over_50ms": int((arr > HEALTHZ_TARGET_MS).sum()),
    }


def probe_healthz(port: int, timeout: float = 10.0) -> float:
    """Milliseconds for one GET /healthz on a new connection (connect included)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"/healthz answered {response.status}")
    finally:
        conn.close()
    return (time.perf_counter() - started) * 1000.0


class Prober:
    """Well-behaved client: /healthz every `interval` s, /classify back to back with a pause."""

    def __init__(self, port: int, image: bytes) -> None:
        self.port = port
        self.image = image
        self.healthz: list[float] = []
        self.classify: list[float] = []
        self.errors: list[str] = []
        self.reconnects = 0

    def run(self, seconds: float) -> None:
        self.healthz, self.classify, self.errors, self.reconnects = [], [], [], 0
        stop = time.monotonic() + seconds
        threads = [
            threading.Thread(target=self._healthz_loop, args=(stop,)),
            threading.Thread(target=self._classify_loop, args=(stop,)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _healthz_loop(self, stop: float) -> None:
        while time.monotonic() < stop:
            try:
                self.healthz.append(probe_healthz(self.port))
            except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                self.errors.append(f"healthz: {exc!r}")
            time.sleep(0.02)

    def _classify_loop(self, stop: float) -> None:
        conn: http.client.HTTPConnection | None = None
        headers = {"Content-Type": "image/png"}
        while time.monotonic() < stop:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            started = time.perf_counter()
            try:
                conn.request("POST", "/classify", body=self.image, headers=headers)
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"/classify answered {response.status}")
                self.classify.append((time.perf_counter() - started) * 1000.0)
            except (OSError, http.client.HTTPException) as exc:
                # The server may close an idle keep-alive connection under the connection limit.
                self.reconnects += 1
                conn.close()
                conn = None
                if not isinstance(exc, http.client.RemoteDisconnected):
                    self.errors.append(f"classify: {exc!r}")
            except RuntimeError as exc:
                self.errors.append(str(exc))
            time.sleep(0.01)
        if conn is not None:
            conn.close()

    def summary(self) -> dict[str, Any]:
        return {
            "healthz": _percentiles(self.healthz),
            "classify": _percentiles(self.classify),
            "classify_reconnects": self.reconnects,
            "errors": len(self.errors),
            "first_errors": self.errors[:5],
        }


# ----------------------------------------------------------------------------- attackers


def _attacker_priority() -> None:
    """Attack traffic comes from other machines in reality; here it shares the CPUs with the
    server, so it runs at the lowest priority: what the server loses is lost to the requests
    themselves, not to generating them."""
    os.nice(19)


def _raise_fd_limit() -> int:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


PARTIAL_HEADER = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Wait: "


def hold_idle_sockets(
    port: int, count: int, stop: Any, open_per_s: int, reopen: bool, opened_all: Any, out: Any
) -> None:
    """Open `count` connections (at most `open_per_s` a second), send each a partial header and
    hold them until `stop` is set; set `opened_all` once all have been opened. With `reopen`,
    every connection the server closes is opened again (a connection flood at up to
    `open_per_s`)."""
    _attacker_priority()
    limit = _raise_fd_limit()
    count = min(count, limit - 64)
    selector = selectors.DefaultSelector()
    opened = closed_by_server = failed = 0
    peak_open = 0
    sources = [f"127.0.0.{i}" for i in range(2, 10)]

    def open_one() -> bool:
        nonlocal opened, failed
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((sources[opened % len(sources)], 0))
            sock.setblocking(False)
            sock.connect_ex(("127.0.0.1", port))
            selector.register(sock, selectors.EVENT_WRITE)
        except OSError:
            failed += 1
            sock.close()
            return False
        opened += 1
        return True

    started = time.monotonic()
    open_seconds = None
    while not stop.is_set() and time.monotonic() - started < MAX_ATTACK_S:
        if open_seconds is None and opened >= count:
            open_seconds = round(time.monotonic() - started, 2)
            opened_all.set()
        open_now = len(selector.get_map())
        peak_open = max(peak_open, open_now)
        wanted = count - open_now if reopen else count - opened
        for _ in range(max(0, min(wanted, max(1, open_per_s // 20)))):
            if not open_one():
                break
        for key, events in selector.select(timeout=0.05):
            sock = key.fileobj
            if events & selectors.EVENT_WRITE:  # connected: start a header, never finish it
                try:
                    sock.send(PARTIAL_HEADER)  # type: ignore[union-attr]
                    selector.modify(sock, selectors.EVENT_READ)
                    continue
                except OSError:
                    pass
            else:
                try:
                    if sock.recv(4096):  # type: ignore[union-attr]
                        continue  # an answer (408) arrives just before the close
                except OSError:
                    pass
            closed_by_server += 1
            selector.unregister(sock)
            sock.close()  # type: ignore[union-attr]
    still_open = len(selector.get_map())
    for key in list(selector.get_map().values()):
        key.fileobj.close()  # type: ignore[union-attr]
    out.put(
        {
            "attacker": "idle_sockets",
            "mode": "flood (reopen what the server closes)" if reopen else "open once and hold",
            "target": count,
            "opened": opened,
            "seconds_to_open_all": open_seconds,
            "peak_open": peak_open,
            "open_at_end": still_open,
            "closed_by_server": closed_by_server,
            "connect_failures": failed,
        }
    )


def endless_header(port: int, stop_event: Any, out: Any) -> None:
    """One client at a time sending a header line that never ends."""
    _attacker_priority()
    stop = time.monotonic() + MAX_ATTACK_S
    sent = cut_off = 0
    answers: dict[str, int] = {}
    while time.monotonic() < stop and not stop_event.is_set():
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Endless: ")
            try:
                while time.monotonic() < stop and not stop_event.is_set():
                    sock.sendall(b"a" * 1024)
                    sent += 1024
                    time.sleep(0.001)
            except OSError:
                cut_off += 1
                try:
                    status = sock.recv(64).split(b" ")[1].decode()
                except (OSError, IndexError):
                    status = "closed"
                answers[status] = answers.get(status, 0) + 1
    out.put({"attacker": "endless_header", "bytes_sent": sent, "cut_off": cut_off,
             "answers": answers})  # fmt: skip


def upload_loop(port: int, payload: bytes, content_type: str, stop_event: Any, out: Any) -> None:
    _attacker_priority()
    stop = time.monotonic() + MAX_ATTACK_S
    statuses: dict[str, int] = {}
    seconds_each: list[float] = []
    while time.monotonic() < stop and not stop_event.is_set():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        started = time.perf_counter()
        try:
            conn.request("POST", "/classify", body=payload, headers={"Content-Type": content_type})
            response = conn.getresponse()
            response.read()
            key = str(response.status)
        except (OSError, http.client.HTTPException) as exc:
            key = type(exc).__name__
        finally:
            conn.close()
        seconds_each.append(time.perf_counter() - started)
        statuses[key] = statuses.get(key, 0) + 1
    out.put({"attacker": f"upload {content_type}", "bytes": len(payload), "answers": statuses,
             "median_s": round(float(np.median(seconds_each)), 4) if seconds_each else None})  # fmt: skip


# ----------------------------------------------------------------------------- server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(bundle: str | None, env_extra: dict[str, str], log: Path) -> tuple[Any, int]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EARLYEXIT_")}
    env.update({"EARLYEXIT_PROVIDERS": "cpu", "PYTHONPATH": str(REPO), **env_extra})
    argv = [sys.executable, "-m", "serving.cli", "--host", "127.0.0.1", "--port", str(port)]
    if bundle:
        argv += ["--bundle", bundle]
    with open(log, "wb") as fh:
        process = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/readyz")
            if conn.getresponse().status == 200:
                conn.close()
                return process, port
            conn.close()
        except OSError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("server not ready after 300 s")


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def memory_phase(
    pid: int, port: int, settle_s: float, concurrency: int = 16, side: int = 4096
) -> dict[str, Any]:
    payload = png16_gray(side)
    baseline = _status_kib(pid, "VmRSS")
    hwm_reset = True
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # peak RSS := current RSS
    except OSError:
        hwm_reset = False
    sampled = [baseline]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            sampled.append(_status_kib(pid, "VmRSS"))
            time.sleep(0.005)

    statuses: list[int | str] = []

    def upload() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request("POST", "/classify", body=payload, headers={"Content-Type": "image/png"})
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
        except (OSError, http.client.HTTPException) as exc:
            statuses.append(type(exc).__name__)
        finally:
            conn.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    threads = [threading.Thread(target=upload) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    burst_s = time.perf_counter() - started
    done.set()
    sampler.join()
    peak = _status_kib(pid, "VmHWM") if hwm_reset else max(sampled)
    time.sleep(settle_s)
    after = _status_kib(pid, "VmRSS")
    return {
        "uploads": concurrency,
        "image": f"{side}x{side} 16-bit greyscale PNG",
        "payload_bytes": len(payload),
        "answers": {str(s): statuses.count(s) for s in sorted(set(statuses), key=str)},
        "burst_seconds": round(burst_s, 2),
        "baseline_mib": round(baseline / 1024, 1),
        "peak_mib": round(max(peak, max(sampled)) / 1024, 1),
        "peak_source": "VmHWM" if hwm_reset else "sampled VmRSS",
        "after_idle_mib": round(after / 1024, 1),
        "settle_seconds": settle_s,
    }


def log_warnings(log: Path) -> dict[str, int]:
    """How often the server logged each distinct warning or error message."""
    counts: dict[str, int] = {}
    for line in log.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            counts["(not a JSON line)"] = counts.get("(not a JSON line)", 0) + 1
            continue
        if entry.get("level") in ("warning", "error", "critical"):
            key = f"{entry['level']}: {entry.get('msg')}"
            if entry.get("reason"):
                key += f" ({entry['reason']})"
            counts[key] = counts.get(key, 0) + 1
    return counts


# ----------------------------------------------------------------------------- main


def attack_phase(
    ctx: Any, pid: int, port: int, prober: Prober, args: argparse.Namespace, reopen: bool
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Start every attacker; probe for --attack-seconds once the idle sockets are all open (or,
    for the flood, after --ramp-seconds)."""
    results, stop, opened_all = ctx.Queue(), ctx.Event(), ctx.Event()
    rate = args.flood_per_s if reopen else args.open_per_s
    png, jpeg = png_many_chunks(10 * 2**20), jpeg_many_scans(10 * 2**20)
    attackers = [
        ctx.Process(target=hold_idle_sockets,
                    args=(port, args.sockets, stop, rate, reopen, opened_all, results)),
        ctx.Process(target=endless_header, args=(port, stop, results)),
        ctx.Process(target=upload_loop, args=(port, png, "image/png", stop, results)),
        ctx.Process(target=upload_loop, args=(port, jpeg, "image/jpeg", stop, results)),
    ]  # fmt: skip
    for p in attackers:
        p.start()
    try:
        if reopen:
            time.sleep(args.ramp_seconds)
        else:
            opened_all.wait(timeout=MAX_ATTACK_S / 2)
            time.sleep(1.0)  # the last connections accepted (and the oldest closed)
        prober.run(args.attack_seconds)
        server_rss = _status_kib(pid, "VmRSS")
    finally:
        stop.set()
    summary = prober.summary()
    summary["server_rss_mib_at_end"] = round(server_rss / 1024, 1)
    found = [results.get(timeout=120) for _ in attackers]
    for p in attackers:
        p.join(timeout=30)
    time.sleep(1.0)
    return summary, found


def run(args: argparse.Namespace) -> dict[str, Any]:
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    state_dir = tempfile.mkdtemp(prefix="earlyexit-attack-state-")
    env = {"EARLYEXIT_DECODE_MEMORY_MB": str(args.decode_memory_mb), "EARLYEXIT_STATE_DIR": state_dir,
           "EARLYEXIT_ACCESS_LOG": "false"}  # fmt: skip
    env.update(dict(item.split("=", 1) for item in args.server_env))
    log = Path(state_dir) / "server.log"  # holds machine paths: summarised, not kept
    try:
        return _attack(args, out_dir, env, log)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def _attack(
    args: argparse.Namespace, out_dir: Path, env: dict[str, str], log: Path
) -> dict[str, Any]:
    process, port = start_server(args.bundle, env, log)
    report: dict[str, Any] = {
        "command": "python scripts/hardening_attack.py " + " ".join(sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        },  # fmt: skip
        "server": {
            "decode_memory_mb": args.decode_memory_mb,
            "environment": args.server_env,
            "other settings": "defaults",
        },  # fmt: skip
    }
    try:
        prober = Prober(port, small_png())
        prober.run(args.idle_seconds)
        report["idle"] = prober.summary()
        report["idle"]["server_rss_mib_at_end"] = round(_status_kib(process.pid, "VmRSS") / 1024, 1)

        ctx = mp.get_context("fork")
        report["attack"], report["attackers"] = attack_phase(
            ctx, process.pid, port, prober, args, reopen=False
        )
        if args.flood_per_s > 0:
            report["flood"], report["flood_attackers"] = attack_phase(
                ctx, process.pid, port, prober, args, reopen=True
            )
        time.sleep(1.0)
        report["memory"] = memory_phase(
            process.pid, port, args.settle_seconds, args.memory_uploads, args.memory_side
        )
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        conn.close()
        report["server_metrics"] = [
            line
            for line in metrics.splitlines()
            if line.startswith(("earlyexit_connections_closed_total", "earlyexit_requests_total",
                                "earlyexit_open_connections"))
        ]  # fmt: skip
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
    report["server_alive_throughout"] = process.returncode in (0, -signal.SIGTERM)
    report["server_log_warnings"] = log_warnings(log)
    idle_p99 = report["idle"]["classify"].get("p99_ms", 0.0)
    attack = report["attack"]
    memory = report["memory"]
    report["targets"] = {
        "healthz_max_ms": attack["healthz"].get("max_ms"),
        "healthz_within_50ms": attack["healthz"].get("max_ms", 1e9) <= HEALTHZ_TARGET_MS,
        "classify_p99_ratio": round(attack["classify"].get("p99_ms", 1e9) / max(idle_p99, 1e-9), 2),
        "classify_p99_within_3x": attack["classify"].get("p99_ms", 1e9)
        <= CLASSIFY_P99_FACTOR * idle_p99,
        "peak_above_baseline_mib": round(memory["peak_mib"] - memory["baseline_mib"], 1),
        "peak_within_budget": memory["peak_mib"] - memory["baseline_mib"] <= args.decode_memory_mb,
        "after_idle_above_baseline_mib": round(
            memory["after_idle_mib"] - memory["baseline_mib"], 1
        ),
        "returns_near_baseline": memory["after_idle_mib"] - memory["baseline_mib"]
        <= SETTLE_SLACK_MIB,
        "no_probe_errors": attack["errors"] == 0 and report["idle"]["errors"] == 0,
    }
    (out_dir / "hardening.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for hardening.json")
    parser.add_argument("--bundle", help="bundle to serve (default: the packaged one)")
    parser.add_argument("--sockets", type=int, default=20_000, help="idle sockets to hold")
    parser.add_argument("--open-per-s", type=int, default=4000, help="idle socket opens a second")
    parser.add_argument(
        "--flood-per-s",
        type=int,
        default=1000,
        help="second attack phase: reopen every closed socket at up to this rate (0: skip)",
    )
    parser.add_argument("--idle-seconds", type=float, default=8.0)
    parser.add_argument(
        "--ramp-seconds", type=float, default=5.0, help="flood phase: attack before probing"
    )
    parser.add_argument("--attack-seconds", type=float, default=15.0)
    parser.add_argument("--settle-seconds", type=float, default=5.0)
    parser.add_argument("--decode-memory-mb", type=int, default=512)
    parser.add_argument("--memory-uploads", type=int, default=16)
    parser.add_argument("--memory-side", type=int, default=4096)
    parser.add_argument(
        "--server-env", action="append", default=[], metavar="EARLYEXIT_X=V",
        help="extra server setting (repeatable)",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = run(args)
    targets = report["targets"]
    print(json.dumps(targets, indent=2))
    ok = all(v for k, v in targets.items() if isinstance(v, bool))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
