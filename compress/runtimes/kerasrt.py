"""A .keras file as a Session, so that Keras models are evaluated the same way as exported files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from compress.kerasmodel import load_model, model_io, two_score_model
from compress.runtimes.session import Session


class KerasSession(Session):
    def __init__(self, path: Path, *, unsafe: bool):
        from compress.keras import keras

        self.model = load_model(path, unsafe=unsafe)
        if tuple(self.model.outputs[0].shape[1:]) == (1,):  # a binary classifier's one score, read as two
            self.model, _ = two_score_model(self.model)
        _, input_shape, _ = model_io(self.model)
        super().__init__(path, "keras", input_shape, dict(runtime=f"tf_keras {keras.__version__}", provider="cpu"))

    def prepare(self, images: np.ndarray) -> np.ndarray:
        return images

    def run_prepared(self, prepared: np.ndarray) -> np.ndarray:
        return np.asarray(self.model(prepared, training=False), dtype=np.float32)
