"""Exports: ONNX / TFLite files for every variant, int8 weights for QAT, pruned zeros kept, parity, CLI errors.

One tiny CNN (Conv8 - Flatten - Dense64 - Dense10 on 16x16x3, ~100k weights so the weights dominate the file size)
trained for a few epochs on a synthetic 10-class set (a per-class pattern under heavy noise); its compressed variants
are made once per module.
"""

import json
import shutil

import numpy as np
import pytest

from compress.cli import main
from compress.errors import ConfigError, ExportError
from compress.techniques.qat import QATConfig
from compress.techniques.qat import qat as quantization_aware_training

SHAPE = (16, 16, 3)


def _synthetic(rng, patterns, count):
    labels = rng.integers(0, 10, count)
    noise = rng.integers(0, 256, (count, *SHAPE))
    images = np.clip(0.2 * patterns[labels] + 0.8 * noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


@pytest.fixture(scope="module")
def data():
    from compress.data import Dataset

    rng = np.random.default_rng(0)
    patterns = rng.integers(0, 256, (10, *SHAPE))
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = (_synthetic(rng, patterns, n) for n in (320, 20, 300))
    return Dataset("synthetic", tuple(f"c{i}" for i in range(10)), x_train, y_train, x_val, y_val, x_test, y_test)


def _loss():
    from compress.keras import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def _fit(model, data, epochs=1, callbacks=()):
    x, y = data.normalized("train")
    model.compile("adam", _loss(), metrics=["accuracy"])
    model.fit(x, y, epochs=epochs, batch_size=32, verbose=0, callbacks=list(callbacks))
    return model


def _tiny_cnn(extra_layers=()):
    from compress.keras import keras

    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(shape=SHAPE, name="image"),
            *extra_layers,
            layers.Conv2D(8, 3, activation="relu", name="conv"),
            layers.Flatten(name="flatten"),
            layers.Dense(64, activation="relu", name="dense"),
            layers.Dense(10, name="logits"),
        ]
    )


def _copy(model):
    """A copy with its own layers: tfmot's wrappers reuse the layer objects, so training one would change the other."""
    from compress.keras import keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


@pytest.fixture(scope="module")
def models(data):
    """float, pruned (wrappers left on and stripped), QAT, prune-preserving QAT and clustered variants."""
    from compress.keras import keras, tfmot

    keras.utils.set_random_seed(0)
    float_model = _fit(_tiny_cnn(), data, epochs=3)
    sparsity = tfmot.sparsity.keras
    pruned_wrapped = sparsity.prune_low_magnitude(
        _copy(float_model), pruning_schedule=sparsity.ConstantSparsity(0.7, begin_step=0, frequency=1)
    )
    _fit(pruned_wrapped, data, callbacks=[sparsity.UpdatePruningStep()])
    pruned = sparsity.strip_pruning(pruned_wrapped)
    quantization = tfmot.quantization.keras
    qat = _fit(quantization.quantize_model(_copy(float_model)), data)
    pqat = _fit(
        quantization.quantize_apply(
            quantization.quantize_annotate_model(_copy(pruned)),
            tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme(),
        ),
        data,
    )
    clustering = tfmot.clustering.keras
    clustered = clustering.strip_clustering(
        _fit(clustering.cluster_weights(_copy(float_model), number_of_clusters=8), data)
    )
    cqat = quantization_aware_training(
        clustered, QATConfig(preserve="clusters", epochs=1, batch_size=32), data, verbose=0).model
    layers = keras.layers
    student = _fit(  # a distilled student is any small CNN; this one has BatchNorm and pooling for the converter
        keras.Sequential([
            keras.Input(shape=SHAPE, name="pixels"),
            layers.Conv2D(8, 3, padding="same", use_bias=False), layers.BatchNormalization(), layers.ReLU(),
            layers.MaxPooling2D(), layers.GlobalAveragePooling2D(), layers.Dense(10),
        ]),
        data,
    )
    return {"float": float_model, "pruned": pruned, "pruned_wrapped": pruned_wrapped, "qat": qat, "pqat": pqat,
            "clustered": clustered, "cqat": cqat, "student": student}


@pytest.fixture(scope="module")
def exports(models, data, tmp_path_factory):
    from compress.export.exporter import export_model

    root = tmp_path_factory.mktemp("exports")
    return {
        "float": export_model(models["float"], root / "float", formats=("onnx", "tflite"), data=data),
        "qat": export_model(models["qat"], root / "qat", formats=("onnx", "tflite"), data=data, chain=["qat"]),
        "pruned": export_model(models["pruned"], root / "pruned", data=data, chain=["prune"]),
        "pqat": export_model(models["pqat"], root / "pqat", data=data, chain=["prune", "pqat"]),
        "clustered": export_model(models["clustered"], root / "clustered", data=data, chain=["cluster"]),
        "cqat": export_model(models["cqat"], root / "cqat", data=data, chain=["cluster", "qat"]),
        "student": export_model(models["student"], root / "student", formats=("onnx", "tflite"), data=data,
                                chain=["distill"]),
    }


