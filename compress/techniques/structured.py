"""Structured pruning: remove whole Conv2D / SeparableConv2D filters and Dense units and rebuild a smaller model.

Magnitude pruning (tfmot) only zeroes weights, so the exported files are no faster; removing channels makes the
layers themselves smaller, so parameters and multiply-adds really go down. The model's graph is traced once
(compress.techniques.channel_trace): layers whose channels must go together form one group. Layers the trace cannot
follow are left whole, with everything whose channels they would have to match, and reported rather than refused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from compress.errors import ConfigError, ModelError, listed
from compress.kerasmodel import count_macs
from compress.techniques.channel_trace import FIXED_OUTPUT, PRUNABLE, ChannelTrace
from compress.techniques.finetune import is_number

SCORES = ("l1", "l2")
# floor(sparsity * channels) without 0.29 * 100 = 28.999... rounding one channel away.
ROUNDING_SLACK = 1e-9
MAX_MULTIPLE = 256


def remove_channels(model, *, sparsity: float, layer_sparsity: Mapping[str, float] | None = None,
                    score: str = "l1", multiple: int = 1) -> tuple:
    """Remove the share `sparsity` of each prunable layer's output channels; return (smaller model, info).

    Prunable: Conv2D and SeparableConv2D filters and Dense units, except those reaching a model output (the
    classifier) or joined with channels that cannot change (the model input, a layer the trace cannot follow).
    `layer_sparsity`
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
    trace = ChannelTrace(model)
    keep = _choose_channels(model, trace, targets, score, multiple)
    if not any(keep[root] is not None for root in trace.groups.roots()):
        reasons = [f"{name}: {reason}" for name, reason in _left_alone(trace).items()]
        raise ModelError(f"model {model.name!r} has no layer whose channels can be removed: "
                         f"{listed(reasons, 3, '; ')}")
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


def _choose_channels(model, trace: ChannelTrace, targets: dict[str, float], score: str,
                     multiple: int) -> dict[int, list | None]:
    """Kept channels of each group root, highest score first then lowest index; None: keep all."""
    import numpy as np

    groups = trace.groups
    keep: dict[int, list | None] = {}
    for root in groups.roots():
        members = groups.members[root]
        if not members or groups.reasons[root]:
            keep[root] = None
            continue
        count = kept_count(groups.width[root], min(targets[name] for name in members), multiple)
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
    """The norm of each output channel's kernel weights (a SeparableConv2D's pointwise kernel)."""
    import numpy as np

    kernel = layer.get_weights()[1 if type(layer).__name__ == "SeparableConv2D" else 0]
    flat = kernel.reshape(-1, kernel.shape[-1])
    return np.abs(flat).sum(axis=0) if score == "l1" else np.sqrt(np.square(flat).sum(axis=0))


def _kept(trace: ChannelTrace, keep: dict[int, list | None], desc) -> list | None:
    """Positions of a described tensor's channels that stay; None when all of them do."""
    if desc is None:
        return None
    roots = [trace.groups.find(gid) for gid, _ in desc]
    if all(keep[root] is None for root in roots):
        return None
    sets = {root: set(keep[root]) for root in set(roots) if keep[root] is not None}
    return [i for i, (root, (_, channel)) in enumerate(zip(roots, desc)) if root not in sets or channel in sets[root]]


def _rebuild(model, trace: ChannelTrace, keep):
    """A clone with fewer filters/units in the pruned layers, carrying the kept slices of every weight."""
    from compress.keras import keras

    sizes = {}
    for name, (_, out_desc) in trace.io.items():
        if (trace.types[name] in PRUNABLE + ("Reshape",)) and (kept := _kept(trace, keep, out_desc)) is not None:
            sizes[name] = len(kept)

    def clone(layer):
        config = layer.get_config()
        if layer.name in sizes and type(layer).__name__ == "Reshape":  # its shape is written out: the new last axis
            config["target_shape"] = (*tuple(config["target_shape"])[:-1], sizes[layer.name])
        elif layer.name in sizes:
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
    if kind == "SeparableConv2D":  # depthwise (h, w, in, multiplier), pointwise (1, 1, in * multiplier, filters)
        multiplier = layer.depth_multiplier
        middle = None if kept_in is None else [c * multiplier + k for c in kept_in for k in range(multiplier)]
        pointwise = take(take(weights[1], middle, 2), kept_out, 3)
        return [take(weights[0], kept_in, 2), pointwise] + [take(bias, kept_out, 0) for bias in weights[2:]]
    if kind == "Conv2DTranspose":  # kernel (h, w, filters, input channels)
        return [take(weights[0], kept_in, 3)] + weights[1:]
    if kind == "BatchNormalization":
        return [take(weight, kept_out, 0) for weight in weights]
    if kind == "PReLU":  # slopes (..., channels) per position and channel, or shared by all channels (..., 1)
        return [weights[0] if weights[0].shape[-1] == 1 else take(weights[0], kept_out, -1)]
    if kind == "Normalization":  # mean and variance per channel, then a scalar count
        return [take(weight, kept_out, -1) if np.ndim(weight) else weight for weight in weights]
    return weights


def _left_alone(trace: ChannelTrace) -> dict[str, str]:
    """Layers left whole: those the trace cannot follow, and prunable layers whose channel set is fixed."""
    left = dict(trace.unsupported)
    groups = trace.groups
    for root in groups.roots():
        for name in groups.members[root]:
            if groups.reasons[root]:
                left[name] = "; ".join(groups.reasons[root])
    return left


def _info(model, new_model, trace: ChannelTrace, keep, targets: dict[str, float], score: str) -> dict:
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
