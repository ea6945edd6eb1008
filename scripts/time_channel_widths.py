"""Time one architecture at several channel counts in onnxruntime: why structured pruning rounds kept channels.

The architecture is the distillation student `conv_pool_cnn` without BatchNormalization: three blocks of
Conv(3x3, 'same')-ReLU-MaxPool at the given widths, GlobalAveragePool, Dense(10), on 32x32x3 images. Each width set
is exported with tf2onnx (random weights: the time does not depend on them) and timed at batch 1 with one thread,
the files taking turns over `--rounds` rounds; prints the median of the rounds' medians per width set.

Usage: python scripts/time_channel_widths.py [--rounds 10] [--calls 200] [WIDTHS ...]   (WIDTHS like 32,64,128)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from compress.keras import configure  # noqa: E402

DEFAULT_WIDTHS = ["32,64,128", "21,42,84", "24,40,80", "16,48,96", "16,48,80", "16,32,64"]


def onnx_session(widths: tuple[int, ...]):
    import onnxruntime
    import tf2onnx

    from compress.keras import keras, tf

    inputs = x = keras.Input((32, 32, 3))
    for filters in widths:
        x = keras.layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = keras.layers.MaxPooling2D(2, padding="same")(x)
    model = keras.Model(inputs, keras.layers.Dense(10)(keras.layers.GlobalAveragePooling2D()(x)))
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=[tf.TensorSpec((None, 32, 32, 3), tf.float32)],
                                          opset=17)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("widths", nargs="*", default=DEFAULT_WIDTHS)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    configure()
    sessions = {text: onnx_session(tuple(int(part) for part in text.split(","))) for text in args.widths}
    image = np.random.default_rng(0).random((1, 32, 32, 3), dtype=np.float32)
    medians = {text: [] for text in sessions}
    for _ in range(args.rounds):
        for text, session in sessions.items():
            feed = {session.get_inputs()[0].name: image}
            for _ in range(5):
                session.run(None, feed)
            times = []
            for _ in range(args.calls):
                started = time.perf_counter_ns()
                session.run(None, feed)
                times.append(time.perf_counter_ns() - started)
            medians[text].append(statistics.median(times) / 1e6)
    for text, values in medians.items():
        print(f"{text:>12}: {statistics.median(values):.4f} ms")


if __name__ == "__main__":
    main()
