"""The article's CNN, layer for layer: 5,616,266 parameters on 32x32x3 input with 10 classes."""

from __future__ import annotations


def build_article_cnn(input_shape: tuple[int, int, int] = (32, 32, 3), num_classes: int = 10):
    """Conv2D(64,3x3,relu) - MaxPool(2x2) - Conv2D(128,3x3,relu) - Flatten - Dense(256,relu) - Dense(classes).

    The last layer outputs logits (no softmax), as in the article; losses use from_logits=True.
    """
    from compress.keras import keras

    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input(shape=input_shape, name="image"),
            layers.Conv2D(64, (3, 3), activation="relu", name="conv1"),
            layers.MaxPooling2D((2, 2), name="pool1"),
            layers.Conv2D(128, (3, 3), activation="relu", name="conv2"),
            layers.Flatten(name="flatten"),
            layers.Dense(256, activation="relu", name="dense1"),
            layers.Dense(num_classes, name="logits"),
        ],
        name="article_cnn",
    )
