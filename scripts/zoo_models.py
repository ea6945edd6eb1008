"""Build and briefly train the models of the zoo benchmark on the shipped CIFAR-10 subset, as users would bring them.

    python3 scripts/zoo_models.py OUT_DIR [--epochs N]

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
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing


def _arrays(input_range: str):
    from compress.data import load_data

    data = load_data("cifar10-mini").with_input_range(input_range)
    return data.normalized("train"), data.normalized("val"), data.normalized("test")


def _train(model, input_range: str, epochs: int, *, from_logits: bool, keras) -> float:
    (x, y), validation, (x_test, y_test) = _arrays(input_range)
    model.compile(optimizer=keras.optimizers.Adam(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits), metrics=["accuracy"])
    model.fit(x, y, batch_size=64, epochs=epochs, validation_data=validation, verbose=2)
    return float(model.evaluate(x_test, y_test, verbose=0)[1])


def build_tf_keras(out: Path, epochs: int) -> None:
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
    for name, (model, input_range, from_logits) in models.items():
        accuracy = _train(model, input_range, epochs * (3 if name == "mobilenetv2" else 1), from_logits=from_logits,
                          keras=keras)
        save_model(model, out / f"{name}.keras")
        print(f"{name}: {model.count_params():,} parameters, test accuracy {accuracy:.4f} ({input_range} pixels)")


def build_keras3(out: Path, epochs: int) -> None:
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
    accuracy = _train(model, "unit", epochs, from_logits=True, keras=keras)
    model.save(out / "keras3_resnet.keras")
    print(f"keras3_resnet: {model.count_params():,} parameters, test accuracy {accuracy:.4f} (Keras {keras.__version__})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--keras3", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.keras3:
        build_keras3(args.out, args.epochs)
        return
    environment = {key: value for key, value in os.environ.items() if key != "TF_USE_LEGACY_KERAS"}
    subprocess.run([sys.executable, __file__, str(args.out), "--epochs", str(args.epochs), "--keras3"],
                   env=environment, check=True)
    build_tf_keras(args.out, args.epochs)


if __name__ == "__main__":
    main()
