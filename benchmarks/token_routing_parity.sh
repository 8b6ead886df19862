#!/usr/bin/env bash
# Issue 3 evidence, one run: train `full` (quickstart) and `token_routing` with the same seed and steps,
# benchmark the LLM part at the Qwen2-0.5B shape, profile attention, and print the comparison.
# Usage: bash benchmarks/token_routing_parity.sh [OUT_DIR]   (about 10 minutes on 2 CPU cores)
set -euo pipefail
out=${1:-runs/parity}
for recipe in quickstart token_routing; do
  /usr/bin/time -f "$recipe wall %e s" segrouter fit --recipe recipes/$recipe.yaml output_dir=$out trainer.enable_progress_bar=false
done
segrouter analyze attention --recipe recipes/quickstart.yaml output_dir=$out --out $out/attention
segrouter bench --recipe recipes/token_routing.yaml --vs recipes/quickstart.yaml --random-init qwen2-0.5b \
  --out $out/bench_qwen2-0.5b.json model.routing.proxy_ratio=0.0625
segrouter compare $out/quickstart $out/token_routing --format markdown --plot $out/pareto.png
