"""Weights with few distinct values stored as a table of those values and packed indices into it.

A clustered kernel holds k distinct values: per tensor, or per output channel after cluster-preserving QAT (tfmot
trains a Conv2D's centroids per channel, and its int8 scales are per channel too). Stored as they are, each weight
takes 4 bytes (float32) or 1 (int8), and gzip meets every channel's own k int8 levels as one alphabet of up to
k x channels symbols (8 clusters came to about 4 bits per weight). As indices into a table, packed 2, 4 or 8 to a byte
(4, 2 or 1 bits each), the file holds little more than the log2(k) bits per weight that clustering left: gzip's one
Huffman table per block codes a byte of four 2-bit indices far closer to their entropy than four bytes of one index
each (indices with 1.79 bits of entropy took 2.16 bits each unpacked, 1.77 packed). The graph rebuilds each weight
from constants only (BitShift -> Mod -> Reshape -> Cast -> [Add the channel's table offset] -> Gather), which
onnxruntime folds when it loads the file: the kernels that run, and what they compute, stay the same
(measure/sizes.py `weight_arrays` reads the weights back the same way). Pure functions of an onnx GraphProto.
"""

from __future__ import annotations

import gzip

import numpy as np

MAX_CODES = 16  # more distinct values than this are not a clustered kernel; indices would save little
MIN_ELEMENTS = 1024  # smaller tensors cost more in table and nodes than their indices save
_STORED_TYPES = (np.float32, np.float16, np.int8, np.uint8)
_SUFFIXES = ("_codes", "_code_shifts", "_code_modulus", "_code_shape", "_codebook", "_code_offsets")


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
        indices, table, offsets, width = codes
        arrays = dict(zip(_SUFFIXES, (*_packed(indices, width), table, offsets)))
        arrays = {suffix: value for suffix, value in arrays.items() if value is not None}
        if _gzip_bytes(*arrays.values()) >= _gzip_bytes(array):
            continue
        graph.initializer.remove(tensor)
        graph.initializer.extend(numpy_helper.from_array(value, tensor.name + suffix)
                                 for suffix, value in arrays.items())
        nodes.extend(_decode_nodes(tensor.name, set(arrays)))
        stored.append(tensor.name)
    for node in reversed(nodes):  # their inputs are all constants: first in the graph keeps it sorted
        graph.node.insert(0, node)
    return stored


def _codes(array: np.ndarray, axis: int | None):
    """(uint8 indices shaped like `array`, table, int64 offsets into the table per slice or None, entries per slice),
    or None where some slice (the whole tensor when `axis` is None) holds more than MAX_CODES distinct values."""
    if axis is None:
        table, indices = np.unique(array, return_inverse=True)
        if table.size > MAX_CODES:
            return None
        return indices.reshape(array.shape).astype(np.uint8), table, None, table.size
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
    return np.ascontiguousarray(indices), table.reshape(-1), offsets, width


def _packed(indices: np.ndarray, width: int):
    """(packed, shifts, modulus, shape): the indices `bits` at a time into bytes, as (count / per byte, 1) uint8, with
    the shifts, modulus and shape that unpack them; (indices, None, None, None) where their count does not divide."""
    bits = next(bits for bits in (1, 2, 4, 8) if width <= 1 << bits)
    per_byte = 8 // bits
    if per_byte == 1 or indices.size % per_byte:
        return indices, None, None, None
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits).reshape(1, per_byte)
    groups = indices.reshape(-1, per_byte).astype(np.uint8)
    packed = np.bitwise_or.reduce(groups << shifts, axis=1, keepdims=True).astype(np.uint8)
    return packed, shifts, np.uint8(1 << bits), np.array(indices.shape, dtype=np.int64)


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


def _decode_nodes(weight: str, stored: set[str]) -> list:
    """The nodes that rebuild `weight` from its constants (named weight + suffix, `stored` the suffixes present)."""
    from onnx import TensorProto, helper

    nodes, codes = [], weight + "_codes"
    if "_code_shifts" in stored:  # packed: shift each index down to the low bits, drop the rest, back to the shape
        nodes += [
            helper.make_node("BitShift", [codes, weight + "_code_shifts"], [weight + "_code_shifted"],
                             direction="RIGHT"),
            helper.make_node("Mod", [weight + "_code_shifted", weight + "_code_modulus"], [weight + "_code_bits"]),
            helper.make_node("Reshape", [weight + "_code_bits", weight + "_code_shape"], [weight + "_code_unpacked"]),
        ]
        codes = weight + "_code_unpacked"
    nodes.append(helper.make_node("Cast", [codes], [weight + "_code_index"], to=TensorProto.INT64))
    index = nodes[-1].output[0]
    if "_code_offsets" in stored:
        nodes.append(helper.make_node("Add", [index, weight + "_code_offsets"], [weight + "_table_index"]))
        index = nodes[-1].output[0]
    nodes.append(helper.make_node("Gather", [weight + "_codebook", index], [weight], axis=0))
    return nodes


def _gzip_bytes(*arrays: np.ndarray) -> int:
    return len(gzip.compress(b"".join(np.asarray(array).tobytes() for array in arrays), compresslevel=9, mtime=0))
