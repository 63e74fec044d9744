"""The embedded Gather graph the CUDA path uses to keep continuing rows on the device."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from serving.runtime import _GATHER_ROWS_MODEL


def _rebuild() -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Gather", ["data", "indices"], ["rows"], axis=0)],
        "gather_rows",
        [
            helper.make_tensor_value_info("data", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("indices", TensorProto.INT64, ["n"]),
        ],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None)],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8, producer_name="earlyexit"
    )


def test_embedded_bytes_are_the_documented_graph():
    assert onnx.load_from_string(_GATHER_ROWS_MODEL) == _rebuild()


def test_gather_selects_rows_of_any_rank():
    session = ort.InferenceSession(_GATHER_ROWS_MODEL, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    index = np.array([4, 0, 2], dtype=np.int64)
    for shape in [(5, 3, 4, 4), (5, 7)]:
        data = rng.standard_normal(shape).astype(np.float32)
        rows = session.run(None, {"data": data, "indices": index})[0]
        assert np.array_equal(rows, data[index])
