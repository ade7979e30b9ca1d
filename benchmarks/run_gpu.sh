#!/usr/bin/env bash
# One batched run on a lent GPU machine (no network, no vxpu install): the checked-IR kernel
# ratios, the SDK and device-path ratios against native CUDA, and the device tests on CUDA.
# Results go to $OUT (the device tool's output folder) or ./gpu-results; a short table on stdout.
#   usage: [STEPS=checked,sdk,xpu,tests] [STEP_TIMEOUT=200] benchmarks/run_gpu.sh [cuda]
#   (STEPS picks a subset, in that order; default all four.)
set -uo pipefail
R="$(cd "$(dirname "$0")/.." && pwd)"
BACKEND="${1:-cuda}"
OUT="${OUT:-$R/gpu-results}"; mkdir -p "$OUT"
PK="$(mktemp -d)"; mkdir -p "$PK/vxpu"
for f in "$R"/vxpu/*; do ln -s "$f" "$PK/vxpu/"; done
for layer in vfio_server accel ir qmp guest; do ln -s "$R/$layer" "$PK/vxpu/$layer"; done
ln -s "$R/vm-images" "$PK/vxpu/images"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PK" VXPU_CACHE="$PK/cache" PYTHONDONTWRITEBYTECODE=1
cd "$PK"
STEPS=",${STEPS:-checked,sdk,xpu,tests},"
want() { [[ "$STEPS" == *",$1,"* ]]; }
step() { echo "== $1"; shift; timeout "${STEP_TIMEOUT:-200}" "$@" 2>&1 | tail -25; }
want checked && step "checked IR kernels vs CUDA C" "$PY" "$R/benchmarks/bench_checked_gpu.py" --json "$OUT/checked.json"
want sdk && step "SDK through the host transport" "$PY" "$R/benchmarks/bench_sdk.py" --backend "$BACKEND" --json "$OUT/sdk.json"
want xpu && step "device path, raw descriptors" "$PY" "$R/benchmarks/bench_xpu.py" --quick --backend "$BACKEND" --json "$OUT/xpu.json"
want tests && step "device + SDK tests on $BACKEND" env VXPU_XPU_BACKEND="$BACKEND" VXPU_SDK_BACKEND="$BACKEND" \
    "$PY" -m pytest -q -p no:cacheprovider --import-mode=importlib "$R/tests/xpu" "$R/tests/sdk/test_sdk_local.py"
