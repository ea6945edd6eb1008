"""The channel trace of structured pruning: which output channels of which layers must go together.

Every tensor's last axis is described channel by channel as (channel set, channel) pairs, so that pass-through
layers, Flatten, Concatenate and depthwise layers carry a choice to the layers that read it; tensors joined by Add
(and the other element-wise joins) merge their channel sets into one group. A layer the trace cannot follow fixes
everything whose channels it would have to match, with the reason.
"""

from __future__ import annotations

import math
from collections import Counter

from compress.kerasmodel import flat_tensors, graph_nodes

# Layers whose output channels are their own and can be removed (a SeparableConv2D's: its pointwise filters).
PRUNABLE = ("Conv2D", "SeparableConv2D", "Dense")
# Layers that read channels and whose weights follow the kept input channels; their output channels stay whole.
FIXED_OUTPUT = ("Conv2DTranspose",)
# Element-wise joins: every input must keep the same channels.
JOINS = ("Add", "Subtract", "Multiply", "Maximum", "Average")
# Per-channel or spatial-only layers: the output has the input's channels.
PASS_THROUGH = (
    "ReLU", "LeakyReLU", "ELU", "ThresholdedReLU", "PReLU", "Activation", "BatchNormalization",
    "Dropout", "SpatialDropout2D", "GaussianNoise", "GaussianDropout", "AlphaDropout", "ActivityRegularization",
    "MaxPooling2D", "AveragePooling2D", "GlobalAveragePooling2D", "GlobalMaxPooling2D",
    "ZeroPadding2D", "Cropping2D", "UpSampling2D", "Resizing", "CenterCrop", "Rescaling", "Normalization",
)
SUPPORTED = PRUNABLE + FIXED_OUTPUT + JOINS + PASS_THROUGH + ("DepthwiseConv2D", "Flatten", "Reshape", "Concatenate")
# Activations that mix channels: removing one changes the others.
CROSS_CHANNEL_ACTIVATIONS = ("softmax", "log_softmax")


class ChannelGroups:
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


class ChannelTrace:
    """One pass over the model's graph: the channel description of every layer's input and output.

    A description lists, for each position of the tensor's last axis, the (group, channel) it carries; None
    means the channels are unknown. `unsupported` maps the layers left whole to the reason.
    """

    def __init__(self, model):
        self.groups = ChannelGroups()
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
            width = layer.units if kind == "Dense" else layer.filters
            activation = layer.get_config().get("activation")
            reason = f"activation {activation} mixes channels" if activation in CROSS_CHANNEL_ACTIVATIONS else None
            gid = self.groups.new(width, member=layer.name, reason=reason)
            return [(gid, channel) for channel in range(width)]
        if kind in FIXED_OUTPUT:
            gid = self.groups.new(layer.filters, reason=f"{kind} filters are not removed")
            return [(gid, channel) for channel in range(layer.filters)]
        if kind == "DepthwiseConv2D":  # output channel c * multiplier + k reads input channel c
            return [pair for pair in descs[0] for _ in range(layer.depth_multiplier)]
        if kind == "Flatten" or reshape_kind(layer) == "flatten":  # NHWC: position p * C + c: channel c of pixel p
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
    import numpy as np

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
    if kind == "PReLU" and layer.get_weights()[0].shape[-1] not in (1, inputs[0].shape[-1]):
        return "its slopes do not follow the channels"
    if kind == "Rescaling" and (np.ndim(layer.scale) or np.ndim(layer.offset)):
        return "rescales each channel by its own factor"
    if kind == "Normalization" and list(layer.axis) not in ([rank - 1], [-1]):
        return "normalises an axis other than the channels"
    if kind == "Activation" and layer.get_config()["activation"] in CROSS_CHANNEL_ACTIVATIONS:
        return f"activation {layer.get_config()['activation']} mixes channels"
    if kind == "Concatenate" and layer.axis not in (-1, rank - 1):
        return "concatenates along an axis other than the channels"
    if kind == "Flatten" and any(dim is None for dim in inputs[0].shape[1:]):
        return "flattens a tensor of unknown size"
    if kind == "Reshape" and reshape_kind(layer) is None:
        return "reshapes across the channels"
    return None


def reshape_kind(layer) -> str | None:
    """How a Reshape moves channels: "channels" where it keeps the last axis (an SE block's (C,) -> (1, 1, C),
    (H, W, C) -> (H * W, C)): row-major order leaves each value in its channel; "flatten" where it flattens an image
    as Flatten does; None for anything else (or another layer)."""
    if type(layer).__name__ != "Reshape":
        return None
    before, after = tuple(layer.input_shape[1:]), tuple(layer.output_shape[1:])
    if None in before or None in after or not before or not after:
        return None
    if before[-1] == after[-1]:
        return "channels"
    if len(after) == 1 and len(before) > 1 and after[0] == math.prod(before):
        return "flatten"
    return None


def _key(tensor) -> tuple:
    history = tensor._keras_history
    return history.layer.name, history.node_index, history.tensor_index
