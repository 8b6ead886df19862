#!/usr/bin/env bash
# Issue 5: train the reference (quickstart = full routing + mlp projector), the two methods and the
# baselines on the synthetic benchmark with one seed and step budget, then write the comparison table and
# the Pareto plot (cIoU vs LLM FLOPs). Usage: bash benchmarks/compare_baselines.sh [OUT_DIR] [key=value ...]
# (about 15 minutes on 2 CPU cores at the recipes' 600 steps).
set -euo pipefail
out=${1:-runs/baselines}
shift || true
segrouter sweep --out "$out" --plot "$out/pareto.png" \
  --recipes recipes/quickstart.yaml recipes/token_routing.yaml recipes/fastv.yaml recipes/mod.yaml \
            recipes/avgpool.yaml recipes/sam_superpixel.yaml recipes/ssp_token_routing.yaml \
  trainer.enable_progress_bar=false "$@"
segrouter compare "$out"/quickstart "$out"/token_routing "$out"/fastv "$out"/mod "$out"/avgpool \
  "$out"/sam_superpixel "$out"/ssp_token_routing --format markdown --out "$out/table.md" --plot "$out/pareto.png"
cat "$out/table.md"
