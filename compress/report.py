"""The report of a run: report.md, results.csv and two accuracy plots, all built from results.json alone.

results.json (read by other tools too)::

    {"machine": {...machine_info()...}, "baseline": NAME, "total_seconds": S,
     "stages": [{"name": ..., "seconds": ...}, ...],
     "variants": [{"name", "chain": [technique, ...], "file", "format", "accuracy" (fraction 0..1),
                   "file_bytes", "gzip_bytes", "params", "nonzero_params",
                   "latency_ms_b1", "latency_ms_b32", "parity_ok"}, ...]}

Every listed key must be present. A measured figure may be null where it was not measured; the report then
says "not measured", with the reason from the variant's optional ``"not_measured": {key: reason}``.
Optional keys used when present: machine "latency_threads", "latency_rounds"; per variant "latency_p95_ms_b1",
"latency_cuda_ms_b1", "latency_threads", "weight_bytes_by_dtype", "notes"; top level "cuda": {"measured": bool,
"reason": str},
"keras_reference": {...keras_latency()...}, "notes": [str, ...]. Other keys are carried along, unread.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Iterable

from compress.errors import ConfigError
from compress.io import atomic_path

REQUIRED_TOP = ("machine", "baseline", "total_seconds", "stages", "variants")
REQUIRED_VARIANT = (
    "name",
    "chain",
    "file",
    "format",
    "accuracy",
    "file_bytes",
    "gzip_bytes",
    "params",
    "nonzero_params",
    "latency_ms_b1",
    "latency_ms_b32",
    "parity_ok",
)
# Figures that may be null (not measured); everything else in REQUIRED_VARIANT must have a value.
MEASURED = ("accuracy", "file_bytes", "gzip_bytes", "params", "nonzero_params", "latency_ms_b1", "latency_ms_b32")
ACCURACY_TOLERANCE_POINTS = 1.0
REPORT_FILES = ("report.md", "results.csv", "accuracy_vs_size.png", "accuracy_vs_latency.png")
NOT_MEASURED = "not measured"
CSV_COLUMNS = (
    "variant",
    "chain",
    "format",
    "file",
    "accuracy",
    "delta_points",
    "file_bytes",
    "gzip_bytes",
    "x_smaller_gzip",
    "params",
    "nonzero_params",
    "latency_ms_b1",
    "latency_p95_ms_b1",
    "latency_ms_b32",
    "x_faster_b1",
    "latency_cuda_ms_b1",
    "parity_ok",
    "not_measured",
)


# --------------------------------------------------------------------------------------------- loading


def load_results(path: str | os.PathLike) -> dict:
    """Read and validate a results.json (or the results.json inside a folder); any problem is one ConfigError."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist; run the pipeline first, or point to a run folder")
    try:
        results = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    validate_results(results, source=str(path))
    return results