def _onnx(result, fmt="onnx"):
    import onnx

    return onnx.load(result["files"][fmt]["path"])


def _weight_initializers(proto):
    from onnx import numpy_helper

    arrays = [numpy_helper.to_array(tensor) for tensor in proto.graph.initializer]
    return [array for array in arrays if array.ndim >= 2 and array.dtype != np.int64]


def test_float_onnx_has_the_contract(exports, models):
    import onnx
    import onnxruntime as ort

    import compress
    from compress.kerasmodel import weights_sha256

    result = exports["float"]
    proto = _onnx(result)
    onnx.checker.check_model(proto, full_check=True)
    assert max(item.version for item in proto.opset_import if item.domain in ("", "ai.onnx")) >= 17
    (graph_input,) = proto.graph.input
    assert graph_input.name == "image"
    batch = graph_input.type.tensor_type.shape.dim[0]
    assert batch.dim_param == "batch" and not batch.HasField("dim_value")
    props = {prop.key: prop.value for prop in proto.metadata_props}
    assert props["compress_version"] == compress.__version__
    assert json.loads(props["technique_chain"]) == []
    assert props["source_sha256"] == weights_sha256(models["float"]) and len(props["source_sha256"]) == 64
    assert all(array.dtype == np.float32 for array in _weight_initializers(proto))
    session = ort.InferenceSession(result["files"]["onnx"]["path"], providers=["CPUExecutionProvider"])
    for batch_size in (1, 5):  # the batch dimension is really dynamic
        out = session.run(None, {"image": np.zeros((batch_size, *SHAPE), np.float32)})[0]
        assert out.shape == (batch_size, 10)
    assert result["parity_ok"] and set(result["parity"]["files"]) == {"model.onnx", "model.tflite"}


def test_export_writes_parity_and_manifest(exports):
    from pathlib import Path

    result = exports["float"]
    folder = Path(result["files"]["onnx"]["path"]).parent
    parity = json.loads((folder / "parity.json").read_text())
    manifest = json.loads((folder / "export.json").read_text())
    assert parity["parity_ok"] is True and manifest["parity_ok"] is True
    check = parity["files"]["model.onnx"]
    assert check["samples"] == 300 and "synthetic test split" in parity["inputs"]["source"]  # all: fewer than 1000
    assert check["top1_agreement"] >= 0.99 and check["max_abs_diff"] < 1e-3
    assert manifest["files"]["tflite"]["precision"] == "float32"
    assert sorted(p.name for p in folder.iterdir()) == ["export.json", "model.onnx", "model.tflite", "parity.json"]


@pytest.mark.parametrize("variant", ["float", "pruned", "qat", "pqat", "clustered", "cqat", "student"])
def test_parity_passes_for_every_variant(exports, variant):
    result = exports[variant]
    assert result["parity_ok"] is True
    for name, check in result["parity"]["files"].items():
        assert check["ok"] and check["top1_agreement"] >= check["threshold"], (variant, name, check)
        assert abs(check["accuracy"] - check["reference_accuracy"]) <= 0.005, (variant, name, check)


def test_clustered_kernels_are_stored_as_indices_into_their_values(exports, tmp_path):
    """The dense kernel (8 clusters, 100k weights) is stored as packed indices and a table, in the float clustered
    file and in the cluster-preserving QAT file: the files read back as the same number of weights, the float one
    is under a fifth of the float file's bytes, and the int8 one still runs on integer kernels."""
    from helpers import optimized_ops

    from compress.measure.sizes import onnx_weight_stats

    float_file = exports["float"]["files"]["onnx"]
    assert float_file["codebook_weights"] == []
    for variant, unclustered in (("clustered", "float"), ("cqat", "qat")):
        entry = exports[variant]["files"]["onnx"]
        assert len(entry["codebook_weights"]) == 1, entry["codebook_weights"]  # conv (216), logits (640): small
        counted = onnx_weight_stats(exports[unclustered]["files"]["onnx"]["path"])["params"]
        assert onnx_weight_stats(entry["path"])["params"] == counted
    assert exports["clustered"]["files"]["onnx"]["bytes"] < 0.2 * float_file["bytes"]
    cqat = exports["cqat"]["files"]["onnx"]
    assert cqat["int8_weight_fraction"] == 1.0 and cqat["bytes"] < 0.7 * exports["qat"]["files"]["onnx"]["bytes"]
    ops = optimized_ops(cqat["path"], tmp_path, "ORT_ENABLE_EXTENDED")
    assert ops.count("QLinearConv") == 1 and ops.count("QGemm") == 2 and "Gather" not in ops, ops


