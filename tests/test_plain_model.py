"""Models users bring in forms tfmot and the converters refuse: a nested backbone (transfer learning, frozen),
mixed precision, a uint8 input, a fixed batch size, noise layers, arithmetic recorded as TFOpLambda layers. Each is
made the plain model it computes, said, and compressed."""

import re

import numpy as np
import pytest

from compress.cli import main


def _transfer_model():
    """The Keras transfer-learning pattern: a frozen backbone model called inside the user's model, a new head; the
    backbone's first convolution is named as a layer of the outer model is."""
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    image = keras.Input((32, 32, 3))
    hidden = layers.Conv2D(16, 3, padding="same", use_bias=False, name="conv")(image)
    hidden = layers.ReLU()(layers.BatchNormalization(name="bn")(hidden))
    hidden = layers.Conv2D(16, 3, strides=2, activation="relu", name="conv_2")(hidden)
    backbone = keras.Model(image, hidden, name="backbone")
    backbone.trainable = False
    inputs = keras.Input((32, 32, 3))
    hidden = backbone(layers.Rescaling(1 / 255, name="scale")(inputs), training=False)
    hidden = layers.Conv2D(16, 1, activation="relu", name="conv")(hidden)
    return keras.Model(inputs, layers.Dense(10, name="logits")(layers.GlobalAveragePooling2D()(hidden)))


def test_a_nested_frozen_backbone_is_inlined_and_made_trainable():
    from compress.plain_model import plain_model

    model = _transfer_model()
    plain, notes = plain_model(model)
    kinds = {layer.name: type(layer).__name__ for layer in plain.layers}
    assert "Functional" not in kinds.values() and {"conv", "backbone_conv", "bn", "conv_2"} <= set(kinds)
    assert plain.get_layer("backbone_conv").trainable and not plain.get_layer("bn").trainable
    images = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    np.testing.assert_allclose(plain(images), model(images), atol=1e-5)
    assert notes[0].startswith("model: nested model(s) backbone inlined")
    assert "frozen layer(s) (backbone_conv, conv_2) made trainable" in notes[1]


def test_a_frozen_model_of_any_input_size_is_made_trainable():
    """keras.applications backbones come built on Input((None, None, 3)): the rebuilt model is checked at 32x32."""
    from compress.keras import keras
    from compress.plain_model import plain_model

    image = keras.Input((None, None, 3))
    convolution = keras.layers.Conv2D(4, 3, name="conv")
    convolution.trainable = False
    model = keras.Model(image, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(convolution(image))))
    plain, notes = plain_model(model)
    assert plain.get_layer("conv").trainable and notes[0].startswith("model: 1 frozen layer(s) (conv) made trainable")


def test_a_transfer_learning_model_is_quantized_and_its_channels_pruned(tmp_path, capsys):
    """tfmot refused the nested backbone ("cannot quantize layer(s) backbone (Functional)"), and the channel trace
    stopped at it ("Functional layers are not supported")."""
    import json

    from compress.kerasmodel import save_model

    path = save_model(_transfer_model(), tmp_path / "transfer.keras")
    assert main(["qat", str(path), "--out", str(tmp_path / "qat"), "--epochs", "0.02"]) == 0
    assert "nested model(s) backbone inlined" in capsys.readouterr().out
    assert main(["prune", str(path), "--out", str(tmp_path / "channels"), "--structure", "channels",
                 "--sparsity", "0.5", "--epochs", "0.02"]) == 0
    channels = json.loads((tmp_path / "channels" / "stats.json").read_text())["stats"]["channels"]
    assert channels["params_after"] < channels["params_before"] / 2
    assert {"backbone_conv", "conv_2", "conv"} <= set(channels["layers"])


def _mixed_precision_model():
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3)), layers.Rescaling(1 / 255, dtype="mixed_float16"),
        layers.Conv2D(8, 3, activation="relu", dtype="mixed_float16"),
        layers.GlobalAveragePooling2D(dtype="mixed_float16"), layers.Dense(10, dtype="mixed_float16"),
        layers.Activation("softmax", dtype="float32"),
    ])


def _uint8_input_model():
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    image = keras.Input((32, 32, 3), dtype="uint8")
    hidden = layers.Conv2D(8, 3, activation="relu")(layers.Rescaling(1 / 255)(image))
    return keras.Model(image, layers.Dense(10)(layers.GlobalAveragePooling2D()(hidden)))


def _batch_of_one_model():
    """Built for batch-1 inference, as a Sequential on uint8 pixels: a Sequential's InputLayer is not among its
    layers, so its uint8 input went unnoticed, and its files could not run batches."""
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    return keras.Sequential([keras.Input((32, 32, 3), dtype="uint8", batch_size=1), layers.Rescaling(1 / 255),
                             layers.Conv2D(8, 3, activation="relu"), layers.GlobalAveragePooling2D(), layers.Dense(10)])


def _noisy_model():
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3)), layers.GaussianNoise(0.1, name="noise"),
        layers.Conv2D(8, 3, activation="relu"), layers.Identity(name="same"),
        layers.ActivityRegularization(l1=1e-5, name="regularize"),
        layers.GlobalAveragePooling2D(), layers.Dense(10),
    ])


