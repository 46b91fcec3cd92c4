#!/usr/bin/env bash
# End-to-end decode of the default model on the GPU machine: `speed` under the CPU execution
# provider with decode attention on the GPU (graphs on and off) and on the CPU, and under the CUDA
# provider when onnxruntime-gpu is there (bench/gpu/ort_gpu.sh). The model (98 MB) is over what one
# device call carries (64 MiB), so it travels in parts over consecutive calls to one warm machine
# (it is released 30 s after a call: make them back to back).
#   here:       FASA_CACHE_DIR=... bash bench/gpu/e2e.sh stage  -> .dev/e2e/p1, p2 (model parts),
#               .dev/e2e/bin (speed, the ONNX Runtime CPU library; xz) (git-ignored)
#   the device: bash bench/gpu/e2e.sh unpack   (a call with carry [".dev/e2e/p1"]), then
#               bash bench/gpu/e2e.sh unpack && bash bench/gpu/e2e.sh run [DEPTHS]
#               (carry [".dev/e2e/p2", ".dev/e2e/bin"]; depths default 2048,8000): the model is
#               whole once both parts came ("model: <file>").
# Output: one line per (binary, provider, attention path, round, depth, mode): decode tokens/s
# over all tokens, the first decode token's ms and the rate of the others; the JSON lines in
# $OUT/e2e.jsonl. Every `speed*` binary staged in .dev/e2e/bin runs (E2E_BASE=<speed built at
# another commit> at `stage` adds it as speed-base, for a same-call A/B); E2E_PATHS=<labels,…>
# keeps only those attention paths (gpu-graphs, gpu-one-by-one, cpu-attention).
set -euo pipefail
cd "$(dirname "$0")/../.."
DEST=${E2E_STAGE:-.dev/e2e}
MODEL=SmolLM2-135M-Instruct.Q4_1.gguf
case "${1:-}" in
stage)
  src="${FASA_CACHE_DIR:?set FASA_CACHE_DIR to the folder with models/ and onnxruntime/}"
  rm -rf "$DEST"; mkdir -p "$DEST/p1" "$DEST/p2" "$DEST/bin"
  (cd "$src/models" && sha256sum "$MODEL") > "$DEST/p1/model.sha256"
  cp "$DEST/p1/model.sha256" "$DEST/p2/"
  split -n 2 -d -a 1 "$src/models/$MODEL" "$DEST/part"
  mv "$DEST/part0" "$DEST/p1/"; mv "$DEST/part1" "$DEST/p2/"
  cargo build --release -p fasa-bench --bin speed
  objcopy --strip-debug "${CARGO_TARGET_DIR:-target}/release/speed" "$DEST/bin/speed"
  xz -6 -T2 "$DEST/bin/speed"
  if [ -n "${E2E_BASE:-}" ]; then
    objcopy --strip-debug "$E2E_BASE" "$DEST/bin/speed-base"
    xz -6 -T2 "$DEST/bin/speed-base"
  fi
  ort=$(ls "$src"/onnxruntime/libonnxruntime.so.* | head -1)
  xz -6 -T2 -c "$ort" > "$DEST/bin/$(basename "$ort").xz"
  du -sh "$DEST"/*
  ;;
unpack)
  parts=/tmp/e2e-model; mkdir -p "$parts"
  for p in "$DEST"/p*/; do [ -f "$p/model.sha256" ] && cp "$p"/part[0-9] "$p/model.sha256" "$parts/"; done
  echo "model parts here: $(ls "$parts"/part[0-9] 2>/dev/null | wc -l) of 2"
  if [ -f "$parts/part0" ] && [ -f "$parts/part1" ] && [ ! -f "$parts/$MODEL" ]; then
    cat "$parts/part0" "$parts/part1" > "$parts/$MODEL"
    (cd "$parts" && sha256sum -c model.sha256)
  fi
  [ -f "$parts/$MODEL" ] && echo "model: $parts/$MODEL"
  ;;
run)
  OUT=${OUT:-/tmp/e2e}; mkdir -p "$OUT"
  depths=${2:-2048,8000}
  bin=/tmp/e2e-bin; mkdir -p "$bin"
  python3 -c 'import lzma, shutil, sys, glob, os
for f in glob.glob(sys.argv[1] + "/*.xz"):
    shutil.copyfileobj(lzma.open(f), open(os.path.join(sys.argv[2], os.path.basename(f)[:-3]), "wb"))' "$DEST/bin" "$bin"
  chmod +x "$bin"/speed*
  [ -f "/tmp/e2e-model/$MODEL" ] || { echo "no model: run 'unpack' with each part first" >&2; exit 1; }
  SITE=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2>/dev/null || true)
  export FASA_MODEL="/tmp/e2e-model/$MODEL" FASA_CACHE_DIR=/tmp/e2e-cache FASA_PTX_CACHE=/tmp/fasa-ptx
  export LD_LIBRARY_PATH="$(ls -d "$SITE"/nvidia/*/lib 2>/dev/null | paste -sd:):/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
  cpu_lib=$(ls "$bin"/libonnxruntime.so.* | head -1)
  # provider, ONNX Runtime library, FASA_GPU, FASA_GPU_GRAPH, label
  cfgs=("cpu $cpu_lib 1 1 gpu-graphs" "cpu $cpu_lib 1 0 gpu-one-by-one" "cpu $cpu_lib 0 1 cpu-attention")
  if [ -f /tmp/ortgpu/libonnxruntime_providers_cuda.so ]; then
    g=$(ls /tmp/ortgpu/libonnxruntime.so.* | head -1)
    cfgs+=("cuda $g 1 1 gpu-graphs" "cuda $g 1 0 gpu-one-by-one")
  fi
  for round in 1 2; do
    for c in "${cfgs[@]}"; do
      set -- $c
      [ -n "${E2E_PATHS:-}" ] && [[ ",$E2E_PATHS," != *",$5,"* ]] && continue
      for exe in "$bin"/speed*; do
        FASA_ORT_LIB=$2 FASA_GPU=$3 FASA_GPU_GRAPH=$4 timeout 300 "$exe" --depth "$depths" --modes dense,fasa \
          --prefill 64 --decode 128 --execution-provider "$1" 2>/dev/null \
          | sed "s/^{/{\"bin\":\"${exe##*/}\",\"path\":\"$5\",\"round\":$round,/" | tee -a "$OUT/e2e.jsonl" \
          | python3 -c 'import json, sys
for j in map(json.loads, sys.stdin):
    print(j["round"], j["bin"], j["execution_provider"], j["path"], j["depth"], j["mode"], "tok/s %.1f" % j["decode_tok_s"],
          "first %.1f ms" % j["first_decode_ms"], "then %.1f tok/s" % j["steady_decode_tok_s"],
          "prefill %.1f tok/s" % j["prefill_tok_s"], "graph steps", j["graph_steps"])'
      done
    done
  done
  ;;
*) echo "usage: $0 stage | unpack | run [DEPTHS]" >&2; exit 2 ;;
esac
