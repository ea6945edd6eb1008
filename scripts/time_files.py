"""Time exported files side by side at batch 1, each in its runtime, longer than a run's report does.

The files take turns over `--rounds` rounds of `--seconds`/`--rounds` each (the report's interleaved timing, with
more time per file), twice; prints each file's median and how many times faster than the first file it is.

Usage: python scripts/time_files.py [--rounds 20] [--seconds 8] [--threads 1] BASELINE.onnx OTHER.onnx ...
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from compress.errors import CompressError  # noqa: E402
from compress.measure.latency import interleaved_latency, timed_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("files", nargs="+", type=Path, help="the first one is the reference")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per file and pass")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    names = [f"{path.parent.name}/{path.name}" for path in args.files]
    try:
        loaded = {name: timed_file(path, 1, threads=args.threads) for name, path in zip(names, args.files)}
    except CompressError as exc:
        print(f"time_files: error: {exc}", file=sys.stderr)
        sys.exit(2)
    for attempt in (1, 2):
        times = interleaved_latency(loaded, rounds=args.rounds, min_seconds=args.seconds)
        reference = times[names[0]]["median_ms"]
        shown = (f"{name} {entry['median_ms']:.4f} ms {reference / entry['median_ms']:.2f}x"
                 for name, entry in times.items())
        print(f"pass {attempt}: " + "; ".join(shown), flush=True)


if __name__ == "__main__":
    main()
