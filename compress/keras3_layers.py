"""Keras 3 layer configs as tf_keras layers: which classes translate, how their options map, and the builder that
rebuilds a Keras 3 model's graph from tf_keras layers and copies its weights (used by compress.keras3)."""

from __future__ import annotations

import inspect
from pathlib import Path

import numpy as np

from compress.errors import ModelError, first_line, listed

SUPPORTED_LAYERS = frozenset(
    "Conv2D Conv1D DepthwiseConv2D SeparableConv2D Conv2DTranspose Dense BatchNormalization LayerNormalization "
    "Activation ReLU LeakyReLU Softmax ELU PReLU MaxPooling2D AveragePooling2D GlobalAveragePooling2D "
    "GlobalMaxPooling2D Add Subtract Multiply Concatenate Average Maximum Dropout SpatialDropout2D Reshape Flatten "
    "ZeroPadding2D Cropping2D UpSampling2D Rescaling Normalization Resizing CenterCrop InputLayer Identity "
    "GroupNormalization UnitNormalization GaussianNoise GaussianDropout AlphaDropout ActivityRegularization".split()
)
# Data augmentation layers (the Keras guides put them in the model): they pass images through unchanged at
# inference, so the translation leaves them out; the translation check on images would catch one that did not.
AUGMENTATION_LAYERS = frozenset(
    "RandomFlip RandomRotation RandomZoom RandomTranslation RandomContrast RandomBrightness RandomHue "
    "RandomSaturation RandomSharpness RandomShear RandomGrayscale RandomColorJitter RandomColorDegeneration "
    "RandomPosterization RandomErasing RandomGaussianBlur RandomInvert RandomPerspective RandAugment AugMix MixUp "
    "CutMix".split()
)
# Layers that pass their input through unchanged at inference: those that act only in training, as augmentation
# does, and Identity (tf_keras models drop them all).
PASS_THROUGH_LAYERS = AUGMENTATION_LAYERS | {
    "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
}
# keras.applications' own layers, rebuilt from tf_keras layers that compute the same: ConvNeXt's LayerScale
# (each channel times a learned factor) as a 1x1 DepthwiseConv2D without bias, its factors as the kernel.
APPLICATION_LAYERS = frozenset({"LayerScale"})
# Keras 3 saves arithmetic on tensors (x + 3.0, x * (1/6), keras.ops.relu6(x)) as layers of these modules.
OPERATION_MODULES = ("keras.src.ops.", "keras.ops.")
# A keras.ops call on one tensor and one number, as the affine map Rescaling computes: x * scale + offset.
# (scale, offset) from the number c and whether the tensor came first; None where no such map exists (c / x).
AFFINE = {
    "Add": lambda c, tensor_first: (1.0, c),
    "Subtract": lambda c, tensor_first: (1.0, -c) if tensor_first else (-1.0, c),
    "Multiply": lambda c, tensor_first: (c, 0.0),
    "Divide": lambda c, tensor_first: (1.0 / c, 0.0) if tensor_first and c != 0 else None,
    "TrueDivide": lambda c, tensor_first: (1.0 / c, 0.0) if tensor_first and c != 0 else None,
}
_MERGES = frozenset({"Add", "Subtract", "Multiply", "Maximum", "Minimum"})  # on two tensors: the merge layer
_UNARY = {  # on one tensor: (tf_keras layer, its options)
    "Relu": ("ReLU", {}), "Relu6": ("ReLU", {"max_value": 6.0}), "Sigmoid": ("Activation", {"activation": "sigmoid"}),
    "Silu": ("Activation", {"activation": "swish"}), "Swish": ("Activation", {"activation": "swish"}),
    "Tanh": ("Activation", {"activation": "tanh"}), "Negative": ("Rescaling", {"scale": -1.0}),
}
MODEL_CLASSES = frozenset({"Functional", "Sequential"})

# Keras 3 activation names that mean the same function in tf_keras, under the tf_keras name.
_ACTIVATIONS = {
    name: name
    for name in ("relu relu6 gelu softmax sigmoid tanh linear elu selu softplus softsign exponential mish "
                 "leaky_relu").split()
} | {"silu": "swish", "swish": "swish"}
# Keras 3 activations tf_keras lacks or defines differently (its hard_sigmoid is clip(0.2x + 0.5)): built from
# tf_keras layers after the layer, which then gets a linear activation.
_EXPANDED_ACTIVATIONS = frozenset({"hard_sigmoid", "hard_silu", "hard_swish"})

