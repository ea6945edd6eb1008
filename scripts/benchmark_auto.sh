#!/usr/bin/env bash
# The search benchmark: `compress auto` on the article CNN trained on the full CIFAR-10 (the baseline of
# scripts/benchmark_cifar10.sh's run folder, which must have finished), at most 1 point lost, for size and latency
# together, with recipes/cifar10.toml's stages run on the same model and measured beside the search's best and
# Pareto files in one report. Results go to benchmarks/auto/.
# Usage: scripts/benchmark_auto.sh [CIFAR10_DIR] [CIFAR10_RUN_DIR] [AUTO_DIR] (a rerun continues the study)
set -euo pipefail
cd "$(dirname "$0")/.."
data_dir=${1:-${COMPRESS_CIFAR10_DIR:-}}
cifar10_run=${2:-runs/cifar10-benchmark}
auto_dir=${3:-runs/auto-benchmark}
minutes=${AUTO_MINUTES:-60}
model="$cifar10_run/baseline/model.keras"
[ -f "$model" ] || { echo "no baseline in $cifar10_run: run scripts/benchmark_cifar10.sh first" >&2; exit 2; }
command=(compress auto "$model" --data cifar10 --out "$auto_dir" --max-drop 1.0 --objective both
         --time-budget "$minutes" --trials 1000 --compare-recipe recipes/cifar10.toml)
[ -n "$data_dir" ] && command+=(--data-dir "$data_dir")
started=$(date +%s)
"${command[@]}" 2>&1 | tee -a "$auto_dir.log"
target=benchmarks/auto
mkdir -p "$target"
cp "$auto_dir"/{auto.json,best.toml,report.md,results.json,results.csv,accuracy_vs_size.png,accuracy_vs_latency.png} \
   "$target"/
cp "$auto_dir.log" "$target"/auto.log
{ printf '%s\n' "${command[*]/$data_dir/\$COMPRESS_CIFAR10_DIR}"
  echo "# wall time of this invocation: $(( $(date +%s) - started )) s"; } > "$target"/command.txt
echo "copied the results to $target/"
