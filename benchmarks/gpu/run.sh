#!/usr/bin/env bash
# Issue 18: the GPU figures in one device call (benchmarks/gpu/README.md).
# Usage: bash benchmarks/gpu/run.sh OUT_DIR [gpu_bench.py options, e.g. --sections prefill,profile]
# Nothing is fetched: omegaconf and antlr4 come from the wheels in .whl/ when the Python lacks omegaconf, and
# segrouter from src/ on PYTHONPATH. Writes OUT_DIR/log.txt, results.json, results.md and profile_*.txt; the
# Python part is stopped after 450 s so that the results come back within an 8-minute device call.
set -uo pipefail
if [ $# -lt 1 ] || [ -z "$1" ] || [[ $1 == -* ]]; then
  echo "run.sh: error: missing output folder — usage: bash benchmarks/gpu/run.sh OUT_DIR [gpu_bench.py options]" >&2
  exit 2
fi
out=$1
shift
mkdir -p "$out" || { echo "run.sh: error: cannot create the output folder $out" >&2; exit 2; }
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/../.."
{
  date -u
  nvidia-smi || echo "nvidia-smi: not available"
  python3 --version
} 2>&1 | tee "$out/log.txt"
if ! python3 -c "import omegaconf" 2>/dev/null; then
  if ! compgen -G ".whl/*.whl" >/dev/null; then
    echo "run.sh: error: omegaconf is not installed and .whl/ holds no wheels — prepare them as benchmarks/gpu/README.md says" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tee -a "$out/log.txt"
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  if ! python3 -c "import omegaconf" 2>>"$out/log.txt"; then
    echo "run.sh: error: omegaconf still cannot be imported after installing .whl/*.whl into /tmp/site (see $out/log.txt)" >&2
    exit 2
  fi
fi
export PYTHONPATH=$PWD/src:${PYTHONPATH:-}
export TOKENIZERS_PARALLELISM=false
timeout -k 10 450 python3 -u benchmarks/gpu/gpu_bench.py "$out" "$@" 2>&1 | tee -a "$out/log.txt"
rc=${PIPESTATUS[0]}
[ "$rc" = 124 ] && echo "run.sh: stopped after 450 s; results.json holds the sections finished before" | tee -a "$out/log.txt"
exit "$rc"
