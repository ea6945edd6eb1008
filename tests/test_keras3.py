"""compress.keras3: Keras 3 model files rebuilt as tf_keras models, checked on data, and refusals in one line.

The Keras 3 models are built and saved by one child process (Keras 3 cannot run in this tf_keras process).
"""

import os
import subprocess
import sys

import numpy as np
import pytest

from compress.errors import ModelError
from compress.keras3 import is_keras3_file, translate_keras3
from compress.kerasmodel import load_model_with_source

# Runs under Keras 3. Random weights; BatchNormalization statistics made non-trivial so the output check means
# something.
_BUILD_KERAS3_MODELS = r"""
import sys
from pathlib import Path

import numpy as np
import keras
from keras import layers as L

out = Path(sys.argv[1])
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)


def randomize_batchnorm(model):
    for layer in model.layers:
        if hasattr(layer, "layers"):
            randomize_batchnorm(layer)
        elif isinstance(layer, L.BatchNormalization):
            n = layer.gamma.shape[0]
            gamma, variance = rng.uniform(0.5, 1.5, n), rng.uniform(0.5, 2, n)
            beta, mean = rng.normal(0, 0.3, n), rng.normal(0, 0.3, n)
            layer.set_weights([gamma, beta, mean, variance])


small = keras.Sequential(
    [
        keras.Input((16, 16, 3), name="pixels"),
        L.Rescaling(1 / 255, name="scale"),
        L.Conv2D(8, 3, name="conv"),
        L.BatchNormalization(name="bn"),
        L.ReLU(name="relu"),
        L.MaxPooling2D(name="pool"),
        L.Flatten(name="flatten"),
        L.Dense(10, activation="softmax", name="classifier"),
    ],
    name="small",
)
randomize_batchnorm(small)
small.save(out / "small.keras")
small.save(out / "small.h5")

normalization = L.Normalization(name="normalize")
normalization.adapt(rng.uniform(0, 1, (32, 16, 16, 3)).astype("float32"))
inputs = keras.Input((16, 16, 3), name="image")
x = normalization(inputs)
x = L.ZeroPadding2D(1)(x)
x = L.Conv2D(8, 3, activation="swish", name="stem")(x)
x = L.BatchNormalization(name="stem_bn")(x)
y = L.DepthwiseConv2D(3, padding="same", activation="hard_silu", name="dw")(x)
y = L.SeparableConv2D(8, 3, padding="same", name="sep")(y)
x = L.Add(name="residual")([x, y])
x = L.ReLU(max_value=6, name="relu6")(x)
block = keras.Sequential(
    [
        keras.Input((16, 16, 8)),
        L.Conv2D(4, 1, activation="gelu", name="conv"),
        L.BatchNormalization(name="bn"),
        L.Activation("hard_sigmoid", name="gate"),
    ],
    name="block",
)
z = block(x)
x = L.Concatenate(name="concat")([x, z])
x = L.LeakyReLU(0.1, name="leaky")(x)
x = L.GlobalAveragePooling2D(name="gap")(x)
x = L.Dropout(0.2, name="drop")(x)
outputs = L.Dense(5, name="logits")(x)  # logits: a softmax would shrink a wrong translation's error
branchy = keras.Model(inputs, outputs, name="branchy")
randomize_batchnorm(branchy)
branchy.save(out / "branchy.keras")

inputs = keras.Input((8, 8, 3))
x = L.Reshape((8, 24), name="rows")(inputs)
x = L.LSTM(4, name="memory")(x)
keras.Model(inputs, L.Dense(2)(x)).save(out / "lstm.keras")


@keras.saving.register_keras_serializable(package="tests")
class Scale(L.Layer):
    def call(self, x):
        return 2 * x


keras.Sequential([keras.Input((4,)), Scale(name="twice"), L.Dense(2)]).save(out / "custom.keras")
keras.Sequential([keras.Input((4,)), L.Lambda(lambda t: t * 2, name="double"), L.Dense(2)]).save(out / "lambda.keras")

# Arithmetic on tensors, which Keras 3 saves as keras.ops layers (MobileNetV3's hard sigmoid is written this way).
inputs = keras.Input((16, 16, 3))
x = L.Conv2D(8, 3, name="conv")(inputs)
x = x * (keras.ops.relu6(x + 3.0) * (1.0 / 6.0))
x = 1.0 - x / 2.0
x = L.GaussianNoise(0.1, name="noise")(x)
x = L.GroupNormalization(groups=2, name="groups")(x)
x = L.GlobalAveragePooling2D()(x)
keras.Model(inputs, L.Dense(5, name="logits")(x)).save(out / "arithmetic.keras")
inputs = keras.Input((16, 16, 3))
keras.Model(inputs, L.Dense(2)(L.Flatten()(keras.ops.square(inputs)))).save(out / "square.keras")

# Pooling, joins and activations written as keras.ops calls, with their options in the saved config.
inputs = keras.Input((16, 16, 3))
x = keras.ops.leaky_relu(L.Conv2D(8, 3, name="conv")(inputs), negative_slope=0.1)
x = keras.ops.hard_silu(x) + keras.ops.hard_sigmoid(x)
pooled = keras.ops.mean(x, axis=[1, 2], keepdims=True)
x = x * keras.ops.sigmoid(pooled)
x = keras.ops.clip(keras.ops.gelu(keras.ops.cast(x, "float32"), approximate=False), 0.0, 6.0)
x = keras.ops.concatenate([keras.ops.mean(x, axis=[1, 2]), keras.ops.max(x, axis=(-3, -2))], axis=-1)
keras.Model(inputs, keras.ops.softmax(L.Dense(5, name="logits")(x))).save(out / "ops.keras")

# The Keras guide's image classifier: augmentation in the model (a nested Sequential and a layer of its own).
augmentation = keras.Sequential([L.RandomFlip("horizontal"), L.RandomRotation(0.1)], name="augmentation")
inputs = keras.Input((16, 16, 3))
x = L.RandomZoom(0.2, name="zoom")(augmentation(inputs))
x = L.Conv2D(4, 3, name="conv")(L.Rescaling(1 / 255, name="scale")(x))
keras.Model(inputs, L.Dense(1, name="score")(L.GlobalAveragePooling2D()(x))).save(out / "augmented.keras")

# A ConvNeXt block: a convolution with a group per channel, and keras.applications' LayerScale.
from keras.src.applications.convnext import LayerScale

inputs = keras.Input((16, 16, 8))
x = L.Conv2D(8, 7, padding="same", groups=8, name="depthwise")(inputs)
x = L.Dense(16, activation="gelu", name="expand")(L.LayerNormalization(epsilon=1e-6, name="norm")(x))
x = LayerScale(0.5, 8, name="scale")(L.Dense(8, name="project")(x))
x = L.Add(name="residual")([inputs, x])
keras.Model(inputs, L.Dense(5, name="logits")(L.GlobalAveragePooling2D()(x))).save(out / "convnext_block.keras")

# A model that takes images of any size and makes them its own size, as models written for deployment do.
inputs = keras.Input((None, None, 3))
x = L.CenterCrop(16, 16, name="crop")(L.Resizing(20, 20, name="resize")(inputs))
x = L.Identity(name="same")(L.Rescaling(1 / 255, name="scale")(x))
x = L.Conv2D(4, 3, activation="leaky_relu", name="conv")(x)
keras.Model(inputs, L.Dense(3, name="logits")(L.GlobalAveragePooling2D()(x))).save(out / "resizing.keras")

# A keras.applications model with its classifier, called on the user's preprocessing: the nested model is the output.
inputs = keras.Input((32, 32, 3))
backbone = keras.applications.MobileNet((32, 32, 3), alpha=0.25, weights=None, classes=3, name="mobilenet")
keras.Model(inputs, backbone(L.Rescaling(1 / 127.5, offset=-1)(inputs))).save(out / "nested_output.keras")
# keras.applications' preprocess_input inside the model: torch style (a mean and a deviation per channel, then a
# script's own per-channel factors), caffe style (RGB reordered to BGR).
for style, preprocess in (("torch", keras.applications.densenet.preprocess_input),
                          ("caffe", keras.applications.resnet50.preprocess_input)):
    inputs = keras.Input((16, 16, 3))
    x = preprocess(inputs)
    x = x * np.array([0.5, 2.0, 1.5], "float32") if style == "torch" else x
    x = L.GlobalAveragePooling2D()(L.Conv2D(4, 3, name="conv")(x))
    keras.Model(inputs, L.Dense(3, name="logits")(x)).save(out / f"{style}_preprocessing.keras")

@keras.saving.register_keras_serializable(package="tests")
class Net(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.classifier = L.Dense(2)

    def call(self, x):
        return self.classifier(x)


subclassed = Net()
subclassed(np.zeros((1, 4), "float32"))
subclassed.save(out / "subclassed.keras")

pixels = keras.Input((16, 16, 3), name="image")
features = L.GlobalAveragePooling2D()(L.Conv2D(4, 3, name="conv")(pixels))
keras.Model({"image": pixels}, {"probs": L.Dense(3, activation="softmax", name="scores")(features)}).save(
    out / "named_ends.keras")
keras.Model(pixels, [L.Dense(3, name="main")(features), L.Dense(3, name="aux")(features)]).save(out / "two_heads.keras")
"""


