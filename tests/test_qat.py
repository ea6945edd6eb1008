"""Quantization-aware training: wrappers kept, trains, saves and loads, unsupported layers, preserved zeros/clusters."""

import json
import tomllib

import numpy as np
import pytest

from compress.errors import CompressError, ConfigError, ModelError
from compress.techniques.qat import QATConfig, qat


def wrapped(model):
    from compress.keras import tfmot

    return {layer.layer.name: layer for layer in model.layers
            if isinstance(layer, tfmot.quantization.keras.QuantizeWrapper)}


def trained_kernel(wrapper):
    """The float kernel variable a QuantizeWrapper trains (its layer's `kernel` attribute is the fake-quantized op)."""
    (kernel,) = [v for v in wrapper.weights if v.name.rsplit("/", 1)[-1].startswith("kernel:")]
    return kernel.numpy()


def round_trip(model, path, data):
    from compress.kerasmodel import load_model, save_model

    images = data.normalized("test")[0][:16]
    loaded = load_model(save_model(model, path))
    np.testing.assert_allclose(loaded.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    return loaded


def test_qat_keeps_wrappers_trains_and_round_trips(tiny_cnn, synthetic_data, tmp_path):
    before = [w.copy() for w in tiny_cnn.get_weights()]
    outcome = qat(tiny_cnn, QATConfig(epochs=2, batch_size=32, learning_rate=1e-3), synthetic_data, verbose=0)
    stats = outcome.stats

    assert set(wrapped(outcome.model)) == {"conv1", "conv2", "flatten", "dense1", "logits"}
    assert stats["quantized_layers"] == ["conv1", "conv2", "flatten", "dense1", "logits"]
    assert stats["float_layers"] == [] and stats["preserve"] == "none"
    assert np.isfinite(stats["history"]["loss"]).all() and np.isfinite(stats["test_loss"])
    assert stats["test_accuracy"] > 0.5  # the synthetic classes are easy
    assert all(np.array_equal(a, b) for a, b in zip(before, tiny_cnn.get_weights()))  # input untouched
    json.dumps(stats)

    loaded = round_trip(outcome.model, tmp_path / "qat.keras", synthetic_data)
    assert set(wrapped(loaded)) == set(wrapped(outcome.model))


def model_with_layer_norm():
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, name="conv1")(inputs)
    x = layers.BatchNormalization(name="bn")(x)  # folded into conv1 by tfmot: supported
    x = layers.ReLU(name="relu")(x)
    x = layers.LayerNormalization(name="norm")(x)  # not in tfmot's 8-bit registry
    x = layers.Flatten(name="flatten")(x)
    outputs = layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs)


def test_unsupported_layers_refused_or_kept_in_float(synthetic_data, tmp_path):
    from compress.keras import keras

    model = model_with_layer_norm()
    with pytest.raises(CompressError) as caught:
        qat(model, QATConfig(), synthetic_data, verbose=0)
    assert "norm (LayerNormalization)" in str(caught.value) and "--unsupported float" in str(caught.value)
    assert "\n" not in str(caught.value) and "bn (" not in str(caught.value)

    outcome = qat(model, QATConfig(unsupported="float", epochs=1, batch_size=32), synthetic_data, verbose=0)
    assert outcome.stats["float_layers"] == ["norm"]
    assert "norm" not in outcome.stats["quantized_layers"] and "logits" in outcome.stats["quantized_layers"]
    assert isinstance(outcome.model.get_layer("norm"), keras.layers.LayerNormalization)
    assert np.isfinite(outcome.stats["history"]["loss"]).all()
    round_trip(outcome.model, tmp_path / "partial.keras", synthetic_data)


def with_smallest_zeroed(model, fraction):
    """A copy of `model` whose non-classifier kernels have their smallest `fraction` of weights set to zero."""
    from compress.keras import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer in copy.layers[:-1]:
        if hasattr(layer, "kernel"):
            kernel = layer.kernel.numpy()
            kernel[np.abs(kernel) < np.quantile(np.abs(kernel), fraction)] = 0
            layer.kernel.assign(kernel)
    return copy


