"""Training-step time of the article CNN and of the distillation student (conv_pool_cnn), TensorFlow's oneDNN
kernels off and on.

Each measurement runs in its own process (TensorFlow reads TF_ENABLE_ONEDNN_OPTS once, at start-up) and trains
one epoch of `--steps` batches of 64 random images after a short warm-up epoch; the settings alternate, round after
round, so that a drift in a shared machine's speed falls on both. Prints the median step time of each process and,
per model, the median over rounds and the ratio off/on.

Usage: python scripts/time_training_step.py [--rounds 3] [--steps 80]
"""

import argparse
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("article_cnn", "conv_pool_cnn")
BATCH = 64


def time_steps(model_name: str, steps: int) -> float:
    """Median milliseconds per training step in this process."""
    import time

    import numpy as np

    from compress.keras import keras

    if model_name == "article_cnn":
        from baseline.model import build_article_cnn

        model = build_article_cnn((32, 32, 3), 10)
    else:
        from compress.students import conv_pool_cnn

        model = conv_pool_cnn((32, 32, 3), 10, 32)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    rng = np.random.default_rng(0)
    images = rng.random((BATCH * steps, 32, 32, 3), dtype=np.float32)
    labels = rng.integers(0, 10, BATCH * steps)
    step_ms = []

    class StepTimer(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.started = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            step_ms.append((time.perf_counter() - self.started) * 1000)

    model.fit(images[: BATCH * 10], labels[: BATCH * 10], batch_size=BATCH, epochs=1, verbose=0)  # warm-up
    model.fit(images, labels, batch_size=BATCH, epochs=1, verbose=0, callbacks=[StepTimer()])
    return statistics.median(step_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--child", choices=MODELS, help=argparse.SUPPRESS)  # one measurement, in a fresh process
    args = parser.parse_args()
    if args.child:
        print(f"{time_steps(args.child, args.steps):.2f}")
        return 0
    medians = {(model, onednn): [] for model in MODELS for onednn in ("0", "1")}
    for round_index in range(args.rounds):
        for model in MODELS:
            for onednn in ("0", "1"):
                env = {**os.environ, "TF_ENABLE_ONEDNN_OPTS": onednn, "PYTHONPATH": str(ROOT)}
                child = subprocess.run([sys.executable, __file__, "--child", model, "--steps", str(args.steps)],
                                       env=env, capture_output=True, text=True, check=True)
                milliseconds = float(child.stdout.strip().splitlines()[-1])
                medians[model, onednn].append(milliseconds)
                print(f"round {round_index + 1}: {model:13s} oneDNN {'on ' if onednn == '1' else 'off'} "
                      f"{milliseconds:6.1f} ms/step", flush=True)
    for model in MODELS:
        off, on = (statistics.median(medians[model, onednn]) for onednn in ("0", "1"))
        print(f"{model:13s} oneDNN off {off:6.1f} ms/step, on {on:6.1f} ms/step: {off / on:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