# Layer options tf_keras lacks, dropped when they hold Keras 3's default (which means tf_keras' behaviour).
# Options tf_keras lacks, at the Keras 3 value that does what tf_keras always does (Resizing and CenterCrop name
# their channels-last layout and Resizing its padding options, which tf_keras' layers never had).
_DEFAULTS_TF_KERAS_LACKS = {
    "quantization_config": None, "rms_scaling": False, "lora_rank": None, "optional": False,
    "data_format": "channels_last", "pad_to_aspect_ratio": False, "fill_mode": "constant", "fill_value": 0.0,
    "antialias": False,
}
_RENAMED = {"LeakyReLU": {"negative_slope": "alpha"}, "InputLayer": {"batch_shape": "batch_input_shape"}}
# Arguments every tf_keras layer takes through **kwargs (base Layer.__init__).
_BASE_LAYER_KWARGS = frozenset({"input_dim", "input_shape", "batch_input_shape", "batch_size", "weights", "autocast"})


def _spatial_axes(axis) -> bool:
    """Whether `axis` names exactly the height and width axes of an NHWC tensor."""
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return sorted(int(a) % 4 for a in axes if isinstance(a, int)) == [1, 2] and len(axes) == 2


def check_layers(path: Path, layers: list[tuple[str, str, str]]) -> None:
    """Refuse, in one line naming them all, the layers ((name, class name, module) of a Keras 3 model) that have
    no tf_keras translation. A Lambda layer's Python code was written for Keras 3, so --unsafe cannot help it."""
    lambdas = [f"'{name}'" for name, class_name, _ in layers if class_name == "Lambda"]
    others = [f"'{name}' ({class_name})" for name, class_name, module in layers
              if class_name not in SUPPORTED_LAYERS | MODEL_CLASSES | AUGMENTATION_LAYERS | APPLICATION_LAYERS
              and class_name != "Lambda"
              and not module.startswith(OPERATION_MODULES)]
    if lambdas:
        raise ModelError(f"{path}: layer(s) {listed(lambdas)} are Lambda layers, Python code written for Keras 3, "
                         "which cannot run on tf_keras (even with --unsafe); rebuild them from built-in layers or "
                         "save the model with tf_keras")
    if others:
        raise ModelError(f"{path}: layer(s) {listed(others)} have no tf_keras translation; rebuild the model from "
                         "the layers in compress.keras3_layers.SUPPORTED_LAYERS or save it with tf_keras")


