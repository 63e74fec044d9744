"""Settings from EARLYEXIT_* variables and the earlyexit-serve CLI's fail-fast paths."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serving.cli import main as serve_main
from serving.settings import DEFAULT_BUNDLE_DIR, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    import os

    for key in list(os.environ):
        if key.startswith("EARLYEXIT_"):
            monkeypatch.delenv(key)


def test_defaults() -> None:
    settings = Settings()
    assert settings.bundle == DEFAULT_BUNDLE_DIR
    assert DEFAULT_BUNDLE_DIR.parent.name == "serving"
    assert (settings.host, settings.port) == ("127.0.0.1", 8000)
    assert settings.max_batch_size == 32 and settings.max_batch_wait_ms == 2.0
    assert settings.max_body_bytes == 10 * 1024 * 1024
    assert settings.admin_token is None
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_environment_is_read(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("EARLYEXIT_BUNDLE", str(tmp_path))
    monkeypatch.setenv("EARLYEXIT_PORT", "9001")
    monkeypatch.setenv("EARLYEXIT_PROVIDERS", "cpu")
    monkeypatch.setenv("EARLYEXIT_MAX_BATCH_WAIT_MS", "0.5")
    monkeypatch.setenv("EARLYEXIT_INLINE_MAX_MS", "0")
    monkeypatch.setenv("EARLYEXIT_WARMUP", "false")
    monkeypatch.setenv("EARLYEXIT_QUEUE_SIZE", "7")
    monkeypatch.setenv("EARLYEXIT_ADMIN_TOKEN", "s3cret")
    monkeypatch.setenv("EARLYEXIT_MAX_BATCH_SIZE", "")  # set but empty: the default
    settings = Settings()
    assert settings.bundle == tmp_path and settings.port == 9001
    assert settings.providers == ["CPUExecutionProvider"]
    assert settings.max_batch_wait_s == pytest.approx(0.0005) and settings.inline_max_s == 0.0
    assert settings.warmup is False
    assert settings.queue_size == 7 and settings.max_batch_size == 32
    assert settings.admin_token.get_secret_value() == "s3cret"
    assert "s3cret" not in repr(settings)
    # Keyword arguments (the CLI flags) win over the environment.
    assert Settings(port=9002).port == 9002


def test_admin_token_whitespace_is_stripped(monkeypatch) -> None:
    """Regression: a token configured with surrounding spaces could never match a request."""
    monkeypatch.setenv("EARLYEXIT_ADMIN_TOKEN", "  s3cret \n")
    assert Settings().admin_token.get_secret_value() == "s3cret"
    monkeypatch.setenv("EARLYEXIT_ADMIN_TOKEN", " \t ")
    assert Settings().admin_token is None
    assert Settings(admin_token=" t ").admin_token.get_secret_value() == "t"


def test_hardening_settings(monkeypatch, tmp_path) -> None:
    settings = Settings()
    assert settings.decode_workers == 2 and settings.decode_memory_mb == 512
    assert settings.max_connections == 2048 and settings.max_header_bytes == 16 * 1024
    assert settings.header_timeout_s == 10.0 and settings.body_timeout_s == 30.0
    assert settings.state_dir is None
    monkeypatch.setenv("EARLYEXIT_SHUTDOWN_TIMEOUT_S", "0.5")
    monkeypatch.setenv("EARLYEXIT_STATE_DIR", str(tmp_path))
    assert Settings().shutdown_timeout_s == 0.5 and Settings().state_dir == tmp_path


def test_provider_lists() -> None:
    assert Settings(providers="cuda, CPU").providers == [
        "CUDAExecutionProvider", "CPUExecutionProvider",
    ]  # fmt: skip
    assert Settings(providers=["CUDAExecutionProvider", "cpu"]).providers[0] == (
        "CUDAExecutionProvider"
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("EARLYEXIT_PORT", "70000"),
        ("EARLYEXIT_PORT", "http"),
        ("EARLYEXIT_MAX_BATCH_SIZE", "0"),
        ("EARLYEXIT_MAX_BATCH_WAIT_MS", "-1"),
        ("EARLYEXIT_INLINE_MAX_MS", "-0.5"),
        ("EARLYEXIT_QUEUE_SIZE", "0"),
        ("EARLYEXIT_PROVIDERS", "quantum"),
        ("EARLYEXIT_PROVIDERS", ","),
        ("EARLYEXIT_PROVIDERS", "tensorrt"),
        ("EARLYEXIT_LOG_LEVEL", "loud"),
        ("EARLYEXIT_DECODE_WORKERS", "0"),
        ("EARLYEXIT_DECODE_MEMORY_MB", "1"),
        ("EARLYEXIT_MAX_CONNECTIONS", "2"),
        ("EARLYEXIT_HEADER_TIMEOUT_S", "0"),
        ("EARLYEXIT_BODY_TIMEOUT_S", "-1"),
        ("EARLYEXIT_MAX_HEADER_BYTES", "100"),
        ("EARLYEXIT_SHUTDOWN_TIMEOUT_S", "0"),
    ],
)
def test_bad_values_fail_at_start(monkeypatch, key: str, value: str) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ValidationError):
        Settings()


def test_cli_bad_setting_is_one_line_exit_2(monkeypatch, capsys, tiny_bundle) -> None:
    monkeypatch.setenv("EARLYEXIT_QUEUE_SIZE", "-3")
    assert serve_main(["--bundle", str(tiny_bundle)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "EARLYEXIT_QUEUE_SIZE" in err


def test_cli_bad_bundle_is_one_line_exit_2(capsys, tmp_path, bundle_copy) -> None:
    assert serve_main(["--bundle", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bundle directory not found" in err
    # A corrupted segment fails the hash check before the server starts.
    segment = next(bundle_copy.glob("segment_*.onnx"))
    segment.write_bytes(segment.read_bytes()[:-10])
    assert serve_main(["--bundle", str(bundle_copy), "--port", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "sha256 mismatch" in err


def test_cli_help(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        serve_main(["--help"])
    assert exc.value.code == 0
    assert "--bundle" in capsys.readouterr().out