def _activity_regularized_model():
    """A layer's activity_regularizer: tfmot's QAT raised "The tensor ... ActivityRegularizer/div_no_nan:0 cannot be
    accessed from here"."""
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    return keras.Sequential([
        keras.Input((32, 32, 3)), layers.Conv2D(8, 3, activation="relu", activity_regularizer="l2", name="conv"),
        layers.GlobalAveragePooling2D(), layers.Dense(10),
    ])


@pytest.mark.parametrize("build, said", [
    (_mixed_precision_model, "4 layer(s) computing in mixed_float16 (mixed precision) made to compute in float32"),
    (_uint8_input_model, "model: takes uint8 pixels; compressed as the same model taking float32 ones"),
    (_noisy_model, "model: left out noise, same, regularize: layers that pass their input through unchanged"),
    (_batch_of_one_model, "model: its input takes batches of exactly 1; compressed as the same model taking any"),
    (_activity_regularized_model, "model: the activity regularizer(s) of conv left out: they only add a training"),
], ids=["mixed-precision", "uint8-input", "noise-layers", "batch-of-one", "activity-regularizer"])
def test_a_model_in_a_form_tfmot_refuses_is_quantized_and_converted(build, said, tmp_path, capsys):
    """Each failed before: tfmot's QAT raised inside its QuantizeLayer or refused GaussianNoise, and TFLite's int8
    converter refused float16 Mul ops or a uint8 input fed float calibration images."""
    from compress.kerasmodel import save_model

    path = save_model(build(), tmp_path / "model.keras")
    assert main(["qat", str(path), "--out", str(tmp_path / "qat"), "--epochs", "0.02"]) == 0
    assert said in capsys.readouterr().out
    assert main(["ptq", str(path), "--out", str(tmp_path / "ptq"), "--formats", "tflite-int8",
                 "--calibration", "64"]) == 0
    assert (tmp_path / "ptq" / "model.int8.tflite").is_file()


def test_a_mixed_precision_model_exported_without_data_computes_in_float32(tmp_path, capsys):
    """Exported as saved, its file computed in float16 (Casts around every layer), slow on a CPU."""
    import onnx

    from compress.kerasmodel import save_model

    path = save_model(_mixed_precision_model(), tmp_path / "mixed.keras")
    assert main(["export", str(path), "--out", str(tmp_path / "out")]) == 0
    assert "made to compute in float32" in capsys.readouterr().out
    graph = onnx.load(str(tmp_path / "out" / "model.onnx")).graph
    float16 = [node.name for node in graph.node for attribute in node.attribute
               if node.op_type == "Cast" and attribute.name == "to" and attribute.i == onnx.TensorProto.FLOAT16]
    assert not float16 and not [tensor.name for tensor in graph.initializer
                                if tensor.data_type == onnx.TensorProto.FLOAT16]


def test_a_model_made_for_batches_of_one_gives_int8_files_that_take_any_batch(tmp_path):
    """The int8 file of its QAT model kept the batch of one ("has a fixed batch size of 1; cannot run 64")."""
    import onnxruntime as ort

    from compress.kerasmodel import save_model

    path = save_model(_batch_of_one_model(), tmp_path / "model.keras")
    assert main(["qat", str(path), "--out", str(tmp_path / "qat"), "--epochs", "0.02"]) == 0
    assert main(["export", str(tmp_path / "qat" / "model.keras"), "--out", str(tmp_path / "int8")]) == 0
    session = ort.InferenceSession(str(tmp_path / "int8" / "model.onnx"), providers=["CPUExecutionProvider"])
    images = np.random.default_rng(0).uniform(0, 255, (3, 32, 32, 3)).astype(np.float32)
    assert session.run(None, {session.get_inputs()[0].name: images})[0].shape == (3, 10)


def test_preprocessing_written_as_arithmetic_is_read_as_layers(tmp_path, capsys):
    """The TensorFlow tutorials' `(x / 255 - mean) / std` or preprocess_input inside a tf_keras model: TFOpLambda
    layers, so the input range rule saw no Rescaling first and fed [0, 1] pixels to a model taking 0-255 ones, and
    QAT refused them. As the Rescaling and Normalization layers they compute, both read them."""
    from compress.keras import keras
    from compress.kerasmodel import save_model

    keras.utils.set_random_seed(0)
    layers = keras.layers
    image = keras.Input((32, 32, 3))
    hidden = (image / 255.0 - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225],
                                                                                         np.float32)
    hidden = layers.GlobalAveragePooling2D()(layers.Conv2D(8, 3, activation="relu")(hidden))
    path = save_model(keras.Model(image, layers.Dense(10)(hidden)), tmp_path / "model.keras")
    assert main(["qat", str(path), "--out", str(tmp_path / "qat"), "--epochs", "0.02"]) == 0
    said = capsys.readouterr().out
    assert "TFOpLambda layers) made the layers computing it (Normalization, Rescaling)" in said
    assert re.search(r"input range: raw \(its first layer tf\.math\.truediv\S* \(Rescaling\) takes 0-255 pixels", said)
