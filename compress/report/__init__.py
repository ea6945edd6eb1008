"""The report of a run, built from results.json alone: `summary` (best variants, fronts), `tables` (report.md and
results.csv) and `plots` (accuracy against size and latency)."""

from __future__ import annotations

import os
from pathlib import Path

from compress.files import write_text
from compress.results import validate_results

REPORT_FILES = ("report.md", "results.csv", "accuracy_vs_size.png", "accuracy_vs_latency.png")


def write_report(results: dict, out_dir: str | os.PathLike) -> list[Path]:
    """Write report.md, results.csv, accuracy_vs_size.png and accuracy_vs_latency.png into `out_dir`."""
    from compress.report.plots import plot_accuracy
    from compress.report.summary import summarize
    from compress.report.tables import render_csv, render_markdown, variant_rows

    validate_results(results)
    out_dir = Path(out_dir)
    summary = summarize(results)
    rows = variant_rows(results)
    paths = [out_dir / name for name in REPORT_FILES]
    write_text(paths[0], render_markdown(results, summary, rows))
    write_text(paths[1], render_csv(results, rows))
    plot_accuracy(results, summary, "size", paths[2])
    plot_accuracy(results, summary, "latency", paths[3])
    return paths