def test_sparsity_preserving_qat_keeps_pruned_zeros(tiny_cnn, synthetic_data, tmp_path):
    pruned = with_smallest_zeroed(tiny_cnn, 0.6)
    config = QATConfig(preserve="sparsity", epochs=2, batch_size=32, learning_rate=1e-3)
    outcome = qat(pruned, config, synthetic_data, verbose=0)
    wrappers = wrapped(outcome.model)
    for name in ("conv1", "conv2", "dense1"):
        zero_before = pruned.get_layer(name).kernel.numpy() == 0
        after = trained_kernel(wrappers[name])
        assert (after[zero_before] == 0).all(), name  # every pruned weight is still exactly zero
        assert not np.array_equal(after, pruned.get_layer(name).kernel.numpy()), name  # yet the layer trained
        assert outcome.stats["sparsity_after"][name] == pytest.approx(outcome.stats["sparsity_before"][name])
        assert outcome.stats["sparsity_before"][name] == pytest.approx(0.6, abs=0.01)
    loaded = round_trip(outcome.model, tmp_path / "pqat.keras", synthetic_data)
    assert np.mean(trained_kernel(wrapped(loaded)["dense1"]) == 0) == pytest.approx(0.6, abs=0.01)


def with_clustered_kernels(model, clusters):
    """A copy of `model` whose non-classifier kernels each hold only `clusters` values (linear centroids)."""
    from compress.keras import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    for layer in copy.layers[:-1]:
        if hasattr(layer, "kernel"):
            kernel = layer.kernel.numpy()
            centroids = np.linspace(kernel.min(), kernel.max(), clusters, dtype=kernel.dtype)
            layer.kernel.assign(centroids[np.abs(kernel[..., None] - centroids).argmin(-1)])
    return copy


def test_cluster_preserving_qat_keeps_clusters(tiny_cnn, synthetic_data, tmp_path):
    clustered = with_clustered_kernels(tiny_cnn, 4)
    config = QATConfig(preserve="clusters", epochs=2, batch_size=32, learning_rate=1e-3)
    outcome = qat(clustered, config, synthetic_data, verbose=0)
    stats = outcome.stats
    wrappers = wrapped(outcome.model)
    assert [stats["unique_values_before"][name] for name in ("conv1", "conv2", "dense1")] == [4, 4, 4]
    assert len(np.unique(trained_kernel(wrappers["dense1"]))) <= 4  # Dense: one set of shared values
    for name in ("conv1", "conv2"):  # Conv2D: tfmot keeps the clusters per output channel
        kernel = trained_kernel(wrappers[name]).reshape(-1, 8)
        assert max(len(np.unique(kernel[:, c])) for c in range(8)) <= 4, name
        assert stats["unique_values_per_channel_after"][name] <= 4
    round_trip(outcome.model, tmp_path / "cqat.keras", synthetic_data)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"unsupported": "skip"}, "unsupported must be one of error, float, got 'skip'"),
        ({"preserve": "both"}, "preserve must be one of none, sparsity, clusters, got 'both'"),
        ({"epochs": 0}, "epochs must be a number in (0, 1000] (0.5 trains on half an epoch), got 0"),
        ({"learning_rate": 2}, "learning_rate must be in (0, 1), got 2"),
    ],
)
def test_out_of_range_settings_are_refused(settings, message):
    with pytest.raises(ConfigError) as caught:
        QATConfig.from_dict(settings)
    assert message in str(caught.value)


