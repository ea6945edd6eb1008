"""What runs before any work: the model against the data, the output folder, bounds; and refusals that are one
short line on stderr, TensorFlow's start-up lines included."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from compress.cli import main
from compress.errors import CompressError


@pytest.fixture
def five_outputs(tmp_path):
    from compress.keras import keras
    from compress.kerasmodel import save_model

    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Conv2D(2, 3), keras.layers.Flatten(),
                              keras.layers.Dense(5)])
    return save_model(model, tmp_path / "five.keras")


@pytest.mark.parametrize("command", ["prune", "qat", "cluster", "ptq", "distill"])
def test_techniques_refuse_a_model_that_does_not_fit_the_data_before_work(command, five_outputs, tmp_path, capsys):
    out = tmp_path / "out"
    assert main([command, str(five_outputs), "--out", str(out), "--data", "cifar10-mini"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "outputs 5 per image" in err[0] and "10 classes" in err[0] and len(err[0]) < 300
    assert not out.exists()


def test_a_refusal_is_one_short_line_on_stderr_even_after_tensorflow_loaded(five_outputs, tmp_path):
    environment = {key: value for key, value in os.environ.items() if key not in ("TF_CPP_MIN_LOG_LEVEL",
                                                                                  "COMPRESS_DEBUG")}
    result = subprocess.run([sys.executable, "-m", "compress.cli", "prune", str(five_outputs), "--out",
                             str(tmp_path / "out")], capture_output=True, text=True, env=environment, timeout=300)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("compress: error: ") and len(result.stderr) < 300
    debug = subprocess.run([sys.executable, "-m", "compress.cli", "--debug", "prune", str(five_outputs), "--out",
                            str(tmp_path / "out")], capture_output=True, text=True, env=environment, timeout=300)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_an_unwritable_output_is_refused_before_work(tmp_path, capsys):
    (tmp_path / "file").write_text("in the way")
    for out in (tmp_path / "file" / "sub", "/proc/compress-cannot-write-here"):
        assert main(["train", "--out", str(out), "--epochs", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "cannot" in err[0]


def test_evaluate_json_into_a_folder_is_refused(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "m.onnx"), "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["cluster", "m.keras", "--out", "o", "--clusters", "100000"], "clusters must be an integer from 2 to 256"),
    (["train", "--out", "o", "--epochs", "1000000000"], "epochs must be an integer from 1 to 1000"),
    (["distill", "m.keras", "--out", "o", "--epochs", "5000"], "epochs must be an integer from 1 to 1000"),
    (["evaluate", "m.onnx", "--image-size", "99999x99999"], "image size must be from 1x1 to 4096x4096"),
], ids=["clusters", "train-epochs", "distill-epochs", "image-size"])
def test_settings_are_bounded(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", ["prune", "evaluate"])
def test_a_savedmodel_folder_is_named_as_such(command, tmp_path, capsys):
    (tmp_path / "saved").mkdir()
    assert main([command, str(tmp_path / "saved"), "--out" if command == "prune" else "--limit",
                 str(tmp_path / "out") if command == "prune" else "8"]) == 2
    assert "is a folder (a SavedModel?)" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["model.weights.h5", "weights.h5"])
def test_a_weights_only_file_is_named_as_such(name, tmp_path, capsys):
    from compress.keras import keras

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    model.save_weights(tmp_path / name)
    assert main(["export", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "holds weights only (model.save_weights)" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_a_model_with_a_custom_layer_class_is_refused_naming_the_class(suffix, tmp_path, capsys):
    """Keras' own text asked for a custom_object_scope, which the command line cannot give."""
    from compress.keras import keras

    class Halve(keras.layers.Layer):
        def call(self, inputs):
            return inputs * 0.5

    model = keras.Sequential([keras.Input((8, 8, 3)), Halve(), keras.layers.Flatten(), keras.layers.Dense(2)])
    model.save(tmp_path / f"model{suffix}")
    assert main(["export", str(tmp_path / f"model{suffix}"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "uses 'Halve', a custom class whose code the file does not hold" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_one_class_data_is_refused(tmp_path):
    from helpers import make_folder_set

    from compress.data import load_data

    root = make_folder_set(tmp_path / "images", classes=("cat",), per_class=4)
    with pytest.raises(CompressError, match="two or more class folders"):
        load_data(f"folder:{root}", cache_dir=tmp_path / "cache")


def test_a_grayscale_training_split_beside_an_rgb_test_split_becomes_rgb(tmp_path):
    from helpers import make_folder_set

    from compress.data import load_data

    make_folder_set(tmp_path / "gray", per_class=4, mode="L")
    make_folder_set(tmp_path / "rgb", per_class=4)
    root = tmp_path / "mixed"
    (root).mkdir()
    (tmp_path / "gray" / "train").rename(root / "train")
    (tmp_path / "rgb" / "test").rename(root / "test")
    data = load_data(f"folder:{root}", cache_dir=tmp_path / "cache")
    assert data.input_shape[-1] == 3 and data.x_test.shape[-1] == 3


def test_an_empty_image_file_is_named_without_object_addresses(tmp_path):
    from helpers import make_folder_set

    from compress.data import load_data

    root = make_folder_set(tmp_path / "images", per_class=4)
    (root / "train" / "cat" / "empty.png").write_bytes(b"")
    with pytest.raises(CompressError, match="empty.png: the file is empty") as caught:
        load_data(f"folder:{root}", cache_dir=tmp_path / "cache")
    assert "0x" not in str(caught.value)


def _rescaling_model():
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255, name="rescale"),
                             keras.layers.Conv2D(4, 3, activation="relu"), keras.layers.Flatten(),
                             keras.layers.Dense(10)])


