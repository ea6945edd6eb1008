"""Keras model files and what the toolkit needs to know about a Keras model, in one place no technique owns.

Loading (safe mode unless asked otherwise; tfmot's wrapper classes known), saving, recognising and stripping tfmot's
training wrappers, the one-image-input / one-output shape every technique assumes, and the model's outputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
import zipfile
from pathlib import Path

import numpy as np

from compress.errors import ExportError, ModelError, first_line
from compress.files import atomic_path

MODEL_SUFFIXES = (".keras", ".h5")
_QAT_CLASSES = {"QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer"}
_PRUNE_CLASSES = {"PruneLowMagnitude"}
_CLUSTER_CLASSES = {"ClusterWeights", "ClusterWeightsMHA"}
# The layer that gives a one-score binary classifier one score per class (`two_score_model`): its name marks the
# model, and every model made from it, as one whose files give the single score back (`one_score_model`).
BINARY_SCORES = "compress_binary_scores"


def load_model(path: str | os.PathLike, *, unsafe: bool = False, sample_images: np.ndarray | None = None):
    """A .keras or .h5 model as a tf_keras model (see `load_model_with_source`)."""
    return load_model_with_source(path, unsafe=unsafe, sample_images=sample_images)[0]


def load_model_with_source(path: str | os.PathLike, *, unsafe: bool = False,
                           sample_images: np.ndarray | None = None) -> tuple:
    """(tf_keras model, where it came from) for a .keras or .h5 file, in Keras' safe mode unless `unsafe`.

    Files written by Keras 3 are translated into the equivalent tf_keras model and the translation is checked on
    `sample_images` (seeded random images without them); the source says which Keras wrote the file and how closely
    the translation reproduced it. Any failure is one ModelError line.
    """
    from compress.keras3 import (
        file_config,
        file_keras_version,
        is_keras3_file,
        layers_in,
        major_version,
        translate_keras3,
    )
    from compress.keras3_layers import MODEL_CLASSES

    path = Path(path)
    if path.is_dir():
        raise ModelError(f"{path} is a folder (a SavedModel?); compress reads .keras and .h5 files: load it in Keras "
                         "and save it with model.save('model.keras')")
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    if path.suffix not in MODEL_SUFFIXES:
        raise ModelError(f"{path} is not a .keras or .h5 model file")
    if path.suffix == ".h5" and _holds_weights_only(path):
        raise ModelError(f"{path} holds weights only (model.save_weights), not the model; save the whole model with "
                         "model.save('model.keras')")
    model_class = (file_config(path) or {}).get("class_name")
    if model_class and model_class not in MODEL_CLASSES | {"Model"}:  # "Model": functional models before TF 2.4
        raise ModelError(f"{path} holds a subclassed model (class {model_class}): its layers are joined by its Python "
                         "code, which the file does not hold; build the same layers with the functional API or "
                         "keras.Sequential and save that")
    version = file_keras_version(path)
    if is_keras3_file(path) or (path.suffix == ".h5" and major_version(version) >= 3):
        model, info = translate_keras3(path, safe_mode=not unsafe, sample_images=sample_images)
        return model, {"file": path.name, "keras": f"Keras {info['keras_version']}", "translated_to_tf_keras": True,
                       **{key: info[key] for key in ("max_abs_diff", "top1_agreement", "images", "left_out")}}
    if path.suffix == ".h5" and not unsafe:  # tf_keras ignores safe_mode for .h5 files
        lambdas = [name for name, kind, _ in layers_in(file_config(path) or {}) if kind == "Lambda"]
        if lambdas:
            raise ModelError(f"{path} holds a Lambda layer ({lambdas[0]}: arbitrary Python code); pass --unsafe if "
                             "you trust the file")
    try:
        model = _load_tf_keras(path, unsafe)
    except ModelError:
        if path.suffix != ".h5" or version:
            raise
        model, info = translate_keras3(path, safe_mode=not unsafe, sample_images=sample_images)  # no version: try 3
        return model, {"file": path.name, "keras": "Keras 3", "translated_to_tf_keras": True,
                       **{key: info[key] for key in ("max_abs_diff", "top1_agreement", "images", "left_out")}}
    require_one_input_one_output(model, str(path))
    return model, {"file": path.name, "keras": f"tf_keras {version}".strip(), "translated_to_tf_keras": False}


def require_one_input_one_output(model, what: str) -> None:
    """Refuse (one ModelError line) a model without exactly one input and one output: an image classifier's scores
    are one output; an auxiliary head or a second input leaves which one to compress to a guess."""
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not inputs or not outputs:
        raise ModelError(f"{what} has no defined inputs; build it as a Sequential or functional model on an Input")
    if len(inputs) == 1 and len(outputs) == 1:
        return
    names = list(getattr(model, "output_names", None) or [])
    hint = (f": save a model of the output you deploy, e.g. keras.Model(model.input, "
            f"model.get_layer({names[0]!r}).output)" if len(inputs) == 1 and names else "")
    counts = " and ".join(f"{len(ends)} {kind}{'s' if len(ends) != 1 else ''}"
                          for ends, kind in ((inputs, "input"), (outputs, "output")))
    raise ModelError(f"{what} has {counts}"
                     + (f" ({', '.join(names)})" if len(outputs) > 1 and names else "")
                     + f"; compress handles image classifiers with one image input and one output{hint}")


def _holds_weights_only(path: Path) -> bool:
    """An HDF5 file of layer weights without the model config that save() writes beside them."""
    import h5py

    try:
        with h5py.File(path, "r") as handle:
            return "model_config" not in handle.attrs and ("layers" in handle or "layer_names" in handle.attrs)
    except OSError:  # not HDF5: the loader names the file as damaged
        return False


def translation_note(source: dict) -> str | None:
    """The line that says a Keras 3 file was translated and how closely (None for a tf_keras file)."""
    if not source.get("translated_to_tf_keras"):
        return None
    left_out = source.get("left_out") or []
    return (f"{source['file']}: written by {source['keras']}, translated to tf_keras; on {source['images']} images "
            f"top-1 agreement {source['top1_agreement']:.2%}, max |diff| {source['max_abs_diff']:.2g}"
            + (f"; left out {', '.join(left_out)}: data augmentation, which acts only in training" if left_out else ""))


def loading_scope() -> contextlib.ExitStack:
    """The classes a saved model may name: models saved mid-compression carry tfmot wrappers and quantizers, and
    two of tfmot's quantization classes need the fixed builds in loading_objects() to load from .keras files."""
    from compress.keras import keras, tfmot

    scope = contextlib.ExitStack()
    for context in (tfmot.quantization.keras.quantize_scope(), tfmot.clustering.keras.cluster_scope(),
                    keras.utils.custom_object_scope(loading_objects())):
        scope.enter_context(context)
    return scope


