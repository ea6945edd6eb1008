"""Accuracy of a model file on a data source's test (or validation) split, run in the file's own runtime."""

from __future__ import annotations

import os

import numpy as np

from compress.errors import DataError
from compress.runtimes import open_session


def evaluate_file(
    path: str | os.PathLike, data, *, batch_size: int = 64, unsafe: bool = False, limit: int | None = None,
    split: str = "test",
) -> dict:
    """Top-1 accuracy of a .onnx / .tflite / .keras / .h5 file on one of `data`'s splits, in the file's own runtime.

    Searches decide on "val", so that the test split stays unseen until the chosen files are reported.
    """
    session = open_session(path, unsafe=unsafe)
    channels = session.input_shape[-1] if len(session.input_shape) == 3 else None
    converted = None
    if {channels, data.input_shape[-1]} == {1, 3}:  # as `compress run` fits a model's data: grey <-> RGB
        converted = f"{'RGB' if channels == 1 else 'grey'} images made {'grey' if channels == 1 else 'RGB'}"
        data = data.with_channels(channels)
    images, labels = data.normalized(split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    session.check_input_shape(images.shape[1:])
    outputs = session.predict(images, batch_size)
    if outputs.ndim != 2 or outputs.shape[1] != data.num_classes:
        raise DataError(f"{session.path.name} gives {outputs.shape[1:]} outputs per image; "
                        f"{data.source} has {data.num_classes} classes")
    return {
        "file": str(session.path),
        "format": session.path.suffix.lstrip(".").lower(),
        "runtime": session.runtime,
        "device": "CPU",
        "bytes": session.path.stat().st_size,
        "data": data.source,
        "split": split,
        "images": int(len(labels)),
        "accuracy": float(np.mean(outputs.argmax(-1) == labels)),
        **({"images_converted": converted} if converted else {}),
    }
