#!/usr/bin/env bash
# Exploration of the vision-dependent testbed's stage 2 on a GPU (docs/results.md, "Vision-dependent
# benchmark"): many short `segrouter fit` runs of recipes/visref_positions.yaml (or RECIPE, another recipe that
# starts from stage 1) at once, one process each, from the stage-1 checkpoints of runs/visref (carried to the
# device), to find settings under which the reading of the visual tokens takes off early and for every seed.
# Exploration only: every acceptance figure is measured on CPU with benchmarks/visref.py.
# Usage: bash benchmarks/gpu/visref_sweep.sh OUT_DIR SECONDS CONFIG...   where CONFIG is
#   label:key=value,key=value   (label alone: the recipe as committed). Each CONFIG runs for seeds 0 and 1
# and is stopped after SECONDS; OUT_DIR/sweep.tgz holds every run's metrics.csv and log (one file: the device
# tool brings back a few files only). ACCEL=cpu runs it on a CPU (a dry run); PRETRAIN names the folder of the
# stage-1 runs (default runs/visref), whose visref_pretrain_s0/s1 last.ckpt the device call must carry.
# Measured on an H200 with 16 cores: 16 runs at once take 0.35 s per step each, 6 at once 0.14 s.
set -uo pipefail
if [ $# -lt 3 ]; then
  echo "visref_sweep.sh: error: usage: bash benchmarks/gpu/visref_sweep.sh OUT_DIR SECONDS CONFIG..." >&2
  exit 2
fi
out=$1; seconds=$2; shift 2
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/../.."
if ! python3 -c "import omegaconf" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore
pretrain=${PRETRAIN:-runs/visref}
work=/tmp/visref_sweep
rm -rf "$work"
pids=()
for spec in "$@"; do
  label=${spec%%:*}
  overrides=()
  [[ $spec == *:* ]] && IFS=, read -r -a overrides <<< "${spec#*:}"
  for seed in 0 1; do
    ckpt=$pretrain/visref_pretrain_s$seed/version_0/checkpoints/last.ckpt
    mkdir -p "$work/${label}_s$seed"
    timeout -s TERM -k 20 "$seconds" python3 -m segrouter.cli fit --recipe "recipes/${RECIPE:-visref_positions}.yaml" \
      output_dir=$work name="${label}_s$seed" seed=$seed init_from=$ckpt trainer.accelerator=${ACCEL:-gpu} \
      trainer.enable_progress_bar=false "${overrides[@]}" > "$work/${label}_s$seed/log.txt" 2>&1 &
    pids+=($!)
  done
done
wait "${pids[@]}"
(cd "$work" && tar czf "$out/sweep.tgz" */log.txt */version_*/metrics.csv)
