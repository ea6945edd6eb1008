"""Models saved by Keras 3 (`import keras` on TensorFlow 2.16+), rebuilt as the tf_keras models the toolkit runs on.

tf_keras cannot read a Keras 3 file, and a process whose TensorFlow serves tf_keras cannot run Keras 3, so a child
process (compress.keras3_worker) loads the file with Keras 3 and hands back its layer graph, its weights and its
outputs on sample images; here the same graph is built from tf_keras layers, the weights are copied, and the two
models' outputs are compared, so a translation that does not reproduce the model is refused, never returned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from compress.errors import ModelError, first_line
from compress.keras3_layers import MODEL_CLASSES, Builder, check_layers

WORKER_TIMEOUT_S = 600  # loading, serialising and running a large model in Keras 3; a hung child is killed after it
SAMPLE_COUNT = 16  # seeded random images used for the output check when the caller gives none
SAMPLE_SEED = 0

def is_keras3_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a .keras archive written by Keras 3 (read from its metadata; TensorFlow is not imported)."""
    path = Path(path)
    if path.suffix != ".keras" or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            names = set(archive.namelist())
            if "metadata.json" in names:
                version = str(json.loads(archive.read("metadata.json")).get("keras_version", ""))
                if version:
                    return major_version(version) >= 3
            if "config.json" in names:  # no version recorded: Keras 3's serialisation has its own markers
                text = archive.read("config.json").decode("utf-8", "replace")
                return any(marker in text for marker in ('"__keras_tensor__"', '"batch_shape"', '"DTypePolicy"'))
    except (OSError, ValueError, zipfile.BadZipFile):
        return False
    return False


def translate_keras3(path: str | os.PathLike, *, safe_mode: bool = True, sample_images=None):
    """Rebuild the Keras 3 model in `path` (.keras or .h5) as a tf_keras model with the same layers and weights.

    Returns (model, info); info holds keras_version (of the file), max_abs_diff and top1_agreement between the two
    models' outputs on `sample_images` (float32 NHWC; seeded random images in [0, 1] when None) and images (how
    many). Refuses, with a one-line ModelError, a layer tf_keras cannot reproduce and a translation whose outputs
    differ from the original's.
    """
    from compress.kerasmodel import require_one_input_one_output

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if sample_images is not None:
        sample_images = np.asarray(sample_images, dtype=np.float32)
        if sample_images.ndim < 2 or len(sample_images) == 0:
            raise ModelError("sample_images must be a non-empty array of images (NHWC)")
    stored = file_config(path)
    if stored is not None:  # refuse early, before a child process spends seconds loading the file
        check_layers(path, list(layers_in(stored)))
    with tempfile.TemporaryDirectory(prefix="compress-keras3-") as workdir:
        workdir = Path(workdir)
        _run_worker(path, workdir, safe_mode, sample_images)
        config = json.loads((workdir / "config.json").read_text())
        with np.load(workdir / "weights.npz") as saved:
            weights = {key: saved[key] for key in saved.files}
        with np.load(workdir / "inputs.npz") as saved:
            inputs = [saved[key] for key in saved.files]
        with np.load(workdir / "outputs.npz") as saved:
            expected = [saved[key] for key in saved.files]
    builder = Builder(path)
    model = builder.build(config, weights)
    require_one_input_one_output(model, str(path))  # before comparing: which output to compare would be a guess
    info = {"keras_version": file_keras_version(path), "left_out": builder.left_out}
    info.update(_compare(path, model, inputs, expected))
    return model, info


def major_version(version: str) -> int:
    head = version.split(".")[0]
    return int(head) if head.isdigit() else 0


def file_config(path: Path) -> dict | None:
    """The model config stored in a .keras archive or an .h5 file, or None when it cannot be read."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return json.loads(archive.read("config.json"))
        import h5py

        with h5py.File(path, "r") as handle:
            text = handle.attrs.get("model_config")
            return json.loads(text.decode() if isinstance(text, bytes) else text) if text is not None else None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return None


def file_keras_version(path: Path) -> str:
    """The Keras version a .keras or .h5 file records, or "" when it records none."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                return str(json.loads(archive.read("metadata.json")).get("keras_version", ""))
        import h5py

        with h5py.File(path, "r") as handle:
            version = handle.attrs.get("keras_version", "")
            return version.decode() if isinstance(version, bytes) else str(version)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile):
        return ""