def test_config_round_trips_through_dict_and_toml():
    config = QATConfig(unsupported="float", preserve="sparsity", epochs=3, batch_size=16, learning_rate=5e-4)
    assert QATConfig.from_dict(config.to_dict()) == config
    assert QATConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert QATConfig.from_dict(QATConfig().to_dict()) == QATConfig()
    text = 'unsupported = "float"\npreserve = "sparsity"\nepochs = 3\nbatch_size = 16\nlearning_rate = 5e-4\n'
    assert QATConfig.from_dict(tomllib.loads(text)) == config


def test_cli_refuses_unknown_preserve(tmp_path, capsys):
    from compress.cli import main

    code = main(["qat", str(tmp_path / "model.keras"), "--out", str(tmp_path / "out"), "--preserve", "weights"])
    assert code == 2
    assert capsys.readouterr().err.strip() == (
        "compress: error: preserve must be one of none, sparsity, clusters, got 'weights'"
    )


def test_cli_qat_on_baseline_with_shipped_data(baseline_1epoch, tmp_path, capsys):
    from compress.cli import main
    from compress.data import load_data
    from compress.kerasmodel import load_model
    from compress.keras import keras

    out = tmp_path / "qat"
    code = main(["qat", str(baseline_1epoch), "--out", str(out), "--data", "cifar10-mini", "--epochs", "1",
                 "--batch-size", "128", "--quiet"])
    assert code == 0, capsys.readouterr().err
    stats = json.loads((out / "stats.json").read_text())["stats"]
    assert stats["quantized_layers"] == ["conv1", "pool1", "conv2", "flatten", "dense1", "logits"]
    assert np.isfinite(stats["history"]["loss"]).all() and stats["test_accuracy"] > 0.15
    model = load_model(out / "model.keras")
    assert set(wrapped(model)) == set(stats["quantized_layers"])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    _, accuracy = model.evaluate(load_data("cifar10-mini").pipeline("test", 256), verbose=0)
    assert accuracy == pytest.approx(stats["test_accuracy"], abs=1e-6)  # the saved file is the model measured


def test_a_gelu_model_trains_and_exports_to_an_int8_onnx_file(synthetic_data, tmp_path):
    from compress.export.exporter import export_model
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(8, 3, name="conv"),
                              layers.Activation("gelu", name="gelu"), layers.Flatten(), layers.Dense(3, name="logits")])
    outcome = qat(model, QATConfig(epochs=1, batch_size=32), synthetic_data, verbose=0)
    result = export_model(outcome.model, tmp_path, formats=("onnx",), data=synthetic_data)  # TFLite's GELU written out
    assert result["parity_ok"] and result["files"]["onnx"]["precision"] == "int8"


@pytest.mark.parametrize("sequential", [True, False])
def test_relu6_as_a_layers_own_activation_is_moved_into_a_layer_that_qat_quantizes(synthetic_data, tmp_path,
                                                                                     sequential):
    from compress.export.exporter import export_model
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    stack = [layers.Conv2D(8, 3, activation="relu6", name="conv"),  # tfmot refuses relu6 here, as a layer it is fine
             layers.DepthwiseConv2D(3, activation="relu6", name="depthwise"), layers.Flatten(name="flat"),
             layers.Dense(3, name="logits")]
    if sequential:
        model = keras.Sequential([keras.Input((8, 8, 3)), *stack])
    else:
        inputs = keras.Input((8, 8, 3))
        x = inputs
        for layer in stack:
            x = layer(x)
        model = keras.Model(inputs, x)
    outcome = qat(model, QATConfig(epochs=1, batch_size=32), synthetic_data, verbose=0)
    assert outcome.stats["activations_split"] == {"conv": "relu6", "depthwise": "relu6"}
    assert outcome.stats["float_layers"] == [] and "conv" in outcome.stats["quantized_layers"]
    result = export_model(outcome.model, tmp_path, formats=("onnx",), data=synthetic_data)
    assert result["parity_ok"] and result["files"]["onnx"]["precision"] == "int8"