def _load_tf_keras(path: Path, unsafe: bool):
    from compress.keras import keras

    with loading_scope():
        try:
            return keras.models.load_model(path, compile=False, safe_mode=not unsafe)
        except ValueError as exc:
            if "Lambda" in str(exc) or "safe_mode" in str(exc):
                raise ModelError(
                    f"{path} holds a Lambda layer (arbitrary Python code); pass --unsafe if you trust the file"
                ) from exc
            raise _load_error(path, exc) from exc
        except Exception as exc:  # zip, h5 and deserialisation errors all mean "not a usable model file"
            if not zipfile.is_zipfile(path) and path.read_bytes()[:8] != b"\x89HDF\r\n\x1a\n":
                raise ModelError(f"{path} is not a Keras model file (neither a .keras archive nor HDF5): damaged, "
                                 "or another format; save the model with model.save('model.keras')") from exc
            raise _load_error(path, exc) from exc


# how tf_keras names a class it cannot find: .h5 files, .keras files, registered names it has no code for
# (a Sequential in a .keras file hands on the class name as a string)
_UNKNOWN_CLASS = re.compile(r"Unknown (?:layer|object|activation)s?: '([^']+)'|Cannot deserialize object of type "
                            r"`([^`]+)`|Could not locate class '([^']+)'|Received: layer=(\w+) of type <class 'str'>")


def _load_error(path: Path, exc: Exception) -> ModelError:
    """One line for a file tf_keras cannot load; a custom class (the user's own layer) is named, with what to do:
    Keras' own text asks for a custom_object_scope, which the command line cannot give."""
    unknown = _UNKNOWN_CLASS.search(str(exc))
    if unknown:
        name = next(group for group in unknown.groups() if group)
        return ModelError(f"{path} uses {name!r}, a custom class whose code the file does not hold (and that no "
                          "technique could quantize or prune): build the model from built-in Keras layers and save "
                          "that")
    return ModelError(f"cannot load {path}: {first_line(exc)}")


