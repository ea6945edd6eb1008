"""Quantization-aware training (int8) with tfmot: fake-quantize weights and activations while fine-tuning.

Layers are annotated one by one (`quantize_annotate_layer` + `quantize_apply`), so layers tfmot's 8-bit scheme does
not support can stay in float on request instead of failing the whole model. tfmot's collaborative schemes keep a
pruned model's zeros (`preserve="sparsity"`) or a clustered model's shared values (`preserve="clusters"`) through
QAT. The result keeps its quantization wrappers: it is a QAT Keras model; compress.export makes the int8 file. Its
biases end on the int32 grid that file stores them on (int8_bias.py), so that it computes what the file computes.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from dataclasses import dataclass

from compress.checks import GEOMETRIC_PREPROCESSING_LAYERS, PREPROCESSING_LAYERS
from compress.errors import ModelError, first_line, listed
from compress.kerasmodel import rebuilt_from_config, rerouted_references, variable_short_name
from compress.plain_model import operators_as_layers
from compress.techniques.finetune import (
    check_training_settings,
    copy_model,
    evaluate,
    fine_tune,
    main_kernel,
    weight_layers,
    zero_fraction,
)
from compress.techniques.base import Outcome, Technique, TechniqueConfig, option, require

UNSUPPORTED = ("error", "float")
PRESERVE = ("none", "sparsity", "clusters")
# Layers tfmot's registry does not list but its 8-bit layout transforms fold or rewrite before quantizing.
_TRANSFORMED = ("SeparableConv1D", "SeparableConv2D")
_BATCH_NORMS = ("BatchNormalization", "SyncBatchNormalization")
_FOLDS_BATCH_NORM = ("Conv2D", "DepthwiseConv2D", "Dense")
RANGE_CALIBRATION_IMAGES = 512  # training images whose activations start the quantizers' ranges
# The (min, max) variables of tfmot's activation quantizers (MovingAverageQuantizer), which quantize a layer's output.
_ACTIVATION_RANGE_VARIABLES = (("output_min", "output_max"), ("post_activation_min", "post_activation_max"))
QUANTIZE_APPLY_LIMIT_S = 300  # tfmot takes seconds to a minute for the models here; beyond this it is not finishing
# The activations tfmot's 8-bit scheme quantizes, in an Activation layer (Default8BitActivationQuantizeConfig) and
# as a layer's own activation (QuantizeAwareActivation). Its registry accepts the layers whatever the function;
# another one (elu, selu, ...) fails inside quantize_apply with a message that names neither layer nor function.
_ACTIVATION_LAYER_FUNCTIONS = frozenset({"relu", "relu6", "swish", "gelu", "linear", "softmax", "sigmoid", "tanh"})
_OWN_ACTIVATION_FUNCTIONS = frozenset({"relu", "swish", "gelu", "linear", "softmax", "sigmoid", "tanh"})
# Activations with a layer of their own that tfmot quantizes (LeakyReLU) or keeps in float (ELU, with
# `unsupported="float"`), where the same function as a convolution's own activation refuses the convolution:
# function -> (layer class, its config computing the function's defaults).
_ACTIVATION_LAYERS = {"leaky_relu": ("LeakyReLU", {"alpha": 0.2}), "elu": ("ELU", {"alpha": 1.0})}
# Weightless elementwise layers tfmot's registry does not know (MobileNetV3's hard-swish x * relu6(x + 3) / 6 is made
# of them) but TFLite runs on int8 kernels: they compute in float and only their output is quantized.
_OUTPUT_QUANTIZED = frozenset({"Rescaling", "Multiply", "Subtract", "Maximum", "Minimum"})


@dataclass(frozen=True)
class QATConfig(TechniqueConfig):
    unsupported: str = option("error", "layers tfmot cannot quantize: error (refuse, naming them) or float (keep "
                              "them in float, listed in the stats)", metavar="{error,float}")
    preserve: str = option("none", "keep an earlier stage's structure through QAT: none, sparsity (pruned zeros "
                           "stay zero) or clusters (clustered kernels keep their shared values)",
                           metavar="{none,sparsity,clusters}")
    epochs: float = option(2, "quantization-aware fine-tuning epochs (0.5: half an epoch)")
    batch_size: int = option(64, "fine-tuning batch size")
    learning_rate: float = option(1e-4, "Adam learning rate for fine-tuning")

    def validate(self) -> None:
        require(self.unsupported in UNSUPPORTED,
                f"unsupported must be one of {', '.join(UNSUPPORTED)}, got {self.unsupported!r}")
        require(self.preserve in PRESERVE, f"preserve must be one of {', '.join(PRESERVE)}, got {self.preserve!r}")
        check_training_settings(self)


def input_preprocessing_layers(model) -> list:
    """The Rescaling/Normalization (and Resizing/CenterCrop) layers a model starts with: they map pixels to the
    range and size the model was trained on and hold no weights to quantize; only their output is quantized, so that
    the first convolution gets int8 inputs and runs on integer kernels (left unannotated, it would stay float)."""
    leading = []
    for layer in model.layers:
        kind = type(layer).__name__
        if kind == "InputLayer":
            continue
        if kind not in PREPROCESSING_LAYERS + GEOMETRIC_PREPROCESSING_LAYERS:
            break
        leading.append(layer)
    return leading


def unsupported_layers(model) -> list:
    """Top-level layers tfmot's default 8-bit scheme cannot quantize (found before anything is built), input
    preprocessing left out (it always stays in float)."""
    from compress.keras import keras, tfmot

    registry = tfmot.quantization.keras.default_8bit.Default8BitQuantizeRegistry()
    preprocessing = {layer.name for layer in input_preprocessing_layers(model)}
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or layer.name in preprocessing:
            continue
        supported = registry.supports(layer) or type(layer).__name__ in _OUTPUT_QUANTIZED
        if supported and unquantized_activation(layer) is None:
            continue
        kind = type(layer).__name__
        if kind in _TRANSFORMED or (kind in _BATCH_NORMS and _follows_foldable(layer)):
            continue
        found.append(layer)
    return found


def unquantized_activation(layer) -> str | None:
    """The name of `layer`'s activation function when tfmot's 8-bit scheme cannot quantize it, else None."""
    function = getattr(layer, "activation", None)
    if function is None:
        return None
    name = getattr(function, "__name__", type(function).__name__)
    allowed = _ACTIVATION_LAYER_FUNCTIONS if type(layer).__name__ == "Activation" else _OWN_ACTIVATION_FUNCTIONS
    return None if name in allowed else name


def activations_as_layers(model):
    """(`model` with each convolution's or Dense layer's activation that tfmot quantizes only as a layer of its own
    moved into one, {layer: activation moved}): Conv2D(activation="relu6") becomes Conv2D + Activation("relu6"),
    the same function, which QAT then quantizes instead of refusing the layer; leaky_relu becomes a LeakyReLU
    layer, elu an ELU layer (`_ACTIVATION_LAYERS`), as does an Activation layer of either. Layers called more than
    once and nested models are left as they are."""
    movable = _ACTIVATION_LAYER_FUNCTIONS | set(_ACTIVATION_LAYERS)
    moved = {layer.name: unquantized_activation(layer) for layer in model.layers
             if type(layer).__name__ != "Activation" and unquantized_activation(layer) in movable
             and len(layer._inbound_nodes) == 1}  # noqa: SLF001 - Keras 2 exposes calls only this way
    replaced = {layer.name: unquantized_activation(layer) for layer in model.layers
                if type(layer).__name__ == "Activation" and unquantized_activation(layer) in _ACTIVATION_LAYERS}
    if not (moved or replaced):
        return model, {}
    activation_layers = {name: [f"{name}_{activation}", 0, 0] for name, activation in moved.items()}
    config = model.get_config()
    layers = []
    for layer in config["layers"]:
        name = layer["config"]["name"]
        if "inbound_nodes" in layer:  # functional: read the new activation's output instead of the layer's
            layer["inbound_nodes"] = rerouted_references(layer["inbound_nodes"], activation_layers)
        if name in replaced:
            kind, options = _ACTIVATION_LAYERS[replaced[name]]
            layer.update(class_name=kind, config={"name": name, **options})
        layers.append(layer)
        if name in moved:
            layer["config"]["activation"] = "linear"
            kind, options = _ACTIVATION_LAYERS.get(moved[name], ("Activation", {"activation": moved[name]}))
            activation = {"class_name": kind, "config": {"name": f"{name}_{moved[name]}", **options}}
            if "inbound_nodes" in layer:
                activation["inbound_nodes"] = [[[name, 0, 0, {}]]]
            activation["name"] = activation["config"]["name"]
            layers.append(activation)
    config["layers"] = layers
    if "output_layers" in config:
        config["output_layers"] = rerouted_references(config["output_layers"], activation_layers)
    rebuilt = rebuilt_from_config(model, config, {})
    return (model, {}) if rebuilt is None else (rebuilt, {**moved, **replaced})


def separable_convolutions_split(model):
    """(`model` with each SeparableConv2D made the DepthwiseConv2D and 1x1 Conv2D it computes, [their names]):
    tfmot's 8-bit scheme folds a BatchNormalization into a Conv2D but not into a SeparableConv2D (the Keras
    guides' Xception-style blocks put one behind each), and refused the model. The pointwise Conv2D keeps the
    layer's name, bias and activation, so every reference to the layer still holds. Layers called more than once
    and nested models are left as they are."""
    separable = {layer.name: layer for layer in model.layers if type(layer).__name__ == "SeparableConv2D"
                 and len(layer._inbound_nodes) == 1}  # noqa: SLF001 - Keras 2 exposes calls only this way
    if not separable:
        return model, []
    config = model.get_config()
    layers, weights = [], {}
    for layer in config["layers"]:
        name = layer["config"]["name"]
        if name not in separable:
            layers.append(layer)
            continue
        options = layer["config"]
        depthwise = {"class_name": "DepthwiseConv2D", "name": f"{name}_depthwise", "config": {
            "name": f"{name}_depthwise", "dtype": options.get("dtype"), **{key: options[key] for key in (
                "kernel_size", "strides", "padding", "data_format", "dilation_rate", "depth_multiplier")},
            "use_bias": False}}
        pointwise = {"class_name": "Conv2D", "name": name, "config": {
            "name": name, "dtype": options.get("dtype"), "filters": options["filters"], "kernel_size": [1, 1],
            "data_format": options["data_format"], "activation": options["activation"],
            "use_bias": options["use_bias"]}}
        if "inbound_nodes" in layer:
            depthwise["inbound_nodes"] = layer["inbound_nodes"]
            pointwise["inbound_nodes"] = [[[depthwise["name"], 0, 0, {}]]]
        layers += [depthwise, pointwise]
        depthwise_kernel, pointwise_kernel, *bias = separable[name].get_weights()
        weights[depthwise["name"]], weights[name] = [depthwise_kernel], [pointwise_kernel, *bias]
    config["layers"] = layers
    rebuilt = rebuilt_from_config(model, config, weights)
    return (model, []) if rebuilt is None else (rebuilt, sorted(separable))


def batch_norms_as_depthwise(model):
    """(`model` with each BatchNormalization that tfmot cannot fold (one behind no convolution: DenseNet's and
    pre-activation ResNet's, or behind a Concatenate; behind a convolution whose output also goes elsewhere, or
    whose own activation comes first, as in `Conv2D(activation="relu")` then BatchNormalization) made the 1x1
    DepthwiseConv2D that computes it, [their names]): per channel, x * gamma / sqrt(variance + epsilon) + (beta -
    mean * that), which tfmot quantizes and onnxruntime runs on integer kernels. Only batch norms over the channels
    of images; layers called more than once and nested models are left as they are."""

    def as_depthwise(norm):
        scale, offset = _batch_norm_affine(norm)
        return "DepthwiseConv2D", {"kernel_size": [1, 1], "use_bias": True}, [scale.reshape(1, 1, -1, 1), offset]

    return _replaced(model, _unfoldable_batch_norms(model, rank=4), as_depthwise)


def flat_batch_norms_as_rescaling(model):
    """(`model` with each BatchNormalization of a flat (batch, units) tensor that tfmot cannot fold (behind a
    Dense whose own activation comes first, the classic `Dense(256, activation="relu")` then BatchNormalization,
    or behind no Dense) made the per-unit Rescaling that computes it at inference, x * scale + offset, [their
    names]): a depthwise convolution needs an image, and tfmot refuses the batch norm. The Rescaling computes in
    float with its output quantized, on a vector per image."""

    def as_rescaling(norm):
        scale, offset = _batch_norm_affine(norm)
        return "Rescaling", {"scale": scale.tolist(), "offset": offset.tolist()}, None

    return _replaced(model, _unfoldable_batch_norms(model, rank=2), as_rescaling)


def _unfoldable_batch_norms(model, rank: int) -> dict:
    """Name -> batch norm over the last axis of a rank-`rank` tensor, called once, that tfmot does not fold."""
    return {layer.name: layer for layer in model.layers if type(layer).__name__ in _BATCH_NORMS
            and not _follows_foldable(layer) and len(layer.input_shape) == rank
            and list(layer.axis) in ([rank - 1], [-1])
            and len(layer._inbound_nodes) == 1}  # noqa: SLF001 - Keras 2 exposes calls only this way


def _batch_norm_affine(norm) -> tuple:
    """(scale, offset) per channel of a batch norm at inference: x * scale + offset."""
    import numpy as np

    scale = norm.gamma.numpy() if norm.scale else 1.0
    scale = scale / np.sqrt(norm.moving_variance.numpy() + norm.epsilon)
    offset = (norm.beta.numpy() if norm.center else 0.0) - norm.moving_mean.numpy() * scale
    return scale.astype(np.float32), offset.astype(np.float32)


def average_pools_as_depthwise(model):
    """(`model` with each AveragePooling2D ('valid' padding) made the DepthwiseConv2D that computes it, [their
    names]): a kernel of 1 / (pool height x width), which fine-tuning then trains like any other. TFLite's int8
    average pooling must keep its input's scale, which tfmot breaks where the pooled output joins a Concatenate
    (DenseNet's transitions: the int8 conversion failed); a depthwise convolution has a scale of its own. Layers
    called more than once and nested models are left as they are."""
    import numpy as np

    def as_depthwise(pool):
        kernel = np.full((*pool.pool_size, pool.input_shape[-1], 1), 1 / np.prod(pool.pool_size), np.float32)
        return "DepthwiseConv2D", {"kernel_size": list(pool.pool_size), "strides": list(pool.strides),
                                   "padding": "valid", "use_bias": False}, [kernel]

    pools = {layer.name: layer for layer in model.layers if type(layer).__name__ == "AveragePooling2D"
             and layer.padding == "valid" and layer.data_format == "channels_last"
             and len(layer._inbound_nodes) == 1}  # noqa: SLF001 - Keras 2 exposes calls only this way
    return _replaced(model, pools, as_depthwise)


def _replaced(model, chosen: dict, replacement) -> tuple:
    """(`model` with each layer of `chosen` (name -> layer) made another layer of the same name,
    `replacement(layer)` giving its (class name, config options, weights or None), [their names]); `model` itself
    where the rebuilt model would compute otherwise."""
    if not chosen:
        return model, []
    config = model.get_config()
    weights = {}
    for layer in config["layers"]:
        original = chosen.get(layer["config"]["name"])
        if original is None:
            continue
        layer["class_name"], options, layer_weights = replacement(original)
        if layer_weights is not None:
            weights[original.name] = layer_weights
        layer["config"] = {"name": original.name, "dtype": layer["config"].get("dtype"), **options}
    rebuilt = rebuilt_from_config(model, config, weights)
    return (model, []) if rebuilt is None else (rebuilt, sorted(chosen))


def _follows_foldable(layer) -> bool:
    """A batch norm right after a Conv2D/DepthwiseConv2D/Dense (possibly through a Reshape) without an activation of
    its own that feeds nothing else: tfmot folds it (where the convolution's output also goes elsewhere, as into a
    DenseNet-style Concatenate, or passes its activation first, it does not)."""
    source = _single_inbound(layer)
    if source is not None and type(source).__name__ == "Reshape":
        source = _single_inbound(source)
    return (source is not None and type(source).__name__ in _FOLDS_BATCH_NORM
            and source.get_config().get("activation", "linear") == "linear"
            and len(source._outbound_nodes) == 1)  # noqa: SLF001 - Keras 2 exposes the layer graph only this way


def _single_inbound(layer):
    nodes = layer._inbound_nodes  # noqa: SLF001 - Keras 2 exposes the layer graph only this way
    if len(nodes) != 1:
        return None
    inbound = nodes[0].inbound_layers
    if isinstance(inbound, (list, tuple)):
        return inbound[0] if len(inbound) == 1 else None
    return inbound


@contextlib.contextmanager
def _time_limit(seconds: int):
    """Raise RuntimeError after `seconds` of the block (main thread with SIGALRM only; elsewhere no limit). tfmot's
    graph rewriting never finishes on some models (seen looping in Keras' rebuild of its rewritten config, on a
    DepthwiseConv2D behind MaxPool-GELU-SeparableConv2D), and a refusal beats a hang."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):  # Windows
        yield
        return

    def expire(signum, frame):
        raise RuntimeError(f"tfmot did not finish rewriting the model's graph in {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _scheme(preserve: str):
    from compress.keras import tfmot

    if preserve == "sparsity":
        return tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
    if preserve == "clusters":
        # preserve_sparsity=True also keeps the zeros of a model that was pruned and then clustered.
        return tfmot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity=True)
    return tfmot.quantization.keras.default_8bit.Default8BitQuantizeScheme()


def qat(model, config: QATConfig, data, *, out_dir=None, verbose: int = 1) -> Outcome:
    """Quantization-aware fine-tuning of a copy of `model`; returns the QAT model (wrappers kept) and stats."""
    from compress.keras import OutputOnlyQuantizeConfig, keras, tfmot

    quantization = tfmot.quantization.keras
    work, separable = separable_convolutions_split(copy_model(model))
    work, norms = batch_norms_as_depthwise(work)
    work, flat_norms = flat_batch_norms_as_rescaling(work)
    work, pools = average_pools_as_depthwise(work)
    work, split = activations_as_layers(work)
    work, operators = operators_as_layers(work)
    unsupported = unsupported_layers(work)
    preprocessing = [layer.name for layer in input_preprocessing_layers(work)]
    registry = tfmot.quantization.keras.default_8bit.Default8BitQuantizeRegistry()
    output_only = [layer.name for layer in work.layers if layer.name not in preprocessing
                   and type(layer).__name__ in _OUTPUT_QUANTIZED and not registry.supports(layer)]
    float_names = [layer.name for layer in unsupported]
    if unsupported and config.unsupported == "error":
        named = ", ".join(f"{layer.name} ({type(layer).__name__}" + (
            f", activation {unquantized_activation(layer)})" if unquantized_activation(layer) else ")")
            for layer in unsupported)
        raise ModelError(
            f"tfmot's 8-bit scheme cannot quantize layer(s) {named}; keep them in float with --unsupported float "
            "(in a recipe stage's settings: unsupported = \"float\")"
        )
    before = _kernel_stats(_float_kernels(work), config.preserve)

    def annotate(layer):
        if layer.name in float_names or isinstance(layer, keras.layers.InputLayer):
            return layer
        if layer.name in preprocessing or layer.name in output_only:
            return quantization.quantize_annotate_layer(layer, quantize_config=OutputOnlyQuantizeConfig())
        return quantization.quantize_annotate_layer(layer)

    try:
        annotated = keras.models.clone_model(work, clone_function=annotate)
        with quantization.quantize_scope(), _time_limit(QUANTIZE_APPLY_LIMIT_S):
            quantized = quantization.quantize_apply(annotated, _scheme(config.preserve))
    except (ValueError, RuntimeError, TypeError) as exc:
        kept = f" with {listed(float_names, 3)} kept in float" if float_names else ""
        activations = sorted({unquantized_activation(layer) for layer in unsupported} - {None})
        if activations:  # tfmot's own message names a function object; the cause fits in the line instead
            raise ModelError(f"tfmot cannot quantize this model{kept}: it quantizes the activation of a convolution "
                             f"or Dense layer even when the layer is kept in float, and cannot quantize "
                             f"{', '.join(activations)}; use relu, relu6, swish or gelu there") from exc
        raise ModelError(f"tfmot cannot quantize this model{kept}: {first_line(exc)}") from exc

    calibrated = _activation_ranges_from_data(quantized, work, data)
    history = fine_tune(
        quantized, data, epochs=config.epochs, batch_size=config.batch_size, learning_rate=config.learning_rate,
        verbose=verbose,
    )
    if config.preserve != "none":
        # The preserving quantizers matter only while training; their inference is the default 8-bit one. The
        # default wrappers save and load like any QAT model (the preserving ones rebuild from the weights at hand
        # when loaded, before the saved weights arrive), so hand back a default QAT model with the trained values.
        quantized = _with_default_quantizers(quantized, work, annotate)
    biases = _biases_on_int8_grid(quantized)
    wrappers = [layer for layer in quantized.layers if isinstance(layer, quantization.QuantizeWrapper)]
    stats = {
        "quantized_layers": [layer.layer.name for layer in wrappers],
        "float_layers": float_names,
        "activations_split": split,
        "operators_as_layers": operators,
        "separable_convolutions_split": separable,
        "batch_norms_as_depthwise": norms,
        "flat_batch_norms_as_rescaling": flat_norms,
        "average_pools_as_depthwise": pools,
        "left_alone": {**{name: "input preprocessing: no weights, only its output quantized" for name in preprocessing},
                       **{name: "no weights, computed in float, only its output quantized" for name in output_only},
                       **{name: "kept in float: not in tfmot's 8-bit scheme" for name in float_names}},
        "preserve": config.preserve,
        "activation_ranges_from_data": calibrated,
        **evaluate(quantized, data),
        "history": history,
    }
    stats["biases_on_int8_grid"] = biases
    if config.preserve != "none":
        kernels = _wrapped_kernels(wrappers)
        after = _kernel_stats(kernels, config.preserve)
        key = "sparsity" if config.preserve == "sparsity" else "unique_values"
        stats[f"{key}_before"] = before
        stats[f"{key}_after"] = {name: after[name] for name in before if name in after}
    if config.preserve == "clusters":
        # tfmot's cluster-preserving QAT trains Conv2D centroids per output channel (as int8 scales are), so a
        # kernel clustered to k values keeps at most k per channel but may hold up to k x channels in all.
        stats["unique_values_per_channel_after"] = {
            name: _max_unique_per_channel(kernels[name]) for name in before if name in kernels
        }
    return Outcome(model=quantized, stats=stats)


def _activation_ranges_from_data(quantized, float_model, data) -> dict:
    """Start each activation quantizer's range where the float model's output of that layer lies on training images.

    tfmot starts every activation range at [-6, 6] and moves it 0.1 % of the way to each batch's range per training
    step (its lower end never above 0): after the one epoch of a QAT fine-tune (704 steps) a ReLU's range still began
    at -3 (-6 x 0.999^704), so a quarter of its 256 levels held values that never occur, and the int8 file kept the
    ReLU as an integer Clip, which also kept onnxruntime from running the pooling after it in NHWC. Started from the
    data, as post-training quantization calibrates them, a ReLU's range starts at 0 and training refines the ranges.
    Returns {layer: [min, max]} of the ranges set; a layer whose output the float model does not expose once (a
    layer called twice, or inside a nested model) keeps tfmot's start."""
    from compress.keras import keras, tfmot

    targets = {}
    for wrapper in quantized.layers:
        if not isinstance(wrapper, tfmot.quantization.keras.QuantizeWrapper):
            continue
        variables = {variable_short_name(variable): variable for variable in wrapper.weights}
        for low, high in _ACTIVATION_RANGE_VARIABLES:
            if low in variables and high in variables:
                targets[wrapper.layer.name] = (variables[low], variables[high])
    outputs = {}
    for name in targets:
        try:
            outputs[name] = float_model.get_layer(name).output
        except (ValueError, AttributeError):  # not a top-level layer, or called more than once
            continue
    if not outputs:
        return {}
    probe = keras.Model(float_model.inputs, list(outputs.values()))
    images = data.normalized("train")[0][:RANGE_CALIBRATION_IMAGES]
    values = probe.predict(images, batch_size=128, verbose=0)
    values = values if isinstance(values, list) else [values]
    ranges = {}
    for name, value in zip(outputs, values):
        low, high = min(0.0, float(value.min())), max(0.0, float(value.max()))  # tfmot keeps 0 inside the range
        if high > low:
            targets[name][0].assign(low)
            targets[name][1].assign(high)
            ranges[name] = [round(low, 4), round(high, 4)]
    return ranges


def _biases_on_int8_grid(model) -> dict:
    """Move the biases onto the int32 grid the int8 file stores them on (see int8_bias.py): tfmot trains them in
    float, and deep models turn the difference into disagreement between the QAT model and its int8 file."""
    from compress.errors import ExportError
    from compress.techniques.int8_bias import biases_on_int8_grid

    try:
        return biases_on_int8_grid(model)
    except ExportError as exc:  # the export will report it; the QAT model stays as trained
        return {"moved": [], "not_done": str(exc)}


def _with_default_quantizers(trained, float_model, annotate):
    """A default-scheme QAT model of `float_model` holding every trained value of `trained` (same layout)."""
    from compress.keras import keras, tfmot

    quantization = tfmot.quantization.keras
    with quantization.quantize_scope():
        result = quantization.quantize_apply(keras.models.clone_model(float_model, clone_function=annotate))
    if [type(layer) for layer in result.layers] != [type(layer) for layer in trained.layers]:
        raise ModelError("QAT model layout changed while rebuilding it with default quantizers")
    for target, source in zip(result.layers, trained.layers):
        if not isinstance(target, quantization.QuantizeWrapper):
            target.set_weights(source.get_weights())
            continue
        trained_values = {variable_short_name(v): v for v in source.weights}
        for variable in target.weights:
            variable.assign(trained_values[variable_short_name(variable)])
    return result



def _float_kernels(model) -> dict:
    return {layer.name: main_kernel(layer).numpy() for layer in weight_layers(model)}


def _wrapped_kernels(wrappers) -> dict:
    """The float kernel variables QAT trains, by inner layer name (the wrapped layer's `kernel` attribute is
    replaced by its fake-quantized tensor)."""
    kernels = {}
    for wrapper in wrappers:
        for variable in wrapper.weights:
            if variable_short_name(variable) == "kernel":
                kernels[wrapper.layer.name] = variable.numpy()
    return kernels


def _max_unique_per_channel(kernel) -> int:
    """The most distinct values any output channel (last axis) of a kernel holds."""
    import numpy as np

    channels = kernel.reshape(-1, kernel.shape[-1])
    return int(max(np.unique(channels[:, c]).size for c in range(channels.shape[1])))


def _kernel_stats(kernels: dict, preserve: str) -> dict:
    """Per kernel: zero fraction (preserve=sparsity) or distinct values (preserve=clusters)."""
    import numpy as np

    if preserve == "sparsity":
        return {name: zero_fraction(values) for name, values in kernels.items()}
    if preserve == "clusters":
        return {name: int(np.unique(values).size) for name, values in kernels.items()}
    return {}


TECHNIQUE = Technique(
    name="qat",
    config_class=QATConfig,
    apply=qat,
    summary="int8 quantization-aware training (optionally keeping sparsity or clusters), tfmot",
)