def test_leaky_relu_and_elu_become_their_layers_which_qat_quantizes_or_keeps_in_float(synthetic_data, tmp_path):
    """A convolution's own leaky_relu or elu, or an Activation layer of either, refused QAT even with
    unsupported="float": tfmot quantizes a layer's own activation when it keeps the layer in float."""
    from compress.export.exporter import export_model
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((8, 8, 3)), layers.Conv2D(8, 3, activation="leaky_relu", name="conv"),
        layers.Conv2D(8, 3, name="conv2"), layers.Activation("leaky_relu", name="leaky"),
        layers.Conv2D(8, 3, activation="elu", name="conv3"), layers.Flatten(), layers.Dense(3, name="logits"),
    ])
    outcome = qat(model, QATConfig(unsupported="float", epochs=1, batch_size=32), synthetic_data, verbose=0)
    assert outcome.stats["activations_split"] == {"conv": "leaky_relu", "leaky": "leaky_relu", "conv3": "elu"}
    assert outcome.stats["float_layers"] == ["conv3_elu"]  # tfmot has no int8 ELU; LeakyReLU it quantizes
    result = export_model(outcome.model, tmp_path, formats=("onnx",), data=synthetic_data)
    assert result["parity_ok"] and result["files"]["onnx"]["precision"] == "int8"


def test_hard_swish_made_of_rescaling_and_multiply_is_quantized_by_its_outputs(synthetic_data, tmp_path):
    from compress.export.exporter import export_model
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    x = layers.Conv2D(8, 3, name="conv")(inputs)
    gate = layers.ReLU(max_value=1.0, name="clip")(layers.Rescaling(1 / 6, offset=0.5, name="affine")(x))
    x = layers.Multiply(name="hard_swish")([x, gate])  # how a Keras 3 hard_swish arrives here, translated
    outputs = layers.Dense(3, name="logits")(layers.GlobalAveragePooling2D(name="pool")(x))
    outcome = qat(keras.Model(inputs, outputs), QATConfig(epochs=1, batch_size=32), synthetic_data, verbose=0)
    assert outcome.stats["float_layers"] == []
    assert set(outcome.stats["left_alone"]) == {"affine", "hard_swish"}
    result = export_model(outcome.model, tmp_path, formats=("onnx",), data=synthetic_data)
    assert result["parity_ok"] and result["files"]["onnx"]["precision"] == "int8"


def test_a_graph_rewrite_that_never_finishes_is_refused_in_one_line(tiny_cnn, synthetic_data, monkeypatch):
    import time

    from compress.keras import tfmot
    from compress.techniques import qat as qat_module

    def never_finishes(*args, **kwargs):  # what tfmot does on some models: Python that loops forever
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(qat_module, "QUANTIZE_APPLY_LIMIT_S", 1)
    monkeypatch.setattr(tfmot.quantization.keras, "quantize_apply", never_finishes)
    with pytest.raises(ModelError, match="did not finish rewriting"):
        qat(tiny_cnn, QATConfig(epochs=1), synthetic_data, verbose=0)


