#!/usr/bin/env bash
# Builds the GPU test and bench binaries HERE (no nvcc needed) and puts stripped copies in .dev/gpu/
# (git-ignored), which bench/gpu/run.sh runs on the device: carry `.dev/gpu`. Also writes
# .dev/gpu/captured.bin, K/V and queries of the real default model (found through FASA_CACHE_DIR,
# as the engine finds it; scripts/setup fetches it) for the tests' captured-K/V check.
set -euo pipefail
cd "$(dirname "$0")/../.."
nice cargo test --release -p fasa-kernels --features cuda,gpu-tests --no-run 2>&1 | tee /tmp/fasa-gpu-build.log
nice cargo build --release -p fasa-kernels --features cuda --example gpu_bench
nice cargo build --release -p fasa-bench
mkdir -p .dev/gpu
# 4096 tokens of GPL-3, layers 0, 10, 20, 29, f16: 12 MiB, about 25 s on 2 cores.
nice "${CARGO_TARGET_DIR:-target}/release/fasa-bench" capture --out .dev/gpu/captured.bin
t=$(grep -o 'tests/gpu.rs (target/release/deps/gpu-[0-9a-f]*)' /tmp/fasa-gpu-build.log | tail -1 | sed 's/.*(\(.*\))/\1/')
objcopy --strip-debug "$t" .dev/gpu/gpu-tests
objcopy --strip-debug target/release/examples/gpu_bench .dev/gpu/gpu_bench
ls -la .dev/gpu
