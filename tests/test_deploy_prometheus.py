"""The monitoring stack against the real server: a real `earlyexit-serve` on 127.0.0.1 serving a
tiny bundle, and a real Prometheus (Debian's package) scraping it with the repo's scrape config
and alert rules. Checks that /metrics carries every series the dashboard and rules use, that
Prometheus ingests them, that every dashboard query parses and has data after traffic, and that
every alert rule evaluates cleanly. Only service discovery differs from docker/compose.yaml:
the DNS lookup of `server` is replaced by a static loopback target.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.test_deploy_config import (
    CONTRACT_METRICS,
    DASHBOARD,
    PROMETHEUS_YML,
    RULES_YML,
    dashboard_exprs,
    exposition_families,
    family_of,
    metric_names,
    rule_exprs,
)

REPO = Path(__file__).resolve().parents[1]
SCRAPE_SECONDS = 1
# Grafana's variables, as a dashboard viewer with "All" replicas and a 5-minute range sees them.
GRAFANA_VARS = {"$__rate_interval": "30s", "$__range": "5m", "$instance": ".*"}


# ---------------------------------------------------------------- helpers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, body: bytes, content_type: str) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args[0]} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if http_get(url, timeout=2)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"{url} not ready after {seconds}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def grafana_to_promql(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    return expr


def png_image(size: tuple[int, int], seed: int) -> bytes:
    image_mod = pytest.importorskip("PIL.Image")
    import numpy as np

    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    image_mod.fromarray(pixels, "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


class Prometheus:
    """A real Prometheus on a loopback port with temp storage."""

    def __init__(self, binary: str, workdir: Path, target: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = yaml.safe_load(PROMETHEUS_YML.read_text(encoding="utf-8"))
        config["global"]["evaluation_interval"] = f"{SCRAPE_SECONDS}s"
        for job in config["scrape_configs"]:
            if job["job_name"] == "earlyexit":
                job.pop("dns_sd_configs")
                job["static_configs"] = [{"targets": [target]}]
                job["scrape_interval"] = f"{SCRAPE_SECONDS}s"
                job["scrape_timeout"] = f"{SCRAPE_SECONDS}s"
            else:
                job["static_configs"] = [{"targets": [f"127.0.0.1:{self.port}"]}]
        workdir.mkdir(parents=True, exist_ok=True)
        for rule_file in config.get("rule_files", []):
            shutil.copy(PROMETHEUS_YML.parent / rule_file, workdir / rule_file)
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        self.log = workdir / "prometheus.log"
        with open(self.log, "wb") as log_fh:
            self.proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                cwd=workdir,
            )
        wait_for(f"{self.url}/-/ready", self.proc, self.log, 60)

    def api(self, path: str, **params: str) -> dict:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        status, body = http_get(url)
        payload = json.loads(body)
        assert status == 200 and payload["status"] == "success", (params, payload)
        return payload["data"]

    def query(self, promql: str) -> list[dict]:
        return self.api("query", query=promql)["result"]


def wait_until_scraped(prometheus: Prometheus) -> list[dict]:
    """The `up` series of the earlyexit job once a scrape succeeded."""
    deadline = time.monotonic() + 30
    up: list[dict] = []
    while time.monotonic() < deadline:
        up = prometheus.query('up{job="earlyexit"}')
        if up and up[0]["value"][1] == "1":
            return up
        time.sleep(0.5)
    pytest.fail(f"no successful scrape: {up}\n{prometheus.log.read_text()[-2000:]}")


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def live_server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    for module in ("serving.app", "serving.cli", "serving.runtime"):
        try:
            __import__(module)
        except ImportError as exc:
            pytest.skip(f"server not importable ({module}: {exc})")
    bundle = tiny_bundle  # tests/conftest.py: a 3-exit bundle exported by training.export
    from core.bundle import load_manifest

    manifest = load_manifest(bundle, verify=False)
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EARLYEXIT_")}
    env.update(OMP_NUM_THREADS="1", EARLYEXIT_ADMIN_TOKEN="deploy-test-token")
    argv = [
        sys.executable, "-m", "serving.cli", "--bundle", str(bundle),
        "--host", "127.0.0.1", "--port", str(port), "--providers", "cpu",
        "--intra-op-threads", "1", "--no-access-log",
    ]  # fmt: skip
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen(argv, stdout=log_fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    size = (manifest.input.shape[2], manifest.input.shape[1])  # shape is [C, H, W]

    def send_traffic() -> list[int]:
        """Seven good images (one with ?full=true) and one undecodable body."""
        codes = [
            http_post(f"{url}/classify", png_image(size, seed), "image/png")[0] for seed in range(6)
        ]
        codes.append(http_post(f"{url}/classify?full=true", png_image(size, 99), "image/png")[0])
        # A 400, so the errors-by-code panel and the code label have a 4xx series.
        codes.append(http_post(f"{url}/classify", b"not an image", "image/png")[0])
        assert codes == [200] * 7 + [400], codes
        return codes

    try:
        wait_for(f"{url}/readyz", proc, log, 90)
        send_traffic()
        yield {
            "url": url,
            "target": f"127.0.0.1:{port}",
            "num_exits": manifest.num_exits,
            "send_traffic": send_traffic,
        }
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus(live_server: dict, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if os.access("/usr/bin/prometheus", os.X_OK) else None
    )
    if binary is None:
        pytest.skip(
            "prometheus binary not installed (apt-get install prometheus; .ci/install-system-deps.sh)"
        )
    prom = Prometheus(binary, tmp_path_factory.mktemp("prometheus"), live_server["target"])
    try:
        yield prom
    finally:
        stop(prom.proc)


# ---------------------------------------------------------------- tests


def test_metrics_endpoint_serves_every_name_the_dashboard_uses(live_server: dict) -> None:
    status, body = http_get(f"{live_server['url']}/metrics")
    assert status == 200
    text = body.decode()
    families = exposition_families(text)
    for name, kind in CONTRACT_METRICS.items():
        assert families.get(name) == kind, f"/metrics lacks {kind} {name}"
    for expr in dashboard_exprs() + rule_exprs():
        for series in metric_names(expr):
            assert family_of(series, families), f"{series} (in {expr!r}) not in /metrics"
    samples = {
        line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and line[0] != "#"
    }
    # After traffic every contract family has samples, not just a TYPE line.
    for name, kind in CONTRACT_METRICS.items():
        assert (name + "_bucket" if kind == "histogram" else name) in samples, name
    assert 'earlyexit_requests_total{code="400"}' in text
    assert 'earlyexit_segment_duration_seconds_bucket{le="+Inf",segment="1"}' in text


def test_prometheus_scrapes_the_server(prometheus: Prometheus, live_server: dict) -> None:
    up = wait_until_scraped(prometheus)
    assert up[0]["metric"]["instance"] == live_server["target"]

    series = prometheus.query('{__name__=~"earlyexit_.*"}')
    names = {s["metric"]["__name__"] for s in series}
    for name, kind in CONTRACT_METRICS.items():
        assert (name + "_bucket" if kind == "histogram" else name) in names, name
    requests = prometheus.query("earlyexit_requests_total")
    by_code = {s["metric"]["code"]: float(s["value"][1]) for s in requests}
    assert by_code.get("200", 0) >= 7 and by_code.get("400", 0) >= 1, by_code


def test_every_dashboard_query_parses_and_has_data(
    prometheus: Prometheus, live_server: dict
) -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels = {
        p["title"]: [grafana_to_promql(t["expr"]) for t in p["targets"]]
        for p in dashboard["panels"]
    }
    p99_expr = panels["Request latency p50 / p95 / p99"][2]
    # Rates need traffic between two scrapes: wait for one scrape, send more, then poll until
    # every panel shows something and the latency quantile is a number.
    wait_until_scraped(prometheus)
    live_server["send_traffic"]()
    deadline = time.monotonic() + 30
    empty: list[str] = []
    p99 = float("nan")
    while time.monotonic() < deadline:
        empty = [
            title for title, exprs in panels.items() if not any(prometheus.query(e) for e in exprs)
        ]
        result = prometheus.query(p99_expr)
        p99 = float(result[0]["value"][1]) if result else float("nan")
        if not empty and math.isfinite(p99):
            break
        time.sleep(1)
    assert not empty, f"panels without data: {empty}"
    assert 0 < p99 < 10, p99
    # Per-exit series exist for every exit of the bundle plus the fallback (primed at start).
    exits = {s["metric"]["exit"] for s in prometheus.query("earlyexit_exit_total")}
    assert {str(k) for k in range(1, live_server["num_exits"] + 1)} | {"fallback"} <= exits


def test_alert_rules_evaluate_on_live_data(prometheus: Prometheus) -> None:
    deadline = time.monotonic() + 20
    rules: list[dict] = []
    while time.monotonic() < deadline:
        groups = prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if rules and all(
            r.get("lastEvaluation", "").startswith("2") and r["health"] != "unknown" for r in rules
        ):
            break
        time.sleep(0.5)
    expected = {
        r["alert"] for g in yaml.safe_load(RULES_YML.read_text())["groups"] for r in g["rules"]
    }
    assert {r["name"] for r in rules} == expected
    bad = {r["name"]: r.get("lastError") for r in rules if r["health"] != "ok"}
    assert not bad, bad
