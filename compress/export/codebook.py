"""Weights with few distinct values stored as a table of those values and one uint8 index per weight.

A clustered kernel holds k distinct values: per tensor, or per output channel after cluster-preserving QAT (tfmot
trains a Conv2D's centroids per channel, and its int8 scales are per channel too). Stored as they are, each weight
takes 4 bytes (float32) or 1 (int8), and gzip meets every channel's own k int8 levels as one alphabet of up to
k x channels symbols (8 clusters came to about 4 bits per weight). As indices into a table, the file holds the log2(k)
bits per weight that clustering left, and gzip finds them. The graph rebuilds each weight from constants only
(Cast -> [Add the channel's table offset] -> Gather), which onnxruntime folds when it loads the file: the kernels
that run, and what they compute, stay the same (measure/sizes.py `weight_arrays` reads the weights back the same
way). Pure functions of an onnx GraphProto.
"""

from __future__ import annotations

import gzip

import numpy as np

MAX_CODES = 16  # more distinct values than this are not a clustered kernel; indices would save little
MIN_ELEMENTS = 1024  # smaller tensors cost more in table and nodes than their indices save
_STORED_TYPES = (np.float32, np.float16, np.int8, np.uint8)
_SUFFIXES = ("_codes", "_codebook", "_code_offsets")


def store_as_codebooks(graph) -> list[str]:
    """Store each large initializer with at most MAX_CODES distinct values (per tensor, or per slice along the axis
    of the per-axis DequantizeLinear that reads it) as indices and a table, where that makes it smaller under gzip.
    Rewrites `graph` in place; returns the names of the weights so stored."""
    from onnx import numpy_helper

    graph_inputs = {value.name for value in graph.input}
    stored, nodes = [], []
    for tensor in list(graph.initializer):
        if tensor.name in graph_inputs:
            continue
        array = numpy_helper.to_array(tensor)
        if array.size < MIN_ELEMENTS or array.dtype.type not in _STORED_TYPES:
            continue
        codes = _codes(array, None)
        if codes is None:
            axis = _dequantize_axis(graph, tensor.name, array.ndim)
            codes = None if axis is None else _codes(array, axis)
        if codes is None:
            continue
        indices, table, offsets = codes
        arrays = [indices, table] + ([] if offsets is None else [offsets])
        if _gzip_bytes(*arrays) >= _gzip_bytes(array):
            continue
        names = [tensor.name + suffix for suffix in _SUFFIXES]
        graph.initializer.remove(tensor)
        graph.initializer.extend(numpy_helper.from_array(value, name) for value, name in zip(arrays, names))
        nodes.extend(_decode_nodes(tensor.name, names, with_offsets=offsets is not None))
        stored.append(tensor.name)
    for node in reversed(nodes):  # their inputs are all constants: first in the graph keeps it sorted
        graph.node.insert(0, node)
    return stored


def _codes(array: np.ndarray, axis: int | None):
    """(uint8 indices shaped like `array`, table, int64 offsets into the table per slice or None), or None where some
    slice (the whole tensor when `axis` is None) holds more than MAX_CODES distinct values."""
    if axis is None:
        table, indices = np.unique(array, return_inverse=True)
        if table.size > MAX_CODES:
            return None
        return indices.reshape(array.shape).astype(np.uint8), table, None
    rows = np.moveaxis(array, axis, 0).reshape(array.shape[axis], -1)
    uniques = [np.unique(row, return_inverse=True) for row in rows]
    width = max(values.size for values, _ in uniques)
    if width > MAX_CODES:
        return None
    # Every slice gets `width` entries (the last value repeated), so slice c's entry j sits at c * width + j.
    table = np.stack([np.pad(values, (0, width - values.size), mode="edge") for values, _ in uniques])
    indices = np.stack([inverse.reshape(-1) for _, inverse in uniques]).astype(np.uint8)
    indices = np.moveaxis(indices.reshape(np.moveaxis(array, axis, 0).shape), 0, axis)
    offsets = (np.arange(array.shape[axis], dtype=np.int64) * width).reshape(
        [-1 if dim == axis else 1 for dim in range(array.ndim)])
    return np.ascontiguousarray(indices), table.reshape(-1), offsets


def _dequantize_axis(graph, name: str, rank: int) -> int | None:
    """The axis of the per-axis DequantizeLinear nodes that read `name`, when only such nodes read it; else None."""
    from onnx import numpy_helper

    constants = {tensor.name: tensor for tensor in graph.initializer}
    readers = [node for node in graph.node if name in node.input]
    axes = set()
    for node in readers:
        if node.op_type != "DequantizeLinear" or node.input[0] != name or node.input[1] not in constants:
            return None
        if numpy_helper.to_array(constants[node.input[1]]).ndim != 1:
            return None
        axes.add(next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1) % rank)
    return axes.pop() if len(axes) == 1 else None


def _decode_nodes(weight: str, names: list[str], *, with_offsets: bool) -> list:
    from onnx import TensorProto, helper

    codes, table, offsets = names
    nodes = [helper.make_node("Cast", [codes], [weight + "_code_index"], to=TensorProto.INT64)]
    index = nodes[-1].output[0]
    if with_offsets:
        nodes.append(helper.make_node("Add", [index, offsets], [weight + "_table_index"]))
        index = nodes[-1].output[0]
    nodes.append(helper.make_node("Gather", [table, index], [weight], axis=0))
    return nodes


def _gzip_bytes(*arrays: np.ndarray) -> int:
    return len(gzip.compress(b"".join(array.tobytes() for array in arrays), compresslevel=9, mtime=0))
