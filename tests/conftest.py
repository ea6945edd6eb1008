"""Shared test fixtures: keep each small; helpers for several test modules live here."""

import pytest


@pytest.fixture(scope="session")
def baseline_1epoch(tmp_path_factory):
    """The article's CNN trained 1 epoch on the shipped cifar10-mini data (article recipe); path to its .keras file."""
    from baseline.train import TrainConfig, train_baseline
    from compress.data import load_data
    from compress.kerasmodel import save_model

    model, _ = train_baseline(load_data("cifar10-mini"), TrainConfig(recipe="article", epochs=1), verbose=0)
    return save_model(model, tmp_path_factory.mktemp("baseline_1epoch") / "model.keras")


@pytest.fixture(scope="session")
def synthetic_data():
    """A tiny, easy Dataset (8x8x3 images, 3 classes told apart by which colour channel is bright), in memory."""
    import numpy as np

    from compress.data import Dataset

    def split(count, seed):
        rng = np.random.default_rng(seed)
        labels = rng.integers(0, 3, count)
        images = rng.integers(0, 100, (count, 8, 8, 3)).astype(np.uint8)
        images[np.arange(count), :, :, labels] += np.uint8(150)
        return images, labels.astype(np.int64)

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = split(240, 0), split(30, 1), split(90, 2)
    return Dataset("synthetic", ("red", "green", "blue"), x_train, y_train, x_val, y_val, x_test, y_test)


@pytest.fixture
def tiny_cnn():
    """A fresh Conv2D(8)-Conv2D(8)-Flatten-Dense(16)-Dense(3) for synthetic_data's 8x8x3 images (logits out).

    Two convolutions so that one has more than 4 input channels (N:M groups); the last Dense is the classifier.
    """
    from compress.keras import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            layers.Conv2D(8, 3, activation="relu", name="conv1"),
            layers.Conv2D(8, 3, activation="relu", name="conv2"),
            layers.Flatten(name="flatten"),
            layers.Dense(16, activation="relu", name="dense1"),
            layers.Dense(3, name="logits"),
        ],
        name="tiny_cnn",
    )
