"""Rewrites of an int8 QDQ ONNX graph that compute exactly what it computed, so that onnxruntime runs it on integer
kernels (QLinearConv / QGemm). Pure functions of an onnx GraphProto: no TensorFlow, no converter.
"""

from __future__ import annotations

import numpy as np

# Ops that only move or pick activation values, so they work the same on uint8 as on int8.
_VALUE_MOVING_OPS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Identity"}
# Ops that, given scalar constants, do the same to every channel: an extra input channel passes them harmlessly.
_CHANNEL_BLIND_OPS = {"Sub", "Div", "Add", "Mul", "Floor", "QuantizeLinear", "DequantizeLinear"}
# onnxruntime's symmetric int8 convolution kernels on x86 (MlasConvSymPackWSize) take input channels in multiples of
# 4 and at least 16 output channels in multiples of 8.
_CHANNEL_ALIGNMENT = 4
_MIN_OUTPUT_CHANNELS, _OUTPUT_CHANNEL_ALIGNMENT = 16, 8


def use_integer_kernels(graph, *, unsigned_weights: bool = False) -> None:
    """Rewrite tf2onnx's QDQ graph of an int8 TFLite file so that onnxruntime runs it on integer kernels.

    onnxruntime fuses DequantizeLinear -> Conv / MatMul+Add -> QuantizeLinear into QLinearConv / QGemm only when the
    activations are uint8 (on x86; it converts int8 Q -> DQ pairs itself only where they sit side by side) and no float
    Relu sits before the QuantizeLinear. Unfused, every call dequantizes all weights to float: slower than the float
    file. Both rewrites compute exactly what the graph did; weights and learned scales stay as they are:
    - int8 activations become uint8 (zero point + 128), where they only pass through value-moving ops to DQs;
    - a Relu or ReLU6-style Clip feeding a QuantizeLinear moves behind it as an integer Clip (quantizing is
      monotonic), or goes where quantizing clips to the same bounds anyway;
    - with `unsigned_weights`, int8 weights become uint8 (value + 128, zero point + 128), for CPUs whose uint8 x int8
      kernels saturate.
    """
    _unsigned_activations(graph)
    _activation_behind_quantize(graph)
    if unsigned_weights:
        _unsigned_weight_initializers(graph)
    _drop_unused_initializers(graph)


