"""Sizes and weight statistics of exported files, read from the files themselves."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from compress.errors import ModelError, first_line

def file_size(path: str | os.PathLike) -> dict:
    """File bytes and gzip bytes (level 9, in memory): pruned weights only shrink once compressed."""
    data = _read_file(path)
    return {"file_bytes": len(data), "gzip_bytes": len(gzip.compress(data, compresslevel=9, mtime=0))}


def onnx_weight_stats(path: str | os.PathLike) -> dict:
    """Weight elements, nonzero weight elements and stored bytes per data type of an ONNX file's constants.

    Weights are the graph's constants as its nodes read them (`weight_arrays`: weights stored as a codebook count as
    the weights they decode to), except int64 tensors (shapes, axes, indices) and the scales and zero points of
    Quantize/DequantizeLinear, which are counted apart as ``quant_params``. ``bytes_by_dtype`` (stored bytes per data
    type) covers every constant as stored, whatever its role. A Clip's bounds (ReLU6, an int8 ReLU) count with
    ``quant_params`` too: they are activation limits, not weights.
    """
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    _read_file(path, check_only=True)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf's DecodeError and onnx's own errors both mean "not an ONNX file"
        raise ModelError(f"cannot read ONNX file {path}: {first_line(exc)}") from exc

    quant_names = {name for graph in _graphs(model.graph) for node in graph.node
                   if node.op_type in ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Clip")
                   for name in node.input[1:]}
    bytes_by_dtype: dict[str, int] = {}
    for tensor in onnx_constants(model.graph):
        array = numpy_helper.to_array(tensor)
        dtype = _dtype_name(tensor.data_type, array)
        bytes_by_dtype[dtype] = bytes_by_dtype.get(dtype, 0) + int(array.nbytes)
    params = nonzero = quant_params = 0
    for name, array, zero_point in graph_weights(model.graph):
        if name in quant_names:
            quant_params += int(array.size)
        elif array.dtype != np.int64:
            params += int(array.size)
            nonzero += int(array.size) - count_zeros(array, zero_point)
    return {
        "params": params,
        "nonzero_params": nonzero,
        "sparsity": round(1.0 - nonzero / params, 6) if params else 0.0,
        "quant_params": quant_params,
        "bytes_by_dtype": dict(sorted(bytes_by_dtype.items())),
    }


def onnx_constants(graph):
    """Every constant tensor of a graph and its subgraphs: initializers and Constant nodes (named by their output)."""
    for sub in _graphs(graph):
        yield from _own_constants(sub)


def graph_weights(graph):
    """(name, array, zero point or None) of every constant of a graph and its subgraphs, as `weight_arrays` gives
    them; the zero point is that of the DequantizeLinear reading it (see `quantized_zero_points`)."""
    for sub in _graphs(graph):
        arrays = weight_arrays(sub)
        zero_points = quantized_zero_points(sub, arrays)
        for name, array in arrays.items():
            yield name, array, zero_points.get(name)


def weight_arrays(graph) -> dict[str, np.ndarray]:
    """A graph's constants (not its subgraphs') as its other nodes read them: initializers and Constant nodes, where
    nodes of _DECODING_OPS that read only constants (how export/codebook.py stores clustered weights: packed indices
    into a table) stand in for what they read by what they compute."""
    from onnx import numpy_helper

    values = {tensor.name: numpy_helper.to_array(tensor) for tensor in _own_constants(graph)}
    folded_inputs = set()
    for node in graph.node:  # nodes are in topological order
        if node.op_type in _DECODING_OPS and node.input and all(name in values for name in node.input):
            attributes = {attribute.name: attribute for attribute in node.attribute}
            values[node.output[0]] = _DECODING_OPS[node.op_type](attributes, *(values[name] for name in node.input))
            folded_inputs.update(node.input)
    read_elsewhere = {name for node in graph.node if node.op_type not in _DECODING_OPS for name in node.input}
    read_elsewhere |= {value.name for value in graph.output}
    return {name: array for name, array in values.items() if name not in folded_inputs or name in read_elsewhere}


def _reshape(attributes, array, shape):
    dims = [array.shape[i] if size == 0 and not _attribute(attributes, "allowzero", 0) else size
            for i, size in enumerate(shape.tolist())]
    return array.reshape(dims)


def _cast(attributes, array):
    from onnx import helper

    return array.astype(helper.tensor_dtype_to_np_dtype(_attribute(attributes, "to", None)))


def _attribute(attributes, name, default):
    return attributes[name].i if name in attributes else default


_DECODING_OPS = {
    "Cast": _cast,
    "Add": lambda attributes, a, b: a + b,
    "Gather": lambda attributes, data, indices: np.take(data, indices, axis=_attribute(attributes, "axis", 0)),
    "BitShift": lambda attributes, a, b: (np.right_shift(a, b) if attributes["direction"].s == b"RIGHT"
                                          else np.left_shift(a, b)).astype(a.dtype),
    "Mod": lambda attributes, a, b: np.fmod(a, b) if _attribute(attributes, "fmod", 0) else np.mod(a, b),
    "Reshape": _reshape,
}


def _own_constants(graph):
    import onnx

    yield from graph.initializer
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attribute in node.attribute:
            if attribute.name == "value" and attribute.type == onnx.AttributeProto.TENSOR:
                tensor = onnx.TensorProto()
                tensor.CopyFrom(attribute.t)
                tensor.name = node.output[0]
                yield tensor


def quantized_zero_points(graph, constants: dict[str, np.ndarray]) -> dict:
    """{constant name: its zero point, shaped to broadcast against it} for constants read by DequantizeLinear.

    A stored integer stands for 0.0 when it equals its zero point: 0 for int8, but 128 for the uint8 weights an
    export makes for CPUs without VNNI, so zeros are counted against the zero point, not against 0. `constants`:
    the graph's `weight_arrays`.
    """
    found = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3 or not set(node.input[::2]) <= set(constants):
            continue
        zero_point = constants[node.input[2]]
        rank = constants[node.input[0]].ndim
        if zero_point.ndim == 1 and rank > 1:  # per-axis: along the node's axis (default 1)
            axis = next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1) % rank
            zero_point = zero_point.reshape([-1 if dim == axis else 1 for dim in range(rank)])
        found[node.input[0]] = zero_point
    return found


def count_zeros(array: np.ndarray, zero_point: np.ndarray | None = None) -> int:
    """Elements of `array` that stand for 0.0: equal to `zero_point` (quantized) or to 0 (anything else)."""
    return int(np.count_nonzero(array == (0 if zero_point is None else zero_point)))


def _graphs(graph):
    """The graph and every subgraph held in node attributes (If/Loop/Scan bodies)."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.g.node or attribute.g.initializer:
                yield from _graphs(attribute.g)
            for sub in attribute.graphs:
                yield from _graphs(sub)


def _dtype_name(data_type: int, array: np.ndarray) -> str:
    import onnx

    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(data_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(data_type).lower() or array.dtype.name


def _read_file(path, *, check_only: bool = False) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path} does not exist or is not a file")
    return b"" if check_only else path.read_bytes()
