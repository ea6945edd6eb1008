"""The article's CNN, layer for layer, and the training command end to end on the shipped data."""

import json

import pytest

from baseline import build_article_cnn
from compress.cli import main


def test_article_cnn_layers_and_parameter_count():
    model = build_article_cnn()
    layers = [(type(layer).__name__, layer.output_shape[1:]) for layer in model.layers]
    assert layers == [
        ("Conv2D", (30, 30, 64)),
        ("MaxPooling2D", (15, 15, 64)),
        ("Conv2D", (13, 13, 128)),
        ("Flatten", (21632,)),
        ("Dense", (256,)),
        ("Dense", (10,)),
    ]
    assert [layer.get_config().get("activation") for layer in model.layers] == [
        "relu", None, "relu", None, "relu", "linear"
    ]
    assert model.layers[0].kernel_size == (3, 3) and model.layers[1].pool_size == (2, 2)
    assert model.count_params() == 5_616_266


def test_article_cnn_follows_input_shape_and_classes():
    model = build_article_cnn((28, 28, 1), 5)
    assert model.input_shape == (None, 28, 28, 1) and model.output_shape == (None, 5)


def test_train_on_shipped_data_writes_model_and_metrics_and_learns(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--epochs", "1", "--out", str(out), "--quiet"]) == 0
    assert capsys.readouterr().out == ""  # --quiet silences Keras' progress and our own lines
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("test_accuracy", "test_loss", "params", "epochs", "train_seconds", "seed", "data", "versions"):
        assert key in metrics
    assert metrics["params"] == 5_616_266 and metrics["epochs"] == 1
    assert metrics["data"]["source"] == "cifar10-mini" and metrics["data"]["counts"]["test"] == 1000
    assert set(metrics["versions"]) == {"tensorflow", "tf_keras", "tfmot"}
    assert metrics["test_accuracy"] > 0.2  # chance is 0.1
    from compress.kerasmodel import load_model

    assert load_model(out / "model.keras").count_params() == 5_616_266


def _make_file(tmp_path):
    path = tmp_path / "a-file"
    path.write_text("x")
    return path


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "folder:/does/not/exist"], "does not exist"),
        (["--data", "imagenet"], "known sources: cifar10-mini, cifar10, folder:PATH"),
        (["--epochs", "0"], "positive integer"),
        (["--epochs", "-3"], "positive integer"),
        (["--training-recipe", "fancy"], "invalid choice"),
    ],
    ids=["missing-folder", "unknown-source", "zero-epochs", "negative-epochs", "unknown-recipe"],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    code = main(["train", "--out", str(out), "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()


def test_unreadable_image_is_named_through_the_cli(tmp_path, capsys):
    from helpers import make_folder_set

    root = make_folder_set(tmp_path / "set")
    (root / "test" / "cat" / "bad.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    out = tmp_path / "out"
    assert main(["train", "--data", f"folder:{root}", "--out", str(out), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "bad.jpg" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_output_path_that_is_a_file_is_refused(tmp_path, capsys):
    path = _make_file(tmp_path)
    assert main(["train", "--out", str(path), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is a file" in err and len(err.strip().splitlines()) == 1
    assert path.read_text() == "x"


def test_cli_help_lists_every_option(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--data", "--data-dir", "--seed", "--epochs", "--training-recipe", "--out", "--quiet", "--image-size"):
        assert option in text