def save_model(model, target: str | os.PathLike) -> Path:
    with atomic_path(target) as partial:
        model.save(partial)
    return Path(target)


def loading_objects() -> dict:
    """Replacements for two tfmot classes that do not load back from .keras files (tfmot PR 1123, unmerged), and
    tf_keras' ConvNeXt layers, which it saves by a name it never registers.

    QuantizeLayer does not mark itself built, so loading builds it twice (5 variables for 3 saved);
    QuantizeWrapperV2 lists its inner layer's weights before building that layer, so the bias goes missing.
    Same names and configs as tfmot's, so files saved either way load either way. Use inside quantize_scope().
    """
    global _LOADING_OBJECTS
    if _LOADING_OBJECTS is None:
        from compress.keras import tfmot

        with tfmot.quantization.keras.quantize_scope() as scope:
            known = {name: cls for table in scope.custom_objects for name, cls in table.items()}

        class QuantizeLayer(known["QuantizeLayer"]):
            def build(self, input_shape):
                super().build(input_shape)
                self.built = True

        class QuantizeWrapperV2(known["QuantizeWrapperV2"]):
            def build(self, input_shape):
                if not self.layer.built:
                    self.layer.build(input_shape)
                    self.layer.built = True
                super().build(input_shape)

        # keras.applications' ConvNeXt layers: tf_keras saves them by name but does not register them for loading
        from tf_keras.src.applications.convnext import LayerScale, StochasticDepth

        _LOADING_OBJECTS = {"QuantizeLayer": QuantizeLayer, "QuantizeWrapperV2": QuantizeWrapperV2,
                            "LayerScale": LayerScale, "StochasticDepth": StochasticDepth}
    return dict(_LOADING_OBJECTS)


_LOADING_OBJECTS = None


def variable_short_name(variable) -> str:
    """A layer variable's own name without its layer path and index: 'quant_conv/kernel_min:0' -> 'kernel_min'."""
    return variable.name.rsplit("/", 1)[-1].split(":", 1)[0]


def is_qat_model(model) -> bool:
    """True for a model holding tfmot quantization wrappers (QAT, prune- or cluster-preserving QAT)."""
    return any(_is_one_of(layer, _QAT_CLASSES) for layer in _layers(model))


def strip_training_wrappers(model):
    """Remove tfmot pruning / clustering wrappers left on a model; returns (model, names of what was stripped)."""
    from compress.keras import tfmot

    stripped = []
    if any(_is_one_of(layer, _PRUNE_CLASSES) for layer in _layers(model)):
        model = _strip(tfmot.sparsity.keras.strip_pruning, model, "pruning")
        stripped.append("pruning")
    if any(_is_one_of(layer, _CLUSTER_CLASSES) for layer in _layers(model)):
        model = _strip(tfmot.clustering.keras.strip_clustering, model, "clustering")
        stripped.append("clustering")
    return model, stripped


def _strip(function, model, what: str):
    try:
        return function(model)
    except Exception as exc:  # tfmot raises ValueError or TypeError for models it cannot clone
        raise ExportError(f"cannot strip the {what} wrappers from the model: {first_line(exc)}") from exc


def model_io(model) -> tuple[str, tuple[int, ...], str]:
    """(input name, input shape without batch, output name) of a one-input, one-output image model."""
    inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
    if not inputs or not outputs:
        raise ModelError(
            "the model has no defined inputs; compress needs a Sequential or functional model built on an Input"
        )
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelError(f"the model has {len(inputs)} inputs and {len(outputs)} outputs; compress handles one of each")
    shape = tuple(inputs[0].shape[1:])
    if any(dim is None for dim in shape):
        raise ModelError(
            f"the model's input shape {shape_text(shape)} is not fully known; build it on a fixed-size Input"
        )
    input_name = (getattr(model, "input_names", None) or ["input"])[0]
    output_name = (getattr(model, "output_names", None) or ["output"])[0]
    return input_name, tuple(int(dim) for dim in shape), output_name


def built_at_size(model, image_shape: tuple[int, int, int]):
    """`model` as it is when its input size is fully known; else the same layers and weights on an Input of
    `image_shape` (height, width, channels), so that every technique, export and timing works on one fixed size."""
    from compress.keras import keras

    if None not in tuple(model.inputs[0].shape[1:]):
        return model
    name = (getattr(model, "input_names", None) or [None])[0]
    try:
        sized = keras.models.clone_model(model, input_tensors=keras.Input(shape=tuple(image_shape), name=name))
        sized.set_weights(model.get_weights())
    except Exception as exc:  # clone_model raises several types for models it cannot rebuild
        raise ModelError(f"the model takes images of any size, and rebuilding it at {shape_text(image_shape)} failed: "
                         f"{first_line(exc)}; save it built on a fixed-size Input") from None
    return sized


