"""What the fine-tuning techniques (prune, cluster, qat) share: copying a model, choosing its weight layers,
parsing name lists, a short Adam fine-tune on the training split and counting zeros and distinct values.

TensorFlow is imported inside the functions, as everywhere outside compress.keras.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from compress.errors import ConfigError, ModelError

MAX_FINE_TUNE_EPOCHS = 1000  # a bound that also refuses inf and nan
MAX_BATCH_SIZE = 4096
# Fine-tuning on a teacher's outputs uses distillation's own defaults (compress.techniques.distill).
DISTILL_ALPHA = 0.5
DISTILL_TEMPERATURE = 4.0


class FrozenDict(dict):
    """A dict that a frozen dataclass can hold as a default: hashable, refuses changes, JSON-ready as a dict."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))

    def __reduce__(self):  # copy, deepcopy and pickle rebuild it whole instead of item by item
        return (FrozenDict, (dict(self),))

    def _refuse(self, *args, **kwargs):
        raise TypeError("FrozenDict cannot be changed")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _refuse  # type: ignore[assignment]


def parse_names(text: str) -> tuple[str, ...]:
    """'conv1, dense1' -> ('conv1', 'dense1'); '' or 'none' is the empty tuple (the default choice)."""
    if text.strip().lower() in ("", "none"):
        return ()
    return tuple(part.strip() for part in text.split(",") if part.strip())


def as_names(value):
    """A layer list from the CLI/TOML (text or list) as a tuple; anything else is left for validation to refuse."""
    if isinstance(value, str):
        return parse_names(value)
    if isinstance(value, list | tuple):
        return tuple(value)
    return value


def require_names(value, field: str) -> None:
    if not (isinstance(value, tuple) and all(isinstance(name, str) and name for name in value)):
        raise ConfigError(f"{field} must be a list of layer names, got {value!r}")


def parse_name_values(text: str, what: str) -> FrozenDict:
    """'dense1=0.95,conv2=0.5' -> {'dense1': 0.95, 'conv2': 0.5}; a malformed item is one ConfigError line."""
    values = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            values[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"{what} must look like 'layer=value,layer=value', got {item!r} in {text!r}") from None
    return FrozenDict(values)