def inputs_rounded_as_fake_quant(graph, fake_quant_range: tuple[float, float] | None = None,
                                 input_values: np.ndarray | None = None) -> None:
    """Quantize each graph input the way the QAT model's input quantizer does, not the way QuantizeLinear does.

    tfmot quantizes a QAT model's input with TensorFlow's FakeQuant op: floor((clip(x) - low) / scale + 0.5) on its
    nudged range [low, high], in float32. QuantizeLinear rounds x / scale half to even. The two agree except on values
    exactly between two levels, which activations almost never hit but image inputs can hit everywhere: pixels scaled
    to [-1, 1] (p / 127.5 - 1, odd multiples of 1/255) all lie halfway between the levels of a [-1, 1] quantizer
    (scale 2/255, zero point 127.5), so float rounding decides each one and the two formulas decide many differently.
    The converter may also nudge that zero point to the other side of 127.5 than FakeQuant did, which moves the
    clipping range by one level (FakeQuant [-0.996, 1.004], the file [-1.004, 0.996]: white pixels differ).

    Each QuantizeLinear of a graph input (scalar scale and zero point) becomes FakeQuant's arithmetic: Sub, Div, Add
    0.5, Floor, then a QuantizeLinear with scale 1 that adds the integer offset and saturates. `fake_quant_range` is
    the QAT input quantizer's (min, max): given, FakeQuant's own nudged range and zero point are used (the
    DequantizeLinear nodes that read the input take that zero point); else the graph's scale and zero point.
    `input_values`, the values the input takes (the 256 pixel levels in the data's input range): where QuantizeLinear
    gives every one of them FakeQuant's level already ([0, 1] or 0-255 pixels, none halfway), it stays, with the
    zero point the DequantizeLinear nodes read, and the arithmetic (four nodes, a few microseconds) is not added.
    """
    from onnx import helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    inputs = {value.name for value in graph.input} - set(initializers)
    consumers = _consumers(graph)
    graph_outputs = {value.name for value in graph.output}
    for quantize in [node for node in graph.node if node.op_type == "QuantizeLinear" and node.input[0] in inputs]:
        if len(quantize.input) < 3 or not set(quantize.input[1:3]) <= set(initializers):
            continue
        scale = numpy_helper.to_array(initializers[quantize.input[1]])
        zero_point = numpy_helper.to_array(initializers[quantize.input[2]])
        if scale.ndim != 0 or zero_point.ndim != 0 or scale.dtype != np.float32 or not scale > 0:
            continue
        limits = np.iinfo(zero_point.dtype)
        users = _dequantizers(quantize.output[0], consumers, graph_outputs)
        nudged = fake_quant_nudge(*fake_quant_range) if fake_quant_range is not None else None
        graph_scale, dequantized_zero_point = scale, quantize.input[2]
        if nudged is not None and users and abs(nudged[1] - (int(zero_point) - limits.min)) <= 1 and np.isclose(
                nudged[0], scale, rtol=1e-5, atol=0):  # the same quantizer: take FakeQuant's zero point
            scale, zero_point = nudged[0], np.array(nudged[1] + limits.min, dtype=zero_point.dtype)
            name = _unused_name(graph, f"{quantize.input[2]}_fake_quant")
            graph.initializer.append(numpy_helper.from_array(zero_point, name))
            for node in users:
                node.input[2] = name
            dequantized_zero_point = name
        if input_values is not None and _clear_of_halfway(input_values, graph_scale) and np.array_equal(
                _quantize_linear_levels(input_values, graph_scale, zero_point),
                _fake_quant_levels(input_values, scale, zero_point)):
            quantize.input[2] = dequantized_zero_point
            continue
        # FakeQuant's level floor((x - low) / scale + 0.5), low one float32 product as TensorFlow computes it, then
        # the level as the integer type: a QuantizeLinear with scale 1 adds the offset and saturates, as clipping x to
        # FakeQuant's range would (levels below 0 or above 255 are the values outside it).
        constants = {"low": (np.float32(limits.min - int(zero_point)) * scale, np.float32),
                     "scale": (scale, np.float32), "half": (0.5, np.float32), "one": (1.0, np.float32),
                     "offset": (limits.min, zero_point.dtype)}
        prefix = quantize.output[0]
        names = {}
        for label, (value, dtype) in constants.items():
            names[label] = _unused_name(graph, f"{prefix}_{label}")
            graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype), names[label]))
        steps = [("Sub", [names["low"]]), ("Div", [names["scale"]]), ("Add", [names["half"]]), ("Floor", []),
                 ("QuantizeLinear", [names["one"], names["offset"]])]
        source = quantize.input[0]
        for position, (op_type, operands) in enumerate(steps):
            last = position == len(steps) - 1
            output = quantize.output[0] if last else _unused_name(graph, f"{prefix}_fake_quant_{position}")
            node = helper.make_node(op_type, [source, *operands], [output],
                                    name=_unused_name(graph, f"{prefix}_fake_quant_{op_type.lower()}"))
            graph.node.insert(list(graph.node).index(quantize), node)
            source = output
        graph.node.remove(quantize)
    _drop_unused_initializers(graph)