def test_qat_onnx_stores_int8_weights_with_learned_scales(exports, models):
    from onnx import numpy_helper

    qat, float_result = exports["qat"], exports["float"]
    assert qat["precision"] == "int8" and qat["files"]["onnx"]["int8_weight_fraction"] == 1.0
    proto = _onnx(qat)
    weights = _weight_initializers(proto)
    stored = np.uint8 if qat["files"]["onnx"]["int8_weights"].startswith("uint8") else np.int8  # auto: by the CPU
    assert weights and all(array.dtype == stored for array in weights)
    assert qat["files"]["onnx"]["bytes"] <= 0.3 * float_result["files"]["onnx"]["bytes"]
    assert qat["files"]["tflite"]["bytes"] <= 0.3 * float_result["files"]["tflite"]["bytes"]

    # The conv kernel's per-channel scales are the ones the QAT wrapper holds: max(|min|, |max|) / 127.
    initializers = {tensor.name: numpy_helper.to_array(tensor) for tensor in proto.graph.initializer}
    conv_kernel = next(name for name, array in initializers.items() if array.ndim == 4 and array.dtype == stored)
    dequant = next(
        node for node in proto.graph.node if node.op_type == "DequantizeLinear" and node.input[0] == conv_kernel
    )
    variables = {w.name.split("/")[-1].split(":")[0]: w.numpy() for w in models["qat"].get_layer("quant_conv").weights}
    learned = np.maximum(np.abs(variables["kernel_min"]), np.abs(variables["kernel_max"])) / 127
    np.testing.assert_allclose(initializers[dequant.input[1]], learned, rtol=1e-3)

    # The input's quantization step is the range the QuantizeLayer learned in training.
    dequantize = _input_dequantize(proto)
    (layer,) = [layer for layer in models["qat"].layers if type(layer).__name__ == "QuantizeLayer"]
    low, high = _range(layer)
    np.testing.assert_allclose(float(initializers[dequantize.input[1]]), (high - low) / 255, rtol=2e-2)


def _input_dequantize(proto):
    """The DequantizeLinear that reads the quantized graph input (after the ops that quantize it)."""
    consumers = {name: node for node in proto.graph.node for name in node.input}
    node = consumers[proto.graph.input[0].name]
    while node.op_type != "DequantizeLinear":
        node = consumers[node.output[0]]
    return node


@pytest.mark.parametrize("variant", ["qat", "pqat"])
def test_qat_onnx_runs_on_integer_kernels_in_onnxruntime(exports, variant, tmp_path):
    """Every conv / dense layer fuses into QLinearConv / QGemm: none is left dequantizing its weights on each call."""
    from helpers import optimized_ops

    ops = optimized_ops(exports[variant]["files"]["onnx"]["path"], tmp_path, "ORT_ENABLE_EXTENDED")
    assert ops.count("QLinearConv") == 1 and ops.count("QGemm") == 2, ops
    assert not {"Conv", "FusedConv", "MatMul", "Gemm", "FusedGemm", "Relu"} & set(ops), ops


def test_depthwise_relu6_block_runs_on_integer_kernels(synthetic_data, tmp_path):
    """A MobileNet-style block (Conv -> DepthwiseConv -> BN -> ReLU6 -> 1x1 Conv -> GAP -> Dense) through the QAT
    path: every convolution, the depthwise one too, runs as QLinearConv; no float Conv is left.

    tfmot trains biases (BatchNorms folded in) in float; the int8 file holds them as int32 steps of input scale x
    weight scale. qat() moves each onto that grid, by at most half a step, so that the Keras model computes what the
    file does (MobileNetV2 alpha 0.35: its QAT file agreed with it on 88.0 % of the parity images, 98.8 % after)."""
    import onnx
    from helpers import optimized_ops

    from compress.export.convert import int8_file_biases
    from compress.export.exporter import export_model
    from compress.keras import keras
    from compress.techniques.int8_bias import _folded_bias
    from compress.techniques.qat import QATConfig, qat

    keras.utils.set_random_seed(0)
    layers = keras.layers
    block = keras.Sequential([
        keras.Input((8, 8, 3)), layers.Conv2D(8, 3, padding="same"), layers.DepthwiseConv2D(3, padding="same"),
        layers.BatchNormalization(), layers.ReLU(6.0), layers.Conv2D(16, 1), layers.GlobalAveragePooling2D(),
        layers.Dense(3),
    ])
    outcome = qat(block, QATConfig(epochs=1, batch_size=64), synthetic_data, verbose=0)
    quantized, moved = outcome.model, outcome.stats["biases_on_int8_grid"]
    assert len(moved["moved"]) == 4 and 0 < moved["largest_move_steps"] <= 0.5 + 1e-3, moved
    file_biases = int8_file_biases(quantized)
    assert sorted(file_biases) == sorted(moved["moved"])
    for name, (target, step) in file_biases.items():
        value, _ = _folded_bias(quantized.get_layer(name))
        np.testing.assert_array_less(np.abs(value - target), 1e-3 * step + 1e-6 * np.abs(value))

    result = export_model(quantized, tmp_path / "export", data=synthetic_data, parity_samples=32)
    assert result["parity_ok"], result["parity"]
    ops = optimized_ops(result["files"]["onnx"]["path"], tmp_path)
    assert ops.count("QLinearConv") == 3 and "QGemm" in ops, ops
    assert not {"Conv", "FusedConv", "BatchNormalization", "Relu"} & set(ops), ops
    graph = onnx.load(result["files"]["onnx"]["path"]).graph  # the rewrites leave no constant behind unread
    assert {t.name for t in graph.initializer} <= {name for node in graph.node for name in node.input}