def copy_model(model):
    """A new model with the same architecture and weights; training it leaves `model` untouched."""
    from compress.keras import keras

    if not isinstance(model, keras.Model):
        raise ModelError(f"expected a Keras (tf_keras) model, got {type(model).__name__}")
    from compress.kerasmodel import is_qat_model

    if is_qat_model(model):
        raise ModelError(
            f"model {model.name!r} is quantization-aware (QAT) already; prune, cluster and qat take a float model, "
            "so apply them before qat (`compress export` turns a QAT model into int8 files)"
        )
    try:
        clone = keras.models.clone_model(model)
    except (ValueError, TypeError, NotImplementedError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot copy model {model.name!r} (only Sequential and functional models): {first}") from exc
    clone.set_weights(model.get_weights())
    return clone


def weight_layers(model) -> list:
    """The model's top-level Conv2D, SeparableConv2D and Dense layers (subclasses included), in order."""
    from compress.keras import keras

    kinds = (keras.layers.Conv2D, keras.layers.SeparableConv2D, keras.layers.Dense)
    return [layer for layer in model.layers if isinstance(layer, kinds)]


def main_kernel(layer):
    """The kernel pruning, clustering and their statistics work on: a SeparableConv2D's pointwise kernel (its
    depthwise one holds few weights; tfmot leaves it alone too), else the layer's kernel."""
    return layer.pointwise_kernel if hasattr(layer, "pointwise_kernel") else layer.kernel


def select_layers(model, names: tuple[str, ...], what: str) -> list:
    """The layers named in `names`, or by default the Conv2D/SeparableConv2D/Dense layers that hold the weights.

    By default the classifier (the last of them) is left alone, since its outputs are the predictions, unless it
    holds most of the weights of those layers (a small convolution before a large Dense, as in tfmot's own
    pruning example): then leaving it alone would leave the model almost as large. `what` names the technique's
    verb in messages ("prune", "cluster"). Unknown names are refused with the list of candidate layers.
    """
    candidates = weight_layers(model)
    by_name = {layer.name: layer for layer in candidates}
    if names:
        unknown = [name for name in names if name not in by_name]
        if unknown:
            raise ConfigError(
                f"cannot {what} layer(s) {', '.join(unknown)}: not a Conv2D/SeparableConv2D/Dense layer of model "
                f"{model.name!r}; "
                f"layers that can be chosen: {', '.join(by_name) or 'none'}"
            )
        chosen = [by_name[name] for name in dict.fromkeys(names)]
    else:
        chosen = candidates if candidates and classifier_share(model) > 0.5 else candidates[:-1]
    if not chosen:
        raise ModelError(
            f"model {model.name!r} has no Conv2D/SeparableConv2D/Dense layer to {what} besides its classifier"
            + (f" {candidates[-1].name!r}; name it in --layers (a stage's layers setting) to {what} it"
               if candidates else "")
        )
    return chosen


def classifier_share(model) -> float:
    """The share of the Conv2D/SeparableConv2D/Dense weights that the last such layer (the classifier) holds."""
    sizes = [int(main_kernel(layer).shape.num_elements()) for layer in weight_layers(model)]
    return sizes[-1] / sum(sizes) if sizes and sum(sizes) else 0.0


def left_alone(model, chosen: list, what: str) -> dict[str, str]:
    """Every layer holding weights that the technique does not touch, with the reason, for stats and report."""
    chosen_names = {layer.name for layer in chosen}
    candidates = weight_layers(model)
    reasons = {}
    for layer in model.layers:
        if layer.name in chosen_names or not layer.weights:
            continue
        count = int(sum(weight.shape.num_elements() for weight in layer.weights))
        if candidates and layer is candidates[-1]:
            reasons[layer.name] = (f"the classifier ({classifier_share(model):.2%} of the Conv2D/SeparableConv2D/"
                                   "Dense weights): its "
                                   "outputs are the predictions; name it in --layers (a stage's layers setting) to "
                                   "include it")
        elif layer in candidates:
            reasons[layer.name] = "not named in --layers"
        else:
            reasons[layer.name] = (f"{type(layer).__name__} ({count:,} weights): {what} handles Conv2D, "
                                   "SeparableConv2D and Dense kernels")
    return reasons


def fine_tune(model, data, *, epochs: float, batch_size: int, learning_rate: float, verbose: int, callbacks=(),
              teacher=None) -> dict:
    """Compile with Adam and sparse cross-entropy on logits, train on 'train' (validating on 'val').

    `epochs` may be a fraction (see `training_plan`). With a `teacher`, the loss is knowledge distillation's on the
    teacher's outputs and the labels (DISTILL_ALPHA, DISTILL_TEMPERATURE). Returns the per-epoch history as floats.
    """
    from compress.keras import keras

    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    if teacher is None:
        model.compile(optimizer=optimizer, loss=classification_loss(model), metrics=["accuracy"])
    else:
        from compress.techniques.distill import make_distiller

        model = make_distiller(teacher, model, data, alpha=DISTILL_ALPHA, temperature=DISTILL_TEMPERATURE)
        model.compile(optimizer=optimizer)
    keras_epochs, steps = training_plan(data, epochs, batch_size)
    train = data.pipeline("train", batch_size, shuffle=True)
    part_epochs = steps != steps_per_epoch(data, batch_size)
    if part_epochs:  # Keras cuts them from one stream of batches, reshuffled at each pass over the data
        train = train.repeat()
    return trained(model, train, learning_rate=learning_rate, epochs=keras_epochs,
                   steps_per_epoch=steps if part_epochs else None, validation_data=data.pipeline("val", 256),
                   callbacks=list(callbacks), verbose=verbose)


def trained(model, train, *, learning_rate: float, callbacks=(), **fit_options) -> dict:
    """`model.fit(train, ...)`'s per-epoch history as floats. Training stops at the first batch whose loss is not
    finite, and is refused: weights that made it NaN are unusable, and exporting them crashed a converter."""
    from compress.keras import keras

    class StopOnNonFiniteLoss(keras.callbacks.Callback):  # Keras' TerminateOnNaN, without its print
        def on_train_batch_end(self, batch, logs=None):
            if not math.isfinite(float((logs or {}).get("loss", 0.0))):
                self.model.stop_training = True

    history = model.fit(train, callbacks=[*callbacks, StopOnNonFiniteLoss()], **fit_options)
    losses = [float(value) for value in history.history.get("loss", [])]
    if not all(math.isfinite(value) for value in losses):
        raise ModelError(f"training diverged: the loss became {losses[-1]} in epoch {len(losses)}; a lower "
                         f"learning rate than {learning_rate:g} may help")
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def classification_loss(model):
    """Sparse cross-entropy on the model's outputs: logits, or probabilities where the model ends in a softmax."""
    from compress.checks import outputs_probabilities
    from compress.keras import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=not outputs_probabilities(model))


