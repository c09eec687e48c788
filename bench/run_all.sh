#!/usr/bin/env bash
# Rerun the core benchmarks (each writes JSON under bench/results/); every other one has its own
# command in bench/README.md, beside its table.
# STREAM_GB sets the size of the streaming checkpoint it makes (default 2 GiB); the >32 GB run
# is documented in bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
status=0
run() {
  echo "== $*" >&2
  "$@" || { echo "FAILED: $*" >&2; status=1; }
}
run python bench/detect.py --threads 1
run python bench/stream.py --size-gb "${STREAM_GB:-2}" --threads 1
for script in bench/eval.py bench/quantize.py bench/llama_cpp_pure.py; do
  [[ -f "$script" ]] && run python "$script"
done
# streamed against in memory on the real models (~40 min on 2 cores)
run python bench/stream_eval.py
run python bench/stream_ablate.py
run python bench/stream_sweep.py --points w8a8 --out bench/results/stream_sweep_w8a8.json
run python bench/w8a8_artifact.py
exit $status
