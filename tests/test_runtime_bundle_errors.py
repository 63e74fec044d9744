"""A bad bundle is refused with a BundleError that names the problem."""

from __future__ import annotations

import json
import logging
import os

import pytest

from core.bundle import (
    BundleError,
    Thresholds,
    load_manifest,
    parse_manifest,
    read_thresholds,
    sha256_file,
    write_thresholds,
)
from serving.runtime import EarlyExitRuntime, ProviderUnavailableError


def _edit_manifest(bundle, edit) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_corrupted_segment_fails_sha256_check(bundle_copy):
    path = bundle_copy / "segment_2.onnx"
    payload = bytearray(path.read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    path.write_bytes(bytes(payload))
    with pytest.raises(BundleError, match=r"sha256 mismatch for segment_2\.onnx"):
        EarlyExitRuntime(bundle_copy)


def test_unloadable_segment_is_named_even_without_hash_check(bundle_copy):
    path = bundle_copy / "segment_3.onnx"
    path.write_bytes(b"not an onnx model")
    _edit_manifest(bundle_copy, lambda d: d["segments"][2].update(sha256=sha256_file(path)))
    with pytest.raises(BundleError, match=r"segment_3\.onnx: onnxruntime cannot load it"):
        EarlyExitRuntime(bundle_copy, verify=False)


def test_missing_file_is_named(bundle_copy):
    (bundle_copy / "stage_1.onnx").unlink()
    with pytest.raises(BundleError, match=r"bundle file missing: stage_1\.onnx"):
        EarlyExitRuntime(bundle_copy)


def test_missing_manifest_field_is_named(bundle_copy):
    _edit_manifest(bundle_copy, lambda d: d["segments"][1].pop("macs"))
    with pytest.raises(BundleError, match=r"missing field 'segments\[1\]\.macs'"):
        EarlyExitRuntime(bundle_copy)


def test_manifest_names_that_the_graphs_lack_are_refused(bundle_copy):
    def rename(data):
        data["segments"][0]["feature_output"] = "feats_1"
        data["segments"][1]["input_name"] = "feats_1"

    _edit_manifest(bundle_copy, rename)
    with pytest.raises(BundleError, match=r"segment_1\.onnx: no output 'feats_1'"):
        EarlyExitRuntime(bundle_copy)


def test_manifest_shapes_that_the_graphs_lack_are_refused(bundle_copy):
    def reshape(data):
        data["segments"][0]["feature_shape"] = [8, 16, 16]
        data["segments"][1]["input_shape"] = [8, 16, 16]

    _edit_manifest(bundle_copy, reshape)
    with pytest.raises(BundleError, match=r"segment_1\.onnx: 'features_1' has shape"):
        EarlyExitRuntime(bundle_copy)


def test_bad_thresholds_file_is_refused(bundle_copy):
    (bundle_copy / "thresholds.json").write_text(json.dumps({"thresholds": [0.5, 2.0, 0.1]}))
    with pytest.raises(BundleError, match=r"threshold 2 must be in \[0, 1\]"):
        EarlyExitRuntime(bundle_copy)


def _cuda_works() -> bool:
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    from serving.runtime import _GATHER_ROWS_MODEL

    ort.set_default_logger_severity(4)
    try:
        session = ort.InferenceSession(
            _GATHER_ROWS_MODEL, providers=["CUDAExecutionProvider", "CPUExecutionProvider"]
        )
        return session.get_providers()[0] == "CUDAExecutionProvider"
    finally:
        ort.set_default_logger_severity(2)


needs_no_cuda = pytest.mark.skipif(_cuda_works(), reason="this machine can run CUDA")


@needs_no_cuda
def test_cuda_request_falls_back_to_cpu_with_one_warning(tiny_bundle, caplog):
    with caplog.at_level(logging.WARNING, logger="serving.runtime"):
        runtime = EarlyExitRuntime(tiny_bundle, providers=("cuda", "cpu"))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "falling back to CPU" in warnings[0].getMessage()
    assert runtime.providers == ["CPUExecutionProvider"] and not runtime.on_cuda


@needs_no_cuda
def test_cuda_request_with_strict_raises(tiny_bundle):
    with pytest.raises(ProviderUnavailableError, match="CUDA execution provider requested"):
        EarlyExitRuntime(tiny_bundle, providers=("cuda",), strict=True)


def test_unknown_provider_is_rejected(tiny_bundle):
    with pytest.raises(ValueError, match="unknown execution provider 'tpu'"):
        EarlyExitRuntime(tiny_bundle, providers=("tpu",))


# ------------------------------------------------------------------ manifest schema


def _deep(levels: int) -> object:
    value: object = 0
    for _ in range(levels):
        value = [value]
    return value


def _outside_symlink(bundle) -> None:
    target = bundle.parent / "elsewhere.onnx"
    target.write_bytes((bundle / "segment_1.onnx").read_bytes())
    (bundle / "segment_1.onnx").unlink()
    (bundle / "segment_1.onnx").symlink_to(target)


BAD_MANIFESTS = [
    ("segments-not-dicts", lambda d: d.update(segments=["segment_1.onnx"]), r"'segments\[0\]'"),
    ("macs-as-string", lambda d: d["segments"][1].update(macs="1000"), r"'segments\[1\]\.macs'"),
    ("shape-as-strings", lambda d: d["input"].update(shape=["3", "32", "32"]), r"input\.shape"),
    ("mean-nan", lambda d: d["input"].update(mean=[float("nan")] * 3), r"'input\.mean\[0\]'"),
    ("std-inf", lambda d: d["input"].update(std=[float("inf")] * 3), r"'input\.std\[0\]'"),
    ("std-zero", lambda d: d["input"].update(std=[0.2, 0.0, 0.2]), r"'input\.std\[1\]'"),
    ("absolute-file", lambda d: d["segments"][0].update(file="/etc/passwd"), "absolute"),
    ("dotdot-file", lambda d: d["full_model"].update(file="../full_model.onnx"), r"'\.\.'"),
    ("backslash-file", lambda d: d["segments"][2].update(file="..\\x.onnx"), "relative path"),
    ("deep-json", lambda d: d["provenance"].update(deep=_deep(100)), "nested deeper"),
    ("huge-macs", lambda d: d["full_model"].update(macs=10**400), r"'full_model\.macs'"),
    ("color-vs-channels", lambda d: d["input"].update(color_mode="L"), "needs 1 channels"),
    ("baseline-accuracy", lambda d: d.update(baseline={"recipe": "r", "accuracy": {"val": 101.0, "test": 90.0}}), r"baseline\.accuracy\.val"),  # noqa: E501
    ("baseline-nan", lambda d: d.update(baseline={"recipe": "r", "accuracy": {"val": float("nan"), "test": 1.0}}), r"baseline\.accuracy\.val"),  # noqa: E501
    ("baseline-split", lambda d: d.update(baseline={"recipe": "r", "accuracy": {"val": 90.0}}), "val and test"),  # noqa: E501
    ("baseline-file", lambda d: d.update(baseline={"recipe": "r", "accuracy": {"val": 1.0, "test": 1.0}, "file": "/tmp/b.onnx", "sha256": "0" * 64}), "absolute"),  # noqa: E501
    ("exit-points-count", lambda d: d.update(exit_points=["layer1", "layer2"]), "2 entries for 3 exits"),  # noqa: E501
    ("exit-points-type", lambda d: d.update(exit_points=["layer1", 2.5, "layer3"]), r"exit_points\[1\]"),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize(
    ("edit", "message"), [c[1:] for c in BAD_MANIFESTS], ids=[c[0] for c in BAD_MANIFESTS]
)
def test_manifest_schema_refuses_bad_values_with_one_line(bundle_copy, edit, message):
    _edit_manifest(bundle_copy, edit)
    with pytest.raises(BundleError, match=message) as info:
        load_manifest(bundle_copy, verify=False)
    assert "\n" not in str(info.value) and str(info.value).startswith("manifest.json:")


def test_a_symlink_out_of_the_bundle_is_refused(bundle_copy):
    _outside_symlink(bundle_copy)
    with pytest.raises(BundleError, match=r"'segment_1\.onnx' resolves outside the bundle"):
        load_manifest(bundle_copy, verify=False)


def test_json_too_deep_for_the_parser_is_one_line(bundle_copy):
    text = (bundle_copy / "manifest.json").read_text()
    (bundle_copy / "manifest.json").write_text(
        text[:-2] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}"
    )
    with pytest.raises(BundleError, match="not valid JSON"):
        load_manifest(bundle_copy, verify=False)


def test_newer_optional_fields_and_unknown_keys_load(bundle_copy):
    baseline = {"recipe": "base_fast", "accuracy": {"val": 91.5, "test": 90.25}}
    _edit_manifest(
        bundle_copy,
        lambda d: d.update(
            baseline=baseline, exit_points=["layer1.1", 5, "layer4.1"], extra={"a": 1}
        ),
    )
    manifest = load_manifest(bundle_copy)
    assert manifest.baseline is not None and manifest.baseline.accuracy == {
        "val": 91.5,
        "test": 90.25,
    }
    assert manifest.exit_points == ("layer1.1", 5, "layer4.1")
    # The written form survives a round trip and stays free of nulls for absent fields.
    data = json.loads(json.dumps(manifest.to_dict()))
    assert parse_manifest(data) == manifest and "file" not in data["baseline"]


def test_cli_refuses_a_nan_mean_with_one_line_and_exit_2(bundle_copy, capsys):
    from serving.cli import main

    _edit_manifest(bundle_copy, lambda d: d["input"].update(mean=[float("nan")] * 3))
    assert main(["--bundle", str(bundle_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("earlyexit-serve: bad bundle: manifest.json:") and "\n" not in err


# ------------------------------------------------------------------ thresholds.json


def test_threshold_integers_too_large_for_a_float_are_bad_input(bundle_copy, capsys):
    from serving.cli import main

    (bundle_copy / "thresholds.json").write_text('{"thresholds": [0.5, 1' + "0" * 400 + ", 0.1]}")
    with pytest.raises(BundleError, match=r"threshold 2 must be in \[0, 1\]"):
        read_thresholds(bundle_copy, 3)
    assert main(["--bundle", str(bundle_copy)]) == 2
    err = capsys.readouterr().err.strip()
    assert "threshold 2 must be in [0, 1]" in err and "\n" not in err and "Traceback" not in err


@pytest.mark.parametrize("kind", ["missing", "directory", "fifo"])
def test_a_reread_never_falls_back_to_full_depth(bundle_copy, kind):
    path = bundle_copy / "thresholds.json"
    path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(BundleError, match="not found|not a regular file"):
        read_thresholds(bundle_copy, 3, missing_ok=False)
    if kind == "missing":  # a bundle before tuning still starts, at full depth
        assert read_thresholds(bundle_copy, 3).values == (1.0, 1.0, 1.0)
    else:
        with pytest.raises(BundleError, match="not a regular file"):
            read_thresholds(bundle_copy, 3)


def test_thresholds_file_is_standard_json(tmp_path):
    def refuse(name: str) -> None:
        raise ValueError(f"not JSON: {name}")

    record = {"method": "x", "metrics": {"acc": float("nan"), "gain": [1.0, float("inf")]}}
    write_thresholds(tmp_path, Thresholds((0.5, 1.0), record))
    data = json.loads((tmp_path / "thresholds.json").read_text(), parse_constant=refuse)
    assert data["tuned"]["metrics"] == {"acc": None, "gain": [1.0, None]}
