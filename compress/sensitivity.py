"""Per-layer sensitivity: how much validation accuracy each Conv2D/SeparableConv2D/Dense layer loses to pruning
and to int8, alone.

Pruning is one-shot with no fine-tune: a layer's smallest weights are zeroed (or, with structure channels, the share
of its channels with the smallest L1 norm removed, the layers joined with it losing the same ones, as `compress prune
--structure channels` removes them), the validation split measured, the weights restored. So the figures rank
layers (a fine-tune recovers much of the loss); they are not the accuracy `compress prune` reaches. int8 is
measured on the real files: the float model is converted to ONNX once and quantized with onnxruntime (QDQ, as
`compress ptq` does) with one layer alone quantized, and with one
layer alone kept float, each file run in onnxruntime. The validation split is used throughout, so that choosing
settings from these figures leaves the test split unseen. The proposal spends a drop budget evenly over the layers.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from compress.errors import ConfigError, ModelError

DEFAULT_SPARSITIES = (0.5, 0.7, 0.9, 0.95)
CALIBRATION_IMAGES = 256  # at most this many training images calibrate the int8 activation ranges
BATCH = 256
PRUNING_METHOD = "one-shot, no fine-tune"
STRUCTURES = ("none", "channels")


def parse_sparsities(text: str) -> tuple[float, ...]:
    """'0.5,0.9' -> (0.5, 0.9); a word where a number belongs is one ConfigError line."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"sparsities must be numbers such as 0.5,0.9, got {text!r}") from None


@dataclass(frozen=True)
class SensitivityConfig:
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES
    max_drop: float = 1.0  # validation-accuracy points the proposal may lose, over all layers together
    structure: str = "none"  # none: single weights zeroed; channels: whole channels removed

    def __post_init__(self):
        object.__setattr__(self, "sparsities", tuple(sorted(set(self.sparsities))))
        if not self.sparsities or not all(_number(s) and 0 < s < 1 for s in self.sparsities):
            raise ConfigError(f"sparsities must be numbers in (0, 1), got {','.join(map(str, self.sparsities))}")
        if not (_number(self.max_drop) and 0 <= self.max_drop < math.inf):
            raise ConfigError(f"max_drop must be a number of accuracy points >= 0, got {self.max_drop!r}")
        if self.structure not in STRUCTURES:
            raise ConfigError(f"structure must be one of {', '.join(STRUCTURES)}, got {self.structure!r}")

    def to_dict(self) -> dict:
        return {"sparsities": list(self.sparsities), "max_drop": self.max_drop, "structure": self.structure}

    def method(self) -> str:
        return PRUNING_METHOD + (", whole channels (L1 norm)" if self.structure == "channels" else "")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value)