def test_activation_ranges_start_from_the_data_so_a_relu_keeps_every_level(synthetic_data, tmp_path):
    """tfmot starts activation ranges at [-6, 6] and moves them 0.1 % a step: a short fine-tune left a ReLU's range
    starting far below 0 (levels for values that never occur) and the int8 file with a Clip for the ReLU. Started
    from the float model's outputs on training images, a ReLU's range starts and stays at 0, and the file has no
    Clip; a linear output (the logits) gets a range from its data too, below and above 0."""
    import onnx

    from compress.export.exporter import export_model
    from compress.keras import keras
    from compress.kerasmodel import variable_short_name

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((8, 8, 3)), layers.Conv2D(16, 3, use_bias=False, name="conv1"),
        layers.BatchNormalization(name="bn1"), layers.ReLU(name="relu1"), layers.MaxPooling2D(name="pool"),
        layers.Conv2D(16, 3, padding="same", activation="relu", name="conv2"), layers.GlobalAveragePooling2D(),
        layers.Dense(3, name="logits"),
    ])
    outcome = qat(model, QATConfig(epochs=1, batch_size=32), synthetic_data, verbose=0)
    started = outcome.stats["activation_ranges_from_data"]
    assert started["relu1"][0] == 0.0 and started["conv2"][0] == 0.0 and started["relu1"][1] > 0, started
    assert started["logits"][0] < 0 < started["logits"][1], started
    trained = {(layer.layer.name, variable_short_name(variable)): float(variable.numpy())
               for layer in outcome.model.layers if hasattr(layer, "layer") for variable in layer.weights
               if variable.shape == ()}
    assert trained[("relu1", "output_min")] == 0.0 and trained[("conv2", "post_activation_min")] == 0.0
    result = export_model(outcome.model, tmp_path / "export", data=synthetic_data, parity_samples=64)
    assert result["parity_ok"], result["parity"]
    ops = [node.op_type for node in onnx.load(result["files"]["onnx"]["path"]).graph.node]
    assert "Clip" not in ops and "Relu" not in ops, ops


def test_a_separable_convolution_with_batch_norm_is_split_and_quantized(synthetic_data):
    """The Keras guides' SeparableConv2D -> BatchNormalization (tfmot folds batch norms into Conv2D only, and
    refused it) is quantized as the DepthwiseConv2D and 1x1 Conv2D it computes; the split model computes the same."""
    import numpy as np

    from compress.keras import keras
    from compress.techniques.qat import separable_convolutions_split

    keras.utils.set_random_seed(0)
    layers = keras.layers
    image = keras.Input(synthetic_data.input_shape)
    hidden = layers.SeparableConv2D(8, 3, padding="same", depth_multiplier=2, name="sep")(image)
    hidden = layers.ReLU()(layers.BatchNormalization(name="bn")(hidden))
    model = keras.Model(image, layers.Dense(synthetic_data.num_classes)(layers.GlobalAveragePooling2D()(hidden)))
    model.get_layer("bn").set_weights([np.full(8, 1.5, np.float32), np.full(8, 0.2, np.float32),
                                       np.full(8, 0.1, np.float32), np.full(8, 2.0, np.float32)])
    split, names = separable_convolutions_split(model)
    assert names == ["sep"]
    assert [type(layer).__name__ for layer in split.layers[1:3]] == ["DepthwiseConv2D", "Conv2D"]
    images = synthetic_data.normalized("test")[0][:8]
    np.testing.assert_allclose(split.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)
    outcome = qat(model, QATConfig(epochs=1, batch_size=32), synthetic_data, verbose=0)
    assert outcome.stats["separable_convolutions_split"] == ["sep"] and outcome.stats["float_layers"] == []


def test_augmentation_layers_in_a_tf_keras_model_are_left_out_and_said(tmp_path, capsys):
    """RandomFlip and RandomRotation (tfmot refuses them) pass images through at inference: the model is taken
    without them, said in one line, and quantized."""
    from compress.cli import main
    from compress.keras import keras
    from compress.kerasmodel import save_model, without_pass_through_layers

    layers = keras.layers
    image = keras.Input((32, 32, 3))
    hidden = layers.RandomRotation(0.1, name="rotate")(layers.RandomFlip("horizontal", name="flip")(image))
    hidden = layers.GlobalAveragePooling2D()(layers.Conv2D(4, 3, activation="relu", name="conv")(hidden))
    model = keras.Model(image, layers.Dense(10, name="logits")(hidden))
    stripped, dropped = without_pass_through_layers(model)
    assert dropped == ["flip", "rotate"] and [layer.name for layer in stripped.layers][1:2] == ["conv"]
    images = np.random.default_rng(0).random((4, 32, 32, 3), dtype=np.float32)
    np.testing.assert_allclose(stripped.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-6)
    path = save_model(model, tmp_path / "augmented.keras")
    assert main(["qat", str(path), "--out", str(tmp_path / "out"), "--epochs", "0.1"]) == 0
    assert "model: left out flip, rotate: layers that pass their input through unchanged" in capsys.readouterr().out