def two_score_model(model) -> tuple:
    """(model, kind) for a binary classifier ending in Dense(1) (sigmoid, or linear for a logit, the sigmoid also
    as its own Activation layer): the same classifier with one score per class, which every technique works with.
    Its last layer is Dense(2) on the same input, kernel [-w/2, w/2] and bias [-b/2, b/2], so that its scores are
    [-z/2, z/2] for the logit z (a softmax of them is [1 - sigmoid(z), sigmoid(z)]), with a softmax for a sigmoid
    model: the same predictions, and the same probabilities, exactly."""
    from compress.keras import keras

    layers = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    last = layers[-1] if layers else None
    kind = "logit"
    if isinstance(last, keras.layers.Activation) and last.activation is keras.activations.sigmoid and len(layers) > 1:
        last, kind = (layers[-2] if last.input is layers[-2].output else None), "sigmoid"
    if not isinstance(last, keras.layers.Dense) or last.units != 1:
        raise ModelError("the model gives one score per image but does not end in a Dense(1) layer; compress "
                         "compares one score per class: end the model in Dense(2) (softmax or logits)")
    if last.activation is keras.activations.sigmoid:
        kind = "sigmoid"
    elif last.activation is not keras.activations.linear:
        raise ModelError(f"the model's one score comes from {last.name} with activation {last.activation.__name__}; "
                         "compress reads a single score as a sigmoid probability or a logit")
    head = keras.layers.Dense(2, activation="softmax" if kind == "sigmoid" else None, name=BINARY_SCORES)
    scores = head(last.input)
    kernel, bias = (last.get_weights() + [np.zeros(1, np.float32)])[:2]
    head.set_weights([np.concatenate([-kernel / 2, kernel / 2], axis=1), np.concatenate([-bias / 2, bias / 2])])
    return keras.Model(model.inputs, scores, name=model.name), kind


def flat_scores_model(model):
    """`model`, whose scores per image have the shape 1x...x1xC (a fully convolutional classifier: a 1x1
    convolution after a global pooling that kept its dimensions), with them reshaped to C, as every technique,
    check and file compares them."""
    from compress.keras import keras

    scores = model.outputs[0]
    flat = keras.layers.Reshape((scores.shape[-1],), name=f"{model.name}_flat_scores")(scores)
    return keras.Model(model.inputs, flat, name=model.name)


def scoring_layer(model):
    """The layer whose output the model's scores are: its last one, looked through a Reshape or Flatten (and the
    tfmot wrapper around one) to the layer before it."""
    layer = model.layers[-1]
    while type(getattr(layer, "layer", layer)).__name__ in ("Reshape", "Flatten"):
        inbound = layer._inbound_nodes[0].inbound_layers  # noqa: SLF001 - Keras 2 exposes calls only this way
        if not inbound or isinstance(inbound, list):
            break
        layer = inbound
    return layer


def binary_kind(model) -> str | None:
    """"sigmoid" or "logit" for a model with the two scores of `two_score_model` (also once QAT-wrapped): what
    single score its files give back; None for any other model."""
    from compress.checks import outputs_probabilities

    last = model.layers[-1]
    if getattr(last, "layer", last).name != BINARY_SCORES:
        return None
    return "sigmoid" if outputs_probabilities(model) else "logit"


def one_score_model(model) -> tuple:
    """(model for the files, binary kind or None): `model` with its two scores made the one score of the user's
    model again (the second probability, or the logit s1 - s0), by a fixed Dense(1); any other model as it is."""
    from compress.keras import keras

    kind = binary_kind(model)
    if kind is None:
        return model, None
    select = keras.layers.Dense(1, use_bias=False, name="binary_score")
    score = select(model.outputs[0])
    select.set_weights([np.array([[0.0], [1.0]] if kind == "sigmoid" else [[-1.0], [1.0]], np.float32)])
    return keras.Model(model.inputs, score, name=model.name), kind