def analyse(model, data, config: SensitivityConfig, *, out_dir, log=print) -> dict:
    """Measure every Conv2D/SeparableConv2D/Dense layer, write OUT/sensitivity.json, .csv and .png; return the
    JSON's content."""
    from compress.files import write_json, write_text
    from compress.kerasmodel import count_macs, layer_macs, strip_training_wrappers
    from compress.report.sensitivity_plot import plot_sensitivity
    from compress.techniques.finetune import copy_model, main_kernel, weight_layers

    model = copy_model(strip_training_wrappers(model)[0])  # weights are changed and restored on a copy
    layers = weight_layers(model)
    if not layers:
        raise ModelError(f"model {model.name!r} has no Conv2D/SeparableConv2D/Dense layer to analyse")
    val_images, val_labels = data.normalized("val")
    baseline = _accuracy(_keras_predict(model, val_images), val_labels)
    log(f"sensitivity: {len(layers)} layers, {len(val_labels)} validation images, baseline validation accuracy "
        f"{baseline:.4f}; pruning {config.method()}")
    weights = {layer.name: int(main_kernel(layer).shape.num_elements()) for layer in layers}
    macs, total_macs = layer_macs(model), count_macs(model)
    int8 = _int8_drops(model, [layer.name for layer in layers], data, val_images, val_labels, log)
    channel_groups = _channel_groups(model) if config.structure == "channels" else {}
    rows = []
    for layer in layers:
        if config.structure == "channels":
            curve = _channel_curve(model, channel_groups.get(layer.name), config.sparsities, val_images, val_labels)
        else:
            curve = _prune_curve(model, layer, config.sparsities, val_images, val_labels)
        row = {
            "layer": layer.name,
            "type": type(layer).__name__,
            "weights": weights[layer.name],
            "weight_share": weights[layer.name] / sum(weights.values()),
            "macs": macs.get(layer.name, 0),
            "mac_share": macs.get(layer.name, 0) / total_macs if total_macs else 0.0,
            "val_accuracy": {str(s): acc for s, acc in curve.items()},
            "drop_points": {str(s): _points(baseline - acc) for s, acc in curve.items()},
            **int8["layers"][layer.name],
        }
        rows.append(row)
        log(f"  {layer.name}: {row['weight_share']:.1%} of weights, {row['mac_share']:.1%} of multiply-adds; "
            + (", ".join(f"{s:g}: {acc:.4f}" for s, acc in curve.items()) or "channels stay (classifier or joined "
               "with channels that cannot change)")
            + f"; int8 alone drop {_show(row['int8_alone_drop'])}, float alone drop {_show(row['float_alone_drop'])}")
    proposal = propose(rows, config)
    result = {
        "model": model.name,
        "settings": {**config.to_dict(), "split": "val", "pruning": config.method(),
                     "calibration_images": int8["calibration_images"]},
        "data": data.describe(),
        "baseline_val_accuracy": baseline,
        "int8": {key: value for key, value in int8.items() if key != "layers"},
        "layers": rows,
        "proposal": proposal,
    }
    out_dir = Path(out_dir)
    write_json(out_dir / "sensitivity.json", result)
    write_text(out_dir / "sensitivity.csv", _csv(rows, config.sparsities))
    plot_sensitivity(result, out_dir / "sensitivity.png")
    for line in proposal["lines"]:
        log(line)
    return result


def _keras_predict(model, images: np.ndarray) -> np.ndarray:
    from compress.kerasmodel import keras_outputs

    return keras_outputs(model, images, BATCH)


def _accuracy(outputs: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(np.argmax(outputs, axis=-1) == labels))


def _points(drop: float) -> float:
    """An accuracy difference in percentage points, rounded where float noise ends."""
    return round(drop * 100.0, 6)


def _show(value) -> str:
    return "n/a" if value is None else f"{value:.2f} points"


def _prune_curve(model, layer, sparsities, images, labels) -> dict[float, float]:
    """Validation accuracy with the layer's smallest-magnitude kernel weights zeroed, one sparsity at a time."""
    from compress.techniques.finetune import main_kernel

    variable = main_kernel(layer)
    kernel = variable.numpy()
    order = np.argsort(np.abs(kernel), axis=None, kind="stable")
    curve = {}
    try:
        for sparsity in sparsities:
            pruned = kernel.copy().reshape(-1)
            pruned[order[: int(round(sparsity * kernel.size))]] = 0.0
            variable.assign(pruned.reshape(kernel.shape))
            curve[sparsity] = _accuracy(_keras_predict(model, images), labels)
    finally:
        variable.assign(kernel)
    return curve


def _channel_groups(model) -> dict[str, list[str]]:
    """Layer name -> the layers that lose the same channels with it, for every layer whose channels can go."""
    from compress.techniques.structured import remove_channels

    try:
        _, info = remove_channels(model, sparsity=0.5)
    except ModelError:  # no layer of this model can lose channels
        return {}
    return {name: group["layers"] for group in info["groups"] if group["pruned"] for name in group["layers"]}


