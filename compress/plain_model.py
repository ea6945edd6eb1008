"""A user's model in the plain form every technique works on: one flat functional model computing in float32 on a
float image input, its layers trainable. Each change is checked to leave the predictions as they were, and said.

Users bring models that are not plain: a keras.applications backbone nested in their own model (the
transfer-learning guides), which tfmot's quantization and the channel trace treat as one opaque layer; layers that
compute in float16 (mixed precision, trained on a GPU), which TFLite's converter and tfmot refuse and which run
slowly on a CPU; an input of uint8 pixels, which the float calibration and training data do not fit; an input of
a fixed batch size (made for batch-1 inference), which training, calibration and batched timing do not fit; a
backbone frozen for transfer learning, which fine-tuning after pruning or quantization could not adapt; Python
arithmetic on tensors (the TensorFlow tutorials' preprocess_input inside the model, `x + shortcut`), which Keras 2
records as TFOpLambda layers that tfmot, the channel trace and the input range rule cannot read; a layer's
activity regularizer, a training loss only, which tfmot's quantization cannot rebuild.
"""

from __future__ import annotations

from compress.errors import ModelError, first_line, listed

MIXED_PRECISION_ATOL = 0.05  # float16 vs float32 compute: logits and probabilities differ by ~1e-3, never this much
# the functions a TFOpLambda layer records for Python operators -> the operation (keras3_layers.AFFINE's names)
_OPERATORS = {"__operators__.add": "Add", "math.add": "Add", "math.subtract": "Subtract", "math.multiply": "Multiply",
              "math.truediv": "TrueDivide", "nn.bias_add": "Add"}


def plain_model(model) -> tuple:
    """(model in the plain form, [one line per change made]); `model` itself where nothing needs changing."""
    notes = []
    nested = [layer.name for layer in model.layers if _is_model(layer)]
    if nested:
        model = _inlined(model)
        notes.append(f"model: nested model(s) {listed(nested)} inlined, so that every technique sees their layers")
    model, replaced = operators_as_layers(model)
    if replaced:
        notes.append(f"model: arithmetic on tensors ({listed(list(replaced))}: TFOpLambda layers) made the layers "
                     f"computing it ({', '.join(sorted(set(replaced.values())))})")
    if not (_fixed_batch(model) or _integer_input(model) or any(_needs_change(layer) for layer in model.layers)):
        return model, notes
    try:
        config = model.get_config()
    except Exception as exc:  # a layer without a config: nothing can be rebuilt
        raise ModelError(f"the model needs float32 layers, a float input of any batch size or trainable layers, and "
                         f"cannot be rebuilt for that: {first_line(exc)}") from None
    float16 = [(layer.name, layer.dtype_policy.name)
               for layer in _changed(model, config, _computes_in_lower_precision, "dtype", "float32")]
    if float16:
        notes.append(f"model: {len(float16)} layer(s) computing in {float16[0][1]} (mixed precision) made to compute "
                     "in float32, as a CPU runs them; their weights are float32 already")
    integer_input = _float_input(model, config)
    if integer_input:
        notes.append(f"model: takes {integer_input} pixels; compressed as the same model taking float32 ones (its "
                     "files take float32 pixel values)")
    fixed_batch = _any_batch(model, config)
    if fixed_batch:
        notes.append(f"model: its input takes batches of exactly {fixed_batch}; compressed as the same model taking "
                     "any batch size")
    unfrozen = [layer.name for layer in _changed(model, config, _frozen, "trainable", True)]
    if unfrozen:
        notes.append(f"model: {len(unfrozen)} frozen layer(s) ({listed(unfrozen)}) made trainable, so that "
                     "fine-tuning after compression can adapt them; frozen BatchNormalization layers stay frozen")
    unregularized = [layer.name for layer in _changed(model, config, _activity_regularized, "activity_regularizer",
                                                      None)]
    if unregularized:
        notes.append(f"model: the activity regularizer(s) of {listed(unregularized)} left out: they only add a "
                     "training loss, which tfmot's quantization cannot rebuild")
    return _rebuilt(model, config, loose=bool(float16), integer_input=bool(integer_input)), notes


def _needs_change(layer) -> bool:
    return _computes_in_lower_precision(layer) or _frozen(layer) or _activity_regularized(layer)


def _activity_regularized(layer) -> bool:
    return getattr(layer, "activity_regularizer", None) is not None


def _computes_in_lower_precision(layer) -> bool:
    policy = getattr(layer, "dtype_policy", None)
    return (type(layer).__name__ != "InputLayer" and policy is not None
            and policy.compute_dtype not in (None, "float32"))