def validate_results(results, *, source: str = "results") -> None:
    """Check the results.json contract: every required key present, with a value of the right kind."""
    if not isinstance(results, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    for key in REQUIRED_TOP:
        if key not in results:
            raise ConfigError(f"{source}: missing key {key!r}")
    if not isinstance(results["machine"], dict):
        raise ConfigError(f"{source}: 'machine' must be an object")
    if not isinstance(results["stages"], list):
        raise ConfigError(f"{source}: 'stages' must be a list")
    for index, stage in enumerate(results["stages"]):
        for key in ("name", "seconds"):
            if not isinstance(stage, dict) or key not in stage:
                raise ConfigError(f"{source}: stage {index}: missing key {key!r}")
        _check_number(stage["seconds"], f"{source}: stage {index} ({stage['name']!r}): 'seconds'")
    _check_number(results["total_seconds"], f"{source}: 'total_seconds'")
    variants = results["variants"]
    if not isinstance(variants, list) or not variants:
        raise ConfigError(f"{source}: 'variants' must be a non-empty list")
    names = set()
    for index, variant in enumerate(variants):
        if not isinstance(variant, dict):
            raise ConfigError(f"{source}: variant {index} must be an object")
        label = f"variant {index} ({variant.get('name', '?')!r})"
        for key in REQUIRED_VARIANT:
            if key not in variant:
                raise ConfigError(f"{source}: {label}: missing key {key!r}")
        if not isinstance(variant["name"], str) or not variant["name"]:
            raise ConfigError(f"{source}: {label}: 'name' must be a non-empty string")
        if variant["name"] in names:
            raise ConfigError(f"{source}: variant name {variant['name']!r} appears twice")
        names.add(variant["name"])
        if not isinstance(variant["chain"], list) or not all(isinstance(step, str) for step in variant["chain"]):
            raise ConfigError(f"{source}: {label}: 'chain' must be a list of technique names")
        for key in MEASURED:
            _check_number(variant[key], f"{source}: {label}: {key!r}")
        for key in ("latency_p95_ms_b1", "latency_cuda_ms_b1"):
            _check_number(variant.get(key), f"{source}: {label}: {key!r}")
        if variant["accuracy"] is not None and variant["accuracy"] > 1:
            raise ConfigError(
                f"{source}: {label}: 'accuracy' must be a fraction between 0 and 1, got {variant['accuracy']!r}"
            )
        if variant["parity_ok"] not in (True, False, None):
            raise ConfigError(f"{source}: {label}: 'parity_ok' must be true, false or null")
    if results["baseline"] not in names:
        raise ConfigError(f"{source}: baseline {results['baseline']!r} is not one of the variants")


def _check_number(value, what: str) -> None:
    """A measured figure is a non-negative finite number, or null (not measured)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{what} must be a number or null, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"{what} must be a finite number >= 0, got {value!r}")


# --------------------------------------------------------------------------------------------- analysis


def pareto_front(points: Iterable[tuple[str, float | None, float | None]]) -> list[str]:
    """Names on the front of (name, cost, accuracy) points: no other point is as cheap and at least as accurate.

    Lower cost and higher accuracy are better; points with a missing figure are left out. The front is
    returned cheapest first; of identical points, the first by name is kept.
    """
    usable = [(cost, -accuracy, name) for name, cost, accuracy in points if cost is not None and accuracy is not None]
    front, best = [], -math.inf
    for cost, negative_accuracy, name in sorted(usable):
        if -negative_accuracy > best:
            front.append(name)
            best = -negative_accuracy
    return front


def ratio(reference, value) -> float | None:
    """reference / value, or None when either is missing or value is zero."""
    if reference is None or value is None or value == 0:
        return None
    return reference / value


def summarize(results: dict, *, tolerance_points: float = ACCURACY_TOLERANCE_POINTS) -> dict:
    """Best variant for size and for b1 latency within `tolerance_points` of the baseline's accuracy.

    Only variants whose parity check passed (parity_ok true) with a measured accuracy compete; the baseline
    competes too, so "best" may be the baseline itself. Also returns both Pareto fronts (same eligibility)
    and the variants left out for failed or unchecked parity.
    """
    variants = results["variants"]
    base = _variant(results, results["baseline"])
    base_accuracy = base["accuracy"]
    eligible = [v for v in variants if v["parity_ok"] is True and v["accuracy"] is not None]
    summary = {
        "baseline": base["name"],
        "baseline_accuracy": base_accuracy,
        "tolerance_points": tolerance_points,
        "best_size": None,
        "best_latency": None,
        "reason": None,
        "pareto_size": pareto_front((v["name"], v["gzip_bytes"], v["accuracy"]) for v in eligible),
        "pareto_latency": pareto_front((v["name"], v["latency_ms_b1"], v["accuracy"]) for v in eligible),
        "parity_failed": [v["name"] for v in variants if v["parity_ok"] is False],
        "parity_unchecked": [v["name"] for v in variants if v["parity_ok"] is None],
        "cuda": cuda_status(results),
    }
    if base_accuracy is None:
        summary["reason"] = "the baseline's accuracy was not measured"
        return summary
    floor = base_accuracy - tolerance_points / 100.0 - 1e-12
    within = [v for v in eligible if v["accuracy"] >= floor]
    for key, figure, reference_key, ratio_key in (
        ("best_size", "gzip_bytes", "gzip_bytes", "x_smaller_gzip"),
        ("best_latency", "latency_ms_b1", "latency_ms_b1", "x_faster_b1"),
    ):
        measured = [v for v in within if v[figure] is not None]
        if not measured:
            continue
        best = min(measured, key=lambda v: (v[figure], -v["accuracy"], v["name"]))
        summary[key] = {
            "name": best["name"],
            figure: best[figure],
            "accuracy": best["accuracy"],
            "delta_points": (best["accuracy"] - base_accuracy) * 100.0,
            ratio_key: ratio(base[reference_key], best[figure]),
        }
    return summary


def cuda_status(results: dict) -> dict:
    """Whether CUDA latency was measured, for which variants, and if not, why not."""
    measured = [v["name"] for v in results["variants"] if v.get("latency_cuda_ms_b1") is not None]
    recorded = results.get("cuda") or {}
    if measured:
        return {"measured": True, "variants": measured, "reason": recorded.get("reason")}
    return {"measured": False, "variants": [], "reason": recorded.get("reason") or "no reason recorded"}


def format_summary(summary: dict) -> list[str]:
    """The summary as plain lines, for the console at the end of a run and for `compress report`."""
    points = summary["tolerance_points"]
    tolerance = f"within {points:g} point{'' if points == 1 else 's'} of the baseline's accuracy"
    lines = []
    if summary["reason"]:
        lines.append(f"no best variant named: {summary['reason']}")
    best = summary["best_size"]
    if best is not None:
        lines.append(
            f"smallest {tolerance}: {best['name']} ({format_bytes(best['gzip_bytes'])} gzip, "
            f"{_times_value(best['x_smaller_gzip'])} smaller; {_accuracy_text(best)})"
        )
    elif not summary["reason"]:
        lines.append(f"smallest {tolerance}: none with gzip size measured")
    best = summary["best_latency"]
    if best is not None:
        lines.append(
            f"fastest {tolerance}: {best['name']} ({_ms(best['latency_ms_b1'])} ms at batch 1, "
            f"{_times_value(best['x_faster_b1'])} faster; {_accuracy_text(best)})"
        )
    elif not summary["reason"]:
        lines.append(f"fastest {tolerance}: none with batch-1 latency measured")
    if summary["parity_failed"]:
        lines.append(f"left out, parity check FAILED: {', '.join(summary['parity_failed'])}")
    if summary["parity_unchecked"]:
        lines.append(f"left out, parity not checked: {', '.join(summary['parity_unchecked'])}")
    cuda = summary["cuda"]
    if cuda["measured"]:
        lines.append(f"CUDA latency measured for: {', '.join(cuda['variants'])}")
    else:
        lines.append(f"CUDA latency not measured: {cuda['reason']}")
    return lines


# --------------------------------------------------------------------------------------------- writing


def write_report(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write report.md, results.csv, accuracy_vs_size.png and accuracy_vs_latency.png into `out_dir`."""
    validate_results(results)
    out_dir = Path(out_dir)
    summary = summarize(results)
    rows = variant_rows(results)
    paths = [out_dir / name for name in REPORT_FILES]
    _write_text(paths[0], render_markdown(results, summary, rows))
    _write_text(paths[1], render_csv(rows))
    plot_accuracy(results, summary, "size", paths[2])
    plot_accuracy(results, summary, "latency", paths[3])
    return paths


def variant_rows(results: dict) -> list[dict]:
    """One dict per variant with the report's figures (raw numbers; None where not measured)."""
    base = _variant(results, results["baseline"])
    rows = []
    for v in results["variants"]:
        delta = None
        if v["accuracy"] is not None and base["accuracy"] is not None:
            delta = (v["accuracy"] - base["accuracy"]) * 100.0
        rows.append(
            {
                "variant": v["name"],
                "chain": list(v["chain"]),
                "format": v["format"],
                "file": v["file"],
                "accuracy": v["accuracy"],
                "delta_points": delta,
                "file_bytes": v["file_bytes"],
                "gzip_bytes": v["gzip_bytes"],
                "x_smaller_gzip": ratio(base["gzip_bytes"], v["gzip_bytes"]),
                "params": v["params"],
                "nonzero_params": v["nonzero_params"],
                "latency_ms_b1": v["latency_ms_b1"],
                "latency_p95_ms_b1": v.get("latency_p95_ms_b1"),
                "latency_ms_b32": v["latency_ms_b32"],
                "x_faster_b1": ratio(base["latency_ms_b1"], v["latency_ms_b1"]),
                "latency_cuda_ms_b1": v.get("latency_cuda_ms_b1"),
                "parity_ok": v["parity_ok"],
                "not_measured": _reasons(v),
                "is_baseline": v["name"] == base["name"],
            }
        )
    return rows


def _reasons(variant: dict) -> dict[str, str]:
    """{key: reason} for every null figure of a variant (reason "no reason recorded" where none was given)."""
    given = variant.get("not_measured") or {}
    keys = [key for key in MEASURED if variant[key] is None]
    keys += [key for key in given if key not in keys and key in variant and variant[key] is None]
    return {key: str(given.get(key) or "no reason recorded") for key in keys}


def render_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        cells = []
        for column in CSV_COLUMNS:
            value = row[column]
            if column == "chain":
                value = " > ".join(value)
            elif column == "not_measured":
                value = "; ".join(f"{key}: {reason}" for key, reason in value.items())
            elif column == "parity_ok":
                value = "" if value is None else str(value).lower()
            elif column in ("x_smaller_gzip", "x_faster_b1", "delta_points") and value is not None:
                value = round(value, 4)
            cells.append("" if value is None else value)
        writer.writerow(cells)
    return buffer.getvalue()


TABLE_COLUMNS = (
    "variant",
    "chain",
    "format",
    "accuracy",
    "Δ vs baseline (points)",
    "size",
    "gzip size",
    "× smaller (gzip)",
    "latency b1 (ms)",
    "latency b32 (ms)",
    "× faster (b1)",
    "parity",
)


def table_cells(row: dict) -> list[str]:
    """The markdown table cells of one variant row, in TABLE_COLUMNS order."""

    def figure(key, text):
        return NOT_MEASURED if row[key] is None else text(row[key])

    name = _md(row["variant"])
    if row["is_baseline"]:
        name = f"**{name}**" + ("" if row["variant"] == "baseline" else " (baseline)")
    return [
        name,
        _md(" → ".join(row["chain"])) or "—",
        _md(str(row["format"])),
        figure("accuracy", _percent),
        "—" if row["is_baseline"] else ("n/a" if row["delta_points"] is None else _points(row["delta_points"])),
        figure("file_bytes", format_bytes),
        figure("gzip_bytes", format_bytes),
        "n/a" if row["x_smaller_gzip"] is None else _times_value(row["x_smaller_gzip"]),
        figure("latency_ms_b1", _ms),
        figure("latency_ms_b32", _ms),
        "n/a" if row["x_faster_b1"] is None else _times_value(row["x_faster_b1"]),
        {True: "ok", False: "FAILED", None: "not checked"}[row["parity_ok"]],
    ]


def render_markdown(results: dict, summary: dict, rows: list[dict]) -> str:
    machine = results["machine"]
    base = _variant(results, results["baseline"])
    threads = _latency_threads(results)
    lines = ["# Compression report", ""]
    lines.append(
        f"Baseline: **{_md(base['name'])}** ({_md(str(base['format']))}, accuracy "
        f"{_percent(base['accuracy']) if base['accuracy'] is not None else NOT_MEASURED}). "
        f"Sizes and latencies are measured on the exported files; latency is the median of timed runs "
        f"({threads}){_interleaving(results)}. Ratios are against the baseline: × smaller compares gzip sizes, "
        f"× faster batch-1 latency."
    )
    formats = sorted({str(v["format"]) for v in results["variants"]})
    if len(formats) > 1:
        lines[-1] += (
            f" Formats ({', '.join(formats)}) each run in their own runtime (ONNX: onnxruntime, "
            "TFLite: ai-edge-litert), so latencies across formats also compare runtimes."
        )
    lines += ["", "| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for row in rows:
        lines.append("| " + " | ".join(table_cells(row)) + " |")
    missing = [(row["variant"], key, reason) for row in rows for key, reason in row["not_measured"].items()]
    if missing:
        lines += ["", "Not measured:", ""]
        lines += [f"- {_md(name)}, {_FIELD_NAMES.get(key, key)}: {_md(reason)}" for name, key, reason in missing]
    cuda_rows = [row for row in rows if row["latency_cuda_ms_b1"] is not None]
    if cuda_rows:
        lines += ["", "CUDA latency, batch 1 (onnxruntime CUDAExecutionProvider):", ""]
        lines += [f"- {_md(row['variant'])}: {_ms(row['latency_cuda_ms_b1'])} ms" for row in cuda_rows]
    keras = results.get("keras_reference")
    if isinstance(keras, dict) and keras:
        lines += ["", "## Keras reference (not an exported file)", ""]
        lines += _keras_lines(keras)

    lines += ["", "## Machine", ""]
    lines.append(f"- CPU: {_md(str(machine.get('cpu', 'unknown')))} ({_md(str(machine.get('arch', '?')))})")
    cores = machine.get("logical_cores", "unknown")
    usable = machine.get("usable_cores")
    usable_text = f" ({usable} usable by this process)" if usable not in (None, cores) else ""
    lines.append(f"- Logical cores: {cores}{usable_text}")
    instruction_sets = ", ".join(machine.get("instruction_sets") or []) or "none recorded"
    lines.append(f"- Instruction sets (int8-relevant): {instruction_sets}")
    lines.append(f"- Latency threads: {threads}")
    lines.append(f"- OS: {_md(str(machine.get('os', 'unknown')))}; Python {machine.get('python', 'unknown')}")
    libraries = machine.get("libraries") or {}
    if libraries:
        listed = ", ".join(f"{name} {version or 'not installed'}" for name, version in libraries.items())
        lines.append(f"- Libraries: {listed}")
    if machine.get("onnxruntime_providers"):
        lines.append(f"- onnxruntime providers: {', '.join(machine['onnxruntime_providers'])}")

    lines += ["", "## Stage wall times", "", "| stage | seconds |", "|---|---|"]
    for stage in results["stages"]:
        reused = " (reused from an earlier run)" if stage.get("skipped") else ""
        lines.append(f"| {_md(str(stage['name']))} | {_seconds(stage['seconds'])}{reused} |")
    lines.append(f"| **total** | {_seconds(results['total_seconds'])} |")

    lines += ["", "## Summary", ""]
    lines += [f"- {_md(line)}" for line in format_summary(summary)]
    for name, front in (("size", summary["pareto_size"]), ("latency", summary["pareto_latency"])):
        if front:
            lines.append(f"- Pareto front, accuracy vs {name} (parity ok only): {', '.join(_md(n) for n in front)}")
    notes = results.get("notes")
    if notes:
        lines += ["", "## Notes", ""]
        lines += [f"- {_md(str(note))}" for note in (notes if isinstance(notes, list) else [notes])]
    lines += ["", "## Plots", "", "![accuracy vs gzip size](accuracy_vs_size.png)", "",
              "![accuracy vs batch-1 latency](accuracy_vs_latency.png)", ""]
    return "\n".join(lines)


_FIELD_NAMES = {
    "accuracy": "accuracy",
    "file_bytes": "size",
    "gzip_bytes": "gzip size",
    "params": "parameters",
    "nonzero_params": "nonzero parameters",
    "latency_ms_b1": "latency b1",
    "latency_ms_b32": "latency b32",
}


def _keras_lines(keras: dict) -> list[str]:
    """Keras reference latencies, either {"b1": keras_latency(...), "b32": ...} or one keras_latency result."""
    groups = {key: value for key, value in keras.items() if isinstance(value, dict) and "predict" in value}
    if not groups and "predict" in keras:
        groups = {f"b{keras.get('batch_size', '?')}": keras}
    lines = []
    for group, entry in groups.items():
        for key in ("predict", "tf_function"):
            timing = entry.get(key)
            if isinstance(timing, dict) and timing.get("median_ms") is not None:
                lines.append(
                    f"- {_md(str(timing.get('label', key)))}, batch {timing.get('batch_size', group)}: "
                    f"{_ms(timing['median_ms'])} ms median"
                )
    return lines or [f"- {NOT_MEASURED}"]


def _interleaving(results: dict) -> str:
    rounds = results["machine"].get("latency_rounds")
    return f", the files taking turns over {rounds} rounds" if rounds else ""


def _latency_threads(results: dict) -> str:
    threads = results["machine"].get("latency_threads")
    if threads is None:
        found = {v.get("latency_threads") for v in results["variants"]} - {None}
        threads = ", ".join(str(t) for t in sorted(found)) if found else None
    if threads is None:
        return "thread count not recorded"
    return f"{threads} intra-op thread(s), 1 inter-op, sequential"


# --------------------------------------------------------------------------------------------- plots


def plot_accuracy(results: dict, summary: dict, axis: str, target: str | os.PathLike) -> Path:
    """Accuracy (%) against gzip size (kB) or batch-1 latency (ms), log x; Pareto front drawn; failed parity marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    key, front_names, xlabel, title = {
        "size": ("gzip_bytes", summary["pareto_size"], "gzip size (kB, log scale)", "Accuracy vs gzip size"),
        "latency": ("latency_ms_b1", summary["pareto_latency"], "batch-1 latency (ms, log scale)",
                    "Accuracy vs batch-1 latency"),
    }[axis]
    scale = 1e-3 if axis == "size" else 1.0
    figure = Figure(figsize=(8, 5.5), dpi=110)
    FigureCanvasAgg(figure)
    ax = figure.add_subplot()
    plotted, skipped = [], []
    for v in results["variants"]:
        if v[key] is None or v["accuracy"] is None:
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
    base = _variant(results, results["baseline"])
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
    subtitle = _md_plain(str(results["machine"].get("cpu", "")))
    if axis == "latency":
        subtitle += f"; {_latency_threads(results)}"
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


# --------------------------------------------------------------------------------------------- helpers


def _variant(results: dict, name: str) -> dict:
    for variant in results["variants"]:
        if variant["name"] == name:
            return variant
    raise ConfigError(f"no variant named {name!r}")


def _write_text(target: Path, text: str) -> Path:
    with atomic_path(target) as partial:
        partial.write_text(text, encoding="utf-8")
    return target


def format_bytes(count: float) -> str:
    """Decimal units: 1 kB = 1000 bytes, 1 MB = 10^6 bytes."""
    if count < 1000:
        return f"{count:.0f} B"
    if count < 1e6:
        return f"{count / 1e3:.1f} kB"
    return f"{count / 1e6:.2f} MB"


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.2f} %"


def _points(delta: float) -> str:
    return f"{delta:+.2f}".replace("-", "−")


def _times_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _accuracy_text(best: dict) -> str:
    return f"accuracy {_percent(best['accuracy'])}, {_points(best['delta_points'])} points"


def _ms(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _seconds(value) -> str:
    return NOT_MEASURED if value is None else f"{value:.1f}"


def _md(text: str) -> str:
    """Escape the characters that would break a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _md_plain(text: str) -> str:
    return text.replace("\n", " ")
