"""Student architectures for distillation, by name: each builder takes (input_shape, num_classes, width).

Every builder returns a plain Keras functional model that outputs logits and uses only layers that export cleanly to
ONNX and to int8 TFLite/ONNX (Conv2D, BatchNormalization (folded into the convolution on export), ReLU, MaxPooling2D,
GlobalAveragePooling2D, Dense). Keras is imported inside the builders, so that importing this module stays light.
"""

from __future__ import annotations

from typing import Callable


def compact_cnn(input_shape: tuple[int, int, int], num_classes: int, width: int = 16, *, batch_norm: bool = True,
                head: str = "logits"):
    """Conv(w)-Conv(w)-MaxPool-Conv(2w)-MaxPool-Conv(4w)-GlobalAveragePool-Dense(classes), 3x3 'same' convolutions.

    Each convolution is followed by BatchNormalization (unless `batch_norm=False`) and ReLU. Parameters grow about
    with width squared: width 16 is ~28k parameters on 32x32x3 with 10 classes, width 32 ~110k.
    """
    from compress.keras import keras

    if width < 1:
        raise ValueError(f"width must be a positive integer, got {width}")
    layers = keras.layers
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    plan = [(width, "conv1", False), (width, "conv2", True), (2 * width, "conv3", True), (4 * width, "conv4", False)]
    for filters, name, pool_after in plan:
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not batch_norm, name=name)(x)
        if batch_norm:
            # momentum 0.9 (not 0.99): short fine-tunes of a few hundred steps still settle the moving statistics
            x = layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
        x = layers.ReLU(name=f"{name}_relu")(x)
        if pool_after:
            # 'same' pooling keeps inputs as small as 1x1 valid; on even sizes it equals the usual 2x2 pooling.
            x = layers.MaxPooling2D(2, padding="same", name=f"{name}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, name=head)(x)
    return keras.Model(inputs, outputs, name=f"compact_cnn_w{width}")


def conv_pool_cnn(input_shape: tuple[int, int, int], num_classes: int, width: int = 32, *, head: str = "logits",
                  first_stride: int = 1):
    """Three blocks of Conv(3x3 'same')-BatchNorm-ReLU-MaxPool with w, 2w, 4w filters, then GlobalAveragePool-Dense.

    Pooling after every convolution puts the parameters where the images are small: width 32 has ~95k parameters
    and needs about half the multiply-adds of compact_cnn at width 32, so an epoch costs less (the README compares
    the two as distillation students).
    """
    from compress.keras import keras

    if width < 1:
        raise ValueError(f"width must be a positive integer, got {width}")
    layers = keras.layers
    inputs = keras.Input(shape=tuple(input_shape), name="image")
    x = inputs
    for block, filters in enumerate((width, 2 * width, 4 * width), start=1):
        stride = first_stride if block == 1 else 1
        x = layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False, name=f"conv{block}")(x)
        x = layers.BatchNormalization(momentum=0.9, name=f"conv{block}_bn")(x)
        x = layers.ReLU(name=f"conv{block}_relu")(x)
        if stride == 1:
            x = layers.MaxPooling2D(2, padding="same", name=f"conv{block}_pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(num_classes, name=head)(x)
    name = "conv_pool_cnn" if first_stride == 1 else "strided_cnn"
    return keras.Model(inputs, outputs, name=f"{name}_w{width}")


def strided_cnn(input_shape: tuple[int, int, int], num_classes: int, width: int = 32, *, head: str = "logits"):
    """conv_pool_cnn with its first convolution striding 2 in place of its first pooling: a quarter of that
    convolution's multiply-adds and one operator less, for the fastest files."""
    return conv_pool_cnn(input_shape, num_classes, width, head=head, first_stride=2)


# Student name -> builder(input_shape, num_classes, width). distill's `student` setting names one of these.
STUDENTS: dict[str, Callable] = {
    "compact_cnn": compact_cnn,
    "conv_pool_cnn": conv_pool_cnn,
    "strided_cnn": strided_cnn,
}


def build_student(name: str, input_shape: tuple[int, int, int], num_classes: int, width: int, *,
                  head: str = "logits"):
    """The named student architecture for this input and class count (names: STUDENTS); `head` names its last
    layer (a binary teacher's students take its BINARY_SCORES name, so that their files give one score too)."""
    from compress.errors import ConfigError

    if name not in STUDENTS:
        raise ConfigError(f"unknown student {name!r}; known students: {', '.join(STUDENTS)}")
    return STUDENTS[name](tuple(input_shape), int(num_classes), int(width), head=head)