def test_a_batch_norm_behind_no_convolution_becomes_a_depthwise_convolution_and_is_quantized(synthetic_data):
    """DenseNet's and pre-activation ResNet's batch norms (here behind a Concatenate) are no convolution's to fold:
    tfmot refused them; as the 1x1 DepthwiseConv2D they compute, they quantize, and compute the same."""
    from compress.keras import keras
    from compress.techniques.qat import batch_norms_as_depthwise

    keras.utils.set_random_seed(0)
    layers = keras.layers
    image = keras.Input(synthetic_data.input_shape)
    first = layers.Conv2D(4, 3, padding="same", name="conv")(image)
    hidden = layers.BatchNormalization(name="bn")(layers.Concatenate(name="concat")([image, first]))
    hidden = layers.Conv2D(8, 3, activation="relu", name="conv2")(layers.ReLU()(hidden))
    model = keras.Model(image, layers.Dense(synthetic_data.num_classes)(layers.GlobalAveragePooling2D()(hidden)))
    rng = np.random.default_rng(0)
    gamma, beta, variance = (rng.uniform(0.5, 2, 7).astype(np.float32) for _ in range(3))
    model.get_layer("bn").set_weights([gamma, beta, rng.normal(0, 1, 7).astype(np.float32), variance])
    rewritten, names = batch_norms_as_depthwise(model)
    assert names == ["bn"] and type(rewritten.get_layer("bn")).__name__ == "DepthwiseConv2D"
    images = synthetic_data.normalized("test")[0][:8]
    np.testing.assert_allclose(rewritten.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)
    outcome = qat(model, QATConfig(epochs=1, batch_size=32), synthetic_data, verbose=0)
    assert outcome.stats["batch_norms_as_depthwise"] == ["bn"] and outcome.stats["float_layers"] == []


def test_batch_norms_behind_an_activated_layer_are_rewritten_and_quantized(synthetic_data, tmp_path):
    """The tutorials' order, `Conv2D(activation="relu")` then BatchNormalization and `Dense(activation="relu")`
    then BatchNormalization, Dropout, Dense: tfmot folds neither batch norm (the activation comes between) and
    refused the model; the image one becomes a 1x1 DepthwiseConv2D, the flat one a per-unit Rescaling, both
    computing the same, and the int8 file passes parity."""
    from compress.export.exporter import export_model
    from compress.keras import keras
    from compress.techniques.qat import batch_norms_as_depthwise, flat_batch_norms_as_rescaling

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input(synthetic_data.input_shape),
        layers.Conv2D(8, 3, activation="relu", name="conv"), layers.BatchNormalization(name="conv_bn"),
        layers.MaxPooling2D(), layers.Flatten(),
        layers.Dense(16, activation="relu", name="hidden"), layers.BatchNormalization(name="hidden_bn"),
        layers.Dropout(0.5), layers.Dense(synthetic_data.num_classes, activation="softmax"),
    ])
    rng = np.random.default_rng(0)
    for name, width in (("conv_bn", 8), ("hidden_bn", 16)):
        gamma, beta, variance = (rng.uniform(0.5, 2, width).astype(np.float32) for _ in range(3))
        model.get_layer(name).set_weights([gamma, beta, rng.normal(0, 1, width).astype(np.float32), variance])
    images = synthetic_data.normalized("test")[0][:8]
    rewritten, names = batch_norms_as_depthwise(model)
    assert names == ["conv_bn"] and type(rewritten.get_layer("conv_bn")).__name__ == "DepthwiseConv2D"
    rewritten, names = flat_batch_norms_as_rescaling(rewritten)
    assert names == ["hidden_bn"] and type(rewritten.get_layer("hidden_bn")).__name__ == "Rescaling"
    np.testing.assert_allclose(rewritten.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)

    outcome = qat(model, QATConfig(epochs=1, batch_size=32), synthetic_data, verbose=0)
    assert outcome.stats["batch_norms_as_depthwise"] == ["conv_bn"]
    assert outcome.stats["flat_batch_norms_as_rescaling"] == ["hidden_bn"] and outcome.stats["float_layers"] == []
    result = export_model(outcome.model, tmp_path, formats=("onnx",), data=synthetic_data)
    assert result["parity_ok"] and result["files"]["onnx"]["precision"] == "int8"


