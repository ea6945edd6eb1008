"""Keras -> TFLite flatbuffer and Keras / int8 TFLite -> ONNX, each file named, tagged and checked the same way."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from compress.errors import ExportError, first_line
from compress.export.int8_rewrite import (input_channels_widened, inputs_rounded_as_fake_quant, reshapes_as_transposes,
                                          use_integer_kernels)
from compress.files import atomic_path
from compress.kerasmodel import model_io, variable_short_name
from compress.measure.sizes import count_zeros, graph_weights

MIN_OPSET = 17
DEFAULT_OPSET = 17


def to_tflite(model, *, int8: bool) -> bytes:
    """A TFLite flatbuffer: float32, or (for a QAT model, `int8=True`) int8 with the learned quantization ranges."""
    from compress.keras import tf

    try:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if int8:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        with warnings.catch_warnings(), grouped_convolutions_traceable(model):
            warnings.simplefilter("ignore")
            return converter.convert()
    except Exception as exc:  # the converter raises ConverterError, ValueError and others, all "cannot convert"
        raise ExportError(f"TFLite conversion failed: {first_line(exc)}") from exc


@contextlib.contextmanager
def grouped_convolutions_traceable(model):
    """While converting, each grouped convolution (1 < groups) calls TensorFlow's convolution op directly.

    Keras runs a grouped convolution inside an XLA-compiled function (TensorFlow's CPU kernels lack it outside XLA),
    which converters see as one opaque PartitionedCall that tf2onnx cannot convert; called directly, it is a Conv2D
    whose kernel has a group's input channels, which tf2onnx writes as an ONNX Conv with `group`.
    """
    grouped = [layer for layer in getattr(model, "submodules", ())
               if getattr(layer, "groups", 1) > 1 and hasattr(layer, "_jit_compiled_convolution_op")]
    for layer in grouped:
        layer._jit_compiled_convolution_op = layer.convolution_op
    try:
        yield
    finally:
        for layer in grouped:
            del layer._jit_compiled_convolution_op  # the class's compiled method again


def with_tflite_metadata(content: bytes, metadata: dict[str, str]) -> bytes:
    """The TFLite flatbuffer `content` with each key: value stored in the model's metadata list (as an ONNX file
    keeps its metadata_props), so that the file itself says, e.g., which input range it takes."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    model.buffers = model.buffers or []
    model.metadata = [entry for entry in (model.metadata or []) if _text(entry.name) not in metadata]
    for key, value in metadata.items():
        buffer = schema.BufferT()
        buffer.data = np.frombuffer(str(value).encode(), dtype=np.uint8)
        model.buffers.append(buffer)
        entry = schema.MetadataT()
        entry.name, entry.buffer = key, len(model.buffers) - 1
        model.metadata.append(entry)
    builder = flatbuffers.Builder(len(content) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def record_metadata(path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Add each key: value to the metadata of the .onnx or .tflite file at `path` (rewritten in place, atomically)."""
    from compress.files import write_bytes

    path = Path(path)
    if path.suffix == ".tflite":
        write_bytes(path, with_tflite_metadata(path.read_bytes(), metadata))
        return
    import onnx

    proto = onnx.load(str(path))
    kept = [entry for entry in proto.metadata_props if entry.key not in metadata]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in metadata.items():
        proto.metadata_props.add(key=key, value=str(value))
    write_bytes(path, proto.SerializeToString())


def tflite_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The text metadata of a TFLite file (see with_tflite_metadata); {} for a file without, or not a TFLite file."""
    from ai_edge_litert import schema_py_generated as schema

    try:
        content = bytearray(Path(path).read_bytes())
        model = schema.Model.GetRootAs(content, 0)
        found = {}
        for index in range(model.MetadataLength()):
            entry = model.Metadata(index)
            data = model.Buffers(entry.Buffer()).DataAsNumpy()
            if isinstance(data, np.ndarray):
                found[_text(entry.Name())] = data.tobytes().decode(errors="replace")
        return found
    except Exception:  # a damaged file is named by the runtime that loads it next
        return {}


def _text(name) -> str:
    return name.decode() if isinstance(name, bytes) else str(name)


def int8_file_biases(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The biases QAT `model`'s int8 file holds, by the Keras layer whose kernel each convolution or fully connected op
    reads: (int32 values times their scale, that scale: input scale x weight scale per output channel), any
    BatchNormalization folded in; NaN where the converter clamped a bias to the int32 limits (a channel whose weights
    are all zero gets a tiny scale). Layers an op cannot be traced to by name, or that several ops read, are left out."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    interpreter = Interpreter(model_content=to_tflite(model, int8=True),
                              experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    interpreter.allocate_tensors()
    tensors = {detail["index"]: detail for detail in interpreter.get_tensor_details()}
    names = {layer.name for layer in model.layers}
    found, seen = {}, set()
    for op in interpreter._get_ops_details():  # noqa: SLF001 - the interpreter lists its ops only this way
        if op["op_name"] not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED") or len(op["inputs"]) < 3:
            continue
        if op["inputs"][2] < 0:  # no bias
            continue
        kernel, bias = tensors[op["inputs"][1]], tensors[op["inputs"][2]]
        scales = np.asarray(bias["quantization_parameters"]["scales"], dtype=np.float64)
        path = kernel["name"].split(";")[0].split("/")  # "model/layer/Conv2D;..."
        if bias["dtype"] != np.int32 or not scales.size or len(path) < 2 or path[1] not in names:
            continue
        name = path[1]
        if name in seen:  # a layer called twice: its ops need not agree
            found.pop(name, None)
            continue
        seen.add(name)
        stored = interpreter.get_tensor(bias["index"])
        limits = np.iinfo(np.int32)
        values = np.where((stored == limits.min) | (stored == limits.max), np.nan, stored.astype(np.float64) * scales)
        found[name] = (values, np.broadcast_to(scales, values.shape))
    return found


def onnx_proto(model, *, opset: int = DEFAULT_OPSET, metadata: dict[str, str], int8_tflite: bytes | None = None,
               unsigned_weights: bool = False, input_values: np.ndarray | None = None):
    """The model as an ONNX ModelProto, named and tagged the way every export is (from `int8_tflite` for QAT;
    `input_values`, the pixel values the model takes, where known: see `inputs_rounded_as_fake_quant`)."""
    input_name, input_shape, output_name = model_io(model)
    proto = _to_onnx(model, opset=opset, int8_tflite=int8_tflite, input_name=input_name, input_shape=input_shape)
    # tf2onnx writes some layout changes as Reshapes; as Transposes, onnxruntime cancels them and folds BatchNorms.
    reshapes_as_transposes(proto)
    if int8_tflite is not None:
        use_integer_kernels(proto.graph, unsigned_weights=unsigned_weights)
        # QuantizeLinear breaks ties between two levels unlike the QAT model's FakeQuant ([-1, 1] pixels are all ties)
        inputs_rounded_as_fake_quant(proto.graph, input_fake_quant_range(model), input_values)
        input_channels_widened(proto.graph)  # an RGB image's int8 convolution on onnxruntime's fast kernels
    _tidy_onnx(proto, input_name=input_name, output_name=output_name, metadata=metadata)
    return proto


def input_fake_quant_range(model) -> tuple[float, float] | None:
    """(min, max) of a QAT model's input quantizer (tfmot's QuantizeLayer right after the input), else None."""
    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    if not layers or type(layers[0]).__name__ != "QuantizeLayer":
        return None
    values = {variable_short_name(weight): weight for weight in layers[0].weights if weight.shape == ()}
    low = next((float(value.numpy()) for name, value in values.items() if name.endswith("_min")), None)
    high = next((float(value.numpy()) for name, value in values.items() if name.endswith("_max")), None)
    return None if low is None or high is None else (low, high)


def _to_onnx(model, *, opset: int, int8_tflite: bytes | None, input_name: str, input_shape):
    """The ONNX ModelProto: from the Keras model (float), or from the int8 TFLite flatbuffer (QAT)."""
    import tf2onnx

    from compress.keras import tf

    try:
        with _quiet_tf2onnx(), grouped_convolutions_traceable(model):
            if int8_tflite is None:
                spec = (tf.TensorSpec((None, *input_shape), tf.float32, name=input_name),)
                proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset,
                                                      custom_op_handlers={"Erfc": (_erfc_as_erf, [])})
            else:
                with tempfile.TemporaryDirectory(prefix="compress-export-") as tmp:
                    path = Path(tmp) / "model.tflite"
                    path.write_bytes(int8_tflite)
                    proto, _ = tf2onnx.convert.from_tflite(str(path), opset=opset,
                                                           custom_op_handlers={"TFL_GELU": (_gelu_from_tflite, [])})
    except ExportError:
        raise
    except Exception as exc:  # tf2onnx raises many types for unsupported ops; each means "cannot convert"
        raise ExportError(f"ONNX conversion failed: {first_line(exc)}") from exc
    import onnx

    # tf2onnx logs the TensorFlow ops it cannot convert and leaves them in the graph, which no runtime loads
    left = [node for node in proto.graph.node if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type)]
    if left:
        layers = sorted({node.name.split("/")[1] if node.name.count("/") > 1 else node.name for node in left})
        raise ExportError(f"ONNX conversion failed: tf2onnx cannot convert TensorFlow op(s) "
                          f"{', '.join(sorted({node.op_type for node in left}))} of layer(s) "
                          f"{', '.join(layers[:3])}{f' and {len(layers) - 3} more' if len(layers) > 3 else ''}")
    return proto


def _erfc_as_erf(ctx, node, name, args):
    """TensorFlow's GELU (approximate=False) computes 0.5 x erfc(-x / sqrt 2); ONNX has Erf but no Erfc (tf2onnx
    stops there): write erfc(x) as 1 - erf(x)."""
    from tf2onnx import utils

    node.type = "Erf"
    one = ctx.make_const(utils.make_name(f"{name}_one"), np.array(1, dtype=np.float32))
    difference = ctx.insert_new_node_on_output("Sub", node.output[0], name=utils.make_name(f"{name}_one_minus"))
    ctx.replace_inputs(difference, [one.output[0], node.output[0]])
    return difference


def _gelu_from_tflite(ctx, node, name, args):
    """TFLite keeps GELU as one op, which tf2onnx does not know: write it out, x * (1 + erf(x / sqrt 2)) / 2, or with
    `approximate` x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 x^3))) / 2."""
    from tf2onnx import utils

    x = node.input[0]

    def const(value):
        return ctx.make_const(utils.make_name(f"{name}_const"), np.array(value, dtype=np.float32)).output[0]

    def op(kind, *inputs):
        return ctx.make_node(kind, list(inputs), name=utils.make_name(f"{name}_{kind.lower()}")).output[0]

    if node.get_attr_value("approximate", False):
        inner = op("Add", x, op("Mul", op("Mul", x, op("Mul", x, x)), const(0.044715)))
        gate = op("Tanh", op("Mul", inner, const(math.sqrt(2 / math.pi))))
    else:
        gate = op("Erf", op("Mul", x, const(1 / math.sqrt(2))))
    node.type = "Mul"
    for attribute in list(node.attr):
        del node.attr[attribute]
    ctx.replace_inputs(node, [x, op("Mul", op("Add", gate, const(1.0)), const(0.5))])
    return node


@contextlib.contextmanager
def _quiet_tf2onnx():
    """Keep tf2onnx's INFO lines and TensorFlow's deprecation warnings off the console during a conversion."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.CRITICAL)  # its ERROR lines name ops it cannot convert; _to_onnx says that in one line
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def _tidy_onnx(proto, *, input_name: str, output_name: str, metadata: dict[str, str]) -> None:
    """Name the graph's input and output after the Keras model's, call the batch dimension 'batch', add metadata."""
    import onnx

    graph = proto.graph
    if len(graph.input) != 1 or len(graph.output) != 1:
        raise ExportError(
            f"the ONNX graph has {len(graph.input)} inputs and {len(graph.output)} outputs; expected one of each"
        )
    _rename_tensor(graph, graph.input[0].name, input_name)
    _rename_tensor(graph, graph.output[0].name, output_name)
    for value in (graph.input[0], graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = "exported by compress; see metadata_props"


def _rename_tensor(graph, old: str, new: str) -> None:
    if old == new:
        return
    names = {name for node in graph.node for name in (*node.input, *node.output)}
    names |= {item.name for item in graph.initializer} | {item.name for item in graph.input}
    if new in names:
        return  # keep tf2onnx's name rather than collide with another tensor
    for node in graph.node:
        node.input[:] = [new if name == old else name for name in node.input]
        node.output[:] = [new if name == old else name for name in node.output]
    for value in (*graph.input, *graph.output, *graph.value_info):
        if value.name == old:
            value.name = new


def save_onnx(proto, target: str | os.PathLike) -> Path:
    """Check the model (with shape inference) and write it atomically; a model that fails the checker is not written."""
    import onnx

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # onnx raises ValidationError and InferenceError
        raise ExportError(f"the converted ONNX model fails onnx.checker: {first_line(exc)}") from exc
    with atomic_path(target) as partial:
        onnx.save(proto, str(partial))
    return Path(target)


def describe_onnx(proto) -> dict:
    """Opset, input, metadata and weight statistics of an ONNX model (weights: float/int tensors of rank >= 2)."""
    import onnx

    opset = max((item.version for item in proto.opset_import if item.domain in ("", "ai.onnx")), default=0)
    value = proto.graph.input[0]
    dims = [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
    weights = [(array, zero_point) for _, array, zero_point in graph_weights(proto.graph)
               if array.ndim >= 2 and array.dtype.kind in "fiu" and array.dtype != np.int64]
    total = sum(array.size for array, _ in weights)
    int8 = sum(array.size for array, _ in weights if array.dtype in (np.int8, np.uint8))
    zeros = sum(count_zeros(array, zero_point) for array, zero_point in weights)
    return {
        "opset": int(opset),
        "input": {"name": value.name, "shape": dims, "dtype": onnx.helper.tensor_dtype_to_np_dtype(
            value.type.tensor_type.elem_type).name},
        "output": proto.graph.output[0].name,
        "metadata": {prop.key: prop.value for prop in proto.metadata_props},
        "weight_elements": int(total),
        "int8_weight_fraction": int8 / total if total else 0.0,
        "weight_zero_fraction": zeros / total if total else 0.0,
    }