class Builder:
    """Builds tf_keras models from Keras 3 model configs, remembering each weighted layer by its path."""

    def __init__(self, path: Path):
        from compress.keras import keras

        self.keras = keras
        self.path = path
        self.layers: dict[str, object] = {}  # "<outer model>/<layer>" -> tf_keras layer, for copying weights
        self.activations: dict[str, tuple] = {}  # layer name -> its activation's layers, reused by a shared layer
        self.left_out: list[str] = []  # augmentation layers, "<outer model>/<layer>": identities at inference
        self.reshaped: set[str] = set()  # layers whose Keras 3 weights take the tf_keras twin's shape (LayerScale)

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
        # Keras 3 numbers a nested Functional model's calls from 1 in the input and output references (its loader
        # takes 1 off), from 0 in call arguments.
        offset = {layer["config"]["name"]: int(layer["class_name"] == "Functional") for layer in config["layers"]}
        ends = []
        for key in ("input_layers", "output_layers"):
            refs = config[key]
            refs = list(refs.values()) if isinstance(refs, dict) else refs  # named ends: keras.Model({"image": x}, ...)
            refs = [refs] if refs and isinstance(refs[0], str) else refs
            found = [tensors[(name, node - offset.get(name, 0), position)] for name, node, position in refs]
            ends.append(found if len(found) > 1 else found[0])
        return keras.Model(ends[0], ends[1], name=config["name"])

    def _call(self, layer: dict, prefix: str, args: list, kwargs: dict, callables: dict | None = None):
        """Calls the tf_keras twin of `layer` (made on its first call) on translated arguments."""
        name = layer["config"]["name"]
        callables = {} if callables is None else callables
        if str(layer.get("module", "")).startswith(OPERATION_MODULES):
            return self._operation(layer, args, kwargs)
        if _augmentation_only(layer) and len(args) == 1:
            self.left_out.append(f"{prefix}{name}")
            return args[0]
        if name not in callables:
            check_layers(self.path, [(name, layer["class_name"], str(layer.get("module", "")))])
            if layer["class_name"] in MODEL_CLASSES:
                callables[name] = (self._model(layer, prefix=f"{prefix}{name}/"), None)
            elif _depthwise_groups(layer, args):
                callables[name] = self._grouped_as_depthwise(layer, prefix)
            else:
                callables[name] = self._layer(layer, prefix)
        target, activation = callables[name]
        if layer["class_name"] == "LayerScale" and (len(args) != 1 or len(args[0].shape) != 4):
            raise self._refuse(name, "(LayerScale) scales a tensor that is not an image's; only ConvNeXt's translate")
        outputs = target(*args, **kwargs)
        return outputs if activation is None else self._activation(name, activation, outputs)

    def _layer(self, layer: dict, prefix: str):
        """(tf_keras layer, activation to build after it or None) for one Keras 3 layer config."""
        if layer["class_name"] == "LayerScale":
            name = layer["config"]["name"]
            self.layers[f"{prefix}{name}"] = built = self.keras.layers.DepthwiseConv2D(1, use_bias=False, name=name)
            self.reshaped.add(f"{prefix}{name}")
            return built, None
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

    def _grouped_as_depthwise(self, layer: dict, prefix: str):
        """A Conv2D with one group per input channel (ConvNeXt's 7x7) as the DepthwiseConv2D it is: tf_keras runs
        grouped convolutions through a compiled function that no ONNX converter reads. Its kernel (h, w, 1, C*m)
        holds the depthwise kernel (h, w, C, m) in the same order."""
        config = self._translate_config(layer)
        channels = config["groups"]
        options = {key: config[key] for key in ("name", "kernel_size", "strides", "padding", "dilation_rate",
                                                "use_bias", "activation") if key in config}
        built = self.keras.layers.DepthwiseConv2D(depth_multiplier=config["filters"] // channels, **options)
        self.layers[f"{prefix}{config['name']}"] = built
        self.reshaped.add(f"{prefix}{config['name']}")
        return built, None

    def _operation(self, layer: dict, args: list, kwargs: dict):
        """A keras.ops call saved as a layer, as the tf_keras layer computing the same: a tensor and a number as
        Rescaling (x + 3 -> x * 1 + 3), a tensor and a value per channel as Normalization, two tensors as the merge
        layer, relu6 and its kind as activation layers."""
        layers = self.keras.layers
        name, operation = layer["config"]["name"], layer["class_name"]
        constants = [constant_operand(arg) for arg in args]
        fixed = [constant is not None for constant in constants]
        if not kwargs and len(args) == 2 and fixed.count(True) == 1 and operation in AFFINE:
            tensor_first = fixed[1]
            tensor, constant = (args[0], constants[1]) if tensor_first else (args[1], constants[0])
            affine = affine_layer(operation, constant, tensor_first, tensor.shape[-1])
            if affine is not None:
                return getattr(layers, affine[0])(name=name, **affine[1])(tensor)
        elif not kwargs and len(args) == 2 and not any(fixed) and operation in _MERGES:
            return getattr(layers, operation)(name=name)(list(args))
        elif not kwargs and len(args) == 1 and not fixed[0] and operation in _UNARY:
            class_name, options = _UNARY[operation]
            return getattr(layers, class_name)(name=name, **options)(args[0])
        elif (built := self._configured_operation(layer, args, kwargs)) is not None:
            return built
        if operation == "GetItem" and _picks_a_channel(args):
            raise self._refuse(name, "picks the image's channels one by one (x[..., k]), as keras.applications' "
                                     "caffe-style preprocess_input (ResNet50, VGG16) turns RGB into BGR; models "
                                     "that reorder their channels have no tf_keras translation")
        shown = ", ".join("a tensor" if constant is None else repr(arg) if constant.size == 1 else "a constant"
                          for arg, constant in zip(args, constants))
        raise self._refuse(name, f"is the Keras 3 operation {layer.get('module')}.{operation}({shown}), which has no "
                                 "tf_keras translation; use a layer instead, or save the model with tf_keras")

    def _configured_operation(self, layer: dict, args: list, kwargs: dict):
        """The keras.ops calls whose options sit in their config, as the tf_keras layer computing the same: a mean or
        max over an image's height and width as global pooling, a concatenation, hard_sigmoid / hard_silu,
        leaky_relu, softmax over channels, exact gelu, clip from 0 as a capped ReLU, a cast to float32 of a float32
        tensor as nothing; None for any other call."""
        layers = self.keras.layers
        config, operation = layer["config"], layer["class_name"]
        name = config["name"]
        if kwargs or len(args) != 1:
            return None
        if isinstance(args[0], (list, tuple)):
            return layers.Concatenate(axis=config.get("axis", 0), name=name)(list(args[0])) if (
                operation == "Concatenate" and len(args[0]) > 1) else None
        tensor = args[0]
        if operation in ("Mean", "Max") and len(tensor.shape) == 4 and _spatial_axes(config.get("axis")) and (
                config.get("initial") is None):
            pooling = layers.GlobalAveragePooling2D if operation == "Mean" else layers.GlobalMaxPooling2D
            return pooling(keepdims=bool(config.get("keepdims")), name=name)(tensor)
        if operation in ("HardSigmoid", "HardSilu", "HardSwish"):
            return self._activation(name, "hard_sigmoid" if operation == "HardSigmoid" else "hard_silu", tensor)
        if operation == "LeakyRelu":
            return layers.LeakyReLU(alpha=config.get("negative_slope", 0.2), name=name)(tensor)
        if operation == "Softmax" and config.get("axis", -1) in (-1, len(tensor.shape) - 1):
            return layers.Softmax(name=name)(tensor)
        if operation == "Gelu" and not config.get("approximate", True):  # tf_keras' gelu layer is the exact one
            return layers.Activation("gelu", name=name)(tensor)
        if operation == "Clip" and config.get("x_min") == 0 and isinstance(config.get("x_max"), (int, float)):
            return layers.ReLU(max_value=float(config["x_max"]), name=name)(tensor)
        if operation == "Cast" and config.get("dtype") == "float32" and tensor.dtype == "float32":
            return tensor
        return None

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
            if any(layer_path == left or layer_path.startswith(f"{left}/") for left in self.left_out):
                continue  # an augmentation layer's random-seed state
            grouped.setdefault(layer_path, []).append((int(index), array))
        for layer_path, layer in self.layers.items():
            arrays = [array for _, array in sorted(grouped.pop(layer_path, []), key=lambda item: item[0])]
            targets = layer.get_weights()
            if layer_path in self.reshaped and [a.size for a in arrays] == [t.size for t in targets]:
                arrays = [array.reshape(target.shape) for array, target in zip(arrays, targets)]
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


def _depthwise_groups(layer: dict, args: list) -> bool:
    """A Conv2D called on one image tensor with as many groups as the tensor has channels."""
    groups = (layer.get("config") or {}).get("groups", 1)
    return (layer["class_name"] == "Conv2D" and groups > 1 and len(args) == 1 and len(args[0].shape) == 4
            and args[0].shape[-1] == groups and layer["config"]["filters"] % groups == 0)


def _augmentation_only(layer: dict) -> bool:
    """An augmentation layer, or a nested model made of nothing else (the guides' `data_augmentation` block)."""
    if layer["class_name"] in AUGMENTATION_LAYERS:
        return True
    inner = [item for item in (layer.get("config") or {}).get("layers") or [] if item["class_name"] != "InputLayer"]
    return layer["class_name"] in MODEL_CLASSES and bool(inner) and all(map(_augmentation_only, inner))


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


def _picks_a_channel(args: list) -> bool:
    """Whether a GetItem's index takes one channel of the last axis (x[..., k])."""
    index = args[1] if len(args) == 2 else None
    return (isinstance(index, list) and len(index) == 2 and isinstance(index[1], int)
            and isinstance(index[0], dict) and index[0].get("class_name") == "__ellipsis__")


def affine_layer(operation: str, constant: np.ndarray, tensor_first: bool, channels) -> tuple[str, dict] | None:
    """(class name, options) of the layer computing `tensor` op `constant` (an AFFINE operation): for one value, the
    Rescaling x * scale + offset (x + 3 -> x * 1 + 3); for one value per channel, as keras.applications' torch-style
    preprocess_input and a script's (x - mean) / std compute, the Normalization (x - m) / sqrt(v) computing
    x * s + o (m = -o / s, v = 1 / s^2, for s > 0); None for any other constant."""
    if constant.size == 1:
        affine = AFFINE[operation](float(constant.ravel()[0]), tensor_first)
        return None if affine is None else ("Rescaling", {"scale": affine[0], "offset": affine[1]})
    if constant.size != channels or constant.shape[-1] != channels:
        return None
    pairs = [AFFINE[operation](float(value), tensor_first) for value in constant.ravel()]
    if any(pair is None for pair in pairs):
        return None
    scale, offset = np.array([pair[0] for pair in pairs]), np.array([pair[1] for pair in pairs])
    if not (scale > 0).all():
        return None
    return "Normalization", {"axis": -1, "mean": (-offset / scale).tolist(), "variance": (1 / scale**2).tolist()}


def constant_operand(value) -> np.ndarray | None:
    """A constant in a serialised call argument (a number, a list of numbers, a Keras 3 `__tensor__` or
    `__numpy__` array) as an array, else None."""
    if isinstance(value, dict) and value.get("class_name") in ("__tensor__", "__numpy__"):
        return np.asarray(value["config"]["value"], dtype=np.float64)
    items = value if isinstance(value, list) and value else [value]
    if all(isinstance(item, (int, float)) and not isinstance(item, bool) for item in items):
        return np.asarray(value, dtype=np.float64)
    return None


def _resolve(value, tensors: dict):
    """A serialised call argument with its Keras 3 tensors replaced by the tf_keras ones."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            return tensors[tuple(value["config"]["keras_history"])]
        return {key: _resolve(item, tensors) for key, item in value.items()}
    if isinstance(value, list):
        return [_resolve(item, tensors) for item in value]
    return value
