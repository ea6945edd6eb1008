"""Models saved by Keras 3 (`import keras` on TensorFlow 2.16+), rebuilt as the tf_keras models the toolkit runs on.

tf_keras cannot read a Keras 3 file, and a process whose TensorFlow serves tf_keras cannot run Keras 3, so a child
process (compress.keras3_worker) loads the file with Keras 3 and hands back its layer graph, its weights and its
outputs on sample images; here the same graph is built from tf_keras layers, the weights are copied, and the two
models' outputs are compared, so a translation that does not reproduce the model is refused, never returned.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from compress.errors import ModelError, first_line

WORKER_TIMEOUT_S = 600  # loading, serialising and running a large model in Keras 3; a hung child is killed after it
SAMPLE_COUNT = 16  # seeded random images used for the output check when the caller gives none
SAMPLE_SEED = 0

SUPPORTED_LAYERS = frozenset(
    "Conv2D Conv1D DepthwiseConv2D SeparableConv2D Conv2DTranspose Dense BatchNormalization LayerNormalization "
    "Activation ReLU LeakyReLU Softmax ELU PReLU MaxPooling2D AveragePooling2D GlobalAveragePooling2D "
    "GlobalMaxPooling2D Add Subtract Multiply Concatenate Average Maximum Dropout SpatialDropout2D Reshape Flatten "
    "ZeroPadding2D Cropping2D UpSampling2D Rescaling Normalization InputLayer Identity".split()
)
_MODELS = frozenset({"Functional", "Sequential"})

# Keras 3 activation names that mean the same function in tf_keras, under the tf_keras name.
_ACTIVATIONS = {
    name: name
    for name in "relu relu6 gelu softmax sigmoid tanh linear elu selu softplus softsign exponential mish".split()
} | {"silu": "swish", "swish": "swish"}
# Keras 3 activations tf_keras lacks or defines differently (its hard_sigmoid is clip(0.2x + 0.5)): built from
# tf_keras layers after the layer, which then gets a linear activation.
_EXPANDED_ACTIVATIONS = frozenset({"hard_sigmoid", "hard_silu", "hard_swish"})

# Layer options tf_keras lacks, dropped when they hold Keras 3's default (which means tf_keras' behaviour).
_DEFAULTS_TF_KERAS_LACKS = {"quantization_config": None, "rms_scaling": False, "lora_rank": None, "optional": False}
_RENAMED = {"LeakyReLU": {"negative_slope": "alpha"}, "InputLayer": {"batch_shape": "batch_input_shape"}}
# Arguments every tf_keras layer takes through **kwargs (base Layer.__init__).
_BASE_LAYER_KWARGS = frozenset({"input_dim", "input_shape", "batch_input_shape", "batch_size", "weights", "autocast"})


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
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if sample_images is not None:
        sample_images = np.asarray(sample_images, dtype=np.float32)
        if sample_images.ndim < 2 or len(sample_images) == 0:
            raise ModelError("sample_images must be a non-empty array of images (NHWC)")
    stored = file_config(path)
    if stored is not None:  # refuse early, before a child process spends seconds loading the file
        for name, class_name in layers_in(stored):
            _check_layer(path, name, class_name, safe_mode)
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
    model = _Builder(path, safe_mode).build(config, weights)
    info = {"keras_version": file_keras_version(path)}
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
        yield layer_config.get("name", layer.get("name", "?")), layer.get("class_name", "?")
        if layer.get("class_name") in _MODELS:
            yield from layers_in(layer)


def _check_layer(path: Path, name: str, class_name: str, safe_mode: bool) -> None:
    if class_name == "Lambda" and safe_mode:
        raise ModelError(
            f"{path}: layer '{name}' is a Lambda layer (arbitrary Python code), refused in safe mode; "
            "rebuild the model from built-in layers"
        )
    if class_name not in SUPPORTED_LAYERS and class_name not in _MODELS:
        raise ModelError(
            f"{path}: layer '{name}' ({class_name}) has no tf_keras translation; rebuild the model from the layers "
            "in compress.keras3.SUPPORTED_LAYERS or save it with tf_keras"
        )


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


class _Builder:
    """Builds tf_keras models from Keras 3 model configs, remembering each weighted layer by its path."""

    def __init__(self, path: Path, safe_mode: bool):
        from compress.keras import keras

        self.keras = keras
        self.path = path
        self.safe_mode = safe_mode
        self.layers: dict[str, object] = {}  # "<outer model>/<layer>" -> tf_keras layer, for copying weights
        self.activations: dict[str, tuple] = {}  # layer name -> its activation's layers, reused by a shared layer

    def build(self, config: dict, weights: dict[str, np.ndarray]):
        model = self._model(config, prefix="")
        self._copy_weights(weights)
        return model

    def _refuse(self, name: str, what: str):
        return ModelError(f"{self.path}: layer '{name}' {what}")

    def _model(self, config: dict, prefix: str):
        if config.get("class_name") == "Sequential":
            return self._sequential(config["config"], prefix)
        return self._functional(config["config"], prefix)

    def _sequential(self, config: dict, prefix: str):
        """A Sequential becomes a Functional chain with the same name and layers (activations may add layers)."""
        keras = self.keras
        layers = list(config["layers"])
        if layers and layers[0]["class_name"] == "InputLayer":
            first = self._translate_config(layers.pop(0))
            inputs = keras.Input(
                batch_shape=first["batch_input_shape"], dtype=first.get("dtype"), name=first["name"]
            )
        elif config.get("build_input_shape"):
            inputs = keras.Input(batch_shape=config["build_input_shape"], name=f"{config['name']}_input")
        else:
            raise self._refuse(config["name"], "(Sequential) records no input shape; build it before saving")
        outputs = inputs
        for layer in layers:
            outputs = self._call(layer, prefix, [outputs], {})
        return keras.Model(inputs, outputs, name=config["name"])

    def _functional(self, config: dict, prefix: str):
        """Rebuilds the graph node by node; a shared layer's later calls may wait for layers listed after it."""
        keras = self.keras
        tensors: dict[tuple, object] = {}
        callables: dict[str, object] = {}
        pending = []
        for layer in config["layers"]:
            if layer["class_name"] == "InputLayer":
                spec = self._translate_config(layer)
                tensors[(spec["name"], 0, 0)] = keras.Input(
                    batch_shape=spec["batch_input_shape"], dtype=spec.get("dtype"), name=spec["name"]
                )
                continue
            pending.extend((layer, index, node) for index, node in enumerate(layer.get("inbound_nodes") or []))
        while pending:
            waiting = []
            for layer, index, node in pending:
                if not all(tuple(history) in tensors for history in _histories(node)):
                    waiting.append((layer, index, node))
                    continue
                args = _resolve(node.get("args", []), tensors)
                kwargs = {k: _resolve(v, tensors) for k, v in node.get("kwargs", {}).items() if v is not None}
                outputs = self._call(layer, prefix, args, kwargs, callables)
                outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
                for position, tensor in enumerate(outputs):
                    tensors[(layer["config"]["name"], index, position)] = tensor
            if len(waiting) == len(pending):
                raise self._refuse(waiting[0][0]["config"]["name"], "has inputs that no layer produces")
            pending = waiting
        ends = []
        for key in ("input_layers", "output_layers"):
            refs = config[key]
            if isinstance(refs, dict):
                raise ModelError(
                    f"{self.path}: model '{config['name']}' has named (dict) inputs or outputs; not supported"
                )
            refs = [refs] if refs and isinstance(refs[0], str) else refs
            found = [tensors[tuple(ref)] for ref in refs]
            ends.append(found if len(found) > 1 else found[0])
        return keras.Model(ends[0], ends[1], name=config["name"])

    def _call(self, layer: dict, prefix: str, args: list, kwargs: dict, callables: dict | None = None):
        """Calls the tf_keras twin of `layer` (made on its first call) on translated arguments."""
        name = layer["config"]["name"]
        callables = {} if callables is None else callables
        if name not in callables:
            _check_layer(self.path, name, layer["class_name"], self.safe_mode)
            if layer["class_name"] in _MODELS:
                callables[name] = (self._model(layer, prefix=f"{prefix}{name}/"), None)
            else:
                callables[name] = self._layer(layer, prefix)
        target, activation = callables[name]
        outputs = target(*args, **kwargs)
        return outputs if activation is None else self._activation(name, activation, outputs)

    def _layer(self, layer: dict, prefix: str):
        """(tf_keras layer, activation to build after it or None) for one Keras 3 layer config."""
        config = self._translate_config(layer)
        activation = None
        if config.get("activation") in _EXPANDED_ACTIVATIONS:
            activation, config["activation"] = config["activation"], "linear"
        try:
            built = self.keras.layers.deserialize({"class_name": layer["class_name"], "config": config})
        except Exception as exc:  # a value tf_keras refuses: one line naming the layer
            problem = f"({layer['class_name']}) cannot be rebuilt in tf_keras: {first_line(exc)}"
            raise self._refuse(config["name"], problem) from exc
        self.layers[f"{prefix}{config['name']}"] = built
        return built, activation

    def _activation(self, name: str, activation: str, x):
        """hard_sigmoid(x) = clip(x/6 + 1/2, 0, 1) as Keras 3 defines it; hard_silu(x) = x * hard_sigmoid(x)."""
        layers = self.keras.layers
        if name not in self.activations:
            self.activations[name] = (
                layers.Rescaling(1 / 6, offset=0.5, name=f"{name}_hard_sigmoid_affine"),
                layers.ReLU(max_value=1.0, name=f"{name}_hard_sigmoid_clip"),
                layers.Multiply(name=f"{name}_hard_silu"),
            )
        affine, clip, multiply = self.activations[name]
        gate = clip(affine(x))
        return gate if activation == "hard_sigmoid" else multiply([x, gate])

    def _translate_config(self, layer: dict) -> dict:
        """A Keras 3 layer config in tf_keras form; options tf_keras lacks are refused unless at their default."""
        class_name = layer["class_name"]
        source = dict(layer["config"])
        name = source.get("name", "?")
        for old, new in _RENAMED.get(class_name, {}).items():
            if old in source:
                source[new] = source.pop(old)
        accepted = _accepted_arguments(getattr(self.keras.layers, class_name))
        config = {}
        for key, value in source.items():
            if key not in accepted:
                if key in _DEFAULTS_TF_KERAS_LACKS and value == _DEFAULTS_TF_KERAS_LACKS[key]:
                    continue
                raise self._refuse(name, f"({class_name}) sets {key}={first_line(value, 40)}, which tf_keras lacks")
            if key == "dtype":
                value = self._dtype(name, value)
            elif key.endswith("activation") and key != "activity_regularizer":
                value = self._activation_name(name, class_name, value)
            elif key.endswith("_initializer"):
                value = self._serialized(self.keras.initializers, value)
                if value is None:  # an initializer only matters before weights are copied: tf_keras' default
                    continue
            elif key.endswith(("_regularizer", "_constraint")) and value is not None:
                module = self.keras.regularizers if key.endswith("_regularizer") else self.keras.constraints
                translated = self._serialized(module, value)
                if translated is None:
                    problem = f"({class_name}) has a {key} tf_keras does not know; drop it and save again"
                    raise self._refuse(name, problem)
                value = translated
            config[key] = value
        return config

    def _dtype(self, name: str, value):
        if not isinstance(value, dict):
            return value
        if value.get("class_name") not in ("DTypePolicy", "FloatDTypePolicy"):
            raise self._refuse(name, f"uses the {value.get('class_name')} dtype policy (quantized); not supported")
        return value["config"]["name"]

    def _activation_name(self, name: str, class_name: str, value):
        if isinstance(value, str) and (value in _EXPANDED_ACTIVATIONS or value in _ACTIVATIONS):
            return value if value in _EXPANDED_ACTIVATIONS else _ACTIVATIONS[value]
        shown = value if isinstance(value, str) else "a custom function"
        raise self._refuse(name, f"({class_name}) uses activation {shown}, which tf_keras lacks; use a built-in one")

    @staticmethod
    def _serialized(module, value):
        """A Keras 3 initializer/regularizer/constraint in tf_keras form, or None when tf_keras has no such class."""
        if isinstance(value, str):
            try:
                module.get(value)
            except (ValueError, TypeError):
                return None
            return value
        if not isinstance(value, dict) or "class_name" not in value:
            return None
        try:
            cls = type(module.get({"class_name": value["class_name"], "config": {}}))
        except (ValueError, TypeError):
            return None
        accepted = _accepted_arguments(cls)
        config = {k: v for k, v in (value.get("config") or {}).items() if k in accepted}
        return {"class_name": value["class_name"], "config": config}

    def _copy_weights(self, weights: dict[str, np.ndarray]) -> None:
        """Copies each layer's weights (same order in both Keras) and checks every weighted layer got its own."""
        grouped: dict[str, list[tuple[int, np.ndarray]]] = {}
        for key, array in weights.items():
            layer_path, index = key.rsplit(":", 1)
            grouped.setdefault(layer_path, []).append((int(index), array))
        for layer_path, layer in self.layers.items():
            arrays = [array for _, array in sorted(grouped.pop(layer_path, []), key=lambda item: item[0])]
            targets = layer.get_weights()
            shapes = [tuple(a.shape) for a in arrays]
            if shapes != [tuple(t.shape) for t in targets]:
                raise self._refuse(
                    layer_path, f"({type(layer).__name__}) has weights {shapes} in Keras 3 but tf_keras expects "
                    f"{[tuple(t.shape) for t in targets]}"
                )
            if arrays:
                layer.set_weights(arrays)
        if grouped:
            raise self._refuse(next(iter(grouped)), "has weights but no tf_keras twin")


def _accepted_arguments(cls) -> set[str]:
    """Constructor arguments of a Keras class, its bases' included where it passes **kwargs on."""
    accepted = set()
    for klass in cls.__mro__:
        if "__init__" not in klass.__dict__:
            continue
        parameters = inspect.signature(klass.__init__).parameters.values()
        accepted |= {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)} - {"self"}
        if not any(p.kind == p.VAR_KEYWORD for p in parameters):
            return accepted
        if klass.__name__ == "Layer":  # tf_keras' base Layer takes more keywords than its signature shows
            return accepted | _BASE_LAYER_KWARGS
    return accepted


def _histories(value):
    """Every keras_history [layer, node, tensor] referenced in a serialised call argument."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            yield value["config"]["keras_history"]
        else:
            for item in value.values():
                yield from _histories(item)
    elif isinstance(value, list):
        for item in value:
            yield from _histories(item)


def _resolve(value, tensors: dict):
    """A serialised call argument with its Keras 3 tensors replaced by the tf_keras ones."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            return tensors[tuple(value["config"]["keras_history"])]
        return {key: _resolve(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, tensors) for item in value]
    return value


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
