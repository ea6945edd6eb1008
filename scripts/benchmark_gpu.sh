#!/usr/bin/env bash
# GPU latency of a finished run's ONNX files and of float16 copies of its float files (scripts/measure_gpu_latency.py),
# with the machine it was measured on: OUT/gpu_latency.json, OUT/gpu_latency.md, OUT/fp16/*.onnx, and
# OUT/command.txt, OUT/nvidia-smi.txt, OUT/lscpu.txt. Needs onnxruntime-gpu and a GPU; exits 2 with one line without.
# Usage: scripts/benchmark_gpu.sh RUN_DIR [OUT]   (OUT defaults to benchmarks/gpu; PYTHON picks the interpreter)
set -euo pipefail
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: scripts/benchmark_gpu.sh RUN_DIR [OUT]" >&2
    exit 2
fi
run_dir=$(realpath -m "$1")
out=$(realpath -m "${2:-$(dirname "$0")/../benchmarks/gpu}")
cd "$(dirname "$0")/.."
command=("${PYTHON:-python3}" scripts/measure_gpu_latency.py "$run_dir" --out "$out")
"${command[@]}"  # says why and exits 2 where no CUDA provider starts
{
    printf 'cd %s\n%s\n' "$PWD" "${command[*]}"
    printf '# git commit: %s\n' "$(git rev-parse HEAD 2>/dev/null || echo unknown)"
} > "$out/command.txt"
query=name,driver_version,memory.total,clocks.max.sm,pcie.link.gen.max,pcie.link.width.max
{ nvidia-smi; nvidia-smi --query-gpu="$query" --format=csv; } > "$out/nvidia-smi.txt" 2>&1 || true
lscpu > "$out/lscpu.txt" 2>&1 || true
echo "wrote the GPU results and the machine's description to $out/"
