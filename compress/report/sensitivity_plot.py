"""The sensitivity plot: validation accuracy against one-shot sparsity per layer, and each layer's int8 drop."""

from __future__ import annotations

import os
from pathlib import Path

from compress.files import atomic_path


def plot_sensitivity(result: dict, target: str | os.PathLike) -> Path:
    """Left: validation accuracy (%) vs sparsity, one line per layer, baseline dotted; right: int8 drop per layer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, sparsities = result["layers"], result["settings"]["sparsities"]
    figure = Figure(figsize=(12, 5), dpi=110)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    for row in (row for row in rows if row["val_accuracy"]):  # (a layer whose channels stay has no curve)
        left.plot([0.0, *sparsities], [result["baseline_val_accuracy"] * 100.0,
                                       *(row["val_accuracy"][str(s)] * 100.0 for s in sparsities)],
                  marker="o", label=f"{row['layer']} ({row['weight_share']:.0%} of weights)")
    left.axhline(result["baseline_val_accuracy"] * 100.0, color="gray", linestyle=":", linewidth=1, label="baseline")
    channels = result["settings"].get("structure") == "channels"
    left.set_xlabel("share of the layer's channels removed" if channels else "sparsity of the layer alone")
    left.set_ylabel("validation accuracy (%)")
    left.set_title(f"Pruning one layer ({result['settings']['pruning']})", fontsize=10)
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8, loc="best")
    names = [row["layer"] for row in rows]
    drops = [row["int8_alone_drop"] for row in rows]
    right.bar(range(len(rows)), [0.0 if drop is None else drop for drop in drops],
              color=["tab:gray" if drop is None else "tab:red" if row["keep_float"] else "tab:blue"
                     for drop, row in zip(drops, rows)])
    right.axhline(result["proposal"]["per_layer_points"], color="tab:red", linestyle="--", linewidth=0.8,
                  label=f"per-layer budget {result['proposal']['per_layer_points']:.3g} points")
    right.set_xticks(range(len(rows)), names, rotation=45, ha="right", fontsize=8)
    right.set_ylabel("validation accuracy drop (points)")
    right.set_title("int8 (ONNX QDQ) on that layer alone; red: keep float, gray: no ONNX node", fontsize=10)
    right.grid(True, axis="y", alpha=0.3)
    right.legend(fontsize=8, loc="best")
    figure.tight_layout()
    target = Path(target)
    with atomic_path(target) as partial:
        figure.savefig(partial, format="png")
    return target
