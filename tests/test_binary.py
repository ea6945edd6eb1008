"""Binary classifiers that give one score (Dense(1): a sigmoid probability or a logit, as in the Keras guides):
compressed as a score per class, and every file gives the one score back, of the same kind."""

import json

import numpy as np
import onnx
import pytest

from compress.cli import main


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
    """A two-class folder set told apart by brightness: dark cats, bright dogs, 12x10 RGB."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pets")
    rng = np.random.default_rng(0)
    for split, count in (("train", 40), ("test", 20)):
        for name, low in (("cat", 0), ("dog", 110)):
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                pixels = rng.integers(low, low + 146, (12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:03d}.png")
    return root


def _one_score_model(activation, tmp_path, data=None):
    """Conv-GAP-Dense(1), with its sigmoid as a layer of its own; trained on `data` (a folder set) when given, so
    that its scores keep clear of the decision threshold."""
    from compress.data import load_data
    from compress.keras import keras
    from compress.kerasmodel import save_model

    keras.utils.set_random_seed(0)
    layers = keras.layers
    model = keras.Sequential([keras.Input((12, 10, 3)), layers.Conv2D(4, 3, activation="relu"),
                              layers.GlobalAveragePooling2D(), layers.Dense(1)])
    if activation == "sigmoid":
        model.add(layers.Activation("sigmoid"))
    if data is not None:
        model.compile(keras.optimizers.Adam(0.05), keras.losses.BinaryCrossentropy(from_logits=activation != "sigmoid"))
        model.fit(*load_data(f"folder:{data}").normalized("train"), epochs=30, verbose=0)
    return model, save_model(model, tmp_path / f"{activation}.keras")


def _output(path):
    proto = onnx.load(str(path))
    dims = [dim.dim_value for dim in proto.graph.output[0].type.tensor_type.shape.dim[1:]]
    return dims, {entry.key: entry.value for entry in proto.metadata_props}.get("binary_output")


@pytest.mark.parametrize("activation", ["sigmoid", "logit"])
def test_a_one_score_model_exports_to_files_giving_that_score(activation, pets, tmp_path, capsys):
    import onnxruntime as ort

    from compress.data import load_data

    model, path = _one_score_model(activation, tmp_path, pets)
    assert main(["export", str(path), "--out", str(tmp_path / "out"), "--data", f"folder:{pets}",
                 "--format", "onnx", "--format", "tflite"]) == 0
    said = capsys.readouterr().out
    kind = "a sigmoid probability" if activation == "sigmoid" else "a logit"
    assert f"one score per image, {kind} of class dog" in said
    onnx_path = tmp_path / "out" / "model.onnx"
    assert _output(onnx_path) == ([1], "sigmoid" if activation == "sigmoid" else "logit")
    images, labels = load_data(f"folder:{pets}").normalized("test")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: images})[0]
    np.testing.assert_allclose(got, model.predict(images, verbose=0), atol=1e-5)  # the user's model's own score
    threshold = 0.5 if activation == "sigmoid" else 0.0
    expected = float(np.mean((got[:, 0] > threshold) == labels))
    for file in (onnx_path, tmp_path / "out" / "model.tflite"):
        assert main(["evaluate", str(file), "--data", f"folder:{pets}", "--json", str(tmp_path / "e.json")]) == 0
        assert json.loads((tmp_path / "e.json").read_text())["accuracy"] == pytest.approx(expected, abs=0.03)


def test_the_two_scores_give_the_models_predictions_and_probabilities_exactly(tmp_path):
    from compress.kerasmodel import binary_kind, one_score_model, scores_per_class, two_score_model

    images = np.random.default_rng(1).random((16, 12, 10, 3), dtype=np.float32)
    for activation in ("sigmoid", "logit"):
        model, _ = _one_score_model(activation, tmp_path)
        model.layers[-1 if activation == "logit" else -2].set_weights([np.full((4, 1), 3.0, np.float32),
                                                                       np.array([-2.0], np.float32)])
        score = model.predict(images, verbose=0)
        two, kind = two_score_model(model)
        assert kind == binary_kind(two) == activation
        scores = two.predict(images, verbose=0)
        np.testing.assert_allclose(scores, scores_per_class(score, kind), atol=1e-5)
        file_model, file_kind = one_score_model(two)
        assert file_kind == activation
        np.testing.assert_allclose(file_model.predict(images, verbose=0), score, atol=1e-5)
        probability = score[:, 0] if activation == "sigmoid" else 1 / (1 + np.exp(-score[:, 0]))
        if activation == "logit":  # the sigmoid model's scores are a softmax's already
            scores = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
        np.testing.assert_allclose(scores[:, 1], probability, atol=1e-5)


def test_a_run_keeps_one_score_in_every_file_the_student_included(pets, tmp_path):
    """PTQ's int8 files, QAT's and a distilled student's give the one score of the teacher's kind."""
    _, path = _one_score_model("sigmoid", tmp_path, pets)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text('[measure]\nbatch_sizes = [1]\nmin_seconds = 0.05\n'
                      '[[stage]]\nname = "ptq"\ntechnique = "ptq"\ninput = "baseline"\n'
                      '[[stage]]\nname = "qat"\ntechnique = "qat"\ninput = "baseline"\nsettings = { epochs = 1 }\n'
                      '[[stage]]\nname = "distilled"\ntechnique = "distill"\ninput = "baseline"\n'
                      'settings = { width = 4, epochs = 1, compare_scratch = false }\n')
    out = tmp_path / "run"
    assert main(["run", "--model", str(path), "--recipe", str(recipe), "--data", f"folder:{pets}", "--out", str(out),
                 "--quiet"]) == 0
    for file in ("ptq/model.int8.onnx", "qat/model.onnx", "distilled/model.onnx"):
        assert _output(out / file) == ([1], "sigmoid"), file
    results = json.loads((out / "results.json").read_text())
    assert all(variant["parity"]["ok"] for variant in results["variants"] if variant.get("parity"))
    accuracy = {variant["name"]: variant["accuracy"] for variant in results["variants"]}
    assert min(accuracy[name] for name in accuracy if name != "distilled") > 0.9  # bright dogs: each file tells them
    student = json.loads((out / "distilled" / "stats.json").read_text())["stats"]["student_test_accuracy"]
    assert accuracy["distilled"] == pytest.approx(student, abs=0.03)  # its file reads as the Keras student does


def test_a_one_score_model_that_is_no_binary_classifier_is_refused_in_one_line(pets, tmp_path, capsys):
    from compress.keras import keras
    from compress.kerasmodel import save_model

    model = keras.Sequential([keras.Input((12, 10, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(1, activation="relu")])
    path = save_model(model, tmp_path / "relu.keras")
    assert main(["ptq", str(path), "--out", str(tmp_path / "out"), "--data", f"folder:{pets}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "activation relu" in err and "sigmoid probability or a logit" in err and len(err) < 300
    assert not (tmp_path / "out").exists()
