#!/usr/bin/env bash
# One batched run on a lent GPU machine (no network, no vxpu install): the checked-IR kernel
# ratios, the SDK and device-path ratios against native CUDA, and the device tests on CUDA.
# Results go to $OUT (the device tool's output folder) or ./gpu-results; a short table on stdout.
#   usage: [STEPS=checked,sdk,xpu,tests,groups] [STEP_TIMEOUT=200] [VARIANTS=no_limits32,...] [SDK_ARGS=...]
#          benchmarks/run_gpu.sh [cuda]      (SDK_ARGS: more bench_sdk.py options, e.g. "--reps-scale 4")
#   (VARIANTS: earlier lowering forms bench_checked_gpu.py times beside the current build, same call)
#   (STEPS picks a subset, in that order; default all five. "groups" runs the checked-kernel
#   fault tests on CUDA twice: fault record in mapped host memory (the default) and in device
#   memory, to tell a record-placement problem from a lowering one.)
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
STEPS=",${STEPS:-checked,sdk,xpu,tests,groups},"
want() { [[ "$STEPS" == *",$1,"* ]]; }
step() {  # the whole output goes to $OUT/steps.log, its last 25 lines to stdout
    echo "== $1" | tee -a "$OUT/steps.log"; shift
    timeout "${STEP_TIMEOUT:-200}" "$@" 2>&1 | tee -a "$OUT/steps.log" | tail -25; }
want checked && step "checked IR kernels vs CUDA C" "$PY" "$R/benchmarks/bench_checked_gpu.py" --json "$OUT/checked.json" \
    ${VARIANTS:+--variants "$VARIANTS"}
want sdk && step "SDK through the host transport" "$PY" "$R/benchmarks/bench_sdk.py" --backend "$BACKEND" --json "$OUT/sdk.json" ${SDK_ARGS:-}
want xpu && step "device path, raw descriptors" "$PY" "$R/benchmarks/bench_xpu.py" --quick --backend "$BACKEND" --json "$OUT/xpu.json"
want tests && step "device + SDK tests on $BACKEND" env VXPU_XPU_BACKEND="$BACKEND" VXPU_SDK_BACKEND="$BACKEND" \
    "$PY" -m pytest -q -p no:cacheprovider --import-mode=importlib "$R/tests/xpu" "$R/tests/sdk/test_sdk_local.py"
want groups && step "checked-kernel fault tests on CUDA, record in mapped host memory" \
    env PYTHONPATH="$PK:$R" "$PY" -m pytest -q -p no:cacheprovider -p no:logging --tb=short --import-mode=importlib \
    "$R/tests/ir/test_gpu_groups.py" "$R/tests/ir/test_bounds.py"
want groups && step "the same, record in device memory" env PYTHONPATH="$PK:$R" "$PY" -c "
import sys, pytest
from vxpu.accel.gpubase import GpuBackend
GpuBackend._mapped_record = lambda self: 0     # force the device-memory record (+ pinned mirror)
sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', '-p', 'no:logging', '--tb=short', '--import-mode=importlib',
                      '$R/tests/ir/test_gpu_groups.py', '$R/tests/ir/test_bounds.py']))"
