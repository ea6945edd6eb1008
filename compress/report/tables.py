"""The report's text: report.md (table, machine, stage times, summary) and results.csv, from results.json alone."""

from __future__ import annotations

import csv
import io

from compress.report.summary import (
    find_variant,
    format_bytes,
    format_summary,
    ms_text,
    percent_text,
    points_text,
    ratio,
    times_text,
)
from compress.results import batch_sizes, cuda_batch_sizes, latency_key, measured_keys

NOT_MEASURED = "not measured"


def csv_columns(results: dict) -> tuple[str, ...]:
    """The CSV's columns: fixed figures, then latency (and p95 at the compared batch size) per measured batch size."""
    batches = batch_sizes(results)
    first = batches[:1]
    return (
        "variant", "chain", "format", "file", "accuracy", "delta_points", "file_bytes", "gzip_bytes",
        "x_smaller_gzip", "params", "nonzero_params", "macs",
        *(key for batch in first for key in (latency_key(batch), latency_key(batch, kind="latency_p95_ms"))),
        *(latency_key(batch) for batch in batches[1:]),
        *(f"x_faster_b{batch}" for batch in first),
        *(latency_key(batch, kind="latency_cuda_ms") for batch in cuda_batch_sizes(results)),
        "parity_ok", "not_measured",
    )


def table_columns(results: dict) -> tuple[str, ...]:
    batches = batch_sizes(results)
    return (
        "variant", "chain", "format", "accuracy", "Δ vs baseline (points)", "size", "gzip size", "× smaller (gzip)",
        "MACs", *(f"latency b{batch} (ms)" for batch in batches),
        *(f"× faster (b{batch})" for batch in batches[:1]),
        "parity",
    )


def variant_rows(results: dict) -> list[dict]:
    """One dict per variant with the report's figures (raw numbers; None where not measured)."""
    base = find_variant(results, results["baseline"])
    batches = batch_sizes(results)
    measured = measured_keys(results)
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
                "macs": v.get("macs"),
                **{latency_key(b): v[latency_key(b)] for b in batches},
                **{latency_key(b, kind="latency_p95_ms"): v.get(latency_key(b, kind="latency_p95_ms")) for b in batches},
                **{f"x_faster_b{b}": ratio(base[latency_key(b)], v[latency_key(b)]) for b in batches[:1]},
                **{latency_key(b, kind="latency_cuda_ms"): v.get(latency_key(b, kind="latency_cuda_ms"))
                   for b in cuda_batch_sizes(results)},
                "parity_ok": v["parity_ok"],
                "not_measured": _reasons(v, measured),
                "is_baseline": v["name"] == base["name"],
            }
        )
    return rows


def _reasons(variant: dict, measured: tuple[str, ...]) -> dict[str, str]:
    """{key: reason} for every null figure of a variant (reason "no reason recorded" where none was given)."""
    given = variant.get("not_measured") or {}
    keys = [key for key in measured if variant[key] is None]
    keys += [key for key in given if key not in keys and key in variant and variant[key] is None]
    return {key: str(given.get(key) or "no reason recorded") for key in keys}


def render_csv(results: dict, rows: list[dict]) -> str:
    columns = csv_columns(results)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        cells = []
        for column in columns:
            value = row[column]
            if column == "chain":
                value = " > ".join(value)
            elif column == "not_measured":
                value = "; ".join(f"{key}: {reason}" for key, reason in value.items())
            elif column == "parity_ok":
                value = "" if value is None else str(value).lower()
            elif (column in ("x_smaller_gzip", "delta_points") or column.startswith("x_faster")) and value is not None:
                value = round(value, 4)
            cells.append("" if value is None else value)
        writer.writerow(cells)
    return buffer.getvalue()


def table_cells(row: dict, batches: list[int]) -> list[str]:
    """The markdown table cells of one variant row, in `table_columns` order."""

    def figure(key, text):
        return NOT_MEASURED if row[key] is None else text(row[key])

    name = _md(row["variant"])
    if row["is_baseline"]:
        name = f"**{name}**" + ("" if row["variant"] == "baseline" else " (baseline)")
    return [
        name,
        _md(" → ".join(row["chain"])) or "—",
        _md(str(row["format"])),
        figure("accuracy", percent_text),
        "—" if row["is_baseline"] else ("n/a" if row["delta_points"] is None else points_text(row["delta_points"])),
        figure("file_bytes", format_bytes),
        figure("gzip_bytes", format_bytes),
        "n/a" if row["x_smaller_gzip"] is None else times_text(row["x_smaller_gzip"]),
        "n/a" if row["macs"] is None else macs_text(row["macs"]),
        *(figure(latency_key(batch), ms_text) for batch in batches),
        *("n/a" if row[f"x_faster_b{batch}"] is None else times_text(row[f"x_faster_b{batch}"]) for batch in batches[:1]),
        {True: "ok", False: "FAILED", None: "not checked"}[row["parity_ok"]],
    ]


