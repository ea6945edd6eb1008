#!/usr/bin/env bash
# The model zoo benchmark: models users bring (scripts/zoo_models.py: trained on the full CIFAR-10 less cifar10-mini's
# images when $COMPRESS_CIFAR10_DIR names it, else on cifar10-mini), each through `compress run` with the default
# recipe (its full epoch counts) on the shipped CIFAR-10 subset (cifar10-mini: 4,500 training, 500 validation,
# 1,000 test images), and the article's CNN beside them. Results go to benchmarks/zoo/<model>/ and
# benchmarks/zoo/summary.md.
# Usage: scripts/benchmark_zoo.sh [RUN_DIR] (default runs/zoo; a rerun resumes every run folder and reuses the
# trained zoo models in RUN_DIR/models)
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir=${1:-runs/zoo}
target=benchmarks/zoo
mkdir -p "$run_dir"
started=$(date +%s)
[ -f "$run_dir/models/mobilenetv2.keras" ] || python3 scripts/zoo_models.py "$run_dir/models" | tee "$run_dir.models.log"
training_seconds=$(( $(date +%s) - started ))
started=$(date +%s)
declare -A extra=([article]="" [tfmot_example]="" [mobilenetv2]="--input-range symmetric" [keras3_resnet]=""
                  [rescaling_cnn]="")
for name in article tfmot_example mobilenetv2 keras3_resnet rescaling_cnn; do
  command=(compress run --out "$run_dir/$name")
  [ "$name" != article ] && command+=(--model "$run_dir/models/$name.keras")
  # shellcheck disable=SC2206
  command+=(${extra[$name]})
  echo "== $name: ${command[*]}"
  "${command[@]}"
  mkdir -p "$target/$name"
  cp "$run_dir/$name"/{report.md,results.json,results.csv,accuracy_vs_size.png} "$target/$name"/
  printf '%s\n' "${command[*]}" > "$target/$name/command.txt"
done
cp "$run_dir.models.log" "$target/models.log" 2>/dev/null || true
python3 scripts/zoo_summary.py "$target" "$(( $(date +%s) - started ))" "$training_seconds" > "$target/summary.md"
echo "wrote $target/summary.md"