def _channel_curve(model, group: list[str] | None, sparsities, images, labels) -> dict[float, float]:
    """Validation accuracy with the share s of the group's channels removed (by `compress prune`'s rule and channel
    multiple), one share at a time; empty for a layer whose channels stay."""
    from compress.techniques.prune import CHANNEL_MULTIPLE
    from compress.techniques.structured import remove_channels

    curve = {}
    for sparsity in sparsities if group else ():
        smaller, _ = remove_channels(model, sparsity=0.0, layer_sparsity={name: sparsity for name in group},
                                     multiple=CHANNEL_MULTIPLE)
        curve[sparsity] = _accuracy(_keras_predict(smaller, images), labels)
    return curve


def _int8_drops(model, names: list[str], data, images, labels, log) -> dict:
    """Validation-accuracy drops (points, against the float ONNX file) of int8 files quantizing one layer alone and
    keeping one layer alone float; a layer without ONNX nodes of its name gets None and the reason."""
    import onnx

    from compress.runtimes import open_session
    from compress.techniques.ptq import PTQConfig, resolve_reduce_range, layer_nodes, prepare_float_onnx, quantize_qdq

    calibration = data.normalized("train")[0][:CALIBRATION_IMAGES]
    reduce_range = resolve_reduce_range(PTQConfig())
    with tempfile.TemporaryDirectory(prefix="compress-sensitivity-") as work:
        work = Path(work)
        prepared, _ = prepare_float_onnx(model, work)
        every_node = onnx.load(str(prepared)).graph.node
        nodes = layer_nodes(prepared, names)

        def accuracy(exclude) -> float:
            target = work / "int8.onnx"
            quantize_qdq(prepared, calibration, True, reduce_range, target, nodes_to_exclude=exclude)
            return _accuracy(open_session(target).predict(images, BATCH), labels)

        float_accuracy = _accuracy(open_session(prepared).predict(images, BATCH), labels)
        all_int8 = accuracy(())
        per_layer = {}
        for name in names:
            own = set(nodes[name])
            if not own:
                per_layer[name] = {"onnx_nodes": [], "int8_alone_drop": None, "float_alone_drop": None,
                                   "int8_note": f"no ONNX node has {name!r} in its name path"}
                continue
            alone = accuracy([node.name for node in every_node if node.name not in own])
            kept_float = accuracy(sorted(own))
            per_layer[name] = {"onnx_nodes": sorted(own), "int8_alone_drop": _points(float_accuracy - alone),
                               "float_alone_drop": _points(float_accuracy - kept_float)}
    log(f"int8: float ONNX {float_accuracy:.4f}, every layer int8 {all_int8:.4f} on the validation split")
    return {
        "float_onnx_val_accuracy": float_accuracy,
        "all_int8_val_accuracy": all_int8,
        "all_int8_drop": _points(float_accuracy - all_int8),
        "calibration_images": int(len(calibration)),
        "format": "onnx QDQ, int8 per-channel weights, uint8 activations (as compress ptq's onnx-qdq)",
        "reduce_range": bool(reduce_range),
        "node_matching": "an ONNX node belongs to a Keras layer when the layer's name is a folder of the node's "
                         "tf2onnx name path (model/layer/op)",
        "layers": per_layer,
    }


