"""Structured pruning: remove whole Conv2D filters and Dense units and rebuild a smaller model.

Magnitude pruning (tfmot) only zeroes weights, so the exported files are no faster; removing channels makes the
layers themselves smaller, so parameters and multiply-adds really go down. The model's graph is traced once: every
tensor's last axis is described channel by channel as (channel set, channel) pairs, so that pass-through layers,
Flatten, Concatenate and depthwise layers carry the choice to the layers that read it. Tensors joined by Add (and
the other element-wise joins) must keep the same channels: their channel sets are merged into one group.
Layers the trace cannot follow are left whole, with everything whose channels they would have to match, and
reported rather than refused.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping

from compress.errors import ConfigError, ModelError
from compress.kerasmodel import count_macs, flat_tensors, graph_nodes
from compress.techniques.finetune import is_number

SCORES = ("l1", "l2")
# Layers whose output channels are their own and can be removed.
PRUNABLE = ("Conv2D", "Dense")
# Layers that read channels and whose weights follow the kept input channels; their output channels stay whole.
FIXED_OUTPUT = ("SeparableConv2D", "Conv2DTranspose")
# Element-wise joins: every input must keep the same channels.
JOINS = ("Add", "Subtract", "Multiply", "Maximum", "Average")
# Per-channel or spatial-only layers: the output has the input's channels.
PASS_THROUGH = (
    "ReLU", "LeakyReLU", "ELU", "ThresholdedReLU", "Activation", "BatchNormalization",
    "Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization",
    "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D",
    "ZeroPadding2D", "Cropping2D", "UpSampling2D",
)
SUPPORTED = PRUNABLE + FIXED_OUTPUT + JOINS + PASS_THROUGH + ("DepthwiseConv2D", "Flatten", "Concatenate")
# Activations that mix channels: removing one changes the others.
CROSS_CHANNEL_ACTIVATIONS = ("softmax", "log_softmax")
# floor(sparsity * channels) without 0.29 * 100 = 28.999... rounding one channel away.
ROUNDING_SLACK = 1e-9
MAX_MULTIPLE = 256


def remove_channels(model, *, sparsity: float, layer_sparsity: Mapping[str, float] | None = None,
                    score: str = "l1", multiple: int = 1) -> tuple:
    """Remove the share `sparsity` of each prunable layer's output channels; return (smaller model, info).

    Prunable: Conv2D filters and Dense units, except those reaching a model output (the classifier) or joined
    with channels that cannot change (the model input, a layer the trace cannot follow). `layer_sparsity`
    overrides the share per layer name; a group of joined layers takes the smallest share of its members.
    Channels are ranked by the `l1` or `l2` norm of their filter weights (summed over a group): a norm needs
    no data, is the standard criterion (Li et al. 2017, "Pruning Filters for Efficient ConvNets") and is
    deterministic, so the same model always loses the same channels. At least one channel per layer stays.
    With `multiple` > 1, each group keeps the nearest multiple of it (see `kept_count`).
    `model` is left untouched; the new one has the same layer names, inputs and output shapes.
    """
    from compress.keras import keras

    _check_fraction(sparsity, "sparsity")
    if score not in SCORES:
        raise ConfigError(f"score must be one of {', '.join(SCORES)}, got {score!r}")
    if not (isinstance(multiple, int) and not isinstance(multiple, bool) and 1 <= multiple <= MAX_MULTIPLE):
        raise ConfigError(f"channel multiple must be an integer from 1 to {MAX_MULTIPLE}, got {multiple!r}")
    if not isinstance(model, keras.Model) or not getattr(model, "_is_graph_network", False):
        raise ModelError(
            f"structured pruning takes a built Sequential or functional tf_keras model, got {type(model).__name__}"
        )
    targets = _layer_targets(model, sparsity, layer_sparsity)
    trace = _Trace(model)
    keep = _choose_channels(model, trace, targets, score, multiple)
    if not any(keep[root] is not None for root in trace.groups.roots()):
        raise ModelError(
            f"model {model.name!r} has no layer whose channels can be removed: "
            + "; ".join(f"{name}: {reason}" for name, reason in _left_alone(trace).items())
        )
    new_model = _rebuild(model, trace, keep)
    return new_model, {**_info(model, new_model, trace, keep, targets, score), "channel_multiple": multiple}


def _check_fraction(value, what: str) -> None:
    if not (is_number(value) and 0 <= value < 1):
        raise ConfigError(f"{what} must be a number in [0, 1), got {value!r}")


def _layer_targets(model, sparsity: float, layer_sparsity) -> dict[str, float]:
    """Each layer's share to remove: `sparsity` unless `layer_sparsity` names it (names must exist)."""
    overrides = {} if layer_sparsity is None else layer_sparsity
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"layer_sparsity must be a table of layer names to shares, got {layer_sparsity!r}")
    names = [layer.name for layer in model.layers]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ConfigError(f"layer_sparsity names {', '.join(map(str, unknown))}, not layers of model {model.name!r}")
    for name, value in overrides.items():
        _check_fraction(value, f"layer_sparsity for {name}")
    return {name: float(overrides.get(name, sparsity)) for name in names}