def test_model_with_its_own_rescaling_quantizes_by_default(synthetic_data, tmp_path):
    """A model taking raw pixels (Rescaling first): QAT quantizes only the Rescaling's output by default and says so;
    the QAT model, behind tfmot's QuantizeLayer, still says it takes raw pixels; the int8 file takes them, agrees
    with the QAT model and runs on integer kernels, the first convolution included, widened to 4 input channels for
    onnxruntime's fast kernels (`input_channels_widened`)."""
    import onnx
    from helpers import optimized_ops

    from compress.checks import decide_input_range
    from compress.export.exporter import export_model
    from compress.keras import keras
    from compress.kerasmodel import load_model, save_model
    from compress.techniques.qat import QATConfig, qat

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((8, 8, 3)), layers.Rescaling(1 / 255, name="rescale"), layers.Conv2D(16, 3, name="conv"),
        layers.ReLU(), layers.Flatten(), layers.Dense(3, name="logits"),
    ])
    raw = synthetic_data.with_input_range("raw")
    outcome = qat(model, QATConfig(epochs=1, batch_size=32), raw, verbose=0)
    assert outcome.stats["float_layers"] == []
    assert outcome.stats["left_alone"] == {"rescale": "input preprocessing: no weights, only its output quantized"}
    assert {"rescale", "conv", "logits"} <= set(outcome.stats["quantized_layers"])
    loaded = load_model(save_model(outcome.model, tmp_path / "qat.keras"))
    images = raw.normalized("test")[0][:16]
    np.testing.assert_allclose(loaded.predict(images, verbose=0), outcome.model.predict(images, verbose=0), atol=1e-6)
    assert type(loaded.layers[0]).__name__ == "QuantizeLayer" and decide_input_range(loaded) == "raw"

    result = export_model(loaded, tmp_path / "export", data=raw, parity_samples=64)
    assert result["parity_ok"], result["parity"]
    ops = optimized_ops(result["files"]["onnx"]["path"], tmp_path)
    assert ops.count("QLinearConv") == 1 and "QGemm" in ops, ops
    widening = ops.count("MatMul") + ops.count("FusedMatMul")  # onnxruntime may fold the input's scaling into it
    assert not {"Conv", "FusedConv", "Gemm"} & set(ops) and widening == 1, ops
    graph = onnx.load(result["files"]["onnx"]["path"]).graph
    assert [list(t.dims) for t in graph.initializer if len(t.dims) == 4] == [[16, 4, 3, 3]]
    # 0-255 pixels never lie halfway between two input levels: QuantizeLinear rounds them as FakeQuant does
    assert "Floor" not in [node.op_type for node in graph.node]