def input_channels_widened(graph) -> None:
    """Give an integer convolution that reads the image directly a multiple of 4 input channels, with zero weights.

    onnxruntime's fast int8 convolution (its symmetric QLinearConv kernels, on x86 with AVX2 or VNNI) takes only
    weights with zero points 0 and input channels in multiples of 4; an RGB image's first convolution (3 channels)
    falls back to an im2col product twice as slow, the slowest layer of a small int8 model. The graph input (NHWC,
    C channels) goes through a MatMul by the C x C' identity padded with zero columns, and the convolution gets zero
    weights for the new channels: it computes exactly what it did, whatever the new channels hold. Only where the
    input reaches that convolution alone, through element-wise ops with scalar constants, quantizers with scalar
    scales and the NHWC -> NCHW Transpose, and the weights are int8 with zero points 0.
    """
    from onnx import TensorProto, helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = _consumers(graph)
    graph_outputs = {value.name for value in graph.output}
    scalars = _scalar_constants(graph, initializers)
    for value in [value for value in graph.input if value.name not in initializers]:
        dims = value.type.tensor_type.shape.dim
        if (value.type.tensor_type.elem_type != TensorProto.FLOAT or len(dims) != 4
                or not dims[3].HasField("dim_value") or dims[3].dim_value % _CHANNEL_ALIGNMENT == 0):
            continue
        channels = dims[3].dim_value
        path = _path_to_convolution(value.name, consumers, scalars, graph_outputs)
        if path is None:
            continue
        convolution = path[-1]
        found = _symmetric_int8_weights(convolution, graph, initializers)
        if found is None or found[1].dims[1] != channels:
            continue
        filters = found[1].dims[0]
        if filters < _MIN_OUTPUT_CHANNELS or filters % _OUTPUT_CHANNEL_ALIGNMENT:  # the slow kernel either way
            continue
        dequantize, weights = found
        wide = -(-channels // _CHANNEL_ALIGNMENT) * _CHANNEL_ALIGNMENT
        kernel = numpy_helper.to_array(weights)
        padded = np.zeros((kernel.shape[0], wide, *kernel.shape[2:]), dtype=kernel.dtype)
        padded[:, :channels] = kernel
        padded_name = _unused_name(graph, f"{weights.name}_widened")
        graph.initializer.append(numpy_helper.from_array(padded, padded_name))
        dequantize.input[0] = padded_name
        widener, widened = (_unused_name(graph, f"{value.name}_{label}") for label in ("widener", "widened"))
        graph.initializer.append(numpy_helper.from_array(np.eye(channels, wide, dtype=np.float32), widener))
        for node in consumers[value.name]:
            node.input[:] = [widened if name == value.name else name for name in node.input]
        graph.node.insert(0, helper.make_node("MatMul", [value.name, widener], [widened],
                                              name=_unused_name(graph, f"{value.name}_widen")))
        stale = {output for node in path for output in node.output}  # their shapes say C channels
        for info in [info for info in graph.value_info if info.name in stale]:
            graph.value_info.remove(info)
    _drop_unused_initializers(graph)


def _path_to_convolution(tensor: str, consumers: dict[str, list], scalars: set[str], graph_outputs: set[str]):
    """The nodes from graph input `tensor` to the one Conv it reaches (last in the list), through single-consumer
    ops that treat every channel alike and a single NHWC -> NCHW Transpose, the Conv's input dequantized; else None."""
    path, transposed = [], False
    while True:
        users = consumers.get(tensor, [])
        if len(users) != 1 or tensor in graph_outputs:
            return None
        node = users[0]
        if node.op_type == "Conv":
            group = next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
            dequantized = bool(path) and path[-1].op_type == "DequantizeLinear"
            return path + [node] if node.input[0] == tensor and group == 1 and transposed and dequantized else None
        if node.op_type == "Transpose":
            perm = next((list(attribute.ints) for attribute in node.attribute if attribute.name == "perm"), None)
            if transposed or perm != [0, 3, 1, 2]:
                return None
            transposed = True
        elif node.op_type not in _CHANNEL_BLIND_OPS or node.input[0] != tensor or not all(
                name in scalars for name in node.input[1:] if name):
            return None
        path.append(node)
        tensor = node.output[0]


def _scalar_constants(graph, initializers: dict) -> set[str]:
    """Names of one-element constants: initializers, and DequantizeLinear outputs of one-element initializers (a
    QAT model's quantized Rescaling factor)."""
    scalars = {name for name, tensor in initializers.items() if int(np.prod(tensor.dims)) == 1}
    scalars |= {node.output[0] for node in graph.node
                if node.op_type == "DequantizeLinear" and all(name in scalars for name in node.input if name)}
    return scalars


def _symmetric_int8_weights(convolution, graph, initializers):
    """(DequantizeLinear, int8 weight initializer) that a Conv alone reads, with zero points 0; else None."""
    from onnx import TensorProto, numpy_helper

    producers = [node for node in graph.node if convolution.input[1] in node.output]
    if len(producers) != 1 or producers[0].op_type != "DequantizeLinear":
        return None
    dequantize = producers[0]
    if sum(convolution.input[1] in node.input for node in graph.node) != 1:
        return None
    weights = initializers.get(dequantize.input[0])
    if weights is None or weights.data_type != TensorProto.INT8 or len(weights.dims) != 4:
        return None
    if len(dequantize.input) > 2 and dequantize.input[2]:
        zero_point = initializers.get(dequantize.input[2])
        if zero_point is None or numpy_helper.to_array(zero_point).any():
            return None
    return dequantize, weights


def _clear_of_halfway(values: np.ndarray, scale: np.ndarray, margin: float = 1e-3) -> bool:
    """True when no value lies within `margin` of a step of halfway between two levels, so that however a runtime
    orders its float operations, it rounds each value as numpy does here."""
    quotient = np.asarray(values, np.float64) / float(scale)
    return bool(np.all(np.abs(quotient - np.floor(quotient) - 0.5) > margin))


def _quantize_linear_levels(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """QuantizeLinear's integer levels of `values`: x / scale rounded half to even, plus the zero point, saturated."""
    limits = np.iinfo(zero_point.dtype)
    quotient = np.asarray(values, np.float32) / np.float32(scale)
    return np.clip(np.rint(quotient) + int(zero_point), limits.min, limits.max).astype(np.int64)


def _fake_quant_levels(values: np.ndarray, scale: np.ndarray, zero_point: np.ndarray) -> np.ndarray:
    """The integer levels the graph's FakeQuant arithmetic (below) gives `values`, in float32 as it computes them."""
    limits = np.iinfo(zero_point.dtype)
    low = np.float32(limits.min - int(zero_point)) * np.float32(scale)
    level = np.floor((np.asarray(values, np.float32) - low) / np.float32(scale) + np.float32(0.5))
    return np.clip(level + limits.min, limits.min, limits.max).astype(np.int64)


def fake_quant_nudge(low: float, high: float) -> tuple[np.float32, int] | None:
    """(scale, zero point in 0..255) of TensorFlow's 8-bit FakeQuantWithMinMaxVars for the range [low, high], computed
    as its kernel does in float32 (zero point rounded half away from zero); None for an empty range."""
    low, high = np.float32(low), np.float32(high)
    scale = np.float32(high - low) / np.float32(255)
    if not scale > 0:
        return None
    from_low = np.float32(0) - low / scale
    return scale, int(np.clip(np.floor(np.float64(from_low) + 0.5), 0, 255))


def reshapes_as_transposes(model) -> None:
    """Rewrite each Reshape that only moves axes of size 1 as the Transpose it is, or drop it where it moves none.

    tf2onnx writes NHWC <-> NCHW Transposes of tensors with a size-1 axis (one-channel images, MobileNet's 1x1 maps
    on small inputs) as Reshapes, by shape inference. onnxruntime runs QLinearConv in NHWC and cancels its layout
    Transposes against the graph's own, but not against a Reshape: every such Reshape between integer convolutions
    costs a Transpose pair, and in a float graph it keeps a BatchNormalization from folding into its Conv.
    """
    from onnx import helper, numpy_helper, shape_inference

    graph = model.graph
    inferred = shape_inference.infer_shapes(model).graph
    shapes = {value.name: [dim.dim_value if dim.HasField("dim_value") else None
                           for dim in value.type.tensor_type.shape.dim]
              for value in (*inferred.value_info, *inferred.input) if value.type.tensor_type.HasField("shape")}
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    graph_outputs = {value.name for value in graph.output}
    for reshape in [node for node in graph.node if node.op_type == "Reshape"]:
        source, target, result = reshape.input[0], reshape.input[1], reshape.output[0]
        if target not in initializers or source not in shapes or result in graph_outputs:
            continue
        allow_zero = any(attribute.name == "allowzero" and attribute.i for attribute in reshape.attribute)
        perm = _axis_move(shapes[source], numpy_helper.to_array(initializers[target]).tolist(), allow_zero)
        if perm is None:
            continue
        if perm == sorted(perm):
            graph.node.remove(reshape)
            for node in graph.node:
                node.input[:] = [source if name == result else name for name in node.input]
            for value in [value for value in graph.value_info if value.name == result]:
                graph.value_info.remove(value)
        else:
            reshape.CopyFrom(helper.make_node("Transpose", [source], [result], name=reshape.name, perm=perm))
    _drop_unused_initializers(graph)


def _axis_move(dims: list[int | None], target: list[int], allow_zero: bool) -> list[int] | None:
    """The Transpose perm doing what Reshape(target) does to a tensor of shape `dims` (None: not known, at most one
    such), where that Reshape only moves axes of size 1; None where it may do more. A 0 in `target` copies its
    dimension (unless allowzero), a -1 takes the unknown one."""
    if len(dims) != len(target) or dims.count(None) > 1 or target.count(-1) > 1:
        return None
    resolved = [dims[axis] if wanted == 0 and not allow_zero else None if wanted == -1 else wanted
                for axis, wanted in enumerate(target)]
    if [dim for dim in resolved if dim != 1] != [dim for dim in dims if dim != 1]:
        return None
    ones, others = ([axis for axis, dim in enumerate(dims) if (dim == 1) == size_one] for size_one in (True, False))
    return [(ones if dim == 1 else others).pop(0) for dim in resolved]


def _unsigned_weight_initializers(graph) -> None:
    from onnx import TensorProto, numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        weights, zero_point = initializers.get(node.input[0]), initializers.get(node.input[2])
        if weights is None or zero_point is None or weights.data_type != TensorProto.INT8:
            continue
        for position, tensor in ((0, weights), (2, zero_point)):  # new names: a scalar zero point may be shared
            shifted = numpy_helper.to_array(tensor).astype(np.int16) + 128
            name = _unused_name(graph, f"{tensor.name}_uint8")
            graph.initializer.append(numpy_helper.from_array(shifted.astype(np.uint8), name))
            node.input[position] = name


def _unsigned_activations(graph) -> None:
    from onnx import TensorProto, numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = _consumers(graph)
    graph_outputs = {value.name for value in graph.output}
    unsigned_names: dict[str, str] = {}

    def unsigned(name: str) -> str:
        if name not in unsigned_names:
            zero_point = numpy_helper.to_array(initializers[name]).astype(np.int16) + 128
            unsigned_names[name] = _unused_name(graph, f"{name}_uint8")
            graph.initializer.append(numpy_helper.from_array(zero_point.astype(np.uint8), unsigned_names[name]))
        return unsigned_names[name]

    for quantize in [node for node in graph.node if node.op_type == "QuantizeLinear"]:
        zero_point = initializers.get(quantize.input[2]) if len(quantize.input) == 3 else None
        if zero_point is None or zero_point.data_type != TensorProto.INT8:
            continue
        users = _dequantizers(quantize.output[0], consumers, graph_outputs)
        if users is None or any(node.input[2] not in initializers for node in users):
            continue
        for node in (quantize, *users):
            node.input[2] = unsigned(node.input[2])


def _activation_behind_quantize(graph) -> None:
    """Move a Relu or a constant-bound Clip (ReLU6) that feeds a QuantizeLinear behind it, as an integer Clip.

    Quantizing is monotonic, so Q(clip(x, lo, hi)) == clip(Q(x), Q(lo), Q(hi)); bounds that cover the integer
    type's whole range clip nothing and the activation simply goes.
    """
    from onnx import helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = _consumers(graph)
    graph_outputs = {value.name for value in graph.output}
    for activation in [node for node in graph.node if node.op_type in ("Relu", "Clip")]:
        users = consumers.get(activation.output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or activation.output[0] in graph_outputs:
            continue
        quantize = users[0]
        if (len(quantize.input) < 3 or not set(quantize.input[1:3]) <= set(initializers)
                or quantize.output[0] in graph_outputs):
            continue
        scale = numpy_helper.to_array(initializers[quantize.input[1]])
        zero_point = numpy_helper.to_array(initializers[quantize.input[2]])
        if zero_point.ndim != 0 or scale.ndim != 0:  # Clip takes scalar bounds; per-axis outputs keep their activation
            continue
        bounds = _float_bounds(activation, initializers)
        if bounds is None:
            continue
        limits = np.iinfo(zero_point.dtype)

        def quantized_bound(bound, unbounded):
            if bound is None:
                return unbounded
            return int(np.clip(np.rint(bound / scale) + int(zero_point), limits.min, limits.max))

        low, high = quantized_bound(bounds[0], limits.min), quantized_bound(bounds[1], limits.max)
        quantize.input[0] = activation.input[0]
        graph.node.remove(activation)
        if low <= limits.min and high >= limits.max:
            continue  # quantizing already clips to these bounds
        quantized = quantize.output[0]
        clipped = _unused_name(graph, f"{quantized}_{activation.op_type.lower()}")
        for node in consumers.get(quantized, []):
            node.input[:] = [clipped if name == quantized else name for name in node.input]
        bound_names = []
        for value, label in ((low, "min"), (high, "max")):
            bound_names.append(_unused_name(graph, f"{clipped}_{label}"))
            graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=zero_point.dtype), bound_names[-1]))
        position = list(graph.node).index(quantize) + 1
        graph.node.insert(position, helper.make_node("Clip", [quantized, *bound_names], [clipped],
                                                     name=_unused_name(graph, f"{activation.name or 'act'}_clip")))


