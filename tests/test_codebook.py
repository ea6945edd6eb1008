"""compress.export.codebook on hand-built graphs: clustered weights stored as uint8 indices into a table must give the
same outputs, still run on integer kernels, read back as the same weights, and be smaller under gzip."""

from __future__ import annotations

import gzip

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from compress.export.codebook import store_as_codebooks
from compress.measure.sizes import weight_arrays

RNG = np.random.default_rng(0)
CHANNELS, IN_CHANNELS = 32, 16


def _per_channel_clustered_int8(values_per_channel=8):
    """int8 conv weights (OIHW) with `values_per_channel` distinct values in each output channel, different ones in
    each channel: what cluster-preserving QAT's per-channel centroids and scales make."""
    tables = np.stack([RNG.choice(np.arange(-127, 128), values_per_channel, replace=False) for _ in range(CHANNELS)])
    picks = RNG.integers(0, values_per_channel, (CHANNELS, IN_CHANNELS, 3, 3))
    return np.take_along_axis(tables.reshape(CHANNELS, -1), picks.reshape(CHANNELS, -1), 1).reshape(
        picks.shape).astype(np.int8)


def _qdq_conv_graph(weights):
    """x -> Q/DQ (uint8) -> Conv with DequantizeLinear(int8 weights, per-channel scales) -> Q/DQ -> y."""
    initializers = [
        numpy_helper.from_array(weights, "w"),
        numpy_helper.from_array(np.full(CHANNELS, 0.01, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(CHANNELS, np.int8), "w_zero"),
        numpy_helper.from_array(np.float32(0.02), "x_scale"), numpy_helper.from_array(np.uint8(128), "x_zero"),
        numpy_helper.from_array(np.float32(0.05), "y_scale"), numpy_helper.from_array(np.uint8(0), "y_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zero"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zero"], ["wd"], axis=0),
        helper.make_node("Conv", ["xd", "wd"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("QuantizeLinear", ["conv", "y_scale", "y_zero"], ["yq"]),
        helper.make_node("DequantizeLinear", ["yq", "y_scale", "y_zero"], ["y"]),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, IN_CHANNELS, 8, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, CHANNELS, 8, 8])
    graph = helper.make_graph(nodes, "g", [x], [y], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _gemm_graph(weights):
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, weights.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, weights.shape[1]])],
        [numpy_helper.from_array(weights, "w")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model, x, level="ORT_ENABLE_ALL", tmp_path=None):
    options = ort.SessionOptions()
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    if tmp_path is not None:
        options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _copy(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy


def _gzip(model):
    return len(gzip.compress(model.SerializeToString(), compresslevel=9, mtime=0))


def test_per_channel_clustered_int8_weights_keep_outputs_and_integer_kernels(tmp_path):
    weights = _per_channel_clustered_int8()
    original = _qdq_conv_graph(weights)
    stored = _copy(original)
    assert store_as_codebooks(stored.graph) == ["w"]
    onnx.checker.check_model(stored, full_check=True)
    codes = {tensor.name: numpy_helper.to_array(tensor) for tensor in stored.graph.initializer}
    assert codes["w_codes"].dtype == np.uint8 and codes["w_codes"].size == weights.size // 2  # 4-bit indices
    assert codes["w_codebook"].size == 8 * CHANNELS
    np.testing.assert_array_equal(weight_arrays(stored.graph)["w"], weights)
    assert set(weight_arrays(stored.graph)) == {tensor.name for tensor in original.graph.initializer}

    x = RNG.normal(size=(1, IN_CHANNELS, 8, 8)).astype(np.float32)
    np.testing.assert_array_equal(_run(stored, x, tmp_path=tmp_path), _run(original, x))
    np.testing.assert_array_equal(_run(stored, x, "ORT_DISABLE_ALL"), _run(original, x, "ORT_DISABLE_ALL"))
    ops = [node.op_type for node in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert "QLinearConv" in ops and not {"Conv", "Gather"} & set(ops), ops
    assert _gzip(stored) < 0.85 * _gzip(original), (_gzip(stored), _gzip(original))


def test_per_tensor_clustered_float_weights_shrink_on_disk():
    centroids = RNG.normal(size=16).astype(np.float32)
    weights = centroids[RNG.integers(0, 16, (256, 64))]
    original = _gemm_graph(weights)
    stored = _copy(original)
    assert store_as_codebooks(stored.graph) == ["w"]
    names = {tensor.name for tensor in stored.graph.initializer}
    # one table for the whole tensor (no per-channel offsets), two 4-bit indices to a byte
    assert names == {"w_codes", "w_code_shifts", "w_code_modulus", "w_code_shape", "w_codebook"}
    np.testing.assert_array_equal(weight_arrays(stored.graph)["w"], weights)
    x = RNG.normal(size=(2, 256)).astype(np.float32)
    np.testing.assert_array_equal(_run(stored, x), _run(original, x))
    assert len(stored.SerializeToString()) < 0.3 * len(original.SerializeToString())
    assert _gzip(stored) < _gzip(original)


def test_four_values_pack_four_indices_to_a_byte_and_odd_counts_stay_unpacked():
    for rows, packed_size in ((256, 256 * 64 // 4), (257, 257 * 64 // 4), (255, None)):
        weights = RNG.normal(size=4).astype(np.float32)[RNG.integers(0, 4, (rows, 63 if packed_size is None else 64))]
        model = _gemm_graph(weights)
        assert store_as_codebooks(model.graph) == ["w"]
        codes = next(tensor for tensor in model.graph.initializer if tensor.name == "w_codes")
        assert numpy_helper.to_array(codes).size == (packed_size or weights.size)
        np.testing.assert_array_equal(weight_arrays(model.graph)["w"], weights)
        x = RNG.normal(size=(2, rows)).astype(np.float32)
        np.testing.assert_array_equal(_run(model, x), _run(_gemm_graph(weights), x))


def test_weights_that_are_not_clustered_stay_as_they_are():
    many_values = RNG.normal(size=(256, 64)).astype(np.float32)
    small = np.repeat(RNG.normal(size=(1, 4)).astype(np.float32), 64, axis=0)  # few values but under 1024 weights
    for weights in (many_values, small):
        model = _gemm_graph(weights)
        assert store_as_codebooks(model.graph) == []
        np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), weights)


def test_a_codebook_that_would_not_shrink_the_file_is_not_used():
    """A depthwise-style kernel: 9 weights per channel are at most 9 values per channel, but a table per channel
    costs more than the indices save."""
    weights = RNG.integers(-127, 128, (CHANNELS * 8, 1, 3, 3)).astype(np.int8)
    model = _qdq_conv_graph(_per_channel_clustered_int8())
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(weights, "w"))
    model.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.full(CHANNELS * 8, 0.01, np.float32), "w_scale"))
    model.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.zeros(CHANNELS * 8, np.int8), "w_zero"))
    assert store_as_codebooks(model.graph) == []


def test_a_float_file_with_codebooks_converts_to_float16(tmp_path):
    """The uint8 indices are not quantized weights: the float16 copy converts the table and computes the same."""
    from compress.export.fp16 import to_fp16

    centroids = RNG.normal(size=16).astype(np.float32)
    weights = centroids[RNG.integers(0, 16, (256, 64))]
    model = _gemm_graph(weights)
    store_as_codebooks(model.graph)
    onnx.save(model, str(tmp_path / "model.onnx"))
    conversion = to_fp16(tmp_path / "model.onnx", tmp_path / "model.fp16.onnx")
    assert "float32" not in conversion["weight_bytes_by_dtype"], conversion
    x = RNG.normal(size=(2, 256)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(session.run(None, {"x": x})[0], x @ weights, atol=0.05)