def _integer_input(model) -> str | None:
    """The integer dtype of the model's image input (Input(dtype="uint8")), or None."""
    dtype = model.inputs[0].dtype.name if getattr(model, "inputs", None) else ""
    return dtype if "int" in dtype else None


def _fixed_batch(model) -> int | None:
    """The batch size the model's input fixes (Input(batch_size=1)), or None."""
    return model.inputs[0].shape[0] if getattr(model, "inputs", None) else None


def _frozen(layer) -> bool:
    """A frozen layer holding weights, BatchNormalization excepted: frozen, it keeps its moving statistics, as the
    Keras transfer-learning guide fine-tunes."""
    from compress.keras import keras

    return (not layer.trainable and bool(layer.weights) and not _is_model(layer)
            and not isinstance(getattr(layer, "layer", layer), keras.layers.BatchNormalization))


def _is_model(layer) -> bool:
    return hasattr(layer, "_nodes_by_depth") and hasattr(layer, "layers")


def _inlined(model):
    """`model` with the layers of its nested models called in its own graph (names made unique where they clash),
    rebuilt from its config as an independent model."""
    from compress.keras import keras
    from compress.kerasmodel import rebuilt_from_config

    taken = {layer.name for layer in model.layers if not _is_model(layer)}
    renamed = set()

    def run(graph, inputs, outer: str):
        values = {str(id(tensor)): _Reusable(value) for tensor, value in zip(graph.inputs, inputs)}
        for depth in sorted(graph._nodes_by_depth, reverse=True):  # noqa: SLF001 - tf_keras exposes its graph so
            for node in graph._nodes_by_depth[depth]:  # noqa: SLF001
                if node.is_input:
                    continue
                args, kwargs = node.map_arguments(values)
                layer = node.layer
                if _is_model(layer):
                    outputs = run(layer, _flattened(args[0] if args else next(iter(kwargs.values()))), layer.name)
                else:
                    if outer and id(layer) not in renamed:
                        renamed.add(id(layer))
                        if layer.name in taken:
                            layer._name = _unique(f"{outer}_{layer.name}", taken)  # noqa: SLF001 - Keras 2's only way
                        taken.add(layer.name)
                    outputs = layer(*args, **kwargs)
                for tensor_id, value in zip(node.flat_output_ids, _flattened(outputs)):
                    values[tensor_id] = _Reusable(value)
        outputs = [values[str(id(tensor))].pop() for tensor in graph.outputs]
        return outputs if len(outputs) > 1 else outputs[0]

    try:
        inputs = [keras.Input(tensor.shape[1:], dtype=tensor.dtype, name=name)
                  for tensor, name in zip(model.inputs, model.input_names)]
        flat = keras.Model(inputs if len(inputs) > 1 else inputs[0], run(model, inputs, ""), name=model.name)
        rebuilt = rebuilt_from_config(flat, flat.get_config(), {})
    except Exception as exc:  # Keras raises several types for graphs it cannot call again
        raise ModelError(f"cannot inline the model's nested models: {first_line(exc)}; save the model with their "
                         "layers in its own graph") from None
    if rebuilt is None:
        raise ModelError("inlining the model's nested models changed what it computes; save the model with their "
                         "layers in its own graph")
    return rebuilt


class _Reusable(list):
    """A computed tensor that every consumer may take: tf_keras' nodes pop their inputs from the graph's table."""

    def __init__(self, value):
        super().__init__([value])

    def pop(self, *_):
        return self[0]


def _flattened(structure) -> list:
    import tensorflow as tf

    return tf.nest.flatten(structure)


def _unique(name: str, taken: set) -> str:
    candidate, number = name, 1
    while candidate in taken:
        number += 1
        candidate = f"{name}_{number}"
    return candidate


def _changed(model, config: dict, needs_change, key: str, value) -> list:
    """The layers of `model` for which `needs_change(layer)` holds, each one's `key` set to `value` in `config`."""
    changed = []
    for layer, entry in _with_entries(model, config):
        if needs_change(layer):
            entry["config"][key] = value
            changed.append(layer)
    return changed


def _with_entries(model, config: dict) -> list:
    """(layer, its entry in `config`) for each layer of `model`."""
    entries = {entry["config"]["name"]: entry for entry in config["layers"]}
    return [(layer, entries[layer.name]) for layer in model.layers]


def _float_input(model, config: dict) -> str | None:
    """The integer dtype of the image input, set to float32 in `config` (a Sequential's lists its InputLayer too);
    None for a float input."""
    dtype = _integer_input(model)
    if dtype:
        for entry in config["layers"]:
            if entry["class_name"] == "InputLayer":
                entry["config"]["dtype"] = "float32"
    return dtype


