"""The zoo benchmark's summary table, from each model's results.json (and DIR/models.log, how the models trained):
python3 scripts/zoo_summary.py DIR [RUN_SECONDS [TRAINING_SECONDS]]."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compress.report.summary import summarize  # noqa: E402


def row(name: str, results: dict) -> list[str]:
    summary = summarize(results)
    by_name = {v["name"]: v for v in results["variants"]}
    base = by_name[results["baseline"]]
    best = summary["best_size"]
    smaller = f"{best['name']} {best['x_smaller_gzip']:.1f}×" if best else "none within 1 point"
    int8 = [v for v in results["variants"] if v["precision"] == "int8" and v["parity_ok"]]
    fastest_int8 = min(int8, key=lambda v: v["latency_ms_b1"]) if int8 else None
    int8_text = (f"{fastest_int8['name']} {fastest_int8['latency_ms_b1']:.3f} vs {base['latency_ms_b1']:.3f} ms"
                 if fastest_int8 else "no int8 file")
    not_slower = fastest_int8 is not None and fastest_int8["latency_ms_b1"] <= base["latency_ms_b1"]
    pruned = by_name.get("pruned")
    pruned_text = (f"{base['gzip_bytes'] / pruned['gzip_bytes']:.1f}× "
                   f"({(pruned['accuracy'] - base['accuracy']) * 100:+.1f} points)" if pruned else "refused")
    failed = [v["name"] for v in results["variants"] if not v["parity_ok"]]
    refused = results.get("refused") or {}
    return [
        name,
        results["data"].get("input_range", "unit"),
        (results.get("input_model") or {}).get("keras", "trained by compress"),
        f"{base['accuracy'] * 100:.1f} %",
        smaller + (" (met)" if best and best["x_smaller_gzip"] >= 4 else " (missed)"),
        pruned_text,
        int8_text + (" (met)" if not_slower else " (missed)"),
        ", ".join(failed) or "all ok",
        "; ".join(f"{stage}: {reason}" for stage, reason in refused.items()) or "none",
    ]


def main() -> None:
    root = Path(sys.argv[1])
    seconds = sys.argv[2] if len(sys.argv) > 2 else None
    training = sys.argv[3] if len(sys.argv) > 3 else None
    columns = ["model", "input range", "saved by", "baseline accuracy", "smallest within 1 point (gzip, ≥ 4× target)",
               "pruned (gzip)", "fastest int8 vs float, batch 1 (target: not slower)", "parity failed", "refused"]
    print("# Model zoo: `compress run` with the default recipe on cifar10-mini\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    machine = None
    for folder in sorted(path for path in root.iterdir() if (path / "results.json").is_file()):
        results = json.loads((folder / "results.json").read_text())
        machine = results["machine"]
        print("| " + " | ".join(row(folder.name, results)) + " |")
    if machine:
        print(f"\nCPU: {machine.get('cpu')}, instruction sets {', '.join(machine.get('instruction_sets', []))}; "
              f"latency {machine.get('latency_threads')} thread, medians of interleaved rounds.")
    models_log = root / "models.log"
    if models_log.is_file():  # how scripts/zoo_models.py trained the models users bring
        print("Zoo models: " + "; ".join(sorted({line for line in models_log.read_text().splitlines()
                                                 if line.startswith("training on")})) + ".")
    if seconds:
        print(f"`compress run` of the five models, measuring included: {int(seconds)} s.")
    if training:
        print(f"Training the zoo models: {int(training)} s" + (" (trained earlier, reused)." if int(training) < 60
                                                                else "."))


if __name__ == "__main__":
    main()
