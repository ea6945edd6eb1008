"""Runs in a child process with Keras 3: loads a model file and writes what compress.keras3 needs to rebuild it.

A process whose TensorFlow was imported for tf_keras cannot load Keras 3 models, so this module must never import
compress.keras. Usage: python -m compress.keras3_worker MODEL WORKDIR SAFE_MODE(0|1) SAMPLES(0|1) COUNT SEED.
It writes into WORKDIR: config.json (the model serialised by Keras 3), weights.npz (each layer's weights under
"<layer path>:<index>"), inputs.npz and outputs.npz (the model's outputs on the given or seeded random inputs),
or error.json ({"kind", "message"}) when the model cannot be loaded or run.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np


def _leaf_weights(model, prefix: str = "") -> dict[str, np.ndarray]:
    """Every weight of every non-model layer, nested models walked, keyed "<outer>/<inner>:<index>"."""
    weights = {}
    for layer in model.layers:
        path = f"{prefix}{layer.name}"
        if hasattr(layer, "layers"):
            weights.update(_leaf_weights(layer, f"{path}/"))
            continue
        weights.update({f"{path}:{index}": np.asarray(w.numpy()) for index, w in enumerate(layer.weights)})
    return weights


def _inputs(model, workdir: Path, use_samples: bool, count: int, seed: int) -> list[np.ndarray]:
    """The parent's sample images when given, else seeded random values in [0, 1] of each input's shape."""
    if use_samples:
        samples = np.load(workdir / "samples.npy")
        wanted = model.inputs[0].shape[1:] if len(model.inputs) == 1 else None
        if wanted is not None and len(wanted) == samples.ndim - 1 and all(
                dim is None or dim == size for dim, size in zip(wanted, samples.shape[1:])):
            return [samples]
        # images the model cannot take: the translation is proven on random ones, the size check refuses the data
    rng = np.random.default_rng(seed)
    arrays = []
    for tensor in model.inputs:
        shape = [dim if dim is not None else 32 for dim in tensor.shape[1:]]
        arrays.append(rng.random((count, *shape), dtype=np.float32))
    return arrays


def main(argv: list[str]) -> int:
    model_path, workdir, safe_mode, use_samples, count, seed = argv
    workdir = Path(workdir)

    def fail(kind: str, exc: BaseException) -> int:
        lines = str(exc).strip().splitlines()
        message = lines[0] if lines else type(exc).__name__
        (workdir / "error.json").write_text(json.dumps({"kind": kind, "message": message}))
        return 3

    os.environ.pop("TF_USE_LEGACY_KERAS", None)  # set, TensorFlow would hand this process tf_keras, not Keras 3
    import keras

    try:
        model = keras.saving.load_model(model_path, compile=False, safe_mode=safe_mode == "1")
    except Exception as exc:  # every loading failure is reported as one line to the parent
        unsafe = "safe_mode" in str(exc) or "Lambda" in str(exc)
        return fail("unsafe" if unsafe else "load", exc)
    (workdir / "config.json").write_text(json.dumps(keras.saving.serialize_keras_object(model)))
    np.savez(workdir / "weights.npz", **_leaf_weights(model))
    try:
        inputs = _inputs(model, workdir, use_samples == "1", int(count), int(seed))
        if len(inputs) != len(model.inputs):
            raise ValueError(f"the model has {len(model.inputs)} inputs; sample images feed only one")
        outputs = model.predict(inputs if len(inputs) > 1 else inputs[0], verbose=0, batch_size=32)
    except Exception as exc:  # a model that loads but cannot run on the images
        return fail("run", exc)
    outputs = list(outputs.values()) if isinstance(outputs, dict) else outputs  # named outputs, in config order
    outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
    np.savez(workdir / "inputs.npz", *inputs)
    np.savez(workdir / "outputs.npz", *[np.asarray(o) for o in outputs])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