def wrap_layers(model, wrap, verb: str):
    """Clone `model` with tfmot wrappers applied by `wrap(layer)`; tfmot's refusal becomes one ModelError line."""
    from compress.keras import keras

    try:
        return keras.models.clone_model(model, clone_function=wrap)
    except ValueError as exc:
        raise ModelError(f"tfmot cannot {verb} this model: {str(exc).strip().splitlines()[0]}") from exc


def steps_per_epoch(data, batch_size: int) -> int:
    return max(1, -(-len(data.split("train")[1]) // batch_size))


def training_plan(data, epochs: float, batch_size: int) -> tuple[int, int]:
    """(Keras epochs, batches in each) for `epochs` over the training split.

    Whole epochs stay whole. A fraction such as 0.5 or 1.5 becomes ceil(epochs) Keras epochs of equal length
    whose batches add up to that share of the data: QAT and clustering need little fine-tuning, and on a 2-core CPU
    an epoch of the article's CNN costs minutes.
    """
    keras_epochs = math.ceil(epochs)
    return keras_epochs, max(1, round(epochs * steps_per_epoch(data, batch_size) / keras_epochs))


def evaluate(model, data) -> dict:
    """Test loss and accuracy of a Keras model (compiled here, so stripped models can be measured too)."""
    model.compile(loss=classification_loss(model), metrics=["accuracy"])
    loss, accuracy = model.evaluate(data.pipeline("test", 256), verbose=0)
    return {"test_accuracy": float(accuracy), "test_loss": float(loss)}


def zero_fraction(array) -> float:
    import numpy as np

    array = np.asarray(array)
    return float(np.count_nonzero(array == 0) / array.size) if array.size else 0.0


def all_params_sparsity(model) -> dict:
    """Zeros over every weight of the model (kernels, biases, everything in get_weights)."""
    import numpy as np

    weights = model.get_weights()
    total = int(sum(w.size for w in weights))
    zeros = int(sum(np.count_nonzero(w == 0) for w in weights))
    return {"params": total, "zero_params": zeros, "sparsity_all_params": zeros / total if total else 0.0}


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def require_positive_int(value, name: str) -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def check_training_settings(config) -> None:
    """The fine-tuning fields every such technique has: epochs, batch_size, learning_rate."""
    if not (is_number(config.epochs) and 0 < config.epochs <= MAX_FINE_TUNE_EPOCHS):
        raise ConfigError(f"epochs must be a number in (0, {MAX_FINE_TUNE_EPOCHS}] (0.5 trains on half an epoch), "
                          f"got {config.epochs!r}")
    require_positive_int(config.batch_size, "batch_size")
    if config.batch_size > MAX_BATCH_SIZE:
        raise ConfigError(f"batch_size must be at most {MAX_BATCH_SIZE}, got {config.batch_size}")
    if not (is_number(config.learning_rate) and 0 < config.learning_rate < 1):
        raise ConfigError(f"learning_rate must be in (0, 1), got {config.learning_rate!r}")


def check_mapping(value: Mapping, field: str) -> None:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{field} must be a table of layer names to values, got {value!r}")
