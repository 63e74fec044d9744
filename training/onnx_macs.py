"""MACs counted on an exported ONNX graph, to check a segment computes what torch says it does.

Counts the same operators `training.costs` counts on the torch side (convolutions, incl.
grouped/depthwise, Gemm and MatMul; element-wise ops are free), per image: the batch axis is
fixed to 1 before shape inference. A segment whose count disagrees with its torch count is
computing something else (for instance, secretly the later stages too).
"""

from __future__ import annotations

import math
import os

import onnx
from onnx import shape_inference

COUNTED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


class OnnxMacsError(ValueError):
    """The graph holds a counted operator whose shapes shape inference could not resolve."""


def _fix_batch(model: onnx.ModelProto, batch: int) -> None:
    """Pin every graph input's first axis (the dynamic batch) to `batch`."""
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims:
            dims[0].Clear()
            dims[0].dim_value = batch


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    graph = model.graph
    for init in graph.initializer:
        shapes[init.name] = tuple(int(d) for d in init.dims)
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        tensor = value.type.tensor_type
        if not tensor.HasField("shape"):
            continue
        dims = tensor.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = tuple(int(d.dim_value) for d in dims)
    return shapes


def _node_macs(node: onnx.NodeProto, shapes: dict[str, tuple[int, ...]]) -> int:
    def shape_of(name: str) -> tuple[int, ...]:
        if name not in shapes:
            raise OnnxMacsError(f"{node.op_type} node {node.name!r}: unknown shape of {name!r}")
        return shapes[name]

    out = shape_of(node.output[0])
    if node.op_type == "Conv":
        # Each output element is a dot product over (Cin / groups) × kH × kW weights.
        weight = shape_of(node.input[1])
        return math.prod(out) * math.prod(weight[1:])
    if node.op_type == "ConvTranspose":
        # Each input element scatters into Cout / groups × kH × kW outputs.
        weight = shape_of(node.input[1])
        return math.prod(shape_of(node.input[0])) * math.prod(weight[1:])
    if node.op_type == "Gemm":
        a = shape_of(node.input[0])
        trans_a = next((attr.i for attr in node.attribute if attr.name == "transA"), 0)
        return math.prod(out) * (a[0] if trans_a else a[1])
    if node.op_type == "MatMul":
        a = shape_of(node.input[0])
        return math.prod(out) * a[-1]
    return 0


def _prepare(model: onnx.ModelProto | str | os.PathLike[str], batch: int) -> onnx.ModelProto:
    proto = onnx.load(os.fspath(model)) if not isinstance(model, onnx.ModelProto) else model
    proto = onnx.ModelProto.FromString(proto.SerializeToString())  # never mutate the caller's
    if proto.functions:
        from onnx import inliner

        proto = inliner.inline_local_functions(proto)
    _fix_batch(proto, batch)
    return shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)


def macs_by_op(model: onnx.ModelProto | str | os.PathLike[str], batch: int = 1) -> dict[str, int]:
    """MACs per counted operator type for one run with the batch axis fixed to `batch`.

    Local functions are inlined first; control-flow sub-graphs are not supported (an exported
    segment never has them) and raise OnnxMacsError.
    """
    inferred = _prepare(model, batch)
    shapes = _static_shapes(inferred)
    out: dict[str, int] = {}
    for node in inferred.graph.node:
        graph_attrs = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        if any(attr.type in graph_attrs for attr in node.attribute):
            raise OnnxMacsError(f"control-flow node {node.op_type} {node.name!r} is not supported")
        if node.op_type in COUNTED_OPS:
            out[node.op_type] = out.get(node.op_type, 0) + _node_macs(node, shapes)
    return out


def count_onnx_macs(model: onnx.ModelProto | str | os.PathLike[str], batch: int = 1) -> int:
    """Total MACs of one run of `model` (default: per image); see `macs_by_op`."""
    return sum(macs_by_op(model, batch).values())


def relative_difference(a: int, b: int) -> float:
    """|a − b| / max(|b|, 1): how far an ONNX count `a` is from the torch count `b`."""
    return abs(a - b) / max(abs(b), 1)
