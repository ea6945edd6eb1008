#!/usr/bin/env bash
# The full CIFAR-10 benchmark: runs recipes/cifar10.toml end to end and copies the results into benchmarks/cifar10/.
# Needs the full set: a class-folder copy as the first argument or in $COMPRESS_CIFAR10_DIR (or internet, for
# Keras' download). A rerun resumes the run folder (default runs/cifar10-benchmark); delete it to start over.
# Usage: scripts/benchmark_cifar10.sh [CIFAR10_DIR] [RUN_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir=${1:-${COMPRESS_CIFAR10_DIR:-}}
run_dir=${2:-runs/cifar10-benchmark}
command=(compress run --recipe recipes/cifar10.toml --data cifar10 --out "$run_dir")
[ -n "$data_dir" ] && command+=(--data-dir "$data_dir")
"${command[@]}"
target=benchmarks/cifar10
mkdir -p "$target"
cp "$run_dir"/{report.md,results.json,results.csv,accuracy_vs_size.png,accuracy_vs_latency.png} "$target"/
cp recipes/cifar10.toml "$target"/recipe.toml
printf '%s\n' "${command[*]/$data_dir/\$COMPRESS_CIFAR10_DIR}" > "$target"/command.txt
echo "copied the results to $target/"