def test_a_resizing_layer_first_is_input_preprocessing(synthetic_data):
    """A model that resizes its input first (Resizing, then Rescaling) takes raw pixels as the Rescaling says, and
    QAT leaves both in float with their outputs quantized (tfmot refused the Resizing)."""
    from compress.checks import decide_input_range
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input(synthetic_data.input_shape), layers.Resizing(6, 6, name="resize"),
                              layers.Rescaling(1 / 255, name="scale"), layers.Conv2D(8, 3, name="conv"),
                              layers.GlobalAveragePooling2D(), layers.Dense(synthetic_data.num_classes)])
    assert decide_input_range(model) == "raw"
    outcome = qat(model, QATConfig(epochs=1, batch_size=32), synthetic_data.with_input_range("raw"), verbose=0)
    assert outcome.stats["float_layers"] == [] and {"resize", "scale"} <= set(outcome.stats["left_alone"])


def test_python_operators_between_layer_outputs_become_layers_and_are_quantized(synthetic_data, tmp_path):
    """`x + shortcut`, `x * gate` and MobileNetV3's `relu6(x + 3) * (1 / 6)` in a functional model are TFOpLambda
    layers in Keras 2, which tfmot refused (keras.applications RegNet, MobileNetV3): QAT takes them as the Add,
    Multiply and Rescaling layers they compute, a factor per channel the Normalization computing it; one with a
    negative factor is left as it is. The int8 file adds on integer kernels."""
    from helpers import optimized_ops

    from compress.export.exporter import export_model
    from compress.keras import keras, tf
    from compress.plain_model import operators_as_layers

    keras.utils.set_random_seed(0)
    layers = keras.layers
    image = keras.Input(synthetic_data.input_shape)
    shortcut = layers.Conv2D(8, 1, name="project")(image)
    hidden = layers.ReLU()(layers.Conv2D(8, 3, padding="same", name="conv")(image))
    hidden = hidden + shortcut
    gate = layers.ReLU(6.0)(layers.Conv2D(8, 1, name="gate_conv")(hidden) + 3.0) * (1.0 / 6.0)
    hidden = layers.ReLU()(tf.math.multiply(hidden, gate))
    scores = layers.Dense(synthetic_data.num_classes)(layers.GlobalAveragePooling2D()(hidden))
    model = keras.Model(image, scores)
    assert [type(layer).__name__ for layer in model.layers].count("TFOpLambda") == 4

    weighted = keras.Model(image, [2.0 - scores / 4.0, scores * np.arange(1, 4, dtype=np.float32),
                                   scores * np.array([-1, 2, 3], dtype=np.float32)])
    rebuilt, replaced = operators_as_layers(weighted)
    assert sorted(replaced.values()) == ["Add", "Multiply", "Normalization", "Rescaling", "Rescaling", "Rescaling",
                                         "Rescaling"]
    assert [type(layer).__name__ for layer in rebuilt.layers].count("TFOpLambda") == 1  # the negative factors
    images = synthetic_data.normalized("test")[0][:8]
    for got, expected in zip(rebuilt.predict(images, verbose=0), weighted.predict(images, verbose=0)):
        np.testing.assert_allclose(got, expected, atol=1e-5)

    outcome = qat(model, QATConfig(epochs=1, batch_size=32), synthetic_data, verbose=0)
    assert sorted(outcome.stats["operators_as_layers"].values()) == ["Add", "Multiply", "Rescaling", "Rescaling"]
    assert outcome.stats["float_layers"] == []
    result = export_model(outcome.model, tmp_path, data=synthetic_data, parity_samples=32)
    assert result["parity_ok"], result["parity"]
    assert "QLinearAdd" in optimized_ops(result["files"]["onnx"]["path"], tmp_path)