def _any_batch(model, config: dict) -> int | None:
    """The batch size the image input fixes, made free (None) in `config` (a Sequential's lists its InputLayer
    too); None where it fixes none."""
    fixed = _fixed_batch(model)
    if fixed:
        for entry in config["layers"]:
            if entry["class_name"] == "InputLayer":
                entry["config"]["batch_input_shape"] = [None, *entry["config"]["batch_input_shape"][1:]]
    return fixed


def _rebuilt(model, config: dict, *, loose: bool, integer_input: bool):
    """`model` rebuilt from `config`, weights copied; checked on pixel values (integers 0-255 for an integer
    input), exactly or, where float16 compute became float32, to within MIXED_PRECISION_ATOL."""
    from compress.kerasmodel import rebuilt_from_config

    rebuilt = rebuilt_from_config(model, config, {}, pixel_values=integer_input,
                                  atol=MIXED_PRECISION_ATOL if loose else 1e-5, rtol=0.01 if loose else 0.0)
    if rebuilt is None:
        raise ModelError("the model computing in float32 on a float input of any batch size, its layers trainable, "
                         "differs from the saved one; save it with float32 layers and input")
    return rebuilt


def operators_as_layers(model):
    """(`model` with each Python operator between layer outputs as the layer that computes it, {layer: its kind}):
    Keras 2 records `x + y`, `x - y`, `x * y` in a functional model as TFOpLambda layers (keras.applications RegNet
    adds its shortcuts so, MobileNetV3 writes hard-sigmoid as `relu6(x + 3) * (1 / 6)`), which tfmot refuses. Two
    tensors become the Add, Subtract or Multiply layer; a tensor and a number the Rescaling computing it (x + 3 ->
    x * 1 + 3), a tensor and a value per channel (keras.applications' torch-style preprocess_input, a script's
    (x - mean) / std) the Normalization computing it, as the Keras 3 translation writes them. The layer keeps its
    name."""
    from compress.keras3_layers import affine_layer, constant_operand
    from compress.kerasmodel import rebuilt_from_config

    if not any(type(layer).__name__ == "TFOpLambda" for layer in model.layers):
        return model, {}
    config = model.get_config()
    replaced = {}
    for position, layer in enumerate(config.get("layers", [])):
        operation = _OPERATORS.get(layer["config"].get("function")) if layer["class_name"] == "TFOpLambda" else None
        nodes = layer.get("inbound_nodes") or []
        if operation is None or len(nodes) != 1:
            continue
        # Keras 2 writes the call function(x, y=...) as one entry: [layer, node, tensor, {"y": ...}], a number
        # first as ["_CONSTANT_VALUE", -1, number, {"y": ...}]
        # tf.nn.bias_add(x, bias) as [layer, node, tensor, {"bias": ..., "data_format": "NHWC"}]
        first = nodes[0]
        if (len(first) != 4 or not isinstance(first[3], dict) or set(first[3]) - {"y", "bias", "name", "data_format"}
                or first[3].get("data_format") not in (None, "NHWC")):
            continue
        operands = [first[2] if first[0] == "_CONSTANT_VALUE" else first[:3], first[3].get("y", first[3].get("bias"))]
        tensors = [isinstance(item, list) and len(item) == 3 and isinstance(item[0], str) for item in operands]
        constants = [None if tensor else constant_operand(item) for item, tensor in zip(operands, tensors)]
        name = layer["config"]["name"]
        entry = {"name": name, "config": {"name": name, "dtype": layer["config"].get("dtype", "float32")}}
        if all(tensors) and operation != "TrueDivide":
            entry.update(class_name=operation, inbound_nodes=[[[*operands[0], {}], [*operands[1], {}]]])
        elif tensors.count(True) == 1 and constants[1 - tensors.index(True)] is not None:
            tensor_first = tensors[0]
            channels = model.get_layer(name).output.shape[-1]  # the tensor's: a constant only broadcasts
            affine = affine_layer(operation, constants[1 - tensors.index(True)], tensor_first, channels)
            if affine is None:
                continue
            entry["config"].update(affine[1])
            entry.update(class_name=affine[0], inbound_nodes=[[[*operands[tensors.index(True)], {}]]])
        else:
            continue
        config["layers"][position] = entry
        replaced[name] = entry["class_name"]
    if not replaced:
        return model, {}
    rebuilt = rebuilt_from_config(model, config, {})
    return (model, {}) if rebuilt is None else (rebuilt, replaced)
