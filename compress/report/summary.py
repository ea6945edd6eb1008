"""What a run's results say: the best variant for size and for latency within the accuracy tolerance, the Pareto
fronts, and which variants were left out and why."""

from __future__ import annotations

import math
from typing import Iterable

from compress.errors import ConfigError
from compress.results import batch_sizes, latency_key

ACCURACY_TOLERANCE_POINTS = 1.0


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
    competes too, so "best" may be the baseline itself. An int8 file slower than its float source
    (`int8_slower_than_float`) is never the fastest pick. Also returns both Pareto fronts (same eligibility)
    and the variants left out for failed or unchecked parity.
    """
    variants = results["variants"]
    base = find_variant(results, results["baseline"])
    batch = latency_batch(results)
    latency = latency_key(batch) if batch is not None else None
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
        "latency_batch": batch,
        "pareto_latency": pareto_front((v["name"], v[latency], v["accuracy"]) for v in eligible) if latency else [],
        "parity_failed": [v["name"] for v in variants if v["parity_ok"] is False],
        "parity_notes": {v["name"]: v["parity"]["note"] for v in variants
                         if v["parity_ok"] is False and (v.get("parity") or {}).get("note")},
        "parity_unchecked": [v["name"] for v in variants if v["parity_ok"] is None],
        "refused": dict(results.get("refused") or {}),
        "cuda": cuda_status(results),
        "int8_slower": int8_slower_than_float(results, latency) if latency else [],
    }
    if base_accuracy is None:
        summary["reason"] = "the baseline's accuracy was not measured"
        return summary
    floor = base_accuracy - tolerance_points / 100.0 - 1e-12
    within = [v for v in eligible if v["accuracy"] >= floor]
    criteria = [("best_size", "gzip_bytes", "x_smaller_gzip")]
    if latency:
        criteria.append(("best_latency", latency, f"x_faster_b{batch}"))
    for key, figure, ratio_key in criteria:
        slower = {item["name"] for item in summary["int8_slower"]} if key == "best_latency" else set()
        measured = [v for v in within if v[figure] is not None and v["name"] not in slower]
        if not measured:
            continue
        best = min(measured, key=lambda v: (v[figure], -v["accuracy"], v["name"]))
        summary[key] = {
            "name": best["name"],
            figure: best[figure],
            "accuracy": best["accuracy"],
            "delta_points": (best["accuracy"] - base_accuracy) * 100.0,
            ratio_key: ratio(base[figure], best[figure]),
        }
    return summary


def int8_slower_than_float(results: dict, latency: str) -> list[dict]:
    """int8 variants slower at `latency` than the float file of the same format their stage was made from.

    Where a model is so small that quantizing and dequantizing outweigh the integer arithmetic, or the CPU lacks
    fast int8 instructions, an int8 file can lose to its float source: then it only saves size. The source is the
    variant of the stage named by "input_stage" (results written before that key existed name none).
    """
    variants = results["variants"]
    found = []
    for variant in variants:
        if variant.get("precision") != "int8" or variant.get(latency) is None or not variant.get("input_stage"):
            continue
        sources = [v for v in variants if v.get("stage") == variant["input_stage"] and v.get("precision") != "int8"
                   and v["format"] == variant["format"] and v.get(latency) is not None]
        if sources and variant[latency] > sources[0][latency]:
            found.append({"name": variant["name"], "source": sources[0]["name"], latency: variant[latency],
                          "source_" + latency: sources[0][latency]})
    return found


def cuda_status(results: dict) -> dict:
    """Whether CUDA latency was measured, for which variants, and if not, why not."""
    measured = [v["name"] for v in results["variants"]
                if any(v.get(latency_key(batch, kind="latency_cuda_ms")) is not None for batch in batch_sizes(results))]
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
            f"{times_text(best['x_smaller_gzip'])} smaller; {_accuracy_text(best)})"
        )
    elif not summary["reason"]:
        lines.append(f"smallest {tolerance}: none with gzip size measured")
    best, batch = summary["best_latency"], summary["latency_batch"]
    if best is not None:
        lines.append(
            f"fastest {tolerance}: {best['name']} ({ms_text(best[latency_key(batch)])} ms at batch {batch}, "
            f"{times_text(best[f'x_faster_b{batch}'])} faster; {_accuracy_text(best)})"
        )
    elif not summary["reason"]:
        lines.append(f"fastest {tolerance}: none with latency measured")
    if summary.get("int8_slower"):
        key = latency_key(batch)
        slower = ", ".join(f"{item['name']} ({ms_text(item[key])} ms vs {ms_text(item['source_' + key])} ms)"
                           for item in summary["int8_slower"])
        lines.append(f"int8 slower than its float file: {slower}")
    if summary["parity_failed"]:
        notes = summary.get("parity_notes", {})
        failed = [f"{name} ({notes[name]})" if name in notes else name for name in summary["parity_failed"]]
        lines.append(f"left out, parity check FAILED: {', '.join(failed)}")
    for name, reason in summary.get("refused", {}).items():
        lines.append(f"refused, nothing exported: {name} ({reason})")
    if summary["parity_unchecked"]:
        lines.append(f"left out, parity not checked: {', '.join(summary['parity_unchecked'])}")
    cuda = summary["cuda"]
    if cuda["measured"]:
        lines.append(f"CUDA latency measured for: {', '.join(cuda['variants'])}")
    else:
        lines.append(f"CUDA latency not measured: {cuda['reason']}")
    return lines


def latency_batch(results: dict) -> int | None:
    """The batch size the summary, the fronts and the "× faster" column compare latency at: the smallest measured."""
    batches = batch_sizes(results)
    return min(batches) if batches else None


def find_variant(results: dict, name: str) -> dict:
    for variant in results["variants"]:
        if variant["name"] == name:
            return variant
    raise ConfigError(f"no variant named {name!r}")


def format_bytes(count: float) -> str:
    """Decimal units: 1 kB = 1000 bytes, 1 MB = 10^6 bytes."""
    if count < 1000:
        return f"{count:.0f} B"
    if count < 1e6:
        return f"{count / 1e3:.1f} kB"
    return f"{count / 1e6:.2f} MB"


def percent_text(fraction: float) -> str:
    return f"{fraction * 100:.2f} %"


def points_text(delta: float) -> str:
    return f"{delta:+.2f}".replace("-", "−")


def times_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def _accuracy_text(best: dict) -> str:
    return f"accuracy {percent_text(best['accuracy'])}, {points_text(best['delta_points'])} points"


def ms_text(value: float) -> str:
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"
