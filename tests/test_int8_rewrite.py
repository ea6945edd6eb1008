"""compress.export.int8_rewrite on small hand-built QDQ graphs of the shape tf2onnx makes from int8 TFLite files:
the rewritten graph must run on onnxruntime's integer kernels and give the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from compress.data import pixel_values
from compress.export.int8_rewrite import (input_channels_widened, inputs_rounded_as_fake_quant, reshapes_as_transposes,
                                          use_integer_kernels)
from compress.measure.hardware import int8_sums_saturate

RNG = np.random.default_rng(0)


def _tensor(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _qdq_input(x_name, scale, zero_point, initializers, nodes):
    """x -> QuantizeLinear -> DequantizeLinear with int8 activations, as tf2onnx writes them."""
    initializers += [_tensor("in_scale", np.float32(scale)), _tensor("in_zp", np.int8(zero_point))]
    nodes += [helper.make_node("QuantizeLinear", [x_name, "in_scale", "in_zp"], ["xq"]),
              helper.make_node("DequantizeLinear", ["xq", "in_scale", "in_zp"], ["xd"])]


def _int8_weights(shape, axis, in_scale, initializers, nodes, *, bias_size):
    weights = RNG.integers(-127, 128, size=shape).astype(np.int8)
    scales = RNG.uniform(0.002, 0.01, size=shape[axis]).astype(np.float32)
    initializers += [_tensor("w", weights), _tensor("w_scale", scales),
                     _tensor("w_zp", np.zeros(shape[axis], np.int8)),
                     _tensor("b", RNG.integers(-500, 500, size=bias_size).astype(np.int32)),
                     _tensor("b_scale", (scales * in_scale).astype(np.float32)),
                     _tensor("b_zp", np.zeros(bias_size, np.int32))]
    nodes += [helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["wd"], axis=axis),
              helper.make_node("DequantizeLinear", ["b", "b_scale", "b_zp"], ["bd"], axis=0)]


def _output_qdq(source, scale, zero_point, initializers, nodes):
    initializers += [_tensor("out_scale", np.float32(scale)), _tensor("out_zp", np.int8(zero_point))]
    nodes += [helper.make_node("QuantizeLinear", [source, "out_scale", "out_zp"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "out_scale", "out_zp"], ["y"])]


def _model(nodes, initializers, input_shape, output_shape):
    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, output_shape)], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def conv_model(activation: str, out_scale: float, out_zp: int):
    nodes, initializers = [], []
    _qdq_input("x", 0.02, -10, initializers, nodes)
    _int8_weights((8, 4, 3, 3), 0, 0.02, initializers, nodes, bias_size=8)
    nodes.append(helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1]))
    if activation == "relu":
        nodes.append(helper.make_node("Relu", ["c"], ["a"]))
    else:  # ReLU6, as Keras' ReLU(max_value=6) and MobileNet blocks export
        initializers += [_tensor("six_low", np.float32(0.0)), _tensor("six_high", np.float32(6.0))]
        nodes.append(helper.make_node("Clip", ["c", "six_low", "six_high"], ["a"]))
    _output_qdq("a", out_scale, out_zp, initializers, nodes)
    return _model(nodes, initializers, ["batch", 4, 6, 6], ["batch", 8, 6, 6])


def gemm_model():
    nodes, initializers = [], []
    _qdq_input("x", 0.02, 3, initializers, nodes)
    _int8_weights((10, 16), 0, 0.02, initializers, nodes, bias_size=10)
    nodes.append(helper.make_node("Gemm", ["xd", "wd", "bd"], ["g"], transB=1))
    _output_qdq("g", 0.03, 5, initializers, nodes)
    return _model(nodes, initializers, ["batch", 16], ["batch", 10])


def _run(model: onnx.ModelProto, inputs: np.ndarray, tmp_path, name: str):
    """Outputs, and the op types onnxruntime ran after its graph optimisations."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / f"{name}.optimized.onnx")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = session.run(None, {"x": inputs})[0]
    ran = {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node}
    return outputs, ran


