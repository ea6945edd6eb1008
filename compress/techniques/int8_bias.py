"""A QAT model's biases on the grid its int8 file stores them on, so that the Keras model computes what the file does.

tfmot's QAT simulates int8 weights and activations but keeps every bias (with a BatchNormalization folded into its
convolution: beta - mean * gamma / sqrt(variance + epsilon)) in float. The int8 file stores it as int32 steps of
input scale x weight scale, per output channel: up to half a step off, the same offset at every position of the
channel. A shallow model never notices; a deep one can: in MobileNetV2 (alpha 0.35) the depthwise layers' folded
BatchNorm gains reach 30, and those offsets turned into 11 points of top-1 disagreement between the QAT Keras model
and its int8 file (0.880; 0.988 with the biases moved onto the grid). Moving each bias onto that grid (by less than
half a step) leaves the int8 file as it was and makes the Keras model compute what it computes.
"""

from __future__ import annotations

import numpy as np

from compress.kerasmodel import variable_short_name


def biases_on_int8_grid(model) -> dict:
    """Move each bias of QAT `model` that its int8 file stores (the converter's view) onto that file's int32 grid.

    Returns {"moved": layer names, "largest_move_steps": the largest move in grid steps (at most 0.5),
    "clamped_channels": {layer: channels whose bias the file clamps to the int32 limits, which stay as trained}};
    layers whose bias cannot be matched with the file's (no bias there, no foldable BatchNormalization) are left alone.
    """
    from compress.export.convert import int8_file_biases

    file_biases = int8_file_biases(model)
    moved, largest, clamped = [], 0.0, {}
    for layer in model.layers:
        folded = _folded_bias(layer)
        if folded is None or layer.name not in file_biases:
            continue
        value, assign = folded
        target, step = file_biases[layer.name]
        if target.shape != value.shape:
            continue
        held = ~np.isnan(target)  # the others the file clamped: it computes something else there, whatever we do
        move = np.abs(np.where(held, target, value) - value)
        # float32 noise: a channel whose weights are all zero (pruned) gets a scale of ~1e-8, a step below it
        noise = 1e-6 * np.abs(value)
        if not np.all(move <= 0.5 * step * (1 + 1e-3) + noise):  # not the bias the file holds for this layer
            continue
        assign(np.where(held, target, value))
        moved.append(layer.name)
        largest = max(largest, float(np.max(np.where(move > noise, move / step, 0.0))))
        if not held.all():
            clamped[layer.name] = int(np.count_nonzero(~held))
    return {"moved": moved, "largest_move_steps": largest, "clamped_channels": clamped}


def _folded_bias(layer):
    """(the bias the int8 converter folds for a quantized Conv/DepthwiseConv/Dense wrapper, a function that sets it),
    or None: the layer's own bias, or with the BatchNormalization that alone follows it folded in."""
    inner = getattr(layer, "layer", None)
    if type(inner).__name__ not in ("Conv2D", "DepthwiseConv2D", "Dense"):
        return None
    variables = {variable_short_name(variable): variable for variable in layer.weights}
    bias = variables.get("bias")
    norm = _only_consumer(layer)
    if norm is None or type(getattr(norm, "layer", None)).__name__ != "BatchNormalization":
        if bias is None:
            return None
        return bias.numpy().astype(np.float64), lambda target: bias.assign(target.astype(np.float32))
    stats = {variable_short_name(variable): variable.numpy().astype(np.float64) for variable in norm.weights}
    gain = stats.get("gamma", 1.0) / np.sqrt(stats["moving_variance"] + norm.layer.epsilon)
    own = bias.numpy().astype(np.float64) if bias is not None else 0.0
    value = (own - stats["moving_mean"]) * gain + stats.get("beta", 0.0)
    beta = next((variable for variable in norm.weights if variable_short_name(variable) == "beta"), None)
    if beta is not None:
        return value, lambda target: beta.assign((stats["beta"] + target - value).astype(np.float32))
    if bias is not None:
        return value, lambda target: bias.assign((own + (target - value) / gain).astype(np.float32))
    return None


def _only_consumer(layer):
    nodes = layer._outbound_nodes  # noqa: SLF001 - Keras 2 exposes the layer graph only this way
    return nodes[0].outbound_layer if len(nodes) == 1 else None