def propose(rows: list[dict], config: SensitivityConfig) -> dict:
    """Per-layer sparsities and float layers that each spend at most max_drop / layers points, in the forms
    `compress prune` and `compress ptq` take."""
    share = config.max_drop / len(rows)
    sparsity = {}
    for row in rows:
        fitting = [float(s) for s, drop in row["drop_points"].items() if drop <= share]
        sparsity[row["layer"]] = max(fitting, default=0.0)
        row["proposed_sparsity"] = sparsity[row["layer"]]
        row["keep_float"] = row["int8_alone_drop"] is not None and row["int8_alone_drop"] > share
    chosen = {name: s for name, s in sparsity.items() if s > 0}
    channels = config.structure == "channels"
    # channels: every layer named (0: whole), since unnamed ones would take prune's --sparsity; else --layers
    named = sparsity if channels else chosen
    layers_text = "" if channels else ",".join(chosen)
    layer_sparsity = ",".join(f"{name}={s:g}" for name, s in named.items())
    float_layers = ",".join(row["layer"] for row in rows if row["keep_float"])
    which = 'structure = "channels"' if channels else f"layers = {json.dumps(layers_text)}"
    toml = (f"settings = {{ {which}, layer_sparsity = {{ "
            + ", ".join(f"{json.dumps(name)} = {s:g}" for name, s in named.items()) + " } }")
    lines = [f"proposal for a budget of {config.max_drop:g} points ({share:.3g} per layer, {config.method()}):"]
    which = "--structure channels" if channels else f"--layers {layers_text}"
    lines.append(f"  compress prune MODEL {which} --layer-sparsity {layer_sparsity}" if chosen
                 else "  prune: no layer stays within its share at the tested sparsities")
    lines.append(f"  recipe: {toml}" if chosen else "")
    lines.append(f"  compress ptq MODEL --float-layers {float_layers}" if float_layers
                 else "  ptq: every layer stays within its share in int8")
    return {
        "budget_points": config.max_drop,
        "per_layer_points": share,
        "layer_sparsity": sparsity,
        "prune_layers": layers_text,
        "prune_layer_sparsity": layer_sparsity,
        "prune_toml": toml,
        "ptq_float_layers": float_layers,
        "lines": [line for line in lines if line],
    }


def allocate_channel_shares(rows: list[dict], target: float) -> dict[str, float]:
    """Per-layer channel shares, from those the analysis tried, that remove at least `target` of the analysed
    layers' weights at the least one-shot accuracy loss: each step raises the layer whose next share costs the
    fewest points per weight removed, until the target is reached or every layer is at its largest share. A fixed
    budget of points does not suit channels: removed one-shot, a quarter of a convolution's channels can cost tens
    of points that a fine-tune wins back. Counted are each layer's own weights (not the next layer's inputs that go
    with them), and the drops are taken to add up: a ranking of where to cut, not a prediction."""
    shares = {row["layer"]: 0.0 for row in rows}
    total = sum(row["weights"] for row in rows)
    curves = {row["layer"]: {float(s): drop for s, drop in row["drop_points"].items()} for row in rows}
    weights = {row["layer"]: row["weights"] for row in rows}
    removed = 0.0
    while removed < target * total:
        steps = []
        for name, curve in curves.items():
            share = shares[name]
            higher = sorted(s for s in curve if s > share)
            if higher:
                gained = (higher[0] - share) * weights[name]
                cost = max(curve[higher[0]] - curve.get(share, 0.0), 0.0)
                steps.append((cost / gained, name, higher[0], gained))
        if not steps:
            break
        _, name, share, gained = min(steps)
        shares[name] = share
        removed += gained
    return shares


def _csv(rows: list[dict], sparsities) -> str:
    import csv
    import io

    columns = ["layer", "type", "weights", "weight_share", "macs", "mac_share",
               *(f"val_accuracy@{s:g}" for s in sparsities), "int8_alone_drop", "float_alone_drop",
               "proposed_sparsity", "keep_float"]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([row["layer"], row["type"], row["weights"], f"{row['weight_share']:.6f}", row["macs"],
                         f"{row['mac_share']:.6f}", *(_csv_number(row["val_accuracy"].get(str(s))) for s in sparsities),
                         "" if row["int8_alone_drop"] is None else row["int8_alone_drop"],
                         "" if row["float_alone_drop"] is None else row["float_alone_drop"],
                         row["proposed_sparsity"], row["keep_float"]])
    return buffer.getvalue()


def _csv_number(value: float | None) -> str:
    """Blank where a layer has no figure (its channels stay)."""
    return "" if value is None else f"{value:.6f}"
