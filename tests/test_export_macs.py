"""MACs counted on ONNX graphs agree with torch's FlopCounter-based count."""

from __future__ import annotations

import io
import warnings

import onnx
import pytest
import torch
from torch import nn

from training.costs import count_macs
from training.onnx_macs import OnnxMacsError, count_onnx_macs, macs_by_op


def _to_onnx(module: nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            (example,),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    return onnx.load_from_string(buffer.getvalue())


class _MatMulHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(24, 7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1) @ self.weight


MODULES = {
    "dense conv": (nn.Conv2d(3, 8, 3, stride=1, padding=1), (3, 16, 16)),
    "strided conv": (nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), (4, 15, 15)),
    "depthwise conv": (nn.Conv2d(8, 8, 3, padding=1, groups=8), (8, 10, 10)),
    "grouped conv": (nn.Conv2d(8, 12, 1, groups=4), (8, 9, 9)),
    "linear (Gemm)": (nn.Sequential(nn.Flatten(), nn.Linear(48, 10)), (3, 4, 4)),
    "matmul": (_MatMulHead(), (6, 2, 2)),
    "conv + bn + relu + pool + fc": (
        nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(8, 4),
        ),
        (3, 8, 8),
    ),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_onnx_count_equals_torch_count(name):
    module, shape = MODULES[name]
    example = torch.randn(2, *shape)
    expected = count_macs(module.eval(), torch.zeros(1, *shape))
    model = _to_onnx(module, example)
    assert expected > 0
    assert count_onnx_macs(model) == expected
    assert count_onnx_macs(model, batch=3) == 3 * expected


def test_breakdown_by_operator():
    module, shape = MODULES["conv + bn + relu + pool + fc"]
    breakdown = macs_by_op(_to_onnx(module, torch.randn(2, *shape)))
    assert breakdown == {"Conv": 8 * 8 * 8 * 3 * 9, "Gemm": 8 * 4}


def test_control_flow_is_refused():
    then_graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y_then"])],
        "then",
        [],
        [onnx.helper.make_tensor_value_info("y_then", onnx.TensorProto.FLOAT, [1])],
    )
    else_graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y_else"])],
        "else",
        [],
        [onnx.helper.make_tensor_value_info("y_else", onnx.TensorProto.FLOAT, [1])],
    )
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node(
                "If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph
            )
        ],
        "branchy",
        [
            onnx.helper.make_tensor_value_info("cond", onnx.TensorProto.BOOL, []),
            onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1]),
        ],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    with pytest.raises(OnnxMacsError, match="control-flow node If"):
        count_onnx_macs(model)
