"""Keras -> ONNX / TFLite files, the parity check that every export passes, and runners for the exported files.

How each variant is exported:
- float models (baseline, pruned, clustered, distilled students): ONNX through `tf2onnx.convert.from_keras`, TFLite
  through `TFLiteConverter.from_keras_model` without optimisations; both stay float32, pruned zeros stay zero.
- QAT models (tfmot `QuantizeWrapperV2` / `QuantizeLayer`, including prune- and cluster-preserving QAT): first an
  int8 TFLite file (`Optimize.DEFAULT`, which gives full int8 with the ranges and per-channel scales training learned),
  then ONNX from that file with `tf2onnx.convert.from_tflite`: int8 weight initializers feeding DequantizeLinear.
  tf2onnx on the Keras QAT model would keep every weight float32. `use_integer_kernels` then rewrites that graph,
  without changing what it computes, so that onnxruntime fuses it into QLinearConv / QGemm (int8 speed). With
  `int8_weights="uint8"` (auto: where this CPU is x86 without VNNI) the weights are also stored as uint8 with zero
  point 128, again the same numbers: there onnxruntime's uint8 x int8 kernels saturate 16-bit sums (a QAT model's
  file agreed with it on 85 % of the test images on an AVX2 EPYC, 99.6 % with uint8 weights, at about 1.4x the int8
  latency, still 2.7x faster than float).

Every file is written atomically, checked (ONNX: `onnx.checker` with shape inference, opset >= 17, a named input with a
dynamic batch dimension, metadata naming the toolkit version, technique chain and source hash), and then run in its
own runtime on a fixed set of inputs beside the source Keras model: the top-1 agreement and largest output difference
go to OUT/parity.json; a file below the agreement threshold is marked failed (`parity_ok` false).

`open_runner` / `predict_file` / `evaluate_file` run .onnx (onnxruntime, CPU), .tflite (ai_edge_litert) and .keras
files the same way, for the parity check, `compress evaluate` and the benchmarks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from compress.errors import ConfigError, DataError, ExportError, ModelError

FORMATS = ("onnx", "tflite")
MIN_OPSET = 17
DEFAULT_OPSET = 17
PARITY_SAMPLES = 1000  # enough that the agreement is known to +-0.5 points at 98 %: 256 gave +-0.9
PARITY_SEED = 0
# Top-1 agreement an exported file needs with its source on the parity inputs. An int8 file is compared with the
# float model it was quantized from, so near-tied predictions flip: correct int8 files of the CIFAR-10 benchmark
# agree on 97.7-98.7 % of the 10,000 test images, files broken by saturating int8 kernels on 85-88.5 %.
PARITY_THRESHOLDS = {"float32": 0.99, "int8": 0.96}
RUNTIMES = {".onnx": "onnxruntime", ".tflite": "litert", ".keras": "keras"}
INT8_WEIGHT_TYPES = ("auto", "int8", "uint8")

_QAT_CLASSES = {"QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer"}
_PRUNE_CLASSES = {"PruneLowMagnitude"}
_CLUSTER_CLASSES = {"ClusterWeights", "ClusterWeightsMHA"}


@dataclass(frozen=True)
class ExportConfig:
    """What to export and how to check it; validated on creation."""

    formats: tuple[str, ...] = ("onnx",)
    opset: int = DEFAULT_OPSET
    parity_samples: int = PARITY_SAMPLES
    batch_size: int = 64
    int8_weights: str = "auto"  # QAT files: int8, uint8 (zero point 128), or auto (uint8 where int8 sums saturate)

    def __post_init__(self):
        formats = (self.formats,) if isinstance(self.formats, str) else tuple(self.formats)
        if not formats:
            raise ConfigError(f"no export format given; known formats: {', '.join(FORMATS)}")
        unknown = [name for name in formats if name not in FORMATS]
        if unknown:
            raise ConfigError(f"unknown export format {unknown[0]!r}; known formats: {', '.join(FORMATS)}")
        object.__setattr__(self, "formats", tuple(dict.fromkeys(formats)))
        if not isinstance(self.opset, int) or self.opset < MIN_OPSET:
            raise ConfigError(f"ONNX opset must be an integer >= {MIN_OPSET}, got {self.opset!r}")
        if self.parity_samples < 1:
            raise ConfigError(f"parity samples must be a positive integer, got {self.parity_samples}")
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {self.batch_size}")
        if self.int8_weights not in INT8_WEIGHT_TYPES:
            raise ConfigError(f"int8 weights must be one of {', '.join(INT8_WEIGHT_TYPES)}, got {self.int8_weights!r}")


# ---------------------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------------------


def export_model(
    model_or_path,
    out_dir: str | os.PathLike,
    *,
    formats: Sequence[str] = ("onnx",),
    data=None,
    chain: Sequence[str] | None = None,
    source_hash: str | None = None,
    unsafe: bool = False,
    opset: int = DEFAULT_OPSET,
    parity_samples: int = PARITY_SAMPLES,
    int8_weights: str = "auto",
    strict: bool = False,
) -> dict:
    """Export a Keras model (object or .keras path) to OUT/model.onnx and/or OUT/model.tflite and check parity.

    `data` (a compress Dataset) supplies the parity inputs (its first `parity_samples` test images) and adds accuracy
    on them; without it, deterministic uniform-random images are used. `chain` names the techniques that made the
    model (default: ["qat"] for a QAT model, else []); `source_hash` overrides the sha256 recorded for the source
    (default: of the .keras file, or of the weights for an in-memory model). `int8_weights` is how a QAT model's ONNX
    file stores its weights: int8, uint8 (zero point 128; the same values), or auto: uint8 where this CPU is x86
    without VNNI, whose onnxruntime kernels saturate on int8 weights (`compress.bench.int8_sums_saturate`).

    Returns a JSON-ready dict (also written to OUT/export.json) with one entry per file under "files" and the overall
    "parity_ok"; the parity details also go to OUT/parity.json. A failed parity check is reported, not raised, unless
    `strict` (then ExportError).
    """
    from compress import __version__
    from compress.io import check_output_dir, write_json
    from compress.keras import versions

    config = ExportConfig(formats=tuple(formats) if not isinstance(formats, str) else (formats,), opset=opset,
                          parity_samples=parity_samples, int8_weights=int8_weights)
    out = check_output_dir(out_dir)
    model, source = _resolve_source(model_or_path, unsafe=unsafe, source_hash=source_hash)
    model, stripped = strip_training_wrappers(model)
    input_name, input_shape, _ = _model_io(model)
    quantized = is_qat_model(model)
    precision = "int8" if quantized else "float32"
    chain = list(chain) if chain is not None else (["qat"] if quantized else [])
    if not all(isinstance(step, str) and step for step in chain):
        raise ConfigError(f"technique chain must be a list of names, got {chain!r}")

    inputs, labels, inputs_description = parity_inputs(input_shape, data, config.parity_samples)
    reference = keras_outputs(model, inputs, config.batch_size)
    keras_sparsity = keras_weight_sparsity(model)

    metadata = {
        "compress_version": __version__,
        "technique_chain": json.dumps(chain),
        "source_name": source["name"],
        "source_sha256": source["sha256"],
        "source_sha256_of": source["sha256_of"],
        "precision": precision,
        "library_versions": json.dumps(versions()),
    }
    tflite_bytes = to_tflite(model, int8=quantized) if (quantized or "tflite" in config.formats) else None

    files: dict[str, dict] = {}
    parity_files: dict[str, dict] = {}
    for fmt in config.formats:
        target = out / f"model.{fmt}"
        if fmt == "onnx":
            unsigned = quantized and _unsigned_weights_wanted(config.int8_weights)
            proto = onnx_proto(model, opset=config.opset, metadata=metadata,
                               int8_tflite=tflite_bytes if quantized else None, unsigned_weights=unsigned)
            save_onnx(proto, target)
            entry = describe_onnx(proto)
            entry["converter"] = "tf2onnx from int8 TFLite" if quantized else "tf2onnx from Keras"
            if quantized:
                entry["int8_weights"] = "uint8, zero point 128" if unsigned else "int8"
        else:
            _write_bytes(tflite_bytes, target)
            entry = {"converter": "TFLiteConverter (Optimize.DEFAULT)" if quantized else "TFLiteConverter"}
        entry = {
            "format": fmt,
            "path": str(target),
            "precision": precision,
            "bytes": target.stat().st_size,
            "sha256": sha256_file(target),
            **entry,
        }
        if fmt == "onnx":
            entry["weight_zero_fraction"] = {"keras": keras_sparsity, "onnx": entry.pop("weight_zero_fraction")}
        files[fmt] = entry
        parity_files[target.name] = check_parity(
            target, inputs, reference, precision=precision, labels=labels, batch_size=config.batch_size
        )

    parity_ok = all(item["ok"] for item in parity_files.values())
    parity = {
        "parity_ok": parity_ok,
        "reference": f"Keras model {source['name']}" + (" (QAT, fake-quantized)" if quantized else ""),
        "inputs": inputs_description,
        "thresholds": PARITY_THRESHOLDS,
        "files": parity_files,
    }
    write_json(out / "parity.json", parity)
    result = {
        "compress_version": __version__,
        "source": source,
        "chain": chain,
        "quantized": quantized,
        "precision": precision,
        "stripped_wrappers": stripped,
        "input": {"name": input_name, "shape": [None, *input_shape]},
        "files": files,
        "parity_ok": parity_ok,
        "parity": parity,
    }
    write_json(out / "export.json", result)
    if strict and not parity_ok:
        raise ExportError(parity_failure_message(result, out / "parity.json"))
    return result


def parity_failure_message(result: dict, parity_path) -> str:
    bad = [(name, item) for name, item in result["parity"]["files"].items() if not item["ok"]]
    parts = [f"{name}: top-1 agreement {item['top1_agreement']:.2%} < {item['threshold']:.0%}" for name, item in bad]
    return f"parity check failed ({'; '.join(parts)}); files kept for inspection, see {parity_path}"


def is_qat_model(model) -> bool:
    """True for a model holding tfmot quantization wrappers (QAT, prune- or cluster-preserving QAT)."""
    return any(_is_one_of(layer, _QAT_CLASSES) for layer in _layers(model))


def strip_training_wrappers(model):
    """Remove tfmot pruning / clustering wrappers left on a model; returns (model, names of what was stripped)."""
    from compress.keras import tfmot

    stripped = []
    if any(_is_one_of(layer, _PRUNE_CLASSES) for layer in _layers(model)):
        model = _strip(tfmot.sparsity.keras.strip_pruning, model, "pruning")
        stripped.append("pruning")
    if any(_is_one_of(layer, _CLUSTER_CLASSES) for layer in _layers(model)):
        model = _strip(tfmot.clustering.keras.strip_clustering, model, "clustering")
        stripped.append("clustering")
    return model, stripped


def _strip(function, model, what: str):
    try:
        return function(model)
    except Exception as exc:  # tfmot raises ValueError or TypeError for models it cannot clone
        raise ExportError(f"cannot strip the {what} wrappers from the model: {_first_line(exc)}") from None


def to_tflite(model, *, int8: bool) -> bytes:
    """A TFLite flatbuffer: float32, or (for a QAT model, `int8=True`) int8 with the learned quantization ranges."""
    from compress.keras import tf

    try:
        converter = tf.lite.TFLiteConverter.from_keras_model(model)
        if int8:
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return converter.convert()
    except Exception as exc:  # the converter raises ConverterError, ValueError and others, all "cannot convert"
        raise ExportError(f"TFLite conversion failed: {_first_line(exc) or type(exc).__name__}") from None


def _unsigned_weights_wanted(int8_weights: str) -> bool:
    from compress.bench import int8_sums_saturate

    return int8_sums_saturate() if int8_weights == "auto" else int8_weights == "uint8"


def onnx_proto(model, *, opset: int = DEFAULT_OPSET, metadata: dict[str, str], int8_tflite: bytes | None = None,
               unsigned_weights: bool = False):
    """The model as an ONNX ModelProto, named and tagged the way every export is (from `int8_tflite` for QAT)."""
    input_name, input_shape, output_name = _model_io(model)
    proto = _to_onnx(model, opset=opset, int8_tflite=int8_tflite, input_name=input_name, input_shape=input_shape)
    if int8_tflite is not None:
        use_integer_kernels(proto.graph, unsigned_weights=unsigned_weights)
    _tidy_onnx(proto, input_name=input_name, output_name=output_name, metadata=metadata)
    return proto


def _to_onnx(model, *, opset: int, int8_tflite: bytes | None, input_name: str, input_shape):
    """The ONNX ModelProto: from the Keras model (float), or from the int8 TFLite flatbuffer (QAT)."""
    import tf2onnx

    from compress.keras import tf

    try:
        with _quiet_tf2onnx():
            if int8_tflite is None:
                spec = (tf.TensorSpec((None, *input_shape), tf.float32, name=input_name),)
                proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
            else:
                with tempfile.TemporaryDirectory(prefix="compress-export-") as tmp:
                    path = Path(tmp) / "model.tflite"
                    path.write_bytes(int8_tflite)
                    proto, _ = tf2onnx.convert.from_tflite(str(path), opset=opset)
    except ExportError:
        raise
    except Exception as exc:  # tf2onnx raises many types for unsupported ops; each means "cannot convert"
        raise ExportError(f"ONNX conversion failed: {_first_line(exc) or type(exc).__name__}") from None
    return proto


# Ops that only move or pick activation values, so they work the same on uint8 as on int8.
_VALUE_MOVING_OPS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Identity"}


def use_integer_kernels(graph, *, unsigned_weights: bool = False) -> None:
    """Rewrite tf2onnx's QDQ graph of an int8 TFLite file so that onnxruntime runs it on integer kernels.

    onnxruntime fuses DequantizeLinear -> Conv / MatMul+Add -> QuantizeLinear into QLinearConv / QGemm only when the
    activations are uint8 (on x86; it converts int8 Q -> DQ pairs itself only where they sit side by side) and no float
    Relu sits before the QuantizeLinear. Unfused, every call dequantizes all weights to float: slower than the float
    file. Both rewrites compute exactly what the graph did; weights and learned scales stay as they are:
    - int8 activations become uint8 (zero point + 128), where they only pass through value-moving ops to DQs;
    - a Relu feeding a QuantizeLinear moves behind it as an integer Clip at the zero point (quantizing is monotonic,
      and the zero point stands for 0.0), or goes when the zero point is the type's lowest value anyway;
    - with `unsigned_weights`, int8 weights become uint8 (value + 128, zero point + 128), for CPUs whose uint8 x int8
      kernels saturate.
    """
    _unsigned_activations(graph)
    _relu_behind_quantize(graph)
    if unsigned_weights:
        _unsigned_weight_initializers(graph)


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
    used = {name for node in graph.node for name in node.input}
    for tensor in list(graph.initializer):
        if tensor.name in initializers and tensor.name not in used:
            graph.initializer.remove(tensor)


def _unsigned_activations(graph) -> None:
    from onnx import TensorProto, numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = _consumers(graph)
    graph_outputs = {value.name for value in graph.output}
    unsigned_names: dict[str, str] = {}

    def dequantizers(tensor: str):
        """The DequantizeLinear nodes `tensor` reaches through value-moving ops; None if it reaches anything else."""
        found = []
        for node in consumers.get(tensor, []):
            if node.op_type == "DequantizeLinear":
                found.append(node)
            elif node.op_type in _VALUE_MOVING_OPS and (further := dequantizers(node.output[0])) is not None:
                found.extend(further)
            else:
                return None
        return None if tensor in graph_outputs else found

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
        users = dequantizers(quantize.output[0])
        if users is None or any(node.input[2] not in initializers for node in users):
            continue
        for node in (quantize, *users):
            node.input[2] = unsigned(node.input[2])
    used = {name for node in graph.node for name in node.input}
    for name in unsigned_names:
        if name not in used:  # an int8 zero point no node reads any more
            graph.initializer.remove(initializers[name])


def _relu_behind_quantize(graph) -> None:
    from onnx import helper, numpy_helper

    initializers = {tensor.name: tensor for tensor in graph.initializer}
    consumers = _consumers(graph)
    graph_outputs = {value.name for value in graph.output}
    for relu in [node for node in graph.node if node.op_type == "Relu"]:
        users = consumers.get(relu.output[0], [])
        if len(users) != 1 or users[0].op_type != "QuantizeLinear" or relu.output[0] in graph_outputs:
            continue
        quantize = users[0]
        if len(quantize.input) < 3 or quantize.input[2] not in initializers or quantize.output[0] in graph_outputs:
            continue
        zero_point = numpy_helper.to_array(initializers[quantize.input[2]])
        if zero_point.ndim != 0:  # Clip takes scalar bounds; per-axis activations keep their Relu
            continue
        quantize.input[0] = relu.input[0]
        graph.node.remove(relu)
        if zero_point == np.iinfo(zero_point.dtype).min:
            continue  # quantizing already clips everything below 0.0
        quantized, clipped = quantize.output[0], _unused_name(graph, f"{quantize.output[0]}_relu")
        for node in consumers.get(quantized, []):
            node.input[:] = [clipped if name == quantized else name for name in node.input]
        position = list(graph.node).index(quantize) + 1
        graph.node.insert(position, helper.make_node("Clip", [quantized, quantize.input[2]], [clipped],
                                                     name=_unused_name(graph, f"{relu.name or 'Relu'}_clip")))


def _consumers(graph) -> dict[str, list]:
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return consumers


def _unused_name(graph, name: str) -> str:
    used = {tensor.name for tensor in graph.initializer} | {node.name for node in graph.node}
    used |= {output for node in graph.node for output in node.output}
    candidate, count = name, 0
    while candidate in used:
        count += 1
        candidate = f"{name}_{count}"
    return candidate


@contextlib.contextmanager
def _quiet_tf2onnx():
    """Keep tf2onnx's INFO lines and TensorFlow's deprecation warnings off the console during a conversion."""
    logger = logging.getLogger("tf2onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
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

    from compress.io import atomic_path

    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:  # onnx raises ValidationError and InferenceError
        raise ExportError(f"the converted ONNX model fails onnx.checker: {_first_line(exc)}") from None
    with atomic_path(target) as partial:
        onnx.save(proto, str(partial))
    return Path(target)


def _write_bytes(payload: bytes, target: Path) -> None:
    from compress.io import atomic_path

    with atomic_path(target) as partial:
        partial.write_bytes(payload)


def describe_onnx(proto) -> dict:
    """Opset, input, metadata and weight statistics of an ONNX model (weights: float/int tensors of rank >= 2)."""
    import onnx
    from onnx import numpy_helper

    opset = max((item.version for item in proto.opset_import if item.domain in ("", "ai.onnx")), default=0)
    value = proto.graph.input[0]
    dims = [dim.dim_param or dim.dim_value for dim in value.type.tensor_type.shape.dim]
    from compress.bench import count_zeros, quantized_zero_points

    zero_points = quantized_zero_points(proto.graph)
    weights = [(tensor.name, numpy_helper.to_array(tensor)) for tensor in _onnx_constants(proto)]
    weights = [(name, array) for name, array in weights
               if array.ndim >= 2 and array.dtype.kind in "fiu" and array.dtype != np.int64]
    total = sum(array.size for _, array in weights)
    int8 = sum(array.size for _, array in weights if array.dtype in (np.int8, np.uint8))
    zeros = sum(count_zeros(array, zero_points.get(name)) for name, array in weights)
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


def _onnx_constants(proto):
    yield from proto.graph.initializer
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attribute in node.attribute:
                if attribute.name == "value":
                    yield attribute.t


def keras_weight_sparsity(model) -> float:
    """Share of exact zeros among the model's weights of rank >= 2 (kernels), the ones pruning sets to zero.

    For a QAT model these are the float kernels before quantization; a cluster-preserving QAT model computes its
    weights from centroids, so its raw kernels say little about the zeros of the exported file.
    """
    arrays = [np.asarray(weight.numpy()) for weight in model.weights if len(weight.shape) >= 2]
    total = sum(array.size for array in arrays)
    return sum(int(np.count_nonzero(array == 0)) for array in arrays) / total if total else 0.0


# ---------------------------------------------------------------------------------------------------------------
# Parity
# ---------------------------------------------------------------------------------------------------------------


def parity_inputs(input_shape, data=None, count: int = PARITY_SAMPLES):
    """(images, labels or None, description): the first `count` test images of `data`, else seeded uniform noise."""
    input_shape = tuple(int(dim) for dim in input_shape)
    if data is not None:
        images, labels = data.normalized("test")
        if tuple(images.shape[1:]) != input_shape:
            raise DataError(
                f"the model takes {_shape_text(input_shape)} images but {data.source} has "
                f"{_shape_text(images.shape[1:])}; pass --image-size to resize them"
            )
        images, labels = images[:count], labels[:count]
        return images, labels, {"source": f"{data.source} test split, first {len(images)} images", "count": len(images)}
    images = np.random.default_rng(PARITY_SEED).random((count, *input_shape), dtype=np.float32)
    return images, None, {"source": f"uniform random images in [0, 1], seed {PARITY_SEED}", "count": count}


def check_parity(
    path: str | os.PathLike,
    inputs: np.ndarray,
    reference: np.ndarray,
    *,
    precision: str = "float32",
    labels: np.ndarray | None = None,
    batch_size: int = 64,
) -> dict:
    """Run the file at `path` on `inputs` in its runtime and compare with `reference` outputs (top-1 and max |diff|)."""
    if precision not in PARITY_THRESHOLDS:
        raise ConfigError(f"unknown precision {precision!r}; known: {', '.join(PARITY_THRESHOLDS)}")
    runner = open_runner(path)
    outputs = runner.predict(inputs, batch_size)
    reference = np.asarray(reference, dtype=np.float32)
    if outputs.shape != reference.shape:
        raise ExportError(f"{path} outputs shape {outputs.shape[1:]}, the source model {reference.shape[1:]}")
    finite = bool(np.isfinite(outputs).all())
    agreement = float(np.mean(outputs.argmax(-1) == reference.argmax(-1))) if len(outputs) else 0.0
    threshold = PARITY_THRESHOLDS[precision]
    result = {
        "runtime": runner.runtime,
        "precision": precision,
        "samples": int(len(inputs)),
        "top1_agreement": agreement,
        "max_abs_diff": float(np.max(np.abs(outputs - reference))) if finite and len(outputs) else float("nan"),
        "threshold": threshold,
        "ok": finite and agreement >= threshold,
    }
    if not finite:
        result["max_abs_diff"] = None
        result["note"] = "the exported file produced NaN or infinite outputs"
    if labels is not None:
        result["accuracy"] = float(np.mean(outputs.argmax(-1) == labels))
        result["reference_accuracy"] = float(np.mean(reference.argmax(-1) == labels))
    return result


# ---------------------------------------------------------------------------------------------------------------
# Runners: one way to run .onnx, .tflite and .keras files
# ---------------------------------------------------------------------------------------------------------------


class Runner:
    """A loaded model file: `runner(batch)` returns float32 outputs; `predict(images, batch_size)` batches."""

    def __init__(self, path: Path, runtime: str, input_shape: tuple, call: Callable[[np.ndarray], np.ndarray]):
        self.path = path
        self.runtime = runtime
        self.input_shape = input_shape  # without the batch dimension; None where the file leaves a size open
        self._call = call

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self._call(np.ascontiguousarray(batch, dtype=np.float32)), dtype=np.float32)

    def predict(self, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
        if batch_size < 1:
            raise ConfigError(f"batch size must be a positive integer, got {batch_size}")
        outputs = [self(images[start:start + batch_size]) for start in range(0, len(images), batch_size)]
        if not outputs:
            raise DataError("no images to run")
        return np.concatenate(outputs)

    def check_input_shape(self, shape) -> None:
        shape = tuple(int(dim) for dim in shape)
        if len(shape) != len(self.input_shape) or any(
            want is not None and want != got for want, got in zip(self.input_shape, shape)
        ):
            want = _shape_text(tuple("?" if dim is None else dim for dim in self.input_shape))
            raise DataError(f"{self.path.name} takes {want} images, the data has {_shape_text(shape)}; "
                            "pass --image-size to resize them")


def open_runner(path: str | os.PathLike, *, unsafe: bool = False, threads: int | None = None) -> Runner:
    """Load a .onnx (onnxruntime, CPU), .tflite (ai_edge_litert) or .keras file; any load failure is a ModelError."""
    path = Path(path)
    runtime = RUNTIMES.get(path.suffix.lower())
    if runtime is None:
        raise ModelError(f"{path} is not a .onnx, .tflite or .keras file")
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if runtime == "onnxruntime":
        return _onnx_runner(path, threads)
    if runtime == "litert":
        return _tflite_runner(path, threads)
    from compress.io import load_model

    model = load_model(path, unsafe=unsafe)
    _, input_shape, _ = _model_io(model)
    return Runner(path, "keras", input_shape, lambda batch: _keras_call(model, batch))


def predict_file(
    path: str | os.PathLike, images: np.ndarray, batch_size: int = 64, *, unsafe: bool = False
) -> np.ndarray:
    """Outputs (float32, one row per image) of the model file at `path`, run in its own runtime."""
    return open_runner(path, unsafe=unsafe).predict(images, batch_size)


def evaluate_file(
    path: str | os.PathLike, data, *, batch_size: int = 64, unsafe: bool = False, limit: int | None = None
) -> dict:
    """Top-1 accuracy of a .onnx / .tflite / .keras file on `data`'s test split, in the file's own runtime."""
    runner = open_runner(path, unsafe=unsafe)
    images, labels = data.normalized("test")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    runner.check_input_shape(images.shape[1:])
    outputs = runner.predict(images, batch_size)
    if outputs.ndim != 2 or outputs.shape[1] != data.num_classes:
        raise DataError(f"{runner.path.name} gives {outputs.shape[1:]} outputs per image; "
                        f"{data.source} has {data.num_classes} classes")
    return {
        "file": str(runner.path),
        "format": runner.path.suffix.lstrip(".").lower(),
        "runtime": runner.runtime,
        "device": "CPU",
        "bytes": runner.path.stat().st_size,
        "data": data.source,
        "split": "test",
        "images": int(len(labels)),
        "accuracy": float(np.mean(outputs.argmax(-1) == labels)),
    }


def _onnx_runner(path: Path, threads: int | None) -> Runner:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises InvalidProtobuf, Fail, InvalidGraph ...: all "unusable file"
        raise ModelError(f"cannot load {path}: {_first_line(exc) or type(exc).__name__}") from None
    inputs = session.get_inputs()
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        raise ModelError(f"{path} must take one float32 image input; it takes "
                         + ", ".join(f"{item.name} {item.type}" for item in inputs))
    name = inputs[0].name
    shape = tuple(dim if isinstance(dim, int) else None for dim in inputs[0].shape[1:])
    return Runner(path, "onnxruntime", shape, lambda batch: session.run(None, {name: batch})[0])


def _tflite_runner(path: Path, threads: int | None) -> Runner:
    from ai_edge_litert.interpreter import Interpreter

    try:
        interpreter = Interpreter(model_path=str(path), num_threads=threads)
    except Exception as exc:  # ValueError / RuntimeError for a damaged flatbuffer
        raise ModelError(f"cannot load {path}: {_first_line(exc) or type(exc).__name__}") from None
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"{path} has {len(inputs)} inputs and {len(outputs)} outputs; expected one of each")
    input_detail, output_index = inputs[0], outputs[0]["index"]
    signature = [int(dim) for dim in input_detail.get("shape_signature", input_detail["shape"])]
    shape = tuple(None if dim < 0 else dim for dim in signature[1:])
    state = {"batch": None}

    def call(batch: np.ndarray) -> np.ndarray:
        if state["batch"] != len(batch):
            interpreter.resize_tensor_input(input_detail["index"], [len(batch), *batch.shape[1:]])
            interpreter.allocate_tensors()
            state["batch"] = len(batch)
        detail = interpreter.get_input_details()[0]
        if np.issubdtype(detail["dtype"], np.integer):  # int8 / uint8 input: quantize with the file's own scale
            scale, zero_point = detail["quantization"]
            limits = np.iinfo(detail["dtype"])
            batch = np.clip(np.round(batch / scale + zero_point), limits.min, limits.max).astype(detail["dtype"])
        interpreter.set_tensor(detail["index"], batch)
        interpreter.invoke()
        result = interpreter.get_tensor(output_index)
        out_detail = interpreter.get_output_details()[0]
        if np.issubdtype(out_detail["dtype"], np.integer):
            scale, zero_point = out_detail["quantization"]
            result = (result.astype(np.float32) - zero_point) * scale
        return result.copy()

    return Runner(path, "litert", shape, call)


# ---------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------


def _resolve_source(model_or_path, *, unsafe: bool, source_hash: str | None):
    """(Keras model, source description with its sha256) from a model object or a .keras path."""
    from compress.io import load_model
    from compress.keras import keras

    if isinstance(model_or_path, (str, os.PathLike)):
        path = Path(model_or_path)
        model = load_model(path, unsafe=unsafe)
        sha, of = sha256_file(path), "file"
        name = path.name
    elif isinstance(model_or_path, keras.Model):
        model = model_or_path
        sha, of = weights_sha256(model), "weights"
        name = model.name
    else:
        raise ModelError(
            f"expected a tf_keras model or a .keras path, got {type(model_or_path).__module__}."
            f"{type(model_or_path).__name__} (build models with `from compress.keras import keras`)"
        )
    if source_hash is not None:
        sha, of = str(source_hash), "given"
    return model, {"name": name, "sha256": sha, "sha256_of": of}


def _model_io(model) -> tuple[str, tuple[int, ...], str]:
    """(input name, input shape without batch, output name) of a one-input, one-output image model."""
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not inputs or not outputs:
        raise ExportError(
            "the model has no defined inputs; export needs a Sequential or functional model built on an Input"
        )
    if len(inputs) != 1 or len(outputs) != 1:
        raise ExportError(f"the model has {len(inputs)} inputs and {len(outputs)} outputs; export handles one of each")
    shape = tuple(inputs[0].shape[1:])
    if any(dim is None for dim in shape):
        raise ExportError(
            f"the model's input shape {_shape_text(shape)} is not fully known; build it on a fixed-size Input"
        )
    input_name = (getattr(model, "input_names", None) or ["input"])[0]
    output_name = (getattr(model, "output_names", None) or ["output"])[0]
    return input_name, tuple(int(dim) for dim in shape), output_name


def _keras_call(model, batch: np.ndarray) -> np.ndarray:
    return np.asarray(model(batch, training=False), dtype=np.float32)


def keras_outputs(model, images: np.ndarray, batch_size: int) -> np.ndarray:
    """The Keras model's float32 outputs for `images`, computed in batches (the parity reference)."""
    return np.concatenate([_keras_call(model, images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


def _layers(model):
    submodules = getattr(model, "submodules", None)
    return list(submodules) if submodules is not None else list(getattr(model, "layers", []))


def _is_one_of(layer, class_names: set[str]) -> bool:
    return any(cls.__name__ in class_names for cls in type(layer).__mro__)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(model) -> str:
    """sha256 over the model's weights in order (shape, dtype and bytes; names vary between sessions)."""
    digest = hashlib.sha256()
    for weight in model.weights:
        array = np.ascontiguousarray(weight.numpy())
        digest.update(f"{array.shape}|{array.dtype}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _shape_text(shape) -> str:
    return "x".join(str(dim) for dim in shape)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
