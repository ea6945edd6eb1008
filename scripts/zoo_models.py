"""Build and train the models of the zoo benchmark, as users would bring them.

    python3 scripts/zoo_models.py OUT_DIR [--epochs N] [--cifar10-dir DIR]

With the full CIFAR-10 (--cifar10-dir, else $COMPRESS_CIFAR10_DIR), the models train on its training images less
every image of the shipped cifar10-mini subset, so that none of the images the benchmark compresses, validates or
tests with was seen in training; without it, on cifar10-mini's own training split. Each model trains until its
validation accuracy stops improving (at most --epochs epochs; the best epoch's weights are kept).

Writes OUT_DIR/<name>.keras for:
- tfmot_example: tfmot's pruning example, Conv2D(12, 3)-MaxPool-Flatten-Dense(10): the last Dense holds 99 % of the
  weights (on 32x32x3 images instead of MNIST's 28x28x1);
- mobilenetv2: keras.applications MobileNetV2, alpha 0.35, 32x32, trained from scratch on [-1, 1] pixels (its
  preprocess_input), BatchNormalization momentum lowered to 0.9 so that a short training settles its statistics;
- rescaling_cnn: a CNN whose first layer is Rescaling(1/255), taking raw 0-255 pixels (the Keras guides' pattern);
- keras3_resnet: built and trained with Keras 3 (`import keras`) in a child process: BatchNormalization, a residual
  Add, DepthwiseConv2D, global pooling; saved as a Keras 3 .keras file.
Each prints its test accuracy in Keras. The article's CNN needs no file: `compress run` trains it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


PATIENCE = 2  # epochs without a better validation accuracy before training stops


def _training_data(cifar10_dir: str | None):
    """The Dataset to train on: its test split is always cifar10-mini's, the one the benchmark tests with."""
    from compress.data import load_data

    mini = load_data("cifar10-mini")
    if not cifar10_dir:
        return mini
    full = load_data("cifar10", data_dir=cifar10_dir)
    seen = {image.tobytes() for name in ("train", "val", "test") for image in mini.split(name)[0]}
    splits, left_out = {}, 0
    for name in ("train", "val"):
        x, y = full.split(name)
        keep = np.array([image.tobytes() not in seen for image in x])
        splits[f"x_{name}"], splits[f"y_{name}"] = x[keep], y[keep]
        left_out += int((~keep).sum())
    data = dataclasses.replace(full, x_test=mini.x_test, y_test=mini.y_test, **splits)
    print(f"training on {len(data.y_train):,} CIFAR-10 images, validating on {len(data.y_val):,} ({left_out:,} images "
          f"of cifar10-mini left out), testing on cifar10-mini's {len(data.y_test):,}")
    return data


def _train(model, data, input_range: str, epochs: int, *, from_logits: bool, keras) -> float:
    data = data.with_input_range(input_range)
    (x, y), validation, (x_test, y_test) = (data.normalized(name) for name in ("train", "val", "test"))
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits), metrics=["accuracy"])
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=PATIENCE, restore_best_weights=True)
    model.fit(x, y, batch_size=64, epochs=epochs, validation_data=validation, callbacks=[stop], verbose=2)
    return float(model.evaluate(x_test, y_test, verbose=0)[1])


def build_tf_keras(out: Path, epochs: int, cifar10_dir: str | None) -> None:
    from compress.keras import keras
    from compress.kerasmodel import save_model

    keras.utils.set_random_seed(0)
    layers = keras.layers
    models = {
        "tfmot_example": (keras.Sequential([
            keras.Input((32, 32, 3)), layers.Conv2D(12, 3, activation="relu"), layers.MaxPooling2D(2),
            layers.Flatten(), layers.Dense(10)], name="tfmot_example"), "unit", True),
        "rescaling_cnn": (keras.Sequential([
            keras.Input((32, 32, 3)), layers.Rescaling(1 / 255), layers.Conv2D(32, 3, padding="same"),
            layers.BatchNormalization(momentum=0.9), layers.ReLU(), layers.MaxPooling2D(2),
            layers.Conv2D(64, 3, padding="same"), layers.BatchNormalization(momentum=0.9), layers.ReLU(),
            layers.MaxPooling2D(2), layers.Flatten(), layers.Dense(128, activation="relu"), layers.Dense(10)],
            name="rescaling_cnn"), "raw", True),
    }
    mobilenet = keras.applications.MobileNetV2(input_shape=(32, 32, 3), alpha=0.35, weights=None, classes=10)
    for layer in mobilenet.layers:
        if isinstance(layer, layers.BatchNormalization):
            layer.momentum = 0.9
    models["mobilenetv2"] = (mobilenet, "symmetric", False)  # softmax outputs, preprocess_input's [-1, 1]
    data = _training_data(cifar10_dir)
    for name, (model, input_range, from_logits) in models.items():
        accuracy = _train(model, data, input_range, epochs, from_logits=from_logits, keras=keras)
        save_model(model, out / f"{name}.keras")
        print(f"{name}: {model.count_params():,} parameters, test accuracy {accuracy:.4f} ({input_range} pixels)")


def build_keras3(out: Path, epochs: int, cifar10_dir: str | None) -> None:
    """Runs in a process with Keras 3 (TF_USE_LEGACY_KERAS unset); must not import compress.keras."""
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    x = layers.Conv2D(32, 3, padding="same", use_bias=False)(inputs)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU()(x)
    shortcut = x
    x = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.ReLU(max_value=6)(x)
    x = layers.Conv2D(32, 1, use_bias=False)(x)
    x = layers.BatchNormalization(momentum=0.9)(x)
    x = layers.Add()([x, shortcut])
    x = layers.MaxPooling2D(2)(x)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.GlobalAveragePooling2D()(x)
    outputs = layers.Dense(10)(x)
    model = keras.Model(inputs, outputs, name="keras3_resnet")
    accuracy = _train(model, _training_data(cifar10_dir), "unit", epochs, from_logits=True, keras=keras)
    model.save(out / "keras3_resnet.keras")
    print(f"keras3_resnet: {model.count_params():,} parameters, test accuracy {accuracy:.4f} (Keras {keras.__version__})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=6, help="most epochs per model (default 6)")
    parser.add_argument("--cifar10-dir", default=os.environ.get("COMPRESS_CIFAR10_DIR"),
                        help="the full CIFAR-10 folder (default $COMPRESS_CIFAR10_DIR); without it, cifar10-mini")
    parser.add_argument("--keras3", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.keras3:
        build_keras3(args.out, args.epochs, args.cifar10_dir)
        return
    environment = {key: value for key, value in os.environ.items() if key != "TF_USE_LEGACY_KERAS"}
    command = [sys.executable, __file__, str(args.out), "--epochs", str(args.epochs), "--keras3"]
    subprocess.run(command + (["--cifar10-dir", args.cifar10_dir] if args.cifar10_dir else []), env=environment,
                   check=True)
    build_tf_keras(args.out, args.epochs, args.cifar10_dir)


if __name__ == "__main__":
    main()