class _Groups:
    """Union-find over channel sets: layers whose outputs are joined share one choice of kept channels.

    A set with a reason is fixed (keeps every channel); merging a fixed set into another fixes both.
    """

    def __init__(self):
        self.parent: list[int] = []
        self.width: list[int] = []
        self.members: list[list[str]] = []
        self.reasons: list[list[str]] = []

    def new(self, width: int, member: str | None = None, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.width.append(width)
        self.members.append([member] if member else [])
        self.reasons.append([reason] if reason else [])
        return self.parent[-1]

    def find(self, gid: int) -> int:
        while self.parent[gid] != gid:
            self.parent[gid] = self.parent[self.parent[gid]]
            gid = self.parent[gid]
        return gid

    def union(self, a: int, b: int) -> None:
        a, b = sorted((self.find(a), self.find(b)))
        if a != b:
            self.parent[b] = a
            self.members[a] += self.members[b]
            self.reasons[a] += [reason for reason in self.reasons[b] if reason not in self.reasons[a]]

    def fix(self, gid: int, reason: str) -> None:
        root = self.find(gid)
        if reason not in self.reasons[root]:
            self.reasons[root].append(reason)

    def roots(self) -> list[int]:
        return [gid for gid in range(len(self.parent)) if self.find(gid) == gid]


class _Trace:
    """One pass over the model's graph: the channel description of every layer's input and output.

    A description lists, for each position of the tensor's last axis, the (group, channel) it carries; None
    means the channels are unknown. `unsupported` maps the layers left whole to the reason.
    """

    def __init__(self, model):
        self.groups = _Groups()
        self.io: dict[str, tuple[list | None, list | None]] = {}
        self.unsupported: dict[str, str] = {}
        self.types: dict[str, str] = {}
        described: dict[tuple, list | None] = {}
        nodes = graph_nodes(model)
        calls = Counter(node.layer.name for node in nodes)
        for node in nodes:
            layer = node.layer
            inputs, outputs = flat_tensors(node.keras_inputs), flat_tensors(node.outputs)
            self.types[layer.name] = type(layer).__name__
            if not inputs:  # an InputLayer
                described[_key(outputs[0])] = self._fresh(outputs[0], "the model input keeps its channels")
                continue
            descs = [described[_key(tensor)] for tensor in inputs]
            reason = _unsupported_reason(layer, inputs, outputs, descs, calls[layer.name])
            if reason:
                self.unsupported[layer.name] = reason
                self._fix(descs, f"feeds {layer.name}, which is left whole ({reason})")
                for tensor in outputs:
                    described[_key(tensor)] = self._fresh(tensor, f"output of {layer.name}, which is left whole")
                self.io[layer.name] = (None, None)
                continue
            desc = self._describe(layer, inputs, descs)
            described[_key(outputs[0])] = desc
            self.io[layer.name] = (descs[0], desc)
        for tensor in model.outputs:
            self._fix([described[_key(tensor)]], "reaches the model output (classifier)")

    def _fresh(self, tensor, reason: str) -> list | None:
        width = tensor.shape[-1] if tensor.shape.rank and tensor.shape.rank >= 2 else None
        if width is None:
            return None
        gid = self.groups.new(width, reason=reason)
        return [(gid, channel) for channel in range(width)]

    def _fix(self, descs, reason: str) -> None:
        for desc in descs:
            for gid in {gid for gid, _ in desc or ()}:
                self.groups.fix(gid, reason)

    def _describe(self, layer, inputs, descs) -> list:
        kind = type(layer).__name__
        if kind in PRUNABLE:
            width = layer.filters if kind == "Conv2D" else layer.units
            activation = layer.get_config().get("activation")
            reason = f"activation {activation} mixes channels" if activation in CROSS_CHANNEL_ACTIVATIONS else None
            gid = self.groups.new(width, member=layer.name, reason=reason)
            return [(gid, channel) for channel in range(width)]
        if kind in FIXED_OUTPUT:
            gid = self.groups.new(layer.filters, reason=f"{kind} filters are not removed")
            return [(gid, channel) for channel in range(layer.filters)]
        if kind == "DepthwiseConv2D":  # output channel c * multiplier + k reads input channel c
            return [pair for pair in descs[0] for _ in range(layer.depth_multiplier)]
        if kind == "Flatten":  # NHWC: position p * C + c holds channel c of pixel p
            return descs[0] * math.prod(inputs[0].shape[1:-1])
        if kind == "Concatenate":
            return [pair for desc in descs for pair in desc]
        if kind in JOINS:
            return self._join(layer, descs)
        return descs[0]

    def _join(self, layer, descs) -> list:
        """Merge the channel sets lined up by an element-wise join; fix them all where they do not line up."""
        first = descs[0]
        pairs = {(gid, other) for desc in descs[1:] for (gid, _), (other, _) in zip(desc, first)}
        lined_up = all(
            len(desc) == len(first)
            and all(channel == first_channel for (_, channel), (_, first_channel) in zip(desc, first))
            for desc in descs[1:]
        ) and all(self.groups.width[self.groups.find(a)] == self.groups.width[self.groups.find(b)] for a, b in pairs)
        if not lined_up:
            self._fix(descs, f"joined by {layer.name} with channels that do not line up")
            return first
        for a, b in pairs:
            self.groups.union(a, b)
        return first


def _unsupported_reason(layer, inputs, outputs, descs, calls: int) -> str | None:
    """Why the trace cannot follow `layer` (None: it can)."""
    from compress.keras import keras

    kind = type(layer).__name__
    if kind not in SUPPORTED or type(layer) is not getattr(keras.layers, kind):
        return f"{kind} layers are not supported"
    if calls > 1:
        return "a layer called more than once"
    if len(outputs) != 1:
        return "a layer with several outputs"
    if any(desc is None for desc in descs):
        return "its input channels are unknown"
    if kind not in JOINS + ("Concatenate",) and len(inputs) != 1:
        return "a layer with several inputs"
    if getattr(layer, "data_format", "channels_last") != "channels_last":
        return "channels_first data"
    rank = inputs[0].shape.rank
    if kind == "Conv2D" and layer.groups != 1:
        return "a grouped convolution"
    if kind == "BatchNormalization" and list(layer.axis) not in ([rank - 1], [-1]):
        return "normalises an axis other than the channels"
    if kind == "Activation" and layer.get_config()["activation"] in CROSS_CHANNEL_ACTIVATIONS:
        return f"activation {layer.get_config()['activation']} mixes channels"
    if kind == "Concatenate" and layer.axis not in (-1, rank - 1):
        return "concatenates along an axis other than the channels"
    if kind == "Flatten" and any(dim is None for dim in inputs[0].shape[1:]):
        return "flattens a tensor of unknown size"
    return None


def _choose_channels(model, trace: _Trace, targets: dict[str, float], score: str,
                     multiple: int) -> dict[int, list | None]:
    """Kept channels of each group root, highest score first then lowest index; None: keep all."""
    import numpy as np

    groups = trace.groups
    keep: dict[int, list | None] = {}
    for root in groups.roots():
        members = groups.members[root]
        width = groups.width[root]
        count = None if not members or groups.reasons[root] else kept_count(
            width, min(targets[name] for name in members), multiple)
        if count is None or count == width:
            keep[root] = None
            continue
        scores = sum(_channel_scores(model.get_layer(name), score) for name in members)
        keep[root] = sorted(int(i) for i in np.argsort(-scores, kind="stable")[:count])
    return keep


def kept_count(width: int, share: float, multiple: int = 1) -> int:
    """Channels that stay of `width` when the share `share` goes, at least one. CPU kernels work on blocks of
    channels (onnxruntime's: 8 with AVX2, 16 with AVX-512), and a layer of 21 channels ran slower than one of 32, so
    with `multiple` > 1 the count is the nearest multiple of it (never 0 nor more than `width`); layers narrower than
    two multiples keep the unrounded count."""
    count = width - min(width - 1, math.floor(share * width + ROUNDING_SLACK))
    if multiple <= 1 or width < 2 * multiple:
        return count
    return min(width, max(multiple, multiple * math.floor(count / multiple + 0.5)))


def _channel_scores(layer, score: str):
    """The norm of each output channel's kernel weights."""
    import numpy as np

    kernel = layer.get_weights()[0]
    flat = kernel.reshape(-1, kernel.shape[-1])
    return np.abs(flat).sum(axis=0) if score == "l1" else np.sqrt(np.square(flat).sum(axis=0))


def _kept(trace: _Trace, keep: dict[int, list | None], desc) -> list | None:
    """Positions of a described tensor's channels that stay; None when all of them do."""
    if desc is None:
        return None
    roots = [trace.groups.find(gid) for gid, _ in desc]
    if all(keep[root] is None for root in roots):
        return None
    sets = {root: set(keep[root]) for root in set(roots) if keep[root] is not None}
    return [i for i, (root, (_, channel)) in enumerate(zip(roots, desc)) if root not in sets or channel in sets[root]]


def _rebuild(model, trace: _Trace, keep):
    """A clone with fewer filters/units in the pruned layers, carrying the kept slices of every weight."""
    from compress.keras import keras

    sizes = {}
    for name, (_, out_desc) in trace.io.items():
        if trace.types[name] in PRUNABLE and (kept := _kept(trace, keep, out_desc)) is not None:
            sizes[name] = len(kept)

    def clone(layer):
        config = layer.get_config()
        if layer.name in sizes:
            config["filters" if "filters" in config else "units"] = sizes[layer.name]
        return layer.__class__.from_config(config)

    new_model = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        in_desc, out_desc = trace.io.get(layer.name, (None, None))
        weights = _slice(layer, layer.get_weights(), _kept(trace, keep, in_desc), _kept(trace, keep, out_desc))
        new_model.get_layer(layer.name).set_weights(weights)
    return new_model


def _slice(layer, weights: list, kept_in, kept_out) -> list:
    """`layer`'s weights restricted to the kept input and output channels (None: all)."""
    import numpy as np

    def take(array, kept, axis):
        return array if kept is None else np.take(array, kept, axis=axis)

    kind = type(layer).__name__
    if kind in ("Conv2D", "Dense"):
        kernel = take(take(weights[0], kept_in, -2), kept_out, -1)
        return [kernel] + [take(bias, kept_out, 0) for bias in weights[1:]]
    if kind == "DepthwiseConv2D":
        return [take(weights[0], kept_in, 2)] + [take(bias, kept_out, 0) for bias in weights[1:]]
    if kind == "SeparableConv2D":
        multiplier = layer.depth_multiplier
        middle = None if kept_in is None else [c * multiplier + k for c in kept_in for k in range(multiplier)]
        return [take(weights[0], kept_in, 2), take(weights[1], middle, 2)] + weights[2:]
    if kind == "Conv2DTranspose":  # kernel (h, w, filters, input channels)
        return [take(weights[0], kept_in, 3)] + weights[1:]
    if kind == "BatchNormalization":
        return [take(weight, kept_out, 0) for weight in weights]
    return weights


def _left_alone(trace: _Trace) -> dict[str, str]:
    """Layers left whole: those the trace cannot follow, and Conv2D/Dense layers whose channel set is fixed."""
    left = dict(trace.unsupported)
    groups = trace.groups
    for root in groups.roots():
        for name in groups.members[root]:
            if groups.reasons[root]:
                left[name] = "; ".join(groups.reasons[root])
    return left


def _info(model, new_model, trace: _Trace, keep, targets: dict[str, float], score: str) -> dict:
    """What was removed, per layer and per group, and what it saved (JSON-ready)."""
    groups = trace.groups
    member_root = {name: groups.find(gid) for gid in range(len(groups.parent)) for name in groups.members[gid]}
    layers = {}
    for name, (_, out_desc) in trace.io.items():
        if out_desc is None or trace.types[name] not in PRUNABLE + FIXED_OUTPUT + (
                "DepthwiseConv2D", "BatchNormalization"):
            continue
        kept = _kept(trace, keep, out_desc)
        before = len(out_desc)
        after = before if kept is None else len(kept)
        root = member_root.get(name)
        layers[name] = {
            "type": trace.types[name],
            "channels_before": before,
            "channels_after": after,
            "removed_share": (before - after) / before,
            "removed": [] if kept is None else sorted(set(range(before)) - set(kept)),
            "score": score if root is not None and keep[root] is not None else None,
        }
    group_info = []
    for root in groups.roots():
        members = groups.members[root]
        if not members:
            continue
        width = groups.width[root]
        group_info.append({
            "layers": members,
            "channels_before": width,
            "channels_after": width if keep[root] is None else len(keep[root]),
            "sparsity": None if keep[root] is None else min(targets[name] for name in members),
            "pruned": keep[root] is not None,
            "reasons": groups.reasons[root],
        })
    info = {
        "score": score,
        "layers": layers,
        "groups": group_info,
        "left_alone": _left_alone(trace),
        "params_before": int(model.count_params()),
        "params_after": int(new_model.count_params()),
    }
    for key, which in (("macs_before", model), ("macs_after", new_model)):
        try:
            info[key] = count_macs(which)
        except ModelError:  # spatial size unknown (None in the input shape)
            info[key] = None
    return info


def _key(tensor) -> tuple:
    history = tensor._keras_history
    return history.layer.name, history.node_index, history.tensor_index