def _float_bounds(activation, initializers) -> tuple[float | None, float | None] | None:
    """(low, high) of a Relu (0, none) or a Clip with constant bounds; None for a Clip whose bounds are not known."""
    from onnx import numpy_helper

    if activation.op_type == "Relu":
        return 0.0, None
    bounds = []
    for position in (1, 2):
        name = activation.input[position] if len(activation.input) > position else ""
        if not name:
            bounds.append(None)
        elif name in initializers and numpy_helper.to_array(initializers[name]).ndim == 0:
            bounds.append(float(numpy_helper.to_array(initializers[name])))
        else:
            return None
    return bounds[0], bounds[1]


def _dequantizers(tensor: str, consumers: dict[str, list], graph_outputs: set[str]) -> list | None:
    """The DequantizeLinear nodes `tensor` reaches through value-moving ops; None if it reaches anything else."""
    found = []
    for node in consumers.get(tensor, []):
        if node.op_type == "DequantizeLinear":
            found.append(node)
        elif node.op_type in _VALUE_MOVING_OPS and (
                further := _dequantizers(node.output[0], consumers, graph_outputs)) is not None:
            found.extend(further)
        else:
            return None
    return None if tensor in graph_outputs else found


def _consumers(graph) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _drop_unused_initializers(graph) -> None:
    """Remove the constants a rewrite left that no node reads (old zero points, bounds, shapes)."""
    used = {name for node in graph.node for name in node.input} | {value.name for value in graph.output}
    for tensor in [tensor for tensor in graph.initializer if tensor.name not in used]:
        graph.initializer.remove(tensor)


def _unused_name(graph, name: str) -> str:
    used = {tensor.name for tensor in graph.initializer} | {node.name for node in graph.node}
    used |= {output for node in graph.node for output in node.output}
    candidate, count = name, 0
    while candidate in used:
        count += 1
        candidate = f"{name}_{count}"
    return candidate