def render_markdown(results: dict, summary: dict, rows: list[dict]) -> str:
    machine = results["machine"]
    base = find_variant(results, results["baseline"])
    threads = latency_threads_text(results)
    lines = ["# Compression report", ""]
    lines.append(
        f"Baseline: **{_md(base['name'])}** ({_md(str(base['format']))}, accuracy "
        f"{percent_text(base['accuracy']) if base['accuracy'] is not None else NOT_MEASURED}). "
        f"Sizes and latencies are measured on the exported files; latency is the median of timed runs "
        f"({threads}){_interleaving(results)}. Ratios are against the baseline: × smaller compares gzip sizes, "
        f"× faster latency at batch {summary['latency_batch']}. MACs: multiply-adds per image of the model the file was "
        f"made from, a latency proxy that does not depend on the machine."
    )
    formats = sorted({str(v["format"]) for v in results["variants"]})
    if len(formats) > 1:
        lines[-1] += (
            f" Formats ({', '.join(formats)}) each run in their own runtime (ONNX: onnxruntime, "
            "TFLite: ai-edge-litert), so latencies across formats also compare runtimes."
        )
    columns, batches = table_columns(results), batch_sizes(results)
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(table_cells(row, batches)) + " |")
    missing = [(row["variant"], key, reason) for row in rows for key, reason in row["not_measured"].items()]
    if missing:
        lines += ["", "Not measured:", ""]
        lines += [f"- {_md(name)}, {_field_name(key)}: {_md(reason)}" for name, key, reason in missing]
    lines += _cuda_lines(rows, cuda_batch_sizes(results))
    refused = results.get("refused") or {}
    if refused:
        lines += ["", "Stages refused, or a stage's file formats (`stage:format`): the technique or converter cannot "
                      "handle this model, nothing was exported for them:", ""]
        lines += [f"- {_md(name)}: {_md(str(reason))}" for name, reason in refused.items()]
    passed_with_note = [(v["name"], v["parity"]["note"]) for v in results["variants"]
                        if v["parity_ok"] is True and (v.get("parity") or {}).get("note")]
    if passed_with_note:
        lines += ["", "Parity passed, with a note:", ""]
        lines += [f"- {_md(name)}: {_md(note)}" for name, note in passed_with_note]
    untouched = [(v["name"], layer, reason) for v in results["variants"]
                 for layer, reason in (v.get("left_alone") or {}).items()]
    if untouched:
        lines += ["", "Layers a technique left alone:", ""]
        lines += [f"- {_md(name)}, {_md(layer)}: {_md(reason)}" for name, layer, reason in untouched]
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
        reused = " (run earlier, reused)" if stage.get("skipped") else ""
        lines.append(f"| {_md(str(stage['name']))} | {_seconds(stage['seconds'])}{reused} |")
    lines.append(f"| **total of this run** (with measuring) | {_seconds(results['total_seconds'])} |")
    if any(stage.get("skipped") for stage in results["stages"]):
        earlier = sum(stage["seconds"] or 0.0 for stage in results["stages"] if stage.get("skipped"))
        lines.append(f"| **with the stages run earlier** | {_seconds(results['total_seconds'] + earlier)} |")

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
}


def _field_name(key: str) -> str:
    return _FIELD_NAMES.get(key) or key.replace("latency_ms_b", "latency b")


def _cuda_lines(rows: list[dict], batches: list[int]) -> list[str]:
    """GPU latency beside the CPU figures: one line per variant timed on CUDA, every batch size."""
    cuda_keys = [(batch, latency_key(batch, kind="latency_cuda_ms")) for batch in batches]
    timed = [row for row in rows if any(row[key] is not None for _, key in cuda_keys)]
    if not timed:
        return []
    lines = ["", "CUDA latency (onnxruntime CUDAExecutionProvider), median ms:", ""]
    for row in timed:
        cells = ", ".join(f"b{batch} {ms_text(row[key])}" for batch, key in cuda_keys if row[key] is not None)
        lines.append(f"- {_md(row['variant'])}: {cells}")
    return lines


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
                    f"{ms_text(timing['median_ms'])} ms median"
                )
    return lines or [f"- {NOT_MEASURED}"]


def _interleaving(results: dict) -> str:
    rounds = results["machine"].get("latency_rounds")
    return f", the files taking turns over {rounds} rounds" if rounds else ""


def latency_threads_text(results: dict) -> str:
    threads = results["machine"].get("latency_threads")
    if threads is None:
        found = {v.get("latency_threads") for v in results["variants"]} - {None}
        threads = ", ".join(str(t) for t in sorted(found)) if found else None
    if threads is None:
        return "thread count not recorded"
    return f"{threads} intra-op thread(s), 1 inter-op, sequential"


def macs_text(count: int) -> str:
    """Multiply-adds per image in decimal units (k, M, G)."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return str(count)


def _seconds(value) -> str:
    return NOT_MEASURED if value is None else f"{value:.1f}"


def _md(text: str) -> str:
    """Escape the characters that would break a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