def test_input_range_is_read_from_the_model_and_can_be_set():
    from compress.checks import decide_input_range
    from compress.keras import keras

    said = []
    assert decide_input_range(_rescaling_model(), "auto", said.append) == "raw" and "rescale" in said[0]
    plain = keras.Sequential([keras.Input((4, 4, 3)), keras.layers.Flatten(), keras.layers.Dense(2)])
    assert decide_input_range(plain) == "unit"
    assert decide_input_range(plain, "symmetric") == "symmetric"
    with pytest.raises(CompressError, match="input range"):
        decide_input_range(plain, "percent")


def test_an_automatic_input_range_is_checked_on_the_validation_images(synthetic_data):
    """A model trained on [-1, 1] pixels with no layer saying so: the data shows it, and the range follows."""
    from compress.checks import decide_input_range
    from compress.keras import keras

    layers = keras.layers
    inputs = keras.Input((8, 8, 3))
    # logits -|channel mean - 0.25|: right for [-1, 1] pixels (class channel ~0.57, others ~-0.6), wrong for
    # [0, 1] (~0.78 against ~0.2) and for raw ones
    distance = layers.Rescaling(1.0, offset=-0.25)(layers.GlobalAveragePooling2D()(inputs))
    size = layers.Add()([layers.ReLU()(distance), layers.ReLU()(layers.Rescaling(-1.0)(distance))])
    symmetric_model = keras.Model(inputs, layers.Rescaling(-1.0)(size))
    said = []
    assert decide_input_range(symmetric_model, "auto", said.append, synthetic_data) == "symmetric"
    assert "alone said unit" in said[0] and "validation images" in said[0]
    assert decide_input_range(symmetric_model, "unit", data=synthetic_data) == "unit"  # as given: not second-guessed
    constant = keras.Sequential([keras.Input((8, 8, 3)), layers.Flatten(), layers.Dense(3, kernel_initializer="zeros")])
    said.clear()
    assert decide_input_range(constant, "auto", said.append, synthetic_data) == "unit"  # no range does better
    assert "validation images: unit" in said[0]


def test_dataset_hands_images_over_in_the_chosen_range(synthetic_data):
    raw, _ = synthetic_data.with_input_range("raw").normalized("test")
    unit, _ = synthetic_data.normalized("test")
    symmetric, _ = synthetic_data.with_input_range("symmetric").normalized("test")
    assert raw.max() > 100 and unit.max() <= 1.0 and symmetric.min() >= -1.0 and symmetric.min() < 0
    assert abs(float(raw[0, 0, 0, 0]) / 255 - float(unit[0, 0, 0, 0])) < 1e-6


