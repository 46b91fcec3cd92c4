#!/usr/bin/env bash
# Builds the GPU test and bench binaries HERE (no nvcc needed) and puts stripped copies in .dev/gpu/
# (git-ignored; another folder with FASA_GPU_STAGE), which bench/gpu/run.sh runs on the device:
# carry that folder. Also stages the engine's GPU-operator test (engine/tests/gpu_op.rs) with the
# ONNX Runtime library it loads, and writes captured.bin, K/V and queries of the real default model
# (found through FASA_CACHE_DIR, as the engine finds it; scripts/setup fetches it) for the tests'
# captured-K/V check.
set -euo pipefail
cd "$(dirname "$0")/../.."
STAGE=${FASA_GPU_STAGE:-.dev/gpu}
TARGET=${CARGO_TARGET_DIR:-target}
nice cargo test --release -p fasa-kernels --features cuda,gpu-tests --no-run 2>&1 | tee /tmp/fasa-gpu-build.log
nice cargo test --release -p fasa-engine --test gpu_op --no-run 2>&1 | tee /tmp/fasa-gpu-op-build.log
nice cargo test --release -p fasa-engine --test cuda_ep --no-run 2>&1 | tee /tmp/fasa-cuda-ep-build.log
nice cargo test --release -p fasa-engine --test gpu_mem --no-run 2>&1 | tee /tmp/fasa-gpu-mem-build.log
nice cargo build --release -p fasa-kernels --features cuda --example gpu_bench
nice cargo build --release -p fasa-bench
mkdir -p "$STAGE"
# 4096 tokens of GPL-3, layers 0, 10, 20, 29, f16: 12 MiB, about 25 s on 2 cores.
nice "$TARGET/release/fasa-bench" capture --out "$STAGE/captured.bin"
bin() { grep -o "$1 ([^)]*)" "$2" | tail -1 | sed 's/.*(\(.*\))/\1/'; }
objcopy --strip-debug "$(bin tests/gpu.rs /tmp/fasa-gpu-build.log)" "$STAGE/gpu-tests"
objcopy --strip-debug "$(bin tests/gpu_op.rs /tmp/fasa-gpu-op-build.log)" "$STAGE/gpu_op"
objcopy --strip-debug "$(bin tests/cuda_ep.rs /tmp/fasa-cuda-ep-build.log)" "$STAGE/cuda_ep"
objcopy --strip-debug "$(bin tests/gpu_mem.rs /tmp/fasa-gpu-mem-build.log)" "$STAGE/gpu_mem"
objcopy --strip-debug "$TARGET/release/examples/gpu_bench" "$STAGE/gpu_bench"
cp "${FASA_CACHE_DIR:?set FASA_CACHE_DIR to the folder with onnxruntime/ and models/}"/onnxruntime/libonnxruntime.so.* "$STAGE/"
ls -la "$STAGE"
