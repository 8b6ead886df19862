#!/usr/bin/env bash
# End-to-end inference cost of token routing and FastV against full, as a user of `predict --generate` pays it
# (issue 15): vision, the routed prefill of 576 visual tokens, 16 greedy decode steps with the KV cache, the mask
# decoder; one sample, a random LLM of Qwen2-0.5B's shape (benchmarks/e2e_qwen05b.yaml), the routing settings of
# the shipped LISA-7B token-routing recipe and of the FastV recipe. Each bench interleaves its two models.
#   bash benchmarks/e2e_generation.sh [OUT_DIR]      (default runs/e2e_generation; ~5 min on 2 CPU cores)
# Prints a markdown table (docs/results.md, "End-to-end generation").
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/e2e_generation}
mkdir -p "$out"
common=(--vs benchmarks/e2e_qwen05b.yaml --decode-steps 16 --warmup 2 --repeats 7)
segrouter bench --recipe benchmarks/e2e_qwen05b.yaml "${common[@]}" --out "$out/token_routing.json" \
  model.routing.name=token_routing model.routing.insert_layer=0.25 model.routing.route_start=0 \
  model.routing.proxy_ratio=0.125 model.routing.proxy_rule=grid model.routing.assignment=nearest
segrouter bench --recipe benchmarks/e2e_qwen05b.yaml "${common[@]}" --out "$out/fastv.json" \
  model.routing.name=fastv model.routing.k=2 model.routing.ratio=0.5 model.routing.rank_by=all
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print("| routing (vs full) | FLOPs ratio | FLOP-ideal speedup | measured speedup (median, per-round IQR) | "
      "% of ideal | full median (s) | load average |")
print("|---|---:|---:|---:|---:|---:|---|")
for name in ("token_routing", "fastv"):
    r = json.loads((out / f"{name}.json").read_text())
    s, load = r["speedup_per_round"], r["load_average"]
    print(f"| {name} | {r['flops_ratio']:.3f} | {r['ideal_speedup']:.2f}× | {r['speedup']:.2f}× "
          f"({s['q1']:.2f}–{s['q3']:.2f}) | {100 * r['fraction_of_ideal']:.0f} % | {r['B']['median_s']:.2f} | "
          f"{load['before']:.2f} → {load['after']:.2f} on {load['cpus']} CPUs |")
PY