def test_a_model_with_its_own_rescaling_gets_raw_pixels_end_to_end(tmp_path, capsys):
    """Export records the range in the ONNX file; evaluate reads it back: the file scores what the Keras model
    scores on raw pixels, not what it would on [0, 1] images."""
    import onnx

    from compress.data import load_data
    from compress.kerasmodel import save_model

    model = _rescaling_model()
    path = save_model(model, tmp_path / "rescaling.keras")
    assert main(["export", str(path), "--out", str(tmp_path / "out"), "--data", "cifar10-mini", "--quiet"]) == 0
    onnx_path = tmp_path / "out" / "model.onnx"
    metadata = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert metadata["input_range"] == "raw"
    assert main(["evaluate", str(onnx_path), "--data", "cifar10-mini", "--json", str(tmp_path / "e.json")]) == 0
    import json

    accuracy = json.loads((tmp_path / "e.json").read_text())["accuracy"]
    images, labels = load_data("cifar10-mini").with_input_range("raw").normalized("test")
    expected = float((model.predict(images, verbose=0).argmax(-1) == labels).mean())
    assert accuracy == pytest.approx(expected, abs=0.002)
    assert "input range: raw" in capsys.readouterr().out


def test_a_full_disk_is_one_line_and_leaves_no_partial_files(tmp_path, capsys, monkeypatch):
    import errno
    import shutil
    from pathlib import Path

    from compress import files

    shutil.copy(Path(__file__).parent / "fixtures" / "results.json", tmp_path / "results.json")

    def full_disk(source, target):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(files.os, "replace", full_disk)
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and len(err[0]) < 300
    assert not list(tmp_path.glob(".*partial*")) and not (tmp_path / "report.md").exists()


def test_a_softmax_is_seen_through_quantization_wrappers():
    """A QAT model of a softmax classifier still outputs probabilities: its fine-tuning loss must not take logits."""
    from compress.checks import outputs_probabilities
    from compress.keras import keras, tfmot
    from compress.techniques.finetune import classification_loss

    layers = keras.layers
    for last in (layers.Dense(3, activation="softmax"), layers.Dense(3)):
        model = keras.Sequential([keras.Input((8, 8, 3)), layers.Conv2D(4, 3), layers.Flatten(), last])
        quantized = tfmot.quantization.keras.quantize_model(model)
        softmax = last.get_config()["activation"] == "softmax"
        assert outputs_probabilities(model) is softmax and outputs_probabilities(quantized) is softmax
        assert classification_loss(quantized).get_config()["from_logits"] is not softmax