def layers_in(config: dict):
    """(name, class_name) of every layer in a serialised model, nested models included (Keras 2 or 3 form)."""
    for layer in config.get("config", {}).get("layers", []) if isinstance(config.get("config"), dict) else []:
        if not isinstance(layer, dict):
            continue
        layer_config = layer.get("config") if isinstance(layer.get("config"), dict) else {}
        yield (layer_config.get("name", layer.get("name", "?")), layer.get("class_name", "?"),
               str(layer.get("module", "")))
        if layer.get("class_name") in MODEL_CLASSES:
            yield from layers_in(layer)


def _run_worker(path: Path, workdir: Path, safe_mode: bool, sample_images) -> None:
    """Load, serialise and run the model in a Keras 3 child process; its failures become one ModelError line."""
    if sample_images is not None:
        np.save(workdir / "samples.npy", sample_images)
    package_root = str(Path(__file__).resolve().parent.parent)
    env = {key: value for key, value in os.environ.items() if key != "TF_USE_LEGACY_KERAS"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    command = [
        sys.executable, "-m", "compress.keras3_worker", str(path.resolve()), str(workdir),
        "1" if safe_mode else "0", "0" if sample_images is None else "1", str(SAMPLE_COUNT), str(SAMPLE_SEED),
    ]  # fmt: skip
    try:
        done = subprocess.run(
            command, cwd=workdir, env=env, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise ModelError(
            f"Keras 3 did not load and run {path} within {WORKER_TIMEOUT_S} s; "
            "check the file, or save the model with tf_keras"
        ) from None
    error_file = workdir / "error.json"
    if error_file.is_file():
        error = json.loads(error_file.read_text())
        message = first_line(error["message"])
        if error["kind"] == "unsafe":
            raise ModelError(
                f"{path} holds a Lambda layer (arbitrary Python code), refused in safe mode; "
                f"rebuild the model from built-in layers ({message})"
            )
        action = "load" if error["kind"] == "load" else "run the images through"
        raise ModelError(f"Keras 3 cannot {action} {path}: {message}")
    if done.returncode != 0:
        last = first_line(done.stderr.strip().splitlines()[-1]) if done.stderr.strip() else f"exit {done.returncode}"
        raise ModelError(f"the Keras 3 loader failed on {path} ({last}); is Keras 3 (the keras package) installed?")


def _compare(path: Path, model, inputs: list[np.ndarray], expected: list[np.ndarray]) -> dict:
    """The tf_keras model's outputs against Keras 3's on the same inputs; a mismatch is a ModelError."""
    got = model.predict(inputs if len(inputs) > 1 else inputs[0], verbose=0, batch_size=32)
    got = got if isinstance(got, (list, tuple)) else [got]
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
        raise ModelError(f"{path}: the tf_keras translation's outputs have other shapes than the Keras 3 model's")
    max_abs_diff = max(float(np.max(np.abs(g.astype(np.float64) - e))) for g, e in zip(got, expected))
    scale = max(1.0, max(float(np.max(np.abs(e))) for e in expected))
    same_top1 = [(g.argmax(-1) == e.argmax(-1)).ravel() for g, e in zip(got, expected)]
    agreement = float(np.mean(np.concatenate(same_top1)))
    info = {"max_abs_diff": max_abs_diff, "top1_agreement": agreement, "images": int(len(inputs[0]))}
    if agreement < 0.999 or not max_abs_diff <= 1e-3 * scale:
        raise ModelError(
            f"{path}: the tf_keras translation does not reproduce the Keras 3 model (max |diff| {max_abs_diff:.3g}, "
            f"top-1 agreement {agreement:.3f} on {info['images']} images); save the model with tf_keras instead"
        )
    return info
