"""A bad bundle is refused with a BundleError that names the problem."""

from __future__ import annotations

import json
import logging

import pytest

from serving.bundle import BundleError, sha256_file
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