def test_a_model_of_any_input_size_is_built_at_the_datas_size(tmp_path, capsys):
    """A fully convolutional model (Input((None, None, 3)), as keras.applications backbones come without an
    input_shape) is compressed at the data's 32x32: the exported file takes 32x32 images and computes what the
    model does at that size."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    from compress.data import load_data
    from compress.keras import keras
    from compress.kerasmodel import save_model

    keras.utils.set_random_seed(0)
    image = keras.Input((None, None, 3))
    hidden = keras.layers.Conv2D(8, 3, activation="relu")(image)
    hidden = keras.layers.GlobalAveragePooling2D()(hidden)
    model = keras.Model(image, keras.layers.Dense(10)(hidden))
    path = save_model(model, tmp_path / "any_size.keras")
    assert main(["export", str(path), "--out", str(tmp_path / "out"), "--data", "cifar10-mini"]) == 0
    assert "takes ?x?x3 images (any size); built at the data's 32x32x3" in capsys.readouterr().out
    onnx_path = str(tmp_path / "out" / "model.onnx")
    dims = onnx.load(onnx_path).graph.input[0].type.tensor_type.shape.dim
    assert [dim.dim_value for dim in dims[1:]] == [32, 32, 3]
    images = load_data("cifar10-mini").normalized("test")[0][:16]
    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images})[0]
    np.testing.assert_allclose(got, model.predict(images, verbose=0), atol=1e-4)


def test_colour_images_are_made_grey_for_a_grey_model_and_said(tmp_path, capsys):
    """A model taking one channel gets cifar10-mini's RGB images as PIL's grey conversion of them; a file of it
    evaluated on the RGB images gets them the same way, and says so."""
    import numpy as np
    from PIL import Image

    from compress.data import load_data
    from compress.keras import keras
    from compress.kerasmodel import save_model

    rgb = load_data("cifar10-mini")
    grey = rgb.with_channels(1)
    expected = np.stack([np.asarray(Image.fromarray(image).convert("L")) for image in rgb.x_test[:8]])
    assert grey.input_shape == (32, 32, 1) and np.array_equal(grey.x_test[:8, ..., 0], expected)
    assert np.array_equal(grey.with_channels(3).x_test[:8], np.repeat(expected[..., None], 3, axis=-1))

    model = keras.Sequential([keras.Input((32, 32, 1)), keras.layers.Conv2D(4, 3), keras.layers.Flatten(),
                              keras.layers.Dense(10)])
    path = save_model(model, tmp_path / "grey.keras")
    assert main(["export", str(path), "--out", str(tmp_path / "out"), "--data", "cifar10-mini"]) == 0
    assert "has RGB images and the model takes grey ones: made grey" in capsys.readouterr().out
    from compress.measure.accuracy import evaluate_file

    on_rgb = evaluate_file(tmp_path / "out" / "model.onnx", rgb)
    on_grey = evaluate_file(tmp_path / "out" / "model.onnx", grey)
    assert on_rgb["images_converted"] == "RGB images made grey" and "images_converted" not in on_grey
    assert on_rgb["accuracy"] == on_grey["accuracy"]
    assert main(["evaluate", str(tmp_path / "out" / "model.onnx"), "--data", "cifar10-mini"]) == 0
    assert "images: RGB images made grey for model.onnx" in capsys.readouterr().out


def test_a_leading_rescaling_or_normalization_says_by_its_scale_which_pixels_it_takes():
    """Rescaling(1/255) and ImageNet statistics times 255 take 0-255 pixels; Rescaling(2, offset=-1) (to [-1, 1])
    and a Normalization adapted to [0, 1] images take [0, 1] ones."""
    import numpy as np

    from compress.checks import decide_input_range
    from compress.keras import keras

    layers = keras.layers

    def starting_with(first):
        return keras.Sequential([keras.Input((8, 8, 3)), first, layers.Conv2D(2, 3), layers.Flatten(),
                                 layers.Dense(3)])

    adapted = layers.Normalization()
    adapted.adapt(np.random.default_rng(0).random((16, 8, 8, 3), dtype=np.float32))
    expected = {"raw": [layers.Rescaling(1 / 255), layers.Rescaling(1 / 127.5, offset=-1),
                        layers.Normalization(mean=[123.7, 116.3, 103.5], variance=[3409, 3262, 3291])],
                "unit": [layers.Rescaling(2.0, offset=-1.0), adapted]}
    for decided, firsts in expected.items():
        assert [decide_input_range(starting_with(first)) for first in firsts] == [decided] * len(firsts)


@pytest.mark.parametrize("shape, hint", [
    ((16, 16, 3), "pass --image-size HxW to resize them$"),
    ((32, 32, 2), "the data has 32x32x2; its channel count differs from the images'$"),
    ((16, 16, 2), "pass --image-size HxW to resize them; its channel count differs from the images'$"),
])
def test_a_file_refuses_images_of_another_shape_naming_each_difference(shape, hint):
    from pathlib import Path

    from compress.runtimes.session import Session

    session = Session(Path("model.onnx"), "onnxruntime", (32, 32, 3), {})
    session.check_input_shape((32, 32, 3))
    with pytest.raises(CompressError, match=hint):
        session.check_input_shape(shape)


def _colour_folder(root, per_class=12):
    """Class folders blue/green/red (sorted: blue, green, red) of 8x8 images bright in their own colour."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", per_class // 2)):
        for channel, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(0, 60, (8, 8, 3)).astype(np.uint8)
                pixels[..., channel] += 180
                Image.fromarray(pixels).save(folder / f"{index}.png")
    return root