@pytest.fixture(scope="module")
def keras3_files(tmp_path_factory):
    """Folder of models saved by Keras 3 in a child process: small (.keras, .h5), branchy, lstm, custom, lambda."""
    folder = tmp_path_factory.mktemp("keras3_models")
    env = {key: value for key, value in os.environ.items() if key != "TF_USE_LEGACY_KERAS"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    done = subprocess.run(
        [sys.executable, "-c", _BUILD_KERAS3_MODELS, str(folder)],
        env=env, cwd=folder, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return folder


def _assert_one_line(message: str, *parts: str) -> None:
    assert "\n" not in message and len(message) < 300, message
    for part in parts:
        assert part in message, message


def test_sequential_translates_with_matching_outputs(keras3_files):
    images = np.random.default_rng(1).uniform(0, 255, (12, 16, 16, 3)).astype(np.float32)
    model, info = translate_keras3(keras3_files / "small.keras", sample_images=images)
    assert info["keras_version"].startswith("3.")
    assert info["images"] == 12 and info["top1_agreement"] == 1.0 and info["max_abs_diff"] < 1e-5
    assert [layer.name for layer in model.layers] == [
        "pixels", "scale", "conv", "bn", "relu", "pool", "flatten", "classifier"
    ]  # fmt: skip
    assert not np.allclose(model.get_layer("bn").moving_variance.numpy(), 1.0)


def test_functional_model_with_nested_sequential_translates(keras3_files):
    model, info = translate_keras3(keras3_files / "branchy.keras")
    assert info["images"] > 0 and info["top1_agreement"] == 1.0 and info["max_abs_diff"] < 1e-4
    block = model.get_layer("block")
    assert [layer.name for layer in block.layers][1:3] == ["conv", "bn"]  # the nested model keeps its own layers
    assert model.get_layer("stem").activation.__name__ == "swish"
    assert model.get_layer("relu6").max_value == 6
    assert model.get_layer("leaky").alpha == pytest.approx(0.1)


def test_a_translation_that_differs_is_refused(keras3_files, monkeypatch):
    import compress.keras3_layers as keras3

    # tf_keras' own hard_sigmoid is clip(0.2x + 0.5), not Keras 3's clip(x/6 + 0.5): the output check must notice.
    monkeypatch.setattr(keras3, "_EXPANDED_ACTIVATIONS", frozenset({"hard_silu", "hard_swish"}))
    monkeypatch.setitem(keras3._ACTIVATIONS, "hard_sigmoid", "hard_sigmoid")
    with pytest.raises(ModelError) as caught:
        translate_keras3(keras3_files / "branchy.keras")
    _assert_one_line(str(caught.value), "does not reproduce")


def test_arithmetic_on_tensors_translates(keras3_files):
    model, info = translate_keras3(keras3_files / "arithmetic.keras")
    assert info["top1_agreement"] == 1.0 and info["max_abs_diff"] < 1e-4
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("Rescaling") == 4 and "Multiply" in kinds and "ReLU" in kinds  # x + 3, x / 6, x / 2, 1 - x
    assert {"noise", "groups"} <= {layer.name for layer in model.layers}


def test_pooling_joins_and_activations_written_as_ops_translate(keras3_files):
    model, info = translate_keras3(keras3_files / "ops.keras")
    assert info["top1_agreement"] == 1.0 and info["max_abs_diff"] < 1e-4
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds.count("GlobalAveragePooling2D") == 2 and "GlobalMaxPooling2D" in kinds
    assert {"Concatenate", "LeakyReLU", "Softmax", "Activation"} <= set(kinds)
    assert kinds.count("Rescaling") == 2 and kinds.count("ReLU") == 3  # two hard sigmoids' clips, the clip


def test_images_the_model_cannot_take_leave_the_size_check_to_the_caller(keras3_files):
    images = np.random.default_rng(1).uniform(0, 255, (12, 32, 32, 3)).astype(np.float32)  # the model takes 16x16
    model, info = translate_keras3(keras3_files / "small.keras", sample_images=images)
    assert info["top1_agreement"] == 1.0 and model.input_shape[1:] == (16, 16, 3)  # proven on random 16x16 images


@pytest.mark.parametrize(("file", "name", "class_name"),
                         [("lstm", "memory", "LSTM"), ("custom", "twice", "Scale"), ("square", "square", "Square")])
def test_untranslatable_layer_is_refused_in_one_line(keras3_files, file, name, class_name):
    with pytest.raises(ModelError) as caught:
        translate_keras3(keras3_files / f"{file}.keras")
    _assert_one_line(str(caught.value), f"'{name}'", class_name, "tf_keras")


def test_lambda_is_refused_with_or_without_safe_mode_saying_why(keras3_files):
    for safe_mode in (True, False):  # its Python code was written for Keras 3: --unsafe cannot make it run on tf_keras
        with pytest.raises(ModelError) as caught:
            translate_keras3(keras3_files / "lambda.keras", safe_mode=safe_mode)
        _assert_one_line(str(caught.value), "'double'", "Lambda", "even with --unsafe")


def test_is_keras3_file(keras3_files, tiny_cnn, tmp_path):
    assert is_keras3_file(keras3_files / "small.keras") and is_keras3_file(keras3_files / "branchy.keras")
    tiny_cnn.save(tmp_path / "tf_keras.keras")
    assert not is_keras3_file(tmp_path / "tf_keras.keras")
    assert not is_keras3_file(keras3_files / "small.h5")
    assert not is_keras3_file(tmp_path / "missing.keras")


def test_h5_files_load_keras2_directly_and_keras3_translated(keras3_files, tiny_cnn, tmp_path):
    tiny_cnn.save(tmp_path / "tf_keras.h5")
    model, source = load_model_with_source(tmp_path / "tf_keras.h5")
    assert not source["translated_to_tf_keras"] and [layer.name for layer in model.layers][-1] == "logits"
    model, source = load_model_with_source(keras3_files / "small.h5")
    assert source["keras"].startswith("Keras 3.") and source["top1_agreement"] == 1.0 and source["max_abs_diff"] < 1e-5
    assert model.get_layer("conv").kernel.shape == (3, 3, 3, 8)


def test_a_keras3_file_works_wherever_a_model_is_read(keras3_files, tmp_path, capsys):
    from compress.cli import main

    model, source = load_model_with_source(keras3_files / "small.keras")
    assert source["translated_to_tf_keras"] and source["keras"].startswith("Keras 3.")
    assert main(["export", str(keras3_files / "small.keras"), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_worker_failure_is_one_line(tmp_path):
    broken = tmp_path / "broken.keras"
    broken.write_text("not a zip archive\n")
    with pytest.raises(ModelError) as caught:
        translate_keras3(broken)
    _assert_one_line(str(caught.value), "Keras 3 cannot load", "broken.keras")


def test_layer_options_are_translated_or_refused():
    from pathlib import Path

    from compress.keras3_layers import Builder

    builder = Builder(Path("model.keras"))
    glorot = {"class_name": "GlorotUniform", "config": {"seed": 3, "input_axes": 0}, "module": "keras.initializers"}
    regularizer = {"module": "keras.regularizers", "class_name": "L2", "config": {"l2": 0.01}}
    policy = {"module": "keras", "class_name": "DTypePolicy", "config": {"name": "float32"}, "registered_name": None}
    dense = {"name": "d", "units": 2, "dtype": policy, "activation": "silu", "kernel_initializer": glorot,
             "bias_initializer": {"class_name": "Novel", "config": {}}, "kernel_regularizer": regularizer,
             "quantization_config": None}  # fmt: skip
    config = builder._translate_config({"class_name": "Dense", "config": dense})
    assert config["dtype"] == "float32" and config["activation"] == "swish" and "quantization_config" not in config
    assert config["kernel_initializer"] == {"class_name": "GlorotUniform", "config": {"seed": 3}}
    assert config["kernel_regularizer"] == {"class_name": "L2", "config": {"l2": 0.01}}
    assert "bias_initializer" not in config  # an initializer tf_keras lacks: its default, since weights are copied
    leaky = builder._translate_config({"class_name": "LeakyReLU", "config": {"name": "l", "negative_slope": 0.2}})
    assert leaky["alpha"] == 0.2
    for layer, expected in [
        ({"class_name": "Dense", "config": {"name": "d", "units": 2, "activation": "celu"}}, "activation celu"),
        ({"class_name": "Dense", "config": {"name": "d", "units": 2, "lora_rank": 4}}, "lora_rank=4"),
        ({"class_name": "LayerNormalization", "config": {"name": "n", "rms_scaling": True}}, "rms_scaling=True"),
    ]:
        with pytest.raises(ModelError) as caught:
            builder._translate_config(layer)
        _assert_one_line(str(caught.value), "'" + layer["config"]["name"] + "'", expected)


def test_augmentation_layers_are_left_out_as_identities_at_inference(keras3_files):
    from compress.kerasmodel import load_model_with_source, translation_note

    images = np.random.default_rng(1).uniform(0, 255, (12, 16, 16, 3)).astype(np.float32)
    model, source = load_model_with_source(keras3_files / "augmented.keras", sample_images=images)
    assert source["left_out"] == ["augmentation", "zoom"] and source["max_abs_diff"] < 1e-5
    assert [type(layer).__name__ for layer in model.layers] == [
        "InputLayer", "Rescaling", "Conv2D", "GlobalAveragePooling2D", "Dense"]
    assert "left out augmentation, zoom: data augmentation, which acts only in training" in translation_note(source)


def test_a_convnext_block_translates_to_layers_onnx_converts(keras3_files, tmp_path):
    """ConvNeXt's convolution with a group per channel becomes a DepthwiseConv2D (tf_keras runs grouped ones
    through a compiled function no ONNX converter reads) and its LayerScale a 1x1 DepthwiseConv2D; the model
    then exports to ONNX with the same outputs."""
    from compress.export.exporter import export_model

    model, info = translate_keras3(keras3_files / "convnext_block.keras")
    assert info["top1_agreement"] == 1.0 and info["max_abs_diff"] < 1e-4
    assert type(model.get_layer("depthwise")).__name__ == "DepthwiseConv2D"
    assert type(model.get_layer("scale")).__name__ == "DepthwiseConv2D"
    result = export_model(model, tmp_path / "out")
    assert result["parity_ok"]


def test_a_model_that_resizes_its_images_itself_translates(keras3_files):
    """Keras 3's Resizing and CenterCrop name their channels-last layout, and Resizing its padding options, which
    tf_keras' layers lack (they do the same without them): both were refused, as was the leaky_relu activation."""
    images = np.random.default_rng(1).uniform(0, 255, (12, 24, 24, 3)).astype(np.float32)
    model, info = translate_keras3(keras3_files / "resizing.keras", sample_images=images)
    assert info["top1_agreement"] == 1.0 and info["max_abs_diff"] < 1e-4
    assert [type(layer).__name__ for layer in model.layers][1:5] == ["Resizing", "CenterCrop", "Rescaling", "Identity"]
    assert model.get_layer("conv").activation.__name__ == "leaky_relu"  # Keras 3's activation of that name, also


def test_a_nested_model_giving_the_output_translates(keras3_files):
    """keras.applications MobileNet with its classifier called inside the user's model: Keras 3 numbers its call
    1 in the output reference, 0 in call arguments; the translation failed with a KeyError traceback."""
    model, info = translate_keras3(keras3_files / "nested_output.keras")
    assert info["top1_agreement"] == 1.0 and info["max_abs_diff"] < 1e-4
    assert model.output_shape == (None, 3) and model.get_layer("mobilenet").output_shape == (None, 3)


def test_preprocessing_with_a_value_per_channel_translates_and_channel_reordering_is_refused(keras3_files):
    """keras.applications' torch-style preprocess_input (DenseNet) and a script's per-channel factors failed with a
    traceback; the caffe style (ResNet50, VGG16) reorders the channels, which is refused naming that."""
    images = np.random.default_rng(1).uniform(0, 255, (12, 16, 16, 3)).astype(np.float32)
    model, info = translate_keras3(keras3_files / "torch_preprocessing.keras", sample_images=images)
    assert info["top1_agreement"] == 1.0 and info["max_abs_diff"] < 1e-4
    assert [type(layer).__name__ for layer in model.layers][1:5] == [
        "Rescaling", "Normalization", "Normalization", "Normalization"]  # /255, - mean, / std, * factors
    with pytest.raises(ModelError) as caught:
        translate_keras3(keras3_files / "caffe_preprocessing.keras")
    _assert_one_line(str(caught.value), "caffe-style preprocess_input", "reorder their channels")


def test_a_subclassed_model_is_refused_in_one_line_saying_why(keras3_files):
    with pytest.raises(ModelError) as caught:  # it was Keras' own message, cut off mid-sentence
        load_model_with_source(keras3_files / "subclassed.keras")
    _assert_one_line(str(caught.value), "subclassed model (class Net)", "functional API")


def test_named_ends_translate_and_a_second_output_is_refused_naming_the_outputs(keras3_files):
    """A dict of one output was pickled by np.savez (a traceback); two outputs failed in the input range check."""
    model, info = translate_keras3(keras3_files / "named_ends.keras")
    assert len(model.outputs) == 1 and info["top1_agreement"] == 1.0 and info["max_abs_diff"] < 1e-5
    with pytest.raises(ModelError) as caught:
        load_model_with_source(keras3_files / "two_heads.keras")
    _assert_one_line(str(caught.value), "1 input and 2 outputs (main, aux)", "model.get_layer('main').output")


def test_an_op_tf2onnx_cannot_convert_is_one_line_naming_the_layer(tmp_path):
    from compress.errors import ExportError
    from compress.export.exporter import export_model
    from compress.keras import keras

    from compress.keras import tf

    layers = keras.layers
    model = keras.Sequential([keras.Input((8, 8, 4)), layers.Lambda(tf.math.lgamma, name="log_gamma"),
                              layers.GlobalAveragePooling2D(), layers.Dense(3)])
    with pytest.raises(ExportError) as caught:
        export_model(model, tmp_path / "out")
    _assert_one_line(str(caught.value), "tf2onnx cannot convert", "Lgamma", "log_gamma")
