"""CUDA latency of ONNX files in onnxruntime-gpu, for a GPU machine that holds only the files (no TensorFlow needed).

`compress run` measures CUDA latency itself where onnxruntime-gpu and a GPU are present; this script is for
measuring exported files of a CPU run on another machine that has a GPU. It writes one JSON document: the machine,
onnxruntime's providers, and per file the median and p95 batch latency on CUDA (and on the CPU, for the ratio).

Usage: python scripts/measure_gpu_latency.py FILE.onnx [FILE.onnx ...] [--batch-sizes 1,32] [--out gpu.json]
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from compress import bench  # noqa: E402


def gpu_name() -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated batch sizes (default: 1,32)")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="shortest timing per file and batch size, over all rounds")
    parser.add_argument("--out", type=Path, help="write the JSON here as well as to stdout")
    args = parser.parse_args()
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    available, reason = bench.cuda_available()
    entries = {str(path): {"file_bytes": path.stat().st_size} for path in args.files}
    report = {"machine": bench.machine_info(threads=1), "gpu": gpu_name(),
              "cuda": {"measured": available, "reason": reason}, "files": entries}
    for batch in batch_sizes:
        print(f"batch {batch}: {len(args.files)} files in interleaved rounds ...", file=sys.stderr, flush=True)
        timings = {"cpu": bench.interleaved_latency(
            {str(path): bench.load_onnx(path, batch, threads=1) for path in args.files}, min_seconds=args.min_seconds)}
        if available:
            timings["cuda"] = bench.interleaved_latency(
                {str(path): bench.load_onnx(path, batch, provider="CUDAExecutionProvider") for path in args.files},
                min_seconds=args.min_seconds)
        for name, entry in entries.items():
            entry[f"cpu_ms_b{batch}"] = timings["cpu"][name]["median_ms"]
            if available:
                entry[f"cuda_ms_b{batch}"] = timings["cuda"][name]["median_ms"]
                entry[f"cuda_p95_ms_b{batch}"] = timings["cuda"][name]["p95_ms"]
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0 if available else 1


if __name__ == "__main__":
    sys.exit(main())
