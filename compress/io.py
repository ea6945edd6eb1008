"""Writing results atomically (write, then rename) and loading Keras model files with clear errors."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from compress.errors import ConfigError, ModelError


def check_output_dir(path: str | os.PathLike) -> Path:
    """Refuse an output path that is an existing file; the folder itself is made only when results are written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path {path} is a file, not a folder")
    return path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike):
    """Yield a temporary path beside `target` (same suffix); on success it replaces `target`, else it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.stem}.{os.getpid()}.partial{target.suffix}")
    try:
        yield partial
        os.replace(partial, target)
    finally:
        if partial.exists():
            partial.unlink()


def write_json(target: str | os.PathLike, payload) -> Path:
    with atomic_path(target) as partial:
        partial.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    return Path(target)


def save_model(model, target: str | os.PathLike) -> Path:
    with atomic_path(target) as partial:
        model.save(partial)
    return Path(target)


def load_model(path: str | os.PathLike, *, unsafe: bool = False):
    """Load a .keras file in Keras' safe mode (no arbitrary code) unless `unsafe`; any failure is one ModelError."""
    from compress.keras import keras, tfmot

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if path.suffix != ".keras":
        raise ModelError(f"{path} is not a .keras model file")
    from compress.techniques.qat import loading_objects

    # Models saved mid-compression carry tfmot wrappers; their classes must be known to deserialize, and two of
    # tfmot's quantization classes need the fixed builds in loading_objects() to load from .keras files.
    with (
        tfmot.quantization.keras.quantize_scope(),
        tfmot.clustering.keras.cluster_scope(),
        keras.utils.custom_object_scope(loading_objects()),
    ):
        try:
            return keras.models.load_model(path, compile=False, safe_mode=not unsafe)
        except ValueError as exc:
            if "Lambda" in str(exc) or "safe_mode" in str(exc):
                raise ModelError(
                    f"{path} holds a Lambda layer (arbitrary Python code); pass --unsafe if you trust the file"
                ) from None
            raise ModelError(f"cannot load {path}: {_first_line(exc)}") from None
        except Exception as exc:  # zip, h5 and deserialisation errors all mean "not a usable model file"
            raise ModelError(f"cannot load {path}: {_first_line(exc) or type(exc).__name__}") from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