def _channel_classifier(order):
    """Mean of each colour channel as the score of class `order[k]` at output k: right in that class order."""
    import numpy as np

    from compress.keras import keras

    image = keras.Input((8, 8, 3))
    scores = keras.layers.Dense(3, name="scores")(keras.layers.GlobalAveragePooling2D()(image))
    model = keras.Model(image, scores)
    channels = {"red": 0, "green": 1, "blue": 2}
    kernel = np.zeros((3, 3), np.float32)
    for output, name in enumerate(order):
        kernel[channels[name], output] = 10.0
    model.get_layer("scores").set_weights([kernel, np.zeros(3, np.float32)])
    return model


def test_outputs_in_another_class_order_than_the_folders_are_warned_of(tmp_path, capsys):
    """A model built with its classes as red, green, blue, on folders that sort as blue, green, red: every figure
    would be of a model reading the wrong classes. Said, naming the outputs; a model in the folders' order is not."""
    from compress.checks import class_order_note
    from compress.data import load_data
    from compress.kerasmodel import save_model

    root = _colour_folder(tmp_path / "colours")
    data = load_data(f"folder:{root}", cache_dir=tmp_path / "cache", val_fraction=0.5)
    assert data.class_names == ("blue", "green", "red")
    assert class_order_note(_channel_classifier(("blue", "green", "red")), data) is None
    note = class_order_note(_channel_classifier(("red", "green", "blue")), data)
    assert "scores 33% as given, 100% with its output 0 as 'red', 2 as 'blue'" in note
    path = save_model(_channel_classifier(("red", "green", "blue")), tmp_path / "rgb_order.keras")
    assert main(["export", str(path), "--out", str(tmp_path / "out"), "--data", f"folder:{root}",
                 "--val-fraction", "0.5"]) == 0
    assert "warning: the model's outputs seem to follow another class order" in capsys.readouterr().err


@pytest.mark.parametrize("mixed", [False, True], ids=["other-size", "mixed-sizes"])
def test_images_are_resized_to_the_input_size_the_model_declares_and_said(mixed, tmp_path, capsys):
    """They were refused ("pass --image-size HxW"): the model's own input size is the one obvious choice."""
    import json

    from PIL import Image

    from compress.keras import keras
    from compress.kerasmodel import save_model
    from helpers import make_folder_set

    root = make_folder_set(tmp_path / "set", size=(12, 10))
    if mixed:
        Image.new("RGB", (40, 30)).save(root / "train" / "dog" / "big.png")
    image = keras.Input((16, 16, 3))
    model = keras.Model(image, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(image)))
    path = save_model(model, tmp_path / "sixteen.keras")
    assert main(["export", str(path), "--out", str(tmp_path / "out"), "--data", f"folder:{root}"]) == 0
    said = capsys.readouterr().out
    assert "images: 12x10 resized to 16x16, the input size of sixteen.keras" in said
    assert json.loads((tmp_path / "out" / "parity.json").read_text())["parity_ok"]
    assert main(["export", str(path), "--out", str(tmp_path / "again"), "--data", f"folder:{root}",
                 "--image-size", "16x16"]) == 0 and "resized to" not in capsys.readouterr().out


def test_a_fully_convolutional_classifier_is_compressed_with_its_scores_flattened(tmp_path, capsys):
    """A 1x1 convolution with a softmax after a global pooling that kept its dimensions gives 1x1xC scores: it was
    refused ("outputs 1x1x3 per image ... needs one score per class"); its softmax is still seen behind the
    Reshape."""
    from helpers import make_folder_set

    from compress.keras import keras
    from compress.kerasmodel import save_model

    root = make_folder_set(tmp_path / "s")
    layers = keras.layers
    image = keras.Input((12, 10, 3))
    pooled = layers.GlobalAveragePooling2D(keepdims=True)(layers.Conv2D(4, 3, activation="relu")(image))
    model = keras.Model(image, layers.Conv2D(3, 1, activation="softmax", name="scores")(pooled))
    path = save_model(model, tmp_path / "fcn.keras")
    assert main(["qat", str(path), "--out", str(tmp_path / "qat"), "--data", f"folder:{root}", "--epochs", "1"]) == 0
    said = capsys.readouterr().out
    assert "model: gives 1x1x3 scores per image; compressed with them reshaped to 3" in said
    assert "3 outputs as probabilities (softmax)" in said