def _reference(model: onnx.ModelProto, inputs: np.ndarray) -> np.ndarray:
    """The graph's outputs exactly as written: no fusion, every node as the ONNX spec defines it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": inputs})[0]


def _rewritten(model, *, unsigned_weights: bool = False):
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    use_integer_kernels(rewritten.graph, unsigned_weights=unsigned_weights)
    onnx.checker.check_model(rewritten, full_check=True)
    return rewritten


CASES = {
    "conv-relu": (lambda: conv_model("relu", 0.05, -20), (3, 4, 6, 6), "QLinearConv", 0.05),
    "conv-relu6-kept": (lambda: conv_model("relu6", 0.04, -128), (3, 4, 6, 6), "QLinearConv", 0.04),
    "conv-relu6-dropped": (lambda: conv_model("relu6", 6 / 255, -128), (3, 4, 6, 6), "QLinearConv", 6 / 255),
    "gemm": (gemm_model, (5, 16), "QGemm", 0.03),
}


@pytest.mark.parametrize("case", list(CASES))
def test_rewrite_runs_on_integer_kernels_with_the_same_outputs(case, tmp_path):
    build, shape, fused, step = CASES[case]
    model = build()
    inputs = RNG.uniform(-2, 2, size=shape).astype(np.float32)
    before = _reference(model, inputs)
    # As the exporter does: uint8 weights where this CPU's uint8 x int8 kernels saturate 16-bit sums (no VNNI).
    rewritten = _rewritten(model, unsigned_weights=int8_sums_saturate())
    assert _reference(rewritten, inputs).tolist() == before.tolist(), "the rewrite changed what the graph computes"
    after, ran_after = _run(rewritten, inputs, tmp_path, "after")
    assert fused in ran_after, f"{case}: onnxruntime ran {sorted(ran_after)}"
    assert not ran_after & {"Conv", "Gemm", "MatMul", "Relu"}, f"float work left: {sorted(ran_after)}"
    # Integer kernels requantize with their own rounding: the last step may differ, never more.
    assert np.max(np.abs(after - before)) <= step * 1.001
    assert np.mean(after == before) > 0.95


def test_relu6_clip_is_kept_where_quantizing_does_not_clip_as_much():
    rewritten = _rewritten(conv_model("relu6", 0.04, -128))
    clips = [node for node in rewritten.graph.node if node.op_type == "Clip"]
    assert len(clips) == 1
    initializers = {t.name: numpy_helper.to_array(t) for t in rewritten.graph.initializer}
    low, high = (int(initializers[name]) for name in clips[0].input[1:])
    # uint8 after the rewrite: zero point -128 + 128 = 0; 6.0 / 0.04 = 150 steps above it.
    assert (low, high) == (0, 150)
    dropped = _rewritten(conv_model("relu6", 6 / 255, -128))
    assert not [node for node in dropped.graph.node if node.op_type in ("Clip", "Relu")]


def test_clip_with_computed_bounds_is_left_alone():
    model = conv_model("relu6", 0.04, -128)
    clip = next(node for node in model.graph.node if node.op_type == "Clip")
    model.graph.node.insert(0, helper.make_node("Identity", ["six_high"], ["six_high_computed"]))
    clip.input[2] = "six_high_computed"
    rewritten = _rewritten(model)
    assert any(node.op_type == "Clip" and node.input[0] == "c" for node in rewritten.graph.node)


def reshape_model(target):
    """1x1 Conv -> Reshape(target) -> 1x1 Conv on a 1x1 feature map, as tf2onnx writes MobileNet's last blocks on
    small images: its NHWC <-> NCHW Transposes of a 1x1 map become Reshape([-1, C, 1, 1])."""
    nodes, initializers = [], []
    _qdq_input("x", 0.02, -10, initializers, nodes)
    _int8_weights((8, 4, 1, 1), 0, 0.02, initializers, nodes, bias_size=8)
    initializers += [_tensor("mid_scale", np.float32(0.05)), _tensor("mid_zp", np.int8(3)),
                     _tensor("target", np.array(target, np.int64)),
                     _tensor("w2", RNG.integers(-127, 128, size=(8, 8, 1, 1)).astype(np.int8)),
                     _tensor("w2_scale", np.float32(0.004)), _tensor("w2_zp", np.int8(0))]
    nodes += [helper.make_node("Conv", ["xd", "wd", "bd"], ["c"]),
              helper.make_node("QuantizeLinear", ["c", "mid_scale", "mid_zp"], ["cq"]),
              helper.make_node("DequantizeLinear", ["cq", "mid_scale", "mid_zp"], ["cd"]),
              helper.make_node("Reshape", ["cd", "target"], ["r"]),
              helper.make_node("DequantizeLinear", ["w2", "w2_scale", "w2_zp"], ["w2d"]),
              helper.make_node("Conv", ["r", "w2d"], ["c2"])]
    _output_qdq("c2", 0.03, 5, initializers, nodes)
    return _model(nodes, initializers, ["batch", 4, 1, 1], ["batch", 8, 1, 1])


def test_identity_reshape_goes_and_int8_convs_need_no_layout_transposes(tmp_path):
    model = reshape_model([-1, 8, 1, 1])
    inputs = RNG.uniform(-2, 2, size=(3, 4, 1, 1)).astype(np.float32)
    before = _reference(model, inputs)
    _run(_rewritten(model), inputs, tmp_path, "before")
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    reshapes_as_transposes(rewritten)
    assert "Reshape" not in {node.op_type for node in rewritten.graph.node}
    assert "target" not in {tensor.name for tensor in rewritten.graph.initializer}
    assert _reference(rewritten, inputs).tolist() == before.tolist()
    _run(_rewritten(rewritten), inputs, tmp_path, "after")
    # onnxruntime runs QLinearConv in NHWC: one Transpose in, one out, and a pair around a Reshape between two.
    transposes = {name: [node.op_type for node in onnx.load(tmp_path / f"{name}.optimized.onnx").graph.node]
                  .count("Transpose") for name in ("before", "after")}
    assert transposes == {"before": 4, "after": 2}


def one_channel_model():
    """A one-channel NHWC image into a Conv: tf2onnx writes its NHWC -> NCHW Transpose as Reshape([-1, 1, H, W])."""
    nodes, initializers = [], []
    initializers += [_tensor("in_scale", np.float32(1 / 255)), _tensor("in_zp", np.int8(-128)),
                     _tensor("target", np.array([-1, 1, 6, 6], np.int64))]
    nodes += [helper.make_node("QuantizeLinear", ["x", "in_scale", "in_zp"], ["xq"]),
              helper.make_node("Reshape", ["xq", "target"], ["xr"]),
              helper.make_node("DequantizeLinear", ["xr", "in_scale", "in_zp"], ["xd"])]
    _int8_weights((8, 1, 3, 3), 0, 1 / 255, initializers, nodes, bias_size=8)
    nodes.append(helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1]))
    _output_qdq("c", 0.03, 5, initializers, nodes)
    return _model(nodes, initializers, ["batch", 6, 6, 1], ["batch", 8, 6, 6])


def test_reshape_moving_a_size_one_axis_becomes_a_transpose_that_cancels(tmp_path):
    model = one_channel_model()
    inputs = RNG.uniform(0, 1, size=(3, 6, 6, 1)).astype(np.float32)
    before = _reference(model, inputs)
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    reshapes_as_transposes(rewritten)
    transpose = next(node for node in rewritten.graph.node if node.op_type == "Transpose")
    assert list(transpose.attribute[0].ints) == [0, 3, 1, 2]
    assert _reference(rewritten, inputs).tolist() == before.tolist()
    ran = {}
    for name, graph in (("before", model), ("after", rewritten)):
        _run(_rewritten(graph), inputs, tmp_path, name)
        ran[name] = [node.op_type for node in onnx.load(tmp_path / f"{name}.optimized.onnx").graph.node]
    # onnxruntime cancels the Transpose into its NHWC QLinearConv; only the one back to NCHW output is left.
    assert "Reshape" in ran["before"] and "Reshape" not in ran["after"]
    assert ran["after"].count("Transpose") == ran["before"].count("Transpose") - 1 == 1, ran


@pytest.mark.parametrize("target", [[-1, 8], [0, 2, 4, 1], [3, 8, 1, 1]])
def test_reshape_that_may_change_the_shape_stays(target):
    model = reshape_model([-1, 8, 1, 1])
    shape = next(tensor for tensor in model.graph.initializer if tensor.name == "target")
    shape.CopyFrom(_tensor("target", np.array(target, np.int64)))
    reshapes_as_transposes(model)
    assert [node.op_type for node in model.graph.node].count("Reshape") == 1


# (low, high) a QAT input quantizer learned, and inputs: [-1, 1] and [0, 1] pixels as compress.data makes them, and
# two ranges where a value falls within float error of halfway (dividing by the scale and multiplying by its inverse
# part there).
FAKE_QUANT_CASES = {
    "symmetric pixels": (-1.0, 1.0, lambda: pixel_values("symmetric")),
    "unit pixels": (0.0, 1.0, lambda: pixel_values("unit")),
    "unit pixels, learned range": (0.0, 3.3538465, lambda: pixel_values("unit")),
    "values, learned range": (-2.252584, 4.980216, lambda: np.array([3.843311, -3, 0, 0.1, 5], np.float32)),
}


@pytest.mark.parametrize("zero_point_type", [np.int8, np.uint8])
@pytest.mark.parametrize("told_the_range", [False, True])
def test_graph_input_gets_the_levels_of_the_qat_models_fake_quant(zero_point_type, told_the_range):
    """tfmot quantizes a QAT model's input with TensorFlow's FakeQuant: floor((x - low) / scale + 0.5). QuantizeLinear
    rounds halfway values to even instead, and every [-1, 1] pixel is halfway between two levels of a [-1, 1]
    quantizer (scale 2/255, zero point 127.5): the int8 file gave many pixel values another level than the Keras model.
    Rewritten, the graph input gets FakeQuant's level for every value, from the graph's own zero point (which the
    converter may nudge the other way, 128 for FakeQuant's 127) or, told the quantizer's range, from FakeQuant's."""
    from compress.keras import tf

    for case, (low, high, make_values) in FAKE_QUANT_CASES.items():
        values = make_values()
        low, high = np.float32(low), np.float32(high)
        scale = np.float32(high - low) / np.float32(255)
        zero_point = int(np.rint(-low / scale)) + (np.iinfo(zero_point_type).min if zero_point_type == np.int8 else 0)
        nodes, initializers = [], [_tensor("s", scale), _tensor("z", zero_point_type(zero_point))]
        nodes += [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                  helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
        model = _model(nodes, initializers, ["n"], ["n"])
        expected = tf.quantization.fake_quant_with_min_max_vars(values, low, high, num_bits=8).numpy()

        def levels_off(graph_model):
            return np.rint((_reference(graph_model, values) - expected) / scale) != 0

        if case == "symmetric pixels":
            assert levels_off(model).any(), "QuantizeLinear no longer rounds [-1, 1] pixels unlike FakeQuant"
        inputs_rounded_as_fake_quant(model.graph, (low, high) if told_the_range else None)
        onnx.checker.check_model(model, full_check=True)
        assert not [node for node in model.graph.node if node.op_type == "QuantizeLinear" and node.input[0] == "x"]
        off = levels_off(model)
        if not told_the_range:  # the graph's clipping range: at its top level, FakeQuant's may be one higher
            off &= values < (np.iinfo(zero_point_type).max - zero_point) * scale
        assert not off.any(), f"{case}: {values[off]}"


def rgb_conv_model(*, filters: int = 32, offset_shape=()):
    """An NHWC RGB image -> Sub -> NCHW Transpose -> uint8 QDQ -> Conv with symmetric int8 weights -> QDQ, as a
    PTQ or QAT file's first convolution looks."""
    nodes, initializers = [], [_tensor("offset", np.full(offset_shape, 0.5, np.float32)),
                               _tensor("in_scale", np.float32(1 / 255)), _tensor("in_zp", np.uint8(128))]
    nodes += [helper.make_node("Sub", ["x", "offset"], ["centred"]),
              helper.make_node("Transpose", ["centred"], ["nchw"], perm=[0, 3, 1, 2]),
              helper.make_node("QuantizeLinear", ["nchw", "in_scale", "in_zp"], ["xq"]),
              helper.make_node("DequantizeLinear", ["xq", "in_scale", "in_zp"], ["xd"])]
    _int8_weights((filters, 3, 3, 3), 0, 1 / 255, initializers, nodes, bias_size=filters)
    nodes.append(helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], pads=[1, 1, 1, 1]))
    initializers += [_tensor("out_scale", np.float32(0.05)), _tensor("out_zp", np.uint8(10))]
    nodes += [helper.make_node("QuantizeLinear", ["c", "out_scale", "out_zp"], ["yq"]),
              helper.make_node("DequantizeLinear", ["yq", "out_scale", "out_zp"], ["y"])]
    return _model(nodes, initializers, ["batch", 32, 32, 3], ["batch", filters, 32, 32])