def scores_per_class(outputs: np.ndarray, kind: str | None) -> np.ndarray:
    """A file's outputs as one score per class: a binary classifier's single score (`kind`: sigmoid or logit)
    becomes the two scores its Keras model gives, [1 - p, p] or [-z/2, z/2]; other outputs as they are."""
    if kind is None or outputs.ndim != 2 or outputs.shape[1] != 1:
        return outputs
    if kind == "sigmoid":
        return np.concatenate([1 - outputs, outputs], axis=1)
    return np.concatenate([-outputs / 2, outputs / 2], axis=1)


def rebuilt_from_config(model, config: dict, weights: dict, *, pixel_values: bool = False, atol: float = 1e-5,
                        rtol: float = 0.0):
    """`model` rebuilt from its rewritten `config`, each layer's weights from `weights` (by name) or else from the
    layer of that name in `model`; None where the rebuilt model does not compute what `model` does on two random
    images ([0, 1) values, or with `pixel_values` integers 0-255) within `atol` + `rtol` (a graph the rewrite does
    not understand: left to the refusal that names the layer)."""
    with loading_scope():
        rebuilt = type(model).from_config(config)
    for layer in rebuilt.layers:
        if layer.weights:
            layer.set_weights(weights[layer.name] if layer.name in weights else
                              model.get_layer(layer.name).get_weights())
    shape = (2, *[32 if dim is None else dim for dim in model.input_shape[1:]])  # any size a fully conv. model takes
    rng = np.random.default_rng(0)
    probe = rng.integers(0, 256, shape).astype(np.float32) if pixel_values else rng.random(shape, dtype=np.float32)
    if not np.allclose(model(probe, training=False), rebuilt(probe, training=False), atol=atol, rtol=rtol):
        return None
    return rebuilt


def without_pass_through_layers(model) -> tuple:
    """(`model` without the layers that pass their input through unchanged at inference, [their names]): data
    augmentation (RandomFlip, RandomRotation and their kind, also a nested model made of nothing else, as the Keras
    guides' `data_augmentation` block), noise (GaussianNoise, GaussianDropout, AlphaDropout) and
    ActivityRegularization act only in training, Identity never; tfmot's quantization and channel pruning refuse
    them. The model is rebuilt without them and checked to compute the same."""
    from compress.keras3_layers import PASS_THROUGH_LAYERS

    def passes_through(layer) -> bool:
        inner = [item for item in getattr(layer, "layers", None) or [] if type(item).__name__ != "InputLayer"]
        return type(layer).__name__ in PASS_THROUGH_LAYERS or (bool(inner) and all(map(passes_through, inner)))

    dropped = [layer.name for layer in model.layers if passes_through(layer)
               and len(layer._inbound_nodes) == 1]  # noqa: SLF001 - Keras 2 exposes calls only this way
    if not dropped:
        return model, []
    config = model.get_config()
    sources = {}  # dropped layer -> the [layer, node, tensor] it read
    for layer in config["layers"]:
        if layer["config"]["name"] in dropped and "inbound_nodes" in layer:
            sources[layer["config"]["name"]] = rerouted_references(layer["inbound_nodes"][0][0][:3], sources)
    config["layers"] = [layer for layer in config["layers"] if layer["config"]["name"] not in dropped]
    for layer in config["layers"]:
        if "inbound_nodes" in layer:
            layer["inbound_nodes"] = rerouted_references(layer["inbound_nodes"], sources)
    if "output_layers" in config:
        config["output_layers"] = rerouted_references(config["output_layers"], sources)
    rebuilt = rebuilt_from_config(model, config, {})
    if rebuilt is None:
        raise ModelError(f"leaving out the pass-through layers {', '.join(dropped)} changed what the model computes; "
                         "save the model without them")
    return rebuilt, dropped


def rerouted_references(nodes, sources: dict):
    """Inbound-node references ([layer, node, tensor, kwargs] lists, nested) in a model config, those to a layer
    named in `sources` pointed at the [layer, node, tensor] given for it instead."""
    if isinstance(nodes, list) and len(nodes) >= 3 and isinstance(nodes[0], str) and isinstance(nodes[1], int):
        return [*sources[nodes[0]], *nodes[3:]] if nodes[0] in sources else nodes
    if isinstance(nodes, list):
        return [rerouted_references(node, sources) for node in nodes]
    return nodes


