"""GPU latency of a finished run's ONNX files and of float16 copies of its float files, on a machine with a GPU.

Takes a run folder (its results.json names the files) and needs no TensorFlow: onnx, onnxruntime-gpu and numpy
suffice. Every .onnx file is timed on CUDA (compress/measure/gpu.py: inputs and outputs on the GPU, copies timed apart)
at each batch size, in interleaved rounds. Each float32 file also gets a float16 copy (compress/export/fp16.py) in
OUT/fp16/, timed beside it on CUDA, and on the CPU next to its source; its parity with the source (top-1 agreement,
largest absolute difference on the same random normalised images) is checked on CPU and on CUDA. Writes
OUT/gpu_latency.json and OUT/gpu_latency.md.

Exits 2 with one line when onnxruntime has no working CUDAExecutionProvider, or on any other input problem.

Usage: python scripts/measure_gpu_latency.py RUN_DIR --out OUT [--batch-sizes 1,32,256] [--cpu-batch-sizes 1,32]
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from compress.errors import CompressError, ConfigError, ExportError  # noqa: E402
from compress.export import fp16  # noqa: E402
from compress.files import atomic_path, write_json  # noqa: E402
from compress.measure import gpu  # noqa: E402
from compress.measure.hardware import machine_info  # noqa: E402
from compress.measure.latency import interleaved_latency, timed_file  # noqa: E402
from compress.results import load_results  # noqa: E402

FP16_SUFFIX = "-fp16"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, help="a finished run folder (with results.json)")
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_latency.json/.md and fp16/")
    gpu_default = ",".join(map(str, gpu.GPU_BATCH_SIZES))
    parser.add_argument("--batch-sizes", default=gpu_default, help=f"GPU batch sizes (default: {gpu_default})")
    parser.add_argument("--cpu-batch-sizes", default="1,32", help="CPU batch sizes, float vs float16 (default: 1,32)")
    parser.add_argument("--threads", type=int, default=1, help="CPU intra-op threads (default: 1, as a run's)")
    parser.add_argument("--min-seconds", type=float, default=1.0,
                        help="shortest timing per file and batch size, over all rounds (default: 1.0)")
    parser.add_argument("--parity-batch", type=int, default=64, help="images in the fp16 parity check (default: 64)")
    args = parser.parse_args(argv)
    try:
        available, reason = gpu.cuda_provider_status()
        if not available:
            print(f"measure_gpu_latency: no CUDA provider, nothing measured: {reason}", file=sys.stderr)
            return 2
        report = measure(args)
    except CompressError as exc:
        print(f"measure_gpu_latency: {exc}", file=sys.stderr)
        return 2
    write_json(args.out / "gpu_latency.json", report)
    with atomic_path(args.out / "gpu_latency.md") as partial:
        partial.write_text(markdown(report))
    print(f"wrote {args.out / 'gpu_latency.json'} and {args.out / 'gpu_latency.md'}", file=sys.stderr)
    return 0


def measure(args) -> dict:
    """Convert, check parity, then time on the GPU and the CPU; everything the JSON holds."""
    gpu_batches, cpu_batches = _batch_sizes(args.batch_sizes), _batch_sizes(args.cpu_batch_sizes)
    results = load_results(args.run_dir)
    sources = {variant["name"]: args.run_dir / variant["file"] for variant in results["variants"]
               if variant["format"] == "onnx"}
    if not sources:
        raise ConfigError(f"{args.run_dir}/results.json lists no ONNX file")
    missing = [str(path) for path in sources.values() if not path.is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} ONNX file(s) of the run are missing, e.g. {missing[0]}")

    variants = {variant["name"]: variant for variant in results["variants"]}
    files, halves = {}, {}
    for name, path in sources.items():
        files[name] = {"path": str(path), "precision": variants[name].get("precision", "as exported"),
                       "accuracy": variants[name]["accuracy"], "file_bytes": path.stat().st_size}
        _log(f"float16 copy of {name} ...")
        target = args.out / "fp16" / f"{re.sub(r'[^A-Za-z0-9._-]', '_', name)}.fp16.onnx"
        try:
            conversion = fp16.to_fp16(path, target)
        except ExportError as exc:
            files[name]["fp16"] = {"skipped": str(exc)}
            continue
        halves[name] = target
        files[name]["precision"] = "float32"
        files[name + FP16_SUFFIX] = {
            "path": str(target),
            "precision": "float16",
            "accuracy": None,
            "file_bytes": conversion["file_bytes"],
            "source": name,
            "conversion": conversion,
            "parity": {
                where: fp16.parity(path, target, batch_size=args.parity_batch, provider=provider)
                for where, provider in (("cpu", "CPUExecutionProvider"), ("cuda", gpu.CUDA))
            },
        }

    _log(f"GPU: {len(sources) + len(halves)} files at batch {gpu_batches}, interleaved ...")
    on_gpu = gpu.measure_gpu({**sources, **{name + FP16_SUFFIX: path for name, path in halves.items()}},
                             gpu_batches, args.min_seconds)
    for name, timings in on_gpu.pop("files").items():
        timings.pop("path")  # files[name] has it
        files[name]["cuda"] = timings

    for batch in cpu_batches if halves else ():
        _log(f"CPU: {2 * len(halves)} files at batch {batch}, {args.threads} thread(s), interleaved ...")
        loaded = {}
        for name, path in halves.items():
            loaded[name] = timed_file(sources[name], batch, threads=args.threads)
            loaded[name + FP16_SUFFIX] = timed_file(path, batch, threads=args.threads)
        for name, timing in interleaved_latency(loaded, min_seconds=args.min_seconds).items():
            files[name].setdefault("cpu", {})[f"b{batch}"] = timing

    return {
        "run_dir": str(args.run_dir),
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "machine": machine_info(threads=args.threads),
        **on_gpu,
        "cpu_batch_sizes": list(cpu_batches) if halves else [],
        "files": files,
    }


def markdown(report: dict) -> str:
    """One table: per file its precision, size, CUDA median (p95) per batch, copy time, CPU median, fp16 parity."""
    gpu_batches, cpu_batches = report["batch_sizes"], report["cpu_batch_sizes"]
    info = report["gpu"]
    gpu_line = (f"{info['name']} ({info['memory_total_mib']} MiB, driver {info['driver_version']}, "
                f"CUDA {info['cuda_version']})" if "name" in info else f"unknown ({info['reason']})")
    lines = [
        "# GPU latency",
        "",
        f"Run: `{report['run_dir']}`. GPU: {gpu_line}. Runtime: {report['cuda']['reason']}.",
        "",
        "CUDA times are the model alone (inputs and outputs stay on the GPU, I/O binding), median (p95) ms per "
        f"batch over {report['rounds']} interleaved rounds; *copy* is the batch's host->device plus "
        f"device->host copy at batch {gpu_batches[-1]}. CPU times: {report['machine']['latency_threads']} "
        "thread(s). Float16 copies are checked against their float32 source on the same random normalised images "
        "(top-1 agreement, largest absolute output difference); their accuracy on the test set was not measured. "
        "The CUDA provider's options (TF32, cuDNN algorithm search) are recorded per timing in gpu_latency.json.",
        "",
    ]
    header = ["file", "precision", "accuracy", "MB", *(f"CUDA b{b} ms" for b in gpu_batches),
              f"copy b{gpu_batches[-1]} ms", *(f"CPU b{b} ms" for b in cpu_batches),
              "top-1 agree (CPU / CUDA)", "max abs diff (CPU / CUDA)"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, entry in report["files"].items():
        cuda = [entry["cuda"].get(f"b{b}", {}) for b in gpu_batches]
        accuracy = f"{entry['accuracy']:.4f}" if entry.get("accuracy") is not None else "not measured"
        cells = [name, entry["precision"], accuracy, f"{entry['file_bytes'] / 1e6:.2f}"]
        cells += [f"{t['median_ms']:.3f} ({t['p95_ms']:.3f})" if "median_ms" in t else "not measured" for t in cuda]
        cells.append(f"{cuda[-1]['copy_ms']:.3f}" if "copy_ms" in cuda[-1] else "not measured")
        cells += [f"{entry['cpu'][f'b{b}']['median_ms']:.3f}" if "cpu" in entry else "" for b in cpu_batches]
        if "parity" in entry:
            parity = entry["parity"]
            cells += [f"{parity['cpu']['top1_agreement']:.3f} / {parity['cuda']['top1_agreement']:.3f}",
                      f"{parity['cpu']['max_abs_diff']:.2g} / {parity['cuda']['max_abs_diff']:.2g}"]
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [f"- {name}: {entry['fp16']['skipped']}" for name, entry in report["files"].items() if "fp16" in entry]
    if skipped:
        lines += ["", "No float16 copy:", *skipped]
    not_measured = [f"- {name} b{b}: {entry['cuda'][f'b{b}']['not_measured']}"
                    for name, entry in report["files"].items()
                    for b in gpu_batches if "not_measured" in entry["cuda"].get(f"b{b}", {})]
    if not_measured:
        lines += ["", "Not measured on CUDA:", *not_measured]
    return "\n".join(lines) + "\n"


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"batch sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError(f"batch sizes must be positive, got {text!r}")
    return sizes


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