def _widened(model):
    rewritten = onnx.ModelProto()
    rewritten.CopyFrom(model)
    input_channels_widened(rewritten.graph)
    onnx.checker.check_model(rewritten, full_check=True)
    return rewritten


def _median_call_seconds(sessions: dict, inputs: np.ndarray, rounds: int = 7, calls: int = 200) -> dict:
    import time

    times = {name: [] for name in sessions}
    for _ in range(rounds):  # in turns, so that a change in the machine's speed falls on both
        for name, session in sessions.items():
            started = time.perf_counter()
            for _ in range(calls):
                session.run(None, {"x": inputs})
            times[name].append((time.perf_counter() - started) / calls)
    return {name: float(np.median(values)) for name, values in times.items()}


def test_an_rgb_images_int8_convolution_gets_a_fourth_zero_channel_and_runs_faster():
    """onnxruntime's fast symmetric int8 convolution takes input channels in multiples of 4: a 3-channel image's
    convolution ran on a fallback about twice as slow, the slowest layer of a small int8 model. Widened, the graph
    computes exactly the same outputs, on every onnxruntime optimisation level, and its convolution runs faster."""
    model = rgb_conv_model()
    widened = _widened(model)
    ops = [node.op_type for node in widened.graph.node]
    assert ops[0] == "MatMul", ops
    kernels = [tensor for tensor in widened.graph.initializer if len(tensor.dims) == 4]
    assert [list(tensor.dims) for tensor in kernels] == [[32, 4, 3, 3]]
    inputs = RNG.uniform(0, 1, size=(4, 32, 32, 3)).astype(np.float32)
    assert _reference(widened, inputs).tolist() == _reference(model, inputs).tolist()
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    sessions = {name: ort.InferenceSession(graph.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for name, graph in (("three", model), ("four", widened))}
    outputs = {name: session.run(None, {"x": inputs})[0].tolist() for name, session in sessions.items()}
    assert outputs["four"] == outputs["three"]
    import platform

    if platform.machine().lower() in ("x86_64", "amd64"):  # the kernels' channel rule is x86's
        seconds = _median_call_seconds(sessions, inputs[:1])
        assert seconds["four"] < 0.9 * seconds["three"], seconds


@pytest.mark.parametrize("case, build", [
    ("12 filters: the fast kernel takes 16 or more either way", lambda: rgb_conv_model(filters=12)),
    ("a per-channel offset would not broadcast over a fourth channel", lambda: rgb_conv_model(offset_shape=(3,))),
])
def test_input_channels_stay_where_widening_cannot_pay_or_would_change_the_graph(case, build):
    model = build()
    assert _widened(model).SerializeToString() == model.SerializeToString(), case


@pytest.mark.parametrize("input_range, low, high, kept", [("unit", 0.0, 1.0, True), ("raw", 0.0, 255.0, True),
                                                         ("symmetric", -1.0, 1.0, False)])
def test_quantize_linear_stays_where_it_gives_every_pixel_fake_quants_level(input_range, low, high, kept):
    """Told the pixel values the input takes, the rewrite keeps the plain QuantizeLinear where it already gives each
    of them FakeQuant's level ([0, 1] and 0-255 pixels: none lies halfway between two levels), four nodes fewer, and
    writes FakeQuant's arithmetic where it does not ([-1, 1] pixels all lie halfway). Either way every pixel value
    gets TensorFlow's FakeQuant level."""
    from compress.keras import tf

    values = pixel_values(input_range)
    low, high = np.float32(low), np.float32(high)
    scale = np.float32(high - low) / np.float32(255)
    zero_point = np.uint8(np.rint(-low / scale))
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])]
    model = _model(nodes, [_tensor("s", scale), _tensor("z", zero_point)], ["n"], ["n"])
    inputs_rounded_as_fake_quant(model.graph, (low, high), values)
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    assert (ops == ["QuantizeLinear", "DequantizeLinear"]) == kept, ops
    expected = tf.quantization.fake_quant_with_min_max_vars(values, low, high, num_bits=8).numpy()
    np.testing.assert_allclose(_reference(model, values), expected, rtol=0, atol=scale * 1e-3)
