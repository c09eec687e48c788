#!/usr/bin/env bash
# Run every benchmark present in bench/ (each writes JSON under bench/results/).
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
exit $status
