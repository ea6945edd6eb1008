"""Checks that run before any work: does the model fit the data, and can the output folder be written?

Every command that takes a model and data calls `check_model_fits_data` once, before training, converting or
writing anything, so that a model with two inputs, a vector input, the wrong image size or the wrong class count
is refused in one line instead of failing minutes later inside a library.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from compress.errors import ConfigError, DataError, ModelError, listed
from compress.kerasmodel import require_one_input_one_output, shape_text

MAX_BATCH_BYTES = 2 << 30  # one timed or evaluated batch of float32 images


def check_model_fits_data(model, data, *, role: str = "model", batch_sizes: Sequence[int] = (),
                          log: Callable[[str], None] | None = None) -> dict:
    """Refuse (one ModelError/DataError line) a model whose input or output does not fit `data`.

    Returns what was decided about the model: whether it outputs probabilities (softmax) or logits, told by its
    last layer or else by its outputs on a few test images.
    """
    require_one_input_one_output(model, f"the {role}")
    inputs, outputs = model.inputs, model.outputs
    input_shape = tuple(inputs[0].shape[1:])
    if len(input_shape) != 3:
        raise ModelError(f"the {role} takes inputs of shape {shape_text(input_shape)}; compress handles image models "
                         "taking height x width x channels")
    if input_shape != tuple(data.input_shape):
        hint = ("pass --image-size HxW to resize the images" if input_shape[2] == data.input_shape[2]
                else "its channel count differs from the images'; convert the images or the model")
        raise DataError(f"the {role} takes {shape_text(input_shape)} images but {data.source} has "
                        f"{shape_text(data.input_shape)}; {hint}")
    output_shape = tuple(outputs[0].shape[1:])
    if len(output_shape) != 1 or output_shape[0] != data.num_classes:
        raise ModelError(f"the {role} outputs {shape_text(output_shape) or 'a scalar'} per image but {data.source} has "
                         f"{data.num_classes} classes; compress needs one score per class")
    check_batch_memory(input_shape, batch_sizes)
    probabilities = outputs_probabilities(model, data)
    decided = {"outputs": "probabilities (softmax)" if probabilities else "logits"}
    if log is not None:
        log(f"{role}: {shape_text(input_shape)} input, {data.num_classes} outputs as {decided['outputs']}")
    return decided


def matched_to_data(model, data, log: Callable[[str], None] | None = None) -> tuple:
    """(model, data) fitted to each other where there is one obvious way, each change said: colour images become
    grey for a model taking one channel (grey ones RGB for a model taking three); a model taking images of any
    height or width (None in its input shape, as keras.applications backbones built without an input_shape) is
    built at the data's size, at which every later technique, export and timing then works; a binary classifier
    giving one score (Dense(1), as in the Keras guides) is given one score per class (`two_score_model`), and its
    files give the one score back; layers that pass their input through at inference (data augmentation, noise,
    Identity) are left out (`without_pass_through_layers`), and the model is given the plain form every technique
    works on (`plain_model`: nested models inlined, float32 compute and input, layers trainable); scores of shape
    1x1xC are reshaped to C (`flat_scores_model`).
    Anything else that does not fit is left for `check_model_fits_data` to refuse."""
    from compress.kerasmodel import built_at_size, flat_scores_model, two_score_model

    inputs = getattr(model, "inputs", None)
    if not inputs or len(inputs) != 1 or len(inputs[0].shape) != 4:
        return model, data
    shape = tuple(inputs[0].shape[1:])
    say = log if log is not None else (lambda _: None)
    model = in_plain_form(model, say)
    if {shape[2], data.input_shape[2]} == {1, 3}:
        data = data.with_channels(shape[2])
        say(f"images: {data.source} has {'RGB' if shape[2] == 1 else 'grey'} images and the model takes "
            f"{'grey' if shape[2] == 1 else 'RGB'} ones: "
            f"{'made grey (ITU-R 601 luma, as PIL does)' if shape[2] == 1 else 'grey repeated into three channels'}")
    if None in shape and all(dim is None or dim == size for dim, size in zip(shape, data.input_shape)):
        model = built_at_size(model, data.input_shape)
        say(f"model: takes {shape_text(shape)} images (any size); built at the data's {shape_text(data.input_shape)}, "
            "at which it is compressed, exported and timed (--image-size HxW resizes the images)")
    outputs = getattr(model, "outputs", None) or []
    if len(outputs) == 1 and tuple(outputs[0].shape[1:]) == (1,) and data.num_classes == 2:
        model, kind = two_score_model(model)
        negative, positive = data.class_names
        say(f"model: one score per image, {'a sigmoid probability' if kind == 'sigmoid' else 'a logit'} of class "
            f"{positive}: compressed as a score per class ({negative}, {positive}); each file gives the one score back")
    elif len(outputs) == 1 and len(outputs[0].shape) > 2 and set(outputs[0].shape[1:-1]) == {1}:
        model = flat_scores_model(model)
        say(f"model: gives {shape_text(outputs[0].shape[1:])} scores per image; compressed with them reshaped to "
            f"{outputs[0].shape[-1]}, as its files give them")
    return model, data


def in_plain_form(model, say: Callable[[str], None]):
    """`model` without the layers that pass their input through at inference and in the plain form of `plain_model`
    (nested models inlined, arithmetic as layers, float32 compute and input of any batch size, layers trainable),
    each change said."""
    from compress.kerasmodel import without_pass_through_layers
    from compress.plain_model import plain_model

    model, dropped = without_pass_through_layers(model)
    if dropped:
        say(f"model: left out {', '.join(dropped)}: layers that pass their input through unchanged at inference "
            "(augmentation, noise, regularization, Identity)")
    model, changes = plain_model(model)
    for change in changes:
        say(change)
    return model


PREPROCESSING_LAYERS = ("Rescaling", "Normalization")
# Weightless geometric preprocessing a model may start with (images of any size made the size it was trained at);
# the layer that says which pixel range the model takes may come after them.
GEOMETRIC_PREPROCESSING_LAYERS = ("Resizing", "CenterCrop")
CLASS_ORDER_IMAGES = 512  # validation images the class-order check predicts
CLASS_ORDER_MARGIN = 0.25  # accuracy by which outputs matched to other classes must beat the outputs as given
RANGE_CHECK_IMAGES = 256  # validation images an automatic input range is checked on
RANGE_CHECK_MARGIN = 0.10  # accuracy by which another range must beat the layer rule's to replace it


def check_batch_memory(input_shape, batch_sizes: Sequence[int]) -> None:
    """Refuse batch sizes whose float32 image batch alone would not fit in memory, before anything is trained."""
    image_bytes = int(np.prod(input_shape)) * 4
    for batch in batch_sizes:
        if batch * image_bytes > MAX_BATCH_BYTES:
            raise ConfigError(f"a batch of {batch} {shape_text(input_shape)} images needs "
                              f"{batch * image_bytes / 2**30:.1f} GiB; use batch sizes up to "
                              f"{MAX_BATCH_BYTES // image_bytes}")


def decide_input_range(model, choice: str = "auto", log: Callable[[str], None] | None = None, data=None) -> str:
    """The range a model takes its pixels in: `choice` when given; with "auto", raw 0-255 pixels for a model whose
    first layer after its input rescales or normalises them from that range (the Keras guides' pattern,
    EfficientNet, ConvNeXt; `_takes_raw_pixels`), else [0, 1], then checked on `data`'s validation images when
    given: a trained model scores clearly better in the range it was trained on (MobileNetV2 without its
    preprocess_input takes [-1, 1] and has no layer that says so). The decision is said, since every later figure
    depends on it."""
    from compress.data import INPUT_RANGES

    if choice != "auto":
        if choice not in INPUT_RANGES:
            raise ConfigError(f"input range must be auto or one of {', '.join(INPUT_RANGES)}, got {choice!r}")
        decided, why = choice, "as given"
    else:
        # A QAT model starts with tfmot's QuantizeLayer, which only rounds the pixels to its int8 grid.
        first = next((layer for layer in model.layers
                      if type(getattr(layer, "layer", layer)).__name__ not in ("InputLayer", "QuantizeLayer",
                                                                               *GEOMETRIC_PREPROCESSING_LAYERS)),
                     None)
        inner = getattr(first, "layer", first)
        if type(inner).__name__ in PREPROCESSING_LAYERS and _takes_raw_pixels(inner):
            decided, why = "raw", f"its first layer {first.name} ({type(inner).__name__}) takes 0-255 pixels"
        elif type(inner).__name__ in PREPROCESSING_LAYERS:
            decided, why = "unit", (f"its first layer {first.name} ({type(inner).__name__}) maps [0, 1] pixels, "
                                    "by its scale")
        else:
            decided, why = "unit", "no rescaling layer first, so pixels scaled to [0, 1]"
        if data is not None:
            require_one_input_one_output(model, f"model {model.name!r}")  # one output to score the ranges by
            decided, why = _range_checked_on_data(model, data, decided, why)
    if log is not None:
        log(f"input range: {decided} ({why}); --input-range raw|unit|symmetric overrides")
    return decided


def _takes_raw_pixels(layer) -> bool:
    """Whether a leading Rescaling or Normalization maps 0-255 pixels: a Rescaling by at most 1/50 (1/255,
    1/127.5), a Normalization whose means lie above 2 (ImageNet's, times 255); Rescaling(2, offset=-1) and
    Normalization by [0, 1] statistics take [0, 1] pixels."""
    if type(layer).__name__ == "Rescaling":
        return bool(np.all(np.abs(np.asarray(layer.scale, np.float64)) <= 1 / 50))
    mean = getattr(layer, "mean", None)
    if mean is None:  # not adapted or built: the common case, raw pixels
        return True
    return bool(np.max(np.abs(np.asarray(mean, np.float64))) > 2)


def _range_checked_on_data(model, data, decided: str, why: str) -> tuple[str, str]:
    """(range, reason): the layer rule's `decided`, or the range in which the model scores clearly better on up to
    RANGE_CHECK_IMAGES validation images (by RANGE_CHECK_MARGIN of accuracy, and above chance)."""
    from compress.data import INPUT_RANGES, normalize
    from compress.kerasmodel import keras_outputs

    images, labels = (array[:RANGE_CHECK_IMAGES] for array in data.split("val"))
    wanted = model.input_shape[1:] if isinstance(model.input_shape, tuple) else None
    fits = wanted is not None and len(wanted) == images.ndim - 1 and all(
        dim is None or dim == size for dim, size in zip(wanted, images.shape[1:]))
    if not len(labels) or not fits:  # a model that does not fit the data is refused by check_model_fits_data
        return decided, why
    scores = {name: float(np.mean(keras_outputs(model, normalize(images, name)).argmax(-1) == labels))
              for name in INPUT_RANGES}
    shown = ", ".join(f"{name} {score:.0%}" for name, score in scores.items())
    best = max(scores, key=scores.get)
    chance = 1.0 / data.num_classes
    if best != decided and scores[best] >= scores[decided] + RANGE_CHECK_MARGIN and scores[best] > 1.5 * chance:
        return best, f"on {len(labels)} validation images the model scores {shown}; its layers alone said {decided}"
    return decided, f"{why}; on {len(labels)} validation images: {shown}"


def file_input_range(path, choice: str = "auto", *, unsafe: bool = False,
                     log: Callable[[str], None] | None = None, data=None) -> str:
    """The input range of a model file: as given; or, with "auto", what an exported ONNX file records in its
    metadata, what a Keras model's first layer says, else [0, 1]."""
    path = Path(path)
    if choice == "auto" and path.suffix in (".keras", ".h5"):
        from compress.kerasmodel import load_model_with_source, translation_note

        model, source = load_model_with_source(path, unsafe=unsafe)
        if log is not None and translation_note(source):
            log(translation_note(source))
        if data is not None:  # a binary classifier's one score read as two, as its evaluation reads it
            model, data = matched_to_data(model, data)
        return decide_input_range(model, choice, log, data)
    if choice == "auto" and path.suffix in (".onnx", ".tflite") and path.is_file():
        recorded = file_metadata(path)
        if recorded.get("input_range"):
            if log is not None:
                log(f"input range: {recorded['input_range']} (recorded in {path.name})")
            return decide_input_range(None, recorded["input_range"])
        if choice == "auto":
            if log is not None:
                log(f"input range: unit ({path.name} records none, so pixels scaled to [0, 1], the common case); "
                    "--input-range raw|unit|symmetric sets it")
            return "unit"
    return decide_input_range(None, "unit" if choice == "auto" else choice, log)


def near_chance_note(what: str, accuracy: float, data) -> str | None:
    """A warning for an accuracy near chance, which most often means pixels in the wrong range; None otherwise."""
    chance = 1.0 / data.num_classes
    if accuracy > 1.5 * chance:
        return None
    return (f"{what} scores {accuracy:.1%}, near chance ({chance:.1%}) for {data.num_classes} classes; its images "
            f"were given in the {data.input_range!r} range: if the model expects another, pass "
            "--input-range raw|unit|symmetric")


def declared_image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) of the image input a model file declares, read without loading it: a .keras or .h5 model's
    InputLayer, an .onnx file's NHWC graph input; None for a size left open, another file kind, or a file that
    cannot be read (its loader names the problem)."""
    if path.suffix == ".onnx":
        import onnx

        try:
            graph = onnx.load(str(path), load_external_data=False).graph
        except Exception:  # noqa: BLE001 - a damaged file is named by the runtime that loads it
            return None
        constants = {tensor.name for tensor in graph.initializer}
        inputs = [value for value in graph.input if value.name not in constants]
        dims = inputs[0].type.tensor_type.shape.dim if len(inputs) == 1 else []
        shape = [dim.dim_value if dim.HasField("dim_value") else None for dim in dims]
    elif path.suffix in (".keras", ".h5"):
        from compress.keras3 import file_config

        layers = ((file_config(path) or {}).get("config") or {}).get("layers") or []
        entries = [layer.get("config", {}) for layer in layers if isinstance(layer, dict)]
        declared = [entry.get("batch_shape") or entry.get("batch_input_shape") for entry in entries
                    if entry.get("batch_shape") or entry.get("batch_input_shape")]
        shape = list(declared[0]) if len(declared) == 1 else []
    else:
        return None
    if len(shape) != 4 or shape[3] not in (1, 3) or not all(isinstance(side, int) for side in shape[1:3]):
        return None
    return shape[1], shape[2]


def class_order_note(model, data) -> str | None:
    """A warning where the model's outputs seem to follow another class order than the data's (its output k is read
    as the k-th class folder in sorted order, as Keras' image_dataset_from_directory orders them): on up to
    CLASS_ORDER_IMAGES validation images, the outputs matched to classes one to one by the most images (greedily)
    score at least CLASS_ORDER_MARGIN more than, and twice, the outputs as given. None otherwise, and with fewer than
    three validation images a class."""
    from compress.kerasmodel import keras_outputs

    images, labels = data.normalized("val")
    images, labels = images[:CLASS_ORDER_IMAGES], labels[:CLASS_ORDER_IMAGES]
    count = data.num_classes
    if len(labels) < 3 * count:  # too few to tell a moved class from a few wrong answers
        return None
    confusion = np.zeros((count, count), dtype=np.int64)  # [output, class]
    np.add.at(confusion, (keras_outputs(model, images).argmax(axis=1), labels), 1)
    as_given = np.trace(confusion) / len(labels)
    matched, cells = {}, confusion.astype(np.float64)
    for _ in range(count):
        output, label = np.unravel_index(np.argmax(cells), cells.shape)
        matched[int(output)] = int(label)
        cells[output, :], cells[:, label] = -1, -1
    reordered = sum(confusion[output, label] for output, label in matched.items()) / len(labels)
    if reordered < as_given + CLASS_ORDER_MARGIN or reordered < 2 * as_given:
        return None
    moved = [f"{output} as {data.class_names[label]!r}" for output, label in sorted(matched.items())
             if output != label]
    return (f"the model's outputs seem to follow another class order than {data.source}'s: on {len(labels)} "
            f"validation images it scores {as_given:.0%} as given, {reordered:.0%} with its output "
            f"{listed(moved, separator=', ')}; compress reads output k as the k-th class folder in sorted order "
            f"({listed([repr(name) for name in data.class_names], separator=', ')}): save the model with its "
            "outputs in that order, or name the folders so that they sort in the model's order")


def file_metadata(path: Path) -> dict[str, str]:
    """The metadata an .onnx or .tflite file records ({} if none or unreadable: the runtime names a damaged file)."""
    if path.suffix == ".tflite":
        from compress.export.convert import tflite_metadata

        return tflite_metadata(path)
    import onnx

    try:
        return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    except Exception:  # a damaged file is named by the runtime that loads it next
        return {}


def outputs_probabilities(model, data=None) -> bool:
    """True when the model's outputs are probabilities: a softmax last layer, or else rows that are non-negative
    and sum to 1 on a few of the data's test images (a model can hide its softmax in a nested block)."""
    from compress.keras import keras
    from compress.kerasmodel import scoring_layer

    last = scoring_layer(model)
    last = getattr(last, "layer", last)  # tfmot wrappers hold the layer they wrap
    activation = getattr(last, "activation", None)
    activation = getattr(activation, "activation", activation)  # QAT: tfmot's QuantizeAwareActivation holds it
    if isinstance(last, keras.layers.Softmax) or activation is keras.activations.softmax:
        return True
    if data is None:
        return False
    images, _ = data.normalized("test")
    outputs = np.asarray(model(images[:16], training=False), dtype=np.float64)
    return bool(outputs.size and (outputs >= 0).all() and np.allclose(outputs.sum(axis=-1), 1.0, atol=1e-3))


def check_writable(path: str | os.PathLike) -> Path:
    """Refuse, before any work, an output folder that is a file or cannot be created or written."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"output path {path} is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"cannot create {path}: {existing} is a file")
    try:  # os.access says yes to root on a read-only folder; writing a file is the real test
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot write to {path}: {exc.strerror or exc}") from exc
    return path
