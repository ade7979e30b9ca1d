#!/usr/bin/env bash
# The accelerator fast lane's modes, alternated, through bench_sdk on a lent GPU machine (no
# network, no vxpu install: benchmarks/run_gpu.sh sets the package up for each run): "poll" (the
# lane with its native poll loop, the default), "issue" (the lane inside Python's cycles only,
# VXPU_FASTLANE_POLL=0) and "off" (VXPU_FASTLANE=0). Prints one line per run (the issue-8 rows:
# SDK/native ratios, LAUNCH + completion in us) and, from one more run of the first mode with
# VXPU_XPU_PROFILE=1, the poller's mean time per step and the lane's counters. Nothing big is kept.
#   usage: [ROUNDS=2] [MODES="poll issue off"] [SDK_ARGS="--buffers 8 --reps-scale 8"] benchmarks/fastlane_ab.sh [cuda]
#   (~15 s a run; SDK_ARGS, more bench_sdk.py options, goes to every run through run_gpu.sh)
set -uo pipefail
R="$(cd "$(dirname "$0")/.." && pwd)"
BACKEND="${1:-cuda}"
TMP="$(mktemp -d)"
PY="${PYTHON:-python3}"
runs=()
MODES=(${MODES:-poll issue off})
env_of() {  # the environment of one mode
    case "$1" in poll) echo "VXPU_FASTLANE=1 VXPU_FASTLANE_POLL=1";; issue) echo "VXPU_FASTLANE=1 VXPU_FASTLANE_POLL=0";;
                 *) echo "VXPU_FASTLANE=0";; esac; }
for round in $(seq 1 "${ROUNDS:-2}"); do
    for mode in "${MODES[@]}"; do
        out="$TMP/r$round-$mode"
        env $(env_of "$mode") STEPS=sdk OUT="$out" STEP_TIMEOUT=60 bash "$R/benchmarks/run_gpu.sh" "$BACKEND" >/dev/null 2>&1
        runs+=("$out/sdk.json")
    done
done
env $(env_of "${MODES[0]}") STEPS=sdk VXPU_XPU_PROFILE=1 OUT="$TMP/prof" STEP_TIMEOUT=60 \
    bash "$R/benchmarks/run_gpu.sh" "$BACKEND" >/dev/null 2>&1
"$PY" - "$TMP/prof/sdk.json" "${runs[@]}" <<'EOF'
import json, os, sys
ROWS = [("64K x64 htod", "guest-RAM->device 64 KiB x64"), ("64K x64 dtoh", "device->guest-RAM 64 KiB x64"),
        ("1M htod", "guest-RAM->device 1 MiB x16"), ("1M dtoh", "device->guest-RAM 1 MiB x16"),
        ("16M htod", "guest-RAM->device 16 MiB x4"), ("16M dtoh", "device->guest-RAM 16 MiB x4"),
        ("launch us", "empty LAUNCH + completion (us)"), ("batched", "batched launches")]
print("run          " + " ".join(f"{name:>13}" for name, _ in ROWS))
for path in sys.argv[2:]:
    label = os.path.basename(os.path.dirname(path))
    if not os.path.exists(path):
        print(f"{label:<12} no result")
        continue
    rows = {r["what"]: r for r in json.load(open(path))["rows"]}
    cells = []
    for _name, prefix in ROWS:
        row = next((r for what, r in rows.items() if what.startswith(prefix)), None)
        if row is None or "error" in row:
            cells.append("-")
        elif prefix.startswith("empty"):
            cells.append(f"{row['sdk']:.1f}/{row['native']:.1f}")
        else:
            cells.append(f"{row['ratio']:.3f}")
    print(f"{label:<12} " + " ".join(f"{c:>13}" for c in cells))
prof = sys.argv[1]
if os.path.exists(prof):
    stats = json.load(open(prof))["stats"]
    print("profile (mean us, count):", {k: (round(v["mean_us"], 2), v["count"])
          for k, v in stats.get("profile", {}).items() if not k.startswith("op:M") and not k.startswith("op:K")})
    print("lane counters:", {k: v for k, v in stats["session"].items() if "fastlane" in k})
EOF
rm -rf "$TMP"
