"""The report's two plots: accuracy against gzip size and against latency, with the Pareto front drawn."""

from __future__ import annotations

import math
import os
from pathlib import Path

from compress.files import atomic_path
from compress.report.summary import find_variant
from compress.report.tables import NOT_MEASURED, latency_threads_text
from compress.results import latency_key

def plot_accuracy(results: dict, summary: dict, axis: str, target: str | os.PathLike) -> Path:
    """Accuracy (%) against gzip size (kB) or batch-1 latency (ms), log x; Pareto front drawn; failed parity marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    batch = summary["latency_batch"]
    key, front_names, xlabel, title = {
        "size": ("gzip_bytes", summary["pareto_size"], "gzip size (kB, log scale)", "Accuracy vs gzip size"),
        "latency": (latency_key(batch or 1), summary["pareto_latency"], f"batch-{batch} latency (ms, log scale)",
                    f"Accuracy vs batch-{batch} latency"),
    }[axis]
    scale = 1e-3 if axis == "size" else 1.0
    figure = Figure(figsize=(8, 5.5), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    plotted, skipped = [], []
    for v in results["variants"]:
        if v.get(key) is None or v["accuracy"] is None:
            skipped.append(v["name"])
            continue
        plotted.append((v["name"], v[key] * scale, v["accuracy"] * 100.0, v["parity_ok"]))
    front = {name for name in front_names}
    kinds = {
        "front": dict(marker="o", s=70, color="tab:blue", edgecolors="black", linewidths=1.2, zorder=4),
        "ok": dict(marker="o", s=40, color="tab:gray", zorder=3),
        "unchecked": dict(marker="o", s=40, facecolors="none", edgecolors="tab:gray", zorder=3),
        "failed": dict(marker="x", s=60, color="tab:red", linewidths=1.8, zorder=3),
    }
    labels = {"front": "Pareto front (parity ok)", "ok": "parity ok", "unchecked": "parity not checked",
              "failed": "parity FAILED (excluded)"}
    for kind, style in kinds.items():
        members = [p for p in plotted if _plot_kind(p, front) == kind]
        if members:
            ax.scatter([p[1] for p in members], [p[2] for p in members], label=labels[kind], **style)
    for (name, x, y, _), dy in zip(plotted, _label_offsets([(p[1], p[2]) for p in plotted])):
        ax.annotate(name, (x, y), xytext=(5, dy), textcoords="offset points", fontsize=8)
    front_points = sorted((x, y) for name, x, y, _ in plotted if name in front)
    if len(front_points) > 1:
        ax.step([p[0] for p in front_points], [p[1] for p in front_points], where="post",
                color="tab:blue", linewidth=1.2, zorder=2)
    base = find_variant(results, results["baseline"])
    if base["accuracy"] is not None:
        ax.axhline(base["accuracy"] * 100.0, color="tab:green", linestyle=":", linewidth=1,
                   label=f"baseline accuracy ({base['name']})")
        ax.axhline((base["accuracy"] * 100.0) - summary["tolerance_points"], color="tab:green", linestyle="--",
                   linewidth=0.8, alpha=0.6, label=f"baseline − {summary['tolerance_points']:g} point")
    if plotted:
        ax.set_xscale("log")
        _plain_log_ticks(ax, [p[1] for p in plotted])
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, f"no variant has both accuracy and {xlabel.split(' (')[0]} measured",
                ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy (%)")
    subtitle = md_plain(str(results["machine"].get("cpu", "")))
    if axis == "latency":
        subtitle += f"; {latency_threads_text(results)}"
    ax.set_title(f"{title}\n{subtitle}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    if skipped:
        figure.text(0.01, 0.01, f"not plotted ({NOT_MEASURED}): {', '.join(skipped)}", fontsize=7)
    figure.tight_layout(rect=(0, 0.03, 1, 1))
    target = Path(target)
    with atomic_path(target) as partial:
        figure.savefig(partial, format="png")
    return target


def _label_offsets(points: list[tuple[float, float]]) -> list[float]:
    """Vertical label offsets (in points) that keep labels of near-coincident points from printing over each other."""
    if not points:
        return []
    xs = [math.log10(x) for x, _ in points]
    ys = [y for _, y in points]
    x_span = (max(xs) - min(xs)) or 1.0
    y_span = (max(ys) - min(ys)) or 1.0
    placed: list[tuple[float, float]] = []
    offsets = []
    for x, y in zip(xs, ys):
        nx, ny = (x - min(xs)) / x_span, (y - min(ys)) / y_span
        offset = 4.0
        while any(abs(nx - px) < 0.12 and abs(ny + offset / 300 - py) < 0.035 for px, py in placed):
            offset -= 10.0
        placed.append((nx, ny + offset / 300))
        offsets.append(offset)
    return offsets


def _plain_log_ticks(ax, xs: list[float]) -> None:
    """Tick labels as plain numbers (0.1, 2, 500) instead of powers of ten; minor ones labelled on a short axis."""
    from matplotlib.ticker import FuncFormatter

    short = max(xs) / min(xs) < 30

    def major(value, _):
        return f"{value:g}"

    def minor(value, _):
        leading = f"{value:e}"[0]
        return f"{value:g}" if short and leading in "235" else ""

    ax.xaxis.set_major_formatter(FuncFormatter(major))
    ax.xaxis.set_minor_formatter(FuncFormatter(minor))


def _plot_kind(point, front) -> str:
    name, _, _, parity = point
    if parity is False:
        return "failed"
    if parity is None:
        return "unchecked"
    return "front" if name in front else "ok"


def md_plain(text: str) -> str:
    return text.replace("\n", " ")