def test_qat_onnx_quantizes_symmetric_pixels_as_the_qat_model_does(synthetic_data, tmp_path):
    """[-1, 1] pixels (p / 127.5 - 1) all lie halfway between two levels of the [-1, 1] input quantizer that images
    with black and white pixels teach a QAT model. The int8 file must give each pixel value the level the Keras
    model's FakeQuant gives it: QuantizeLinear's rounding and the converter's zero point (128 for FakeQuant's 127)
    gave 17 of the 256 another, which a deep model (MobileNetV2 alpha 0.35) turned into 6 points of top-1
    disagreement with its QAT Keras model."""
    import onnx
    import onnxruntime as ort

    from compress.data import normalize
    from compress.export.exporter import export_model
    from compress.keras import keras, tfmot

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = tfmot.quantization.keras.quantize_model(keras.Sequential([
        keras.Input((8, 8, 3)), layers.Conv2D(4, 3), layers.GlobalAveragePooling2D(), layers.Dense(3)]))
    quantize_layer = next(layer for layer in model.layers if type(layer).__name__ == "QuantizeLayer")
    for weight in quantize_layer.weights:  # the range training on images with black and white pixels learns
        name = weight.name.split("/")[-1].split(":")[0]
        if name.endswith(("_min", "_max")):
            weight.assign(-1.0 if name.endswith("_min") else 1.0)
    data = synthetic_data.with_input_range("symmetric")
    result = export_model(model, tmp_path / "export", data=data, parity_samples=16)

    proto = onnx.load(result["files"]["onnx"]["path"])
    dequantize = _input_dequantize(proto)
    proto.graph.output.append(onnx.helper.make_tensor_value_info(dequantize.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    images = normalize(np.resize(np.arange(256, dtype=np.uint8), (4, 8, 8, 3)), "symmetric")  # every pixel value
    in_file = session.run([dequantize.output[0]], {proto.graph.input[0].name: images})[0]
    in_keras = keras.Model(model.inputs, quantize_layer.output)(images).numpy()
    if in_file.shape != in_keras.shape:  # read behind tf2onnx's NHWC -> NCHW Transpose
        in_file = in_file.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(np.rint((in_file - in_keras) / (2 / 255)), 0)


def test_biases_reach_the_grid_beside_a_pruned_channel():
    """An output channel whose weights are all pruned gets a weight scale of ~1e-9 in the int8 file, so its bias grid
    step is far below float32 precision, and its bias may not fit in int32 (the converter clamps it; the file then
    computes something else there, which is reported). The layer's other channels still move onto the grid."""
    from compress.export.convert import int8_file_biases
    from compress.keras import keras, tfmot
    from compress.techniques.int8_bias import _folded_bias, biases_on_int8_grid

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = tfmot.quantization.keras.quantize_model(keras.Sequential([
        keras.Input((8, 8, 3)), layers.Conv2D(4, 3, padding="same", use_bias=False),
        layers.BatchNormalization(), layers.ReLU(), layers.GlobalAveragePooling2D(), layers.Dense(3)]))
    conv = next(layer for layer in model.layers if type(getattr(layer, "layer", None)).__name__ == "Conv2D")
    norm = next(layer for layer in model.layers if type(getattr(layer, "layer", None)).__name__ == "BatchNormalization")
    def variables(layer, *names):
        return [variable for variable in layer.weights if variable.name.rsplit("/", 1)[-1].split(":")[0] in names]

    kernel = variables(conv, "kernel")[0]
    kernel.assign(np.concatenate([np.zeros_like(kernel.numpy()[..., :1]), kernel.numpy()[..., 1:]], axis=-1))
    model(np.random.default_rng(0).uniform(-1, 1, (8, 8, 8, 3)).astype(np.float32), training=True)  # sets ranges
    rng = np.random.default_rng(1)  # trained-looking biases and statistics, off the int8 file's grid
    for variable in variables(norm, "beta", "moving_mean") + variables(model.layers[-1], "bias"):
        variable.assign(rng.normal(0, 0.5, variable.shape).astype(np.float32))

    moved = biases_on_int8_grid(model)
    assert sorted(moved["moved"]) == sorted([conv.name, model.layers[-1].name]), moved
    assert moved["clamped_channels"] == {conv.name: 1}
    for name, (target, step) in int8_file_biases(model).items():
        value, _ = _folded_bias(model.get_layer(name))
        held = ~np.isnan(target)
        assert held.sum() == 3  # conv: 4 channels, 1 clamped; dense: 3
        np.testing.assert_array_less(np.abs(value - target)[held], (1e-3 * step + 1e-6 * np.abs(value))[held])


def test_uint8_weights_hold_the_same_values_and_still_fuse(models, tmp_path):
    """int8_weights="uint8" (for CPUs whose int8 kernels saturate) stores w + 128 with zero point 128: the same values,
    the same zeros (here of the pruned, sparsity-preserving QAT model) and the same fused integer kernels."""
    import onnx
    from helpers import optimized_ops
    from onnx import numpy_helper

    from compress.export.exporter import export_model

    def dequantized(result):
        proto = onnx.load(result["files"]["onnx"]["path"])
        tensors = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
        found = {}
        for node in proto.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in tensors and tensors[node.input[0]].ndim >= 2:
                weights, scale, zero_point = (tensors[name] for name in node.input[:3])
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                shape = [-1 if dim == axis else 1 for dim in range(weights.ndim)] if scale.ndim else []
                values = (weights.astype(np.int32) - zero_point.astype(np.int32).reshape(shape)) * scale.reshape(shape)
                found[weights.shape] = (weights.dtype, values)
        return found

    from compress.measure.sizes import onnx_weight_stats

    signed, unsigned = (export_model(models["pqat"], tmp_path / kind, int8_weights=kind, parity_samples=8)
                        for kind in ("int8", "uint8"))
    assert signed["files"]["onnx"]["int8_weights"] == "int8"
    assert unsigned["files"]["onnx"]["int8_weights"] == "uint8, zero point 128"
    signed_values, unsigned_values = dequantized(signed), dequantized(unsigned)
    assert signed_values.keys() == unsigned_values.keys() and len(signed_values) == 3
    for shape, (dtype, values) in unsigned_values.items():
        assert dtype == np.uint8 and signed_values[shape][0] == np.int8
        np.testing.assert_array_equal(values, signed_values[shape][1])
    # A pruned zero is stored as 128 in uint8: zeros are counted against the zero point.
    zeros = [result["files"]["onnx"]["weight_zero_fraction"]["onnx"] for result in (signed, unsigned)]
    assert zeros[0] == zeros[1] >= 0.6
    stats = [onnx_weight_stats(result["files"]["onnx"]["path"]) for result in (signed, unsigned)]
    assert stats[0]["nonzero_params"] == stats[1]["nonzero_params"] < 0.4 * stats[1]["params"]

    ops = optimized_ops(unsigned["files"]["onnx"]["path"], tmp_path)
    assert ops.count("QLinearConv") == 1 and ops.count("QGemm") == 2, ops


def _range(quantize_layer):
    values = {w.name.split("/")[-1].split(":")[0]: float(w.numpy()) for w in quantize_layer.weights if w.shape == ()}
    low = next(value for name, value in values.items() if name.endswith("_min"))
    high = next(value for name, value in values.items() if name.endswith("_max"))
    return low, high


def test_qat_int8_tflite_runs_in_litert_with_float_or_int8_input(exports, models, data):
    """The int8 .tflite runs through predict_file; a variant with int8 input/output gets quantized by the runner."""
    from compress.runtimes import open_session
    from compress.keras import tf

    images, _ = data.normalized("test")
    path = exports["qat"]["files"]["tflite"]["path"]
    float_io = open_session(path).predict(images[:50], batch_size=16)
    converter = tf.lite.TFLiteConverter.from_keras_model(models["qat"])
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.inference_input_type = converter.inference_output_type = tf.int8
    int8_path = path.replace("model.tflite", "int8io.tflite")
    with open(int8_path, "wb") as handle:
        handle.write(converter.convert())
    int8_io = open_session(int8_path).predict(images[:50], batch_size=16)
    assert float_io.shape == int8_io.shape == (50, 10)
    assert np.mean(float_io.argmax(1) == int8_io.argmax(1)) >= 0.98


def test_pruned_zeros_stay_zero_in_onnx(exports):
    for variant in ("pruned", "pqat"):
        zeros = exports[variant]["files"]["onnx"]["weight_zero_fraction"]
        assert zeros["keras"] >= 0.6, variant  # the fixture pruned to 70%
        assert abs(zeros["onnx"] - zeros["keras"]) <= 0.001, (variant, zeros)
    proto = _onnx(exports["pruned"])
    weights = _weight_initializers(proto)
    measured = sum(int(np.count_nonzero(w == 0)) for w in weights) / sum(w.size for w in weights)
    assert measured == pytest.approx(exports["pruned"]["files"]["onnx"]["weight_zero_fraction"]["onnx"])
    assert exports["float"]["files"]["onnx"]["weight_zero_fraction"]["onnx"] < 0.01


def test_pruning_wrappers_left_on_are_stripped(models, tmp_path):
    from compress.export.exporter import export_model

    result = export_model(models["pruned_wrapped"], tmp_path, parity_samples=32)
    assert result["stripped_wrappers"] == ["pruning"] and result["parity_ok"]
    assert result["files"]["onnx"]["weight_zero_fraction"]["onnx"] >= 0.6
    assert "prune_low_magnitude" not in " ".join(node.name for node in _onnx(result).graph.node)


def test_perturbed_onnx_weights_fail_the_parity_check(exports, models, data, tmp_path):
    import onnx
    from onnx import numpy_helper

    from compress.export.parity import check_parity

    images, labels = data.normalized("test")
    reference = models["float"](images[:128], training=False).numpy()
    proto = _onnx(exports["float"])
    rng = np.random.default_rng(0)
    for tensor in proto.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.ndim >= 2:
            tensor.CopyFrom(numpy_helper.from_array(rng.permutation(array.ravel()).reshape(array.shape), tensor.name))
    broken = tmp_path / "broken.onnx"
    onnx.save(proto, broken)
    check = check_parity(broken, images[:128], reference, precision="float32", labels=labels[:128])
    assert check["ok"] is False and check["top1_agreement"] < 0.99
    good = check_parity(exports["float"]["files"]["onnx"]["path"], images[:128], reference, precision="float32")
    assert good["ok"] is True


def _perturbing(convert):
    def perturbed(*args, **kwargs):
        from onnx import numpy_helper

        proto = convert(*args, **kwargs)
        for tensor in proto.graph.initializer:
            array = numpy_helper.to_array(tensor)
            if array.ndim >= 2:
                tensor.CopyFrom(numpy_helper.from_array(-array, tensor.name))
        return proto

    return perturbed


def test_cli_export_fails_when_parity_fails(models, tmp_path, monkeypatch, capsys):
    from compress.export import convert
    from compress.kerasmodel import save_model

    model_path = save_model(models["float"], tmp_path / "model.keras")
    monkeypatch.setattr(convert, "_to_onnx", _perturbing(convert._to_onnx))
    assert main(["export", str(model_path), "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parity check failed" in err[0] and "model.onnx" in err[0]
    parity = json.loads((tmp_path / "out" / "parity.json").read_text())
    assert parity["parity_ok"] is False and parity["files"]["model.onnx"]["ok"] is False
    assert json.loads((tmp_path / "out" / "export.json").read_text())["parity_ok"] is False


def test_strict_export_raises_when_parity_fails(models, tmp_path, monkeypatch):
    from compress.export import convert
    from compress.export.exporter import export_model

    monkeypatch.setattr(convert, "_to_onnx", _perturbing(convert._to_onnx))
    with pytest.raises(ExportError, match="parity check failed .*model.onnx: top-1 agreement"):
        export_model(models["float"], tmp_path, parity_samples=64, strict=True)
    assert json.loads((tmp_path / "parity.json").read_text())["parity_ok"] is False


def _write_folder_data(data, root):
    """The synthetic test images (and a few training ones) as PNG class folders, for --data folder:ROOT."""
    from PIL import Image

    for split, (images, labels) in (("train", data.split("train")), ("test", data.split("test"))):
        for index, (image, label) in enumerate(zip(images, labels)):
            if split == "train" and np.count_nonzero(labels[:index] == label) >= 3:
                continue  # three training images per class are enough to split off validation
            folder = root / split / data.class_names[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:04d}.png")
    return f"folder:{root}"


def test_cli_export_and_evaluate_every_format(models, data, tmp_path, monkeypatch, capsys):
    import onnx

    from compress.files import sha256_file
    from compress.kerasmodel import save_model

    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path / "cache"))
    source = _write_folder_data(data, tmp_path / "data")
    model_path = save_model(models["qat"], tmp_path / "qat.keras")
    out = tmp_path / "out"
    argv = ["export", str(model_path), "--format", "onnx", "--format", "tflite", "--out", str(out),
            "--data", source, "--chain", "prune,qat"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "model.onnx: int8" in printed and "top-1 agreement" in printed
    props = {p.key: p.value for p in onnx.load(out / "model.onnx").metadata_props}
    assert props["source_sha256"] == sha256_file(model_path)
    assert json.loads(props["technique_chain"]) == ["prune", "qat"]
    parity = json.loads((out / "parity.json").read_text())
    assert parity["files"]["model.onnx"]["samples"] == 300 and parity["parity_ok"]  # every test image

    keras_accuracy = float(np.mean(models["qat"](data.normalized("test")[0], training=False).numpy().argmax(1)
                                   == data.y_test))
    for name in ("model.onnx", "model.tflite"):
        report = tmp_path / f"{name}.json"
        assert main(["evaluate", str(out / name), "--data", source, "--json", str(report)]) == 0
        assert "accuracy" in capsys.readouterr().out
        result = json.loads(report.read_text())
        assert result["images"] == len(data.y_test)
        assert abs(result["accuracy"] - keras_accuracy) <= 0.005, (name, result, keras_accuracy)
    assert main(["evaluate", str(model_path), "--data", source, "--limit", "40"]) == 0
    assert "on 40 " in capsys.readouterr().out
    h5_path = tmp_path / "float.h5"
    models["float"].save(h5_path)  # a legacy HDF5 file evaluates like a .keras one
    assert main(["evaluate", str(h5_path), "--data", source, "--limit", "40"]) == 0
    assert "on 40 " in capsys.readouterr().out


def test_evaluate_resizes_images_to_the_files_input_size_and_says_so(exports, tmp_path, capsys):
    """The file takes 16x16 images, cifar10-mini's are 32x32 (this was refused); with --image-size given, a size
    the file does not take is refused in one line naming both."""
    path = exports["float"]["files"]["onnx"]["path"]
    assert main(["evaluate", path, "--data", "cifar10-mini", "--limit", "8"]) == 0
    assert "images: 32x32 resized to 16x16, the input size of model.onnx" in capsys.readouterr().out
    code = main(["evaluate", path, "--data", "cifar10-mini", "--limit", "8", "--image-size", "32x32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "16x16x3" in err[0] and "32x32x3" in err[0]


@pytest.mark.parametrize(
    "command, name, damage",
    [
        ("export", "model.keras", "truncate"),
        ("evaluate", "model.keras", "truncate"),
        ("export", "model.keras", "garbage"),
        ("evaluate", "model.onnx", "truncate"),
        ("evaluate", "model.onnx", "garbage"),
        ("evaluate", "model.tflite", "truncate"),
        ("export", "model.onnx", "none"),
    ],
)
def test_damaged_files_are_one_line_exit_2(exports, models, tmp_path, capsys, command, name, damage):
    from compress.kerasmodel import save_model

    target = tmp_path / name
    if name.endswith(".keras"):
        save_model(models["float"], target)
    else:
        shutil.copy(exports["float"]["files"][name.rsplit(".", 1)[1]]["path"], target)
    payload = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(payload[: len(payload) // 2])
    elif damage == "garbage":
        target.write_bytes(b"this is not a model file\n" * 10)
    argv = [command, str(target)] + (["--out", str(tmp_path / "out")] if command == "export" else ["--limit", "8"])
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("compress: error:") and name in err[0], err
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_lambda_model_needs_unsafe(data, tmp_path, capsys):
    from compress.kerasmodel import save_model
    from compress.keras import keras

    keras.utils.set_random_seed(1)
    model = _tiny_cnn([keras.layers.Lambda(lambda x: x * 2.0 - 1.0, name="rescale")])
    path = save_model(model, tmp_path / "lambda.keras")
    out = tmp_path / "out"
    assert main(["export", str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Lambda" in err[0] and "--unsafe" in err[0]
    assert not out.exists() or not any(out.iterdir())
    assert main(["export", str(path), "--out", str(out), "--quiet", "--unsafe"]) == 0
    assert json.loads((out / "parity.json").read_text())["parity_ok"] is True


def test_a_failed_write_leaves_no_partial_file(models, tmp_path, monkeypatch):
    import onnx

    from compress.export.exporter import export_model

    def failing_save(proto, path):
        with open(path, "wb") as handle:
            handle.write(proto.SerializeToString()[:100])
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save", failing_save)
    with pytest.raises(OSError):
        export_model(models["float"], tmp_path, parity_samples=8)
    assert list(tmp_path.iterdir()) == []


def test_export_settings_are_validated(models, tmp_path):
    from compress.export.exporter import ExportConfig, export_model

    with pytest.raises(ConfigError, match="unknown export format 'pdf'"):
        ExportConfig(formats=("pdf",))
    with pytest.raises(ConfigError, match="opset"):
        export_model(models["float"], tmp_path, opset=13)
    with pytest.raises(ConfigError, match="parity samples"):
        ExportConfig(parity_samples=0)
    with pytest.raises(ConfigError, match="int8 weights must be one of auto, int8, uint8"):
        ExportConfig(int8_weights="int4")
    assert ExportConfig(formats=("onnx", "tflite", "onnx")).formats == ("onnx", "tflite")


def test_parity_counts_a_tie_at_the_files_resolution_as_agreement():
    from compress.export.parity import top1_agreeing

    reference = np.array([[0.30, 0.31, 0.39], [0.50, 0.20, 0.30], [0.1, 0.6, 0.3]], dtype=np.float32)
    # an int8 softmax's levels: row 0 ties classes 1 and 2 (argmax says 1, the reference 2); row 2 really differs
    file_outputs = np.array([[77, 100, 100], [128, 51, 77], [26, 77, 153]], dtype=np.float32) / 256
    agreeing, ties = top1_agreeing(file_outputs, reference)
    assert agreeing.tolist() == [True, True, False] and ties == 1


def test_gelu_exports_to_onnx_through_erf(tmp_path):
    from compress.export.exporter import export_model
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3), layers.Activation("gelu"),
                              layers.Flatten(), layers.Dense(3)])  # TensorFlow's GELU is written with Erfc
    result = export_model(model, tmp_path, formats=("onnx",))
    assert result["parity_ok"] and "Erf" in {node.op_type for node in _onnx(result).graph.node}
    assert result["parity"]["files"]["model.onnx"]["max_abs_diff"] < 1e-4


def test_a_grouped_convolution_exports_to_float_and_int8_files(synthetic_data, tmp_path):
    """Keras runs a grouped convolution through an XLA-compiled function, which tf2onnx could not read (ResNeXt- and
    RegNet-style models were refused); converted, it is an ONNX Conv with `group`, in float, PTQ and QAT files."""
    import onnx
    from helpers import optimized_ops

    from compress.export.exporter import export_model
    from compress.keras import keras
    from compress.techniques.ptq import PTQConfig, ptq

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((8, 8, 3)), layers.Conv2D(16, 3, padding="same", activation="relu"),
        layers.Conv2D(32, 3, padding="same", groups=4, name="grouped"), layers.ReLU(),
        layers.GlobalAveragePooling2D(), layers.Dense(3),
    ])
    result = export_model(model, tmp_path / "float", formats=("onnx", "tflite"))
    assert result["parity_ok"] and result["parity"]["files"]["model.onnx"]["max_abs_diff"] < 1e-4
    groups = [attribute.i for node in onnx.load(result["files"]["onnx"]["path"]).graph.node
              if node.op_type == "Conv" for attribute in node.attribute if attribute.name == "group"]
    assert 4 in groups, groups
    assert "_jit_compiled_convolution_op" not in vars(model.get_layer("grouped"))  # the compiled call is back

    int8 = ptq(model, PTQConfig(formats=("onnx-qdq",), calibration=64), synthetic_data, out_dir=tmp_path / "ptq",
               verbose=0)
    assert int8.stats["formats"]["onnx-qdq"]["agreement_with_keras"] >= 0.9, int8.stats["formats"]
    quantized = quantization_aware_training(model, QATConfig(epochs=0.5, batch_size=32), synthetic_data,
                                            verbose=0).model
    result = export_model(quantized, tmp_path / "qat", data=synthetic_data, parity_samples=32)
    assert result["parity_ok"], result["parity"]
    assert optimized_ops(result["files"]["onnx"]["path"], tmp_path).count("QLinearConv") == 2


def test_a_tf_keras_convnext_file_loads_and_exports(tmp_path, capsys):
    """tf_keras saves keras.applications ConvNeXt's LayerScale by a name it never registers: its .keras files did
    not load ("'str' object is not callable"). A ConvNeXt block (grouped 7x7 convolution, LayerNormalization,
    LayerScale, StochasticDepth) now loads and exports."""
    from compress.keras import keras  # before tf_keras: it sets which Keras TensorFlow loads

    from tf_keras.src.applications.convnext import LayerScale, StochasticDepth

    keras.utils.set_random_seed(0)
    layers = keras.layers
    image = keras.Input((8, 8, 8))
    hidden = layers.Conv2D(8, 7, padding="same", groups=8)(image)
    hidden = layers.Dense(8)(layers.LayerNormalization(epsilon=1e-6)(hidden))
    hidden = layers.Add()([image, StochasticDepth(0.1)(LayerScale(0.5, 8)(hidden))])
    model = keras.Model(image, layers.Dense(3)(layers.GlobalAveragePooling2D()(hidden)))
    model.save(tmp_path / "convnext_block.keras")
    assert main(["export", str(tmp_path / "convnext_block.keras"), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.onnx").exists()
    assert "top-1 agreement 100.00%" in capsys.readouterr().out