def test_a_densenet_transition_quantizes_and_converts_to_an_int8_file(synthetic_data, tmp_path):
    """keras.applications DenseNet: a convolution feeding both a batch norm and a Concatenate (tfmot folds neither
    way: refused), and a transition's AveragePooling2D joining a Concatenate (TFLite's int8 average pooling must
    keep its input's scale: the int8 conversion failed). The batch norm becomes a 1x1 DepthwiseConv2D, the pooling
    the DepthwiseConv2D it computes; the int8 file agrees with the QAT model."""
    from compress.export.exporter import export_model
    from compress.keras import keras
    from compress.techniques.qat import average_pools_as_depthwise

    keras.utils.set_random_seed(0)
    layers = keras.layers

    def dense_block(x, name):
        grown = layers.Conv2D(4, 3, padding="same", name=f"{name}_conv")(layers.ReLU()(layers.BatchNormalization(
            name=f"{name}_bn")(x)))
        return layers.Concatenate(name=f"{name}_concat")([x, grown])

    image = keras.Input(synthetic_data.input_shape)
    hidden = dense_block(layers.Conv2D(8, 3, padding="same", name="stem")(image), "block1")
    hidden = layers.AveragePooling2D(2, name="transition_pool")(layers.Conv2D(8, 1, name="transition")(hidden))
    hidden = layers.ReLU()(layers.BatchNormalization(name="final_bn")(dense_block(hidden, "block2")))
    model = keras.Model(image, layers.Dense(synthetic_data.num_classes)(layers.GlobalAveragePooling2D()(hidden)))

    rewritten, names = average_pools_as_depthwise(model)
    assert names == ["transition_pool"] and type(rewritten.get_layer("transition_pool")).__name__ == "DepthwiseConv2D"
    images = synthetic_data.normalized("test")[0][:8]
    np.testing.assert_allclose(rewritten.predict(images, verbose=0), model.predict(images, verbose=0), atol=1e-5)

    outcome = qat(model, QATConfig(epochs=1, batch_size=32), synthetic_data, verbose=0)
    assert outcome.stats["average_pools_as_depthwise"] == ["transition_pool"]
    assert "block1_bn" in outcome.stats["batch_norms_as_depthwise"] and outcome.stats["float_layers"] == []
    assert type(wrapped(outcome.model)["transition_pool"].layer).__name__ == "DepthwiseConv2D"
    result = export_model(outcome.model, tmp_path, data=synthetic_data, parity_samples=32)
    assert result["parity_ok"], result["parity"]


def test_an_activation_tfmot_cannot_quantize_in_a_layer_kept_in_float_is_named_in_one_line(synthetic_data):
    """tfmot quantizes a convolution's activation even when the convolution is kept in float: its own message
    ("Only some Keras activations ... are supported ...") was cut off before the hint that says what to change."""
    from compress.keras import keras
    from compress.techniques.qat import QATConfig, qat

    layers = keras.layers
    model = keras.Sequential([keras.Input(synthetic_data.input_shape), layers.Conv2D(4, 3, activation="selu"),
                              layers.BatchNormalization(), layers.GlobalAveragePooling2D(), layers.Dense(3)])
    with pytest.raises(ModelError) as caught:
        qat(model, QATConfig(epochs=1, unsupported="float"), synthetic_data, verbose=0)
    message = str(caught.value)
    assert "cannot quantize selu; use relu, relu6, swish or gelu there" in message and len(message) < 300
