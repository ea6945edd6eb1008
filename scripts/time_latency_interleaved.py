"""Batch-1 CPU latency of a run's ONNX files, timed in interleaved rounds so that drift in the machine's speed
falls on every file alike.

`compress run` times one file after another; on a shared machine whose speed drifts, that can move the ratios
between files. Here each round times every file for `--calls` calls (after a short warm-up), and a file's figure is
the median of its round medians. Prints one line per file and its speed-up over the run's baseline.

Usage: python scripts/time_latency_interleaved.py RUN_DIR [--rounds 15] [--calls 40] [--threads 1]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from compress import bench  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    results_path = args.run_dir / "results.json"
    if not results_path.is_file():
        print(f"error: {results_path} does not exist; pass the folder of a finished `compress run`", file=sys.stderr)
        return 2
    results = json.loads(results_path.read_text())
    files = {variant["name"]: args.run_dir / variant["file"] for variant in results["variants"]
             if variant["file"].endswith(".onnx")}
    round_medians = {name: [] for name in files}
    for round_index in range(args.rounds):
        print(f"round {round_index + 1}/{args.rounds}", file=sys.stderr, flush=True)
        for name, path in files.items():
            timing = bench.onnx_latency(path, 1, threads=args.threads, warmup=5, min_repeats=args.calls,
                                        min_seconds=0)
            round_medians[name].append(timing["median_ms"])
    medians = {name: statistics.median(values) for name, values in round_medians.items()}
    baseline = medians[results["baseline"]]
    print(bench.machine_info(threads=args.threads)["cpu"], f"{args.threads} thread(s), batch 1, "
          f"{args.rounds} rounds of {args.calls} calls")
    for name, median in medians.items():
        print(f"{name:16s} {median:7.3f} ms  {baseline / median:5.2f}x faster than {results['baseline']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
