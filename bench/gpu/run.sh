#!/usr/bin/env bash
# On the device, one call: correctness tests (every kernel vs its CPU twin; the engine's GPU
# operator vs its CPU path), then the timings (in-house dense, FASA-C paper and default modes with
# fp16 and int8 TIP, PyTorch SDPA, copy bandwidth) and the table.
# Build first, here: bench/gpu/build.sh; then run with carry [".dev/gpu"]:
#   bash bench/gpu/run.sh [--quick | --targets | --tests]   (--tests: the correctness part only;
#   --targets: issue 5's four target shapes only)
# (FASA_GPU_STAGE names another staging folder; FASA_GPU_SCRIPTS another folder of sdpa.py and
# table.py.) Results go to $OUT (tests.log, gpu_op.log, bench.csv, sdpa.csv, table.md, env.txt).
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fasa-gpu}
STAGE=${FASA_GPU_STAGE:-.dev/gpu}
SCRIPTS=${FASA_GPU_SCRIPTS:-bench/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 FASA_PTX_CACHE=/tmp/fasa-ptx
# NVRTC: the CUDA toolkit's, else the one in PyTorch's wheels.
# (The site-packages folder of PyTorch's CUDA wheels, `nvidia/*/lib`.)
SITE=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null)
for d in /usr/local/cuda/lib64 /usr/local/cuda/targets/x86_64-linux/lib "$SITE"/nvidia/cu13/lib; do
  [ -d "$d" ] && export LD_LIBRARY_PATH="$d:${LD_LIBRARY_PATH:-}"
done
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu,power.draw --format=csv; nvcc --version | tail -2; ls /usr/local/cuda/lib64/libnvrtc* 2>&1 | head -3; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
chmod +x "$STAGE/gpu-tests" "$STAGE/gpu_bench" "$STAGE/gpu_op"
# Real-model K/V (bench/gpu/build.sh writes it); without it the captured-K/V test skips, said below.
export FASA_CAPTURED_KV=$STAGE/captured.bin
timeout 300 "$STAGE/gpu-tests" --include-ignored --test-threads=1 --nocapture 2>&1 | tee "$OUT/tests.log" | grep -E '^(test |test result|captured K/V: [0-9]+ cases|SKIPPED)|panicked'
echo "tests exit ${PIPESTATUS[0]}"
grep -q -E '^(SKIPPED|captured K/V: [0-9]+ cases)' "$OUT/tests.log" || echo "captured-K/V check: no result line (see tests.log)"
# The engine's operator on the GPU vs its CPU path (synthetic model, outputs poisoned), then with
# FASA_GPU=0, which must fail with "no GPU path" (the switch works).
# (The CPU library staged by build.sh; else onnxruntime-gpu's, whose CPU provider is the same.)
ORT=$(ls "$STAGE"/libonnxruntime.so.* /tmp/ortgpu/libonnxruntime.so.* 2>/dev/null | head -1)
FASA_ORT_LIB=$ORT timeout 200 "$STAGE/gpu_op" --include-ignored --nocapture 2>&1 | tee "$OUT/gpu_op.log" | grep -E 'logits rel-L2|test result|panicked|no GPU path'
echo "gpu_op exit ${PIPESTATUS[0]}"
# The same with int4 scoring planes, and fasa-paper reading them (the experiment switches: the
# CPU path and the GPU mirror both follow them).
FASA_EXPERIMENT_TIP=int4 FASA_EXPERIMENT_PAPER_PLANES=1 FASA_ORT_LIB=$ORT timeout 200 "$STAGE/gpu_op" --include-ignored --nocapture 2>&1 \
  | tee "$OUT/gpu_op_int4.log" | grep -E 'logits rel-L2|test result|panicked|no GPU path'
echo "gpu_op (int4 planes) exit ${PIPESTATUS[0]}"
# A GPU memory budget (FASA_GPU_MEM_MB) of one slot and a half mirrors one of two slots; the
# other decodes on the CPU (its own binary: the test sets the variable).
chmod +x "$STAGE/gpu_mem"
FASA_ORT_LIB=$ORT timeout 100 "$STAGE/gpu_mem" --include-ignored --nocapture 2>&1 | tee "$OUT/gpu_mem.log" | grep -E 'slot bytes|test result|panicked'
echo "gpu_mem exit ${PIPESTATUS[0]}"
off=$(FASA_GPU=0 FASA_ORT_LIB=$ORT timeout 60 "$STAGE/gpu_op" --include-ignored 2>&1)
grep -m1 -o -E "no GPU path[^\"]*" <<<"$off" || echo "FASA_GPU=0: no 'no GPU path' failure seen"
# The graph under ONNX Runtime's CUDA execution provider, FasaAttention on ORT's stream, against
# the CPU path: needs onnxruntime-gpu's libraries, which bench/gpu/ort_gpu.sh carries over
# several calls into /tmp/ortgpu; the CUDA libraries it links come from PyTorch's wheels.
if [ -f /tmp/ortgpu/libonnxruntime_providers_cuda.so ]; then
  nv=$(ls -d "$SITE"/nvidia/*/lib 2>/dev/null | paste -sd:)
  chmod +x "$STAGE/cuda_ep"
  FASA_ORT_LIB=$(ls /tmp/ortgpu/libonnxruntime.so.* | head -1) LD_LIBRARY_PATH="$nv:${LD_LIBRARY_PATH:-}" timeout 200 "$STAGE/cuda_ep" --include-ignored --nocapture 2>&1 \
    | tee "$OUT/cuda_ep.log" | grep -E 'rel-L2|test result|panicked|provider|error'
  echo "cuda_ep exit ${PIPESTATUS[0]}"
else
  echo "cuda_ep: skipped (no onnxruntime-gpu in /tmp/ortgpu: bench/gpu/ort_gpu.sh)"
fi
[ "${1:-}" = --tests ] && exit 0
timeout 400 "$STAGE/gpu_bench" "$@" "$OUT/bench.csv" 2>&1 | cut -d, -f1-17
timeout 150 python3 "$SCRIPTS/sdpa.py" "$@" "$OUT/sdpa.csv"
python3 "$SCRIPTS/table.py" "$OUT/bench.csv" "$OUT/sdpa.csv" > "$OUT/table.md"
sed -n '/^| shape /,$p' "$OUT/table.md"
# Optional (FASA_NCU=1): hardware counters of the paper int8 step's four kernels, PDL off, one
# ncu run per shape (FASA_NCU_SHAPES, default 16x32768; e.g. 16x131072,1x32768).
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
if [ "${FASA_NCU:-0}" = 1 ] && [ -n "$NCU" ]; then
  for sh in $(tr , ' ' <<<"${FASA_NCU_SHAPES:-16x32768}"); do
    FASA_GPU_PDL=0 FASA_BENCH_SHAPES=$sh FASA_BENCH_MODES=fasa_paper_group_int8 timeout 150 "$NCU" --clock-control none \
      -k 'regex:^(tip8p?_.*f16|select_filter_v[28]|facl?_h4_f16|facm_d128_f16|fac_combine)$' -c 4 \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats "$STAGE/gpu_bench" --targets /tmp/ncu-bench.csv > "$OUT/ncu_$sh.txt" 2>&1
    echo "== ncu $sh"
    grep -E '^  [a-z_0-9]+ \(|^    (Duration|DRAM Throughput|Achieved Occupancy|Registers Per|Issued Warp Per|Warp Cycles Per Issued)' "$OUT/ncu_$sh.txt"
  done
fi
