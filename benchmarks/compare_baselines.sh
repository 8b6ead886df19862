#!/usr/bin/env bash
# Issue 5: train the reference (quickstart = full routing + mlp projector), the two methods and the
# baselines on the synthetic benchmark with one seed and step budget, then write the comparison table and
# the Pareto plot (cIoU vs LLM FLOPs) into docs/results.md (between the "baselines" markers) and
# docs/pareto_baselines.png. Usage: bash benchmarks/compare_baselines.sh [OUT_DIR] [key=value ...]
# (about 30 minutes on 2 CPU cores at the recipes' 1000 steps).
set -euo pipefail
out=${1:-runs/baselines}
shift || true
paths=() runs=()
for r in quickstart token_routing fastv mod avgpool slic_superpixel sam_superpixel sam_superpixel_no_pe \
    sam_superpixel_no_agg ssp_token_routing; do
  paths+=("recipes/$r.yaml") runs+=("$out/$r")
done
segrouter sweep --out "$out" --recipes "${paths[@]}" trainer.enable_progress_bar=false "$@" \
  || echo "some runs failed; they are listed as such below"
segrouter compare "${runs[@]}" --format markdown --out "$out/table.md" --plot docs/pareto_baselines.png
python3 - "$out/table.md" <<'PY'
import pathlib, platform, subprocess, sys
table = pathlib.Path(sys.argv[1]).read_text()
doc = pathlib.Path("docs/results.md")
begin, end = "<!-- baselines:begin -->", "<!-- baselines:end -->"
text = doc.read_text()
cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
model = next((l.split(":", 1)[1].strip() for l in cpu.splitlines() if l.startswith("Model name")), platform.machine())
body = f"{begin}\nMachine: {model}, {subprocess.run(['nproc'], capture_output=True, text=True).stdout.strip()} cores. Regenerate with `bash benchmarks/compare_baselines.sh`.\n\n{table}\n![Pareto: cIoU vs LLM FLOPs](pareto_baselines.png)\n{end}"
text = text[: text.index(begin)] + body + text[text.index(end) + len(end):] if begin in text else text + "\n" + body + "\n"
doc.write_text(text)
PY