def keras_outputs(model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """The Keras model's float32 outputs for `images`, computed in batches (inference mode)."""
    return np.concatenate([
        np.asarray(model(images[i:i + batch_size], training=False), dtype=np.float32)
        for i in range(0, len(images), batch_size)
    ])


def weights_sha256(model) -> str:
    """sha256 over the model's weights in order (shape, dtype and bytes; names vary between sessions)."""
    digest = hashlib.sha256()
    for weight in model.weights:
        array = np.ascontiguousarray(weight.numpy())
        digest.update(f"{array.shape}|{array.dtype}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def keras_weight_sparsity(model) -> float:
    """Share of exact zeros among the model's weights of rank >= 2 (kernels), the ones pruning sets to zero.

    For a QAT model these are the float kernels before quantization; a cluster-preserving QAT model computes its
    weights from centroids, so its raw kernels say little about the zeros of the exported file.
    """
    arrays = [np.asarray(weight.numpy()) for weight in model.weights if len(weight.shape) >= 2]
    total = sum(array.size for array in arrays)
    return sum(int(np.count_nonzero(array == 0)) for array in arrays) / total if total else 0.0


def _layers(model):
    submodules = getattr(model, "submodules", None)
    return list(submodules) if submodules is not None else list(getattr(model, "layers", []))


def _is_one_of(layer, class_names: set[str]) -> bool:
    return any(cls.__name__ in class_names for cls in type(layer).__mro__)


def shape_text(shape) -> str:
    """32x32x3, an unknown dimension (None) as ?: ?x?x3."""
    return "x".join("?" if dim is None else str(dim) for dim in shape)


def count_macs(model) -> int:
    """Multiply-accumulates of one image's forward pass through the Conv2D, DepthwiseConv2D, SeparableConv2D,
    Conv2DTranspose and Dense layers (other layers count 0; biases are not multiplies).

    Output shapes carry strides and padding, so a strided or 'valid' convolution is counted as computed.
    """
    return sum(layer_macs(model).values())


def layer_macs(model) -> dict[str, int]:
    """`count_macs` per top-level layer name (a nested model counts as one layer; a shared layer adds up its calls);
    layers without multiplies are left out."""
    from compress.keras import keras

    if not getattr(model, "_is_graph_network", False):
        raise ModelError(f"cannot count multiply-adds of model {model.name!r}: build it (give it an input shape) first")
    per_layer: dict[str, int] = {}
    for node in graph_nodes(model):
        layer = getattr(node.layer, "layer", node.layer)  # tfmot wrappers compute what the layer they wrap does
        macs = count_macs(layer) if isinstance(layer, keras.Model) else _node_macs(layer, node)
        if macs:
            per_layer[node.layer.name] = per_layer.get(node.layer.name, 0) + macs
    return per_layer


def _node_macs(layer, node) -> int:
    """Multiply-adds of one call of a weight layer (0 for layers that do not multiply weights)."""
    from compress.keras import keras

    layers = keras.layers
    if not isinstance(layer, (layers.Conv2D, layers.DepthwiseConv2D, layers.SeparableConv2D, layers.Dense)):
        return 0
    inputs, outputs = flat_tensors(node.keras_inputs), flat_tensors(node.outputs)
    shape_in, shape_out = known_shape(layer, inputs[0]), known_shape(layer, outputs[0])
    c_in, out_size = shape_in[-1], math.prod(shape_out[1:])
    if isinstance(layer, layers.Dense):
        return int(out_size * c_in)
    if isinstance(layer, layers.Conv2DTranspose):  # every input pixel is spread over a kernel window
        return int(math.prod(shape_in[1:]) * math.prod(layer.kernel_size) * layer.filters)
    if isinstance(layer, layers.DepthwiseConv2D):
        return int(out_size * math.prod(layer.kernel_size))
    if isinstance(layer, layers.SeparableConv2D):
        pixels, middle = math.prod(shape_out[1:-1]), c_in * layer.depth_multiplier
        return int(pixels * middle * (math.prod(layer.kernel_size) + shape_out[-1]))
    return int(out_size * math.prod(layer.kernel_size) * c_in // layer.groups)


def graph_nodes(model) -> list:
    """The model's own nodes, inputs first."""
    by_depth = model._nodes_by_depth
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]


def flat_tensors(tensors) -> list:
    from compress.keras import tf

    return tf.nest.flatten(tensors)


def known_shape(layer, tensor) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if any(dim is None for dim in shape[1:]):
        raise ModelError(f"cannot count multiply-adds of {layer.name}: its shape {shape} is not fully known")
    return shape
