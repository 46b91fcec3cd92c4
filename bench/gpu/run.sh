#!/usr/bin/env bash
# On the device, one call: correctness tests (every kernel vs its CPU twin), then the timings
# (in-house dense, FASA-C paper and default modes, PyTorch SDPA, copy bandwidth) and the table.
# Build first, here: bench/gpu/build.sh; then run with carry [".dev/gpu"]:
#   bash bench/gpu/run.sh [--quick]
# Results go to $OUT (tests.log, bench.csv, sdpa.csv, table.md, env.txt).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fasa-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASA_PTX_CACHE=/tmp/fasa-ptx
# NVRTC: the CUDA toolkit's, else the one in PyTorch's wheels.
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib $(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)/nvidia/cu13/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv; nvcc --version | tail -2; ls /usr/local/cuda/lib64/libnvrtc* 2>&1 | head -3; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
chmod +x .dev/gpu/gpu-tests .dev/gpu/gpu_bench
# Real-model K/V (bench/gpu/build.sh writes it); without it the captured-K/V test skips, said below.
export FASA_CAPTURED_KV=.dev/gpu/captured.bin
timeout 150 .dev/gpu/gpu-tests --include-ignored --test-threads=1 --nocapture 2>&1 | tee "$OUT/tests.log"
echo "tests exit ${PIPESTATUS[0]}"
grep -E '^(SKIPPED|captured K/V: [0-9]+ cases)' "$OUT/tests.log" || echo "captured-K/V check: no result line (see tests.log)"
timeout 330 .dev/gpu/gpu_bench "$@" "$OUT/bench.csv" 2>&1 | tail -n +1
timeout 150 python3 bench/gpu/sdpa.py "$@" "$OUT/sdpa.csv"
python3 bench/gpu/table.py "$OUT/bench.csv" "$OUT/sdpa.csv" | tee "$OUT/table.md"
# Optional (FASA_NCU=1): hardware counters of the first launches of dense FAC, TIP, filter, FAC.
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ "${FASA_NCU:-0}" = 1 ] && [ -n "$NCU" ]; then
  timeout 75 "$NCU" --clock-control none -k 'regex:^(fac_h4_f16|facl_h4_f16|tip_f16|select_filter)$' -c 4 --section SpeedOfLight --section Occupancy \
    .dev/gpu/gpu_bench --quick /tmp/ncu-bench.csv > "$OUT/ncu.txt" 2>&1
  grep -E '^  [a-z_]+16|select_filter|Memory Throughput|DRAM Throughput|Duration|Achieved Occupancy|Theoretical Occupancy|Block Limit' "$OUT/ncu.txt" | head -60
fi
