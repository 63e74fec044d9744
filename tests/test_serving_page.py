"""The web page in headless Chromium, loaded from a real server: choose a file, see the answer.

Chromium is driven through chromedriver's W3C WebDriver HTTP API with httpx (no selenium):
a file input accepts a local path via "element send keys".
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.serving_helpers import REPO, free_port, png_bytes, server_process

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


@pytest.fixture(scope="session")
def browser_binaries() -> tuple[str, str]:
    """(chromium, chromedriver). Missing ones skip the page tests on a workstation but fail
    them in CI (CI=true), where a skip would hide that the page was never tested."""
    missing = [name for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER))
               if path is None]  # fmt: skip
    if missing:
        why = (f"{' and '.join(missing)} not on PATH; install them with "
               "`bash .ci/install-system-deps.sh` (apt-get install chromium chromium-driver)")  # fmt: skip
        if _in_ci():
            pytest.fail(f"CI=true but the page tests cannot run: {why}", pytrace=False)
        pytest.skip(f"headless Chromium unavailable: {why}")
    assert CHROMIUM is not None and CHROMEDRIVER is not None
    return CHROMIUM, CHROMEDRIVER


# Listed before a test's own fixtures so that a missing browser is reported before the session
# builds the tiny bundle and starts a server.
needs_browser = pytest.mark.usefixtures("browser_binaries")


class WebDriver:
    """The handful of WebDriver commands the test needs."""

    def __init__(self, base: str, session_id: str) -> None:
        self.http = httpx.Client(base_url=f"{base}/session/{session_id}", timeout=300.0)

    def _call(self, method: str, path: str, body: dict | None = None):
        response = self.http.request(method, path, json=body)
        payload = response.json()
        if response.status_code != 200:
            raise RuntimeError(f"webdriver {method} {path}: {payload}")
        return payload["value"]

    def open(self, url: str) -> None:
        self._call("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        reference = self._call("POST", "/element", {"using": "css selector", "value": css})
        # W3C names the key "element-6066-…"; it is the reference's only entry.
        (element_id,) = reference.values()
        return element_id

    def send_keys(self, element: str, text: str) -> None:
        self._call("POST", f"/element/{element}/value", {"text": text})

    def script(self, source: str):
        return self._call("POST", "/execute/sync", {"script": source, "args": []})

    def wait_for(self, source: str, timeout: float = 120.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.script(source)
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for: {source}")


@pytest.fixture(scope="module")
def browser(browser_binaries, tmp_path_factory) -> Iterator[WebDriver]:
    chromium, chromedriver = browser_binaries
    port = free_port()
    log = tmp_path_factory.mktemp("chromedriver") / "chromedriver.log"
    with open(log, "wb") as log_fh:
        driver = subprocess.Popen(
            [chromedriver, f"--port={port}"], stdout=log_fh, stderr=subprocess.STDOUT
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{base}/status", timeout=2).json()["value"]["ready"]:
                    break
            except (httpx.HTTPError, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"chromedriver did not start: {log.read_text()[-2000:]}")
            time.sleep(0.1)
        profile = tmp_path_factory.mktemp("chromium-profile")
        args = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-quic", "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"]  # fmt: skip
        capabilities = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": chromium, "args": args}}}  # fmt: skip
        response = httpx.post(f"{base}/session", json={"capabilities": capabilities}, timeout=300)
        assert response.status_code == 200, response.text
        session_id = response.json()["value"]["sessionId"]
        web = WebDriver(base, session_id)
        try:
            yield web
        finally:
            httpx.delete(f"{base}/session/{session_id}", timeout=30)
    finally:
        driver.terminate()
        driver.wait(timeout=10)


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    with server_process(tiny_bundle, log_dir=tmp_path_factory.mktemp("page")) as proc:
        yield proc


@needs_browser
def test_choosing_a_file_shows_label_exit_and_every_exit(browser, server, tiny_images, tmp_path):
    image_path = tmp_path / "sample.png"
    image_path.write_bytes(png_bytes(tiny_images.images[3]))
    expected = httpx.post(
        f"{server.url}/classify", params={"full": "true", "top_k": "3"},
        content=image_path.read_bytes(), headers={"Content-Type": "image/png"}, timeout=300,
    ).json()  # fmt: skip

    browser.open(server.url + "/")
    model_line = browser.wait_for(
        "const t = document.getElementById('model-line').textContent;"
        "return t.includes('exits') ? t : null;"
    )
    assert "tiny-resnet18" in model_line and "3 exits" in model_line

    browser.send_keys(browser.find("#file-input"), str(image_path))
    state = browser.wait_for(
        "const s = document.getElementById('result').dataset.state;"
        "return s === 'done' || s === 'error' ? s : null;"
    )
    assert state == "done", browser.script("return document.getElementById('error').textContent")
    label = browser.script("return document.getElementById('label').textContent")
    exit_text = browser.script("return document.getElementById('exit').textContent")
    latency = browser.script("return document.getElementById('latency').textContent")
    assert label == expected["label"]
    if expected["exit"] == "fallback":
        assert exit_text.startswith("fallback")
    else:
        assert exit_text == f"{expected['exit']} of 3"
    assert latency.endswith(" ms")
    rows = browser.script(
        "return [...document.querySelectorAll('#exits .exit-row')].map(r => ({"
        "exit: Number(r.dataset.exit), taken: r.classList.contains('taken'),"
        "width: r.querySelector('.bar-fill').style.width,"
        "text: r.querySelector('.exit-value').textContent}))"
    )
    assert [r["exit"] for r in rows] == [1, 2, 3]
    for row, answer in zip(rows, expected["exits"], strict=True):
        assert row["text"].startswith(answer["label"])
        assert row["width"] == f"{100 * answer['confidence']:.1f}%"
        assert row["taken"] == (answer["exit"] == expected["exit"])
    assert not browser.script("return document.getElementById('exits-section').hidden")
    # The page asks for the three best classes; it shows them, best first, with their share.
    top = browser.script(
        "return [...document.querySelectorAll('#top-classes li')].map(li => ({"
        "label: li.querySelector('.top-label').textContent,"
        "value: li.querySelector('.top-value').textContent}))"
    )
    assert [t["label"] for t in top] == [c["label"] for c in expected["top_k"]]
    assert [t["value"] for t in top] == [f"{100 * c['confidence']:.1f}%" for c in expected["top_k"]]
    assert len(top) == 3 and top[0]["label"] == expected["label"]
    assert not browser.script("return document.getElementById('top-section').hidden")


@needs_browser
def test_a_broken_file_shows_the_error(browser, server, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    browser.open(server.url + "/")
    browser.send_keys(browser.find("#file-input"), str(broken))
    browser.wait_for("return document.getElementById('result').dataset.state === 'error'")
    message = browser.script("return document.getElementById('error').textContent")
    assert "could not decode image" in message


@needs_browser
def test_a_failed_upload_clears_the_previous_answer(browser, server, tiny_images, tmp_path):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes(tiny_images.images[5]))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    browser.open(server.url + "/")
    upload = browser.find("#file-input")
    browser.send_keys(upload, str(good))
    browser.wait_for("return document.getElementById('result').dataset.state === 'done'")
    assert browser.script("return document.getElementById('latency').textContent").endswith("ms")

    browser.send_keys(upload, str(broken))
    browser.wait_for("return document.getElementById('result').dataset.state === 'error'")
    shown = browser.script(
        "const text = (id) => document.getElementById(id).textContent;"
        "return {label: text('label'), exit: text('exit'), confidence: text('confidence'),"
        "latency: text('latency'), error: text('error'),"
        "errorHidden: document.getElementById('error').hidden,"
        "exitRows: document.querySelectorAll('#exits .exit-row').length,"
        "exitsHidden: document.getElementById('exits-section').hidden,"
        "topRows: document.querySelectorAll('#top-classes li').length,"
        "topHidden: document.getElementById('top-section').hidden}"
    )
    # Nothing of the first image's answer may read as the answer for the broken file.
    assert (shown["label"], shown["exit"], shown["confidence"], shown["latency"]) == ("—",) * 4
    assert shown["exitRows"] == 0 and shown["exitsHidden"]
    assert shown["topRows"] == 0 and shown["topHidden"]
    assert not shown["errorHidden"] and "could not decode image" in shown["error"]


def _run_page_tests_without_a_browser(tmp_path, ci: str | None) -> subprocess.CompletedProcess:
    """This module's browser tests in a child pytest whose PATH has neither Chromium nor
    chromedriver (an empty folder), as on a fresh machine."""
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = str(tmp_path / "empty-path")
    (tmp_path / "empty-path").mkdir(parents=True)
    if ci is not None:
        env["CI"] = ci
    command = [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
               f"{__file__}", "-k", "not without_a_browser"]  # fmt: skip
    return subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False
    )


def test_without_a_browser_ci_fails_and_a_workstation_skips(tmp_path):
    in_ci = _run_page_tests_without_a_browser(tmp_path / "ci", ci="true")
    output = in_ci.stdout + in_ci.stderr
    assert in_ci.returncode == 1, output
    assert "skipped" not in output and "3 errors" in output, output
    assert "chromedriver" in output and "chromium-driver" in output, output

    locally = _run_page_tests_without_a_browser(tmp_path / "local", ci=None)
    output = locally.stdout + locally.stderr
    assert locally.returncode == 0, output
    assert "3 skipped" in output and "chromium-driver" in output, output
