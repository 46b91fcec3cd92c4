#!/usr/bin/env bash
# GPU run 27, on the device with carry [".dev/gpu"], after bench/gpu/ort_gpu.sh unpack and the
# default model carried in parts to /tmp/model/m0..m2: tests (kernels, gpu_op, cuda_ep), a profile
# of the CUDA provider's graph, then decode speed with the correction as nodes vs the custom op,
# alternated with the CPU provider's two paths.
set -u
cd "$(dirname "$0")/../.."
cat /tmp/model/m0 /tmp/model/m1 /tmp/model/m2 > /tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf && sha256sum /tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf | cut -c1-16
OUT=$OUT timeout 300 bash bench/gpu/run.sh --tests
SITE=$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))')
export LD_LIBRARY_PATH="$(ls -d "$SITE"/nvidia/*/lib | paste -sd:):/usr/local/cuda/lib64" FASA_ORT_LIB=/tmp/ortgpu/libonnxruntime.so.1.31.1 FASA_MODEL=/tmp/model/SmolLM2-135M-Instruct.Q4_1.gguf FASA_CACHE_DIR=/tmp/fcache FASA_PTX_CACHE=/tmp/fasa-ptx
S=.dev/gpu/speed; chmod +x $S
FASA_ORT_PROFILE=/tmp/pn timeout 120 $S --depth 2048 --modes fasa --prefill 64 --decode 32 --execution-provider cuda > /dev/null 2>&1
python3 bench/gpu/ort_profile.py /tmp/pn_*.json | tee $OUT/profile_nodes.txt
for i in 1 2; do
  for cfg in "cuda nodes 1" "cuda op 1" "cpu op 1" "cpu op 0"; do
    set -- $cfg
    FASA_GPU=$3 FASA_EXPERIMENT_CORRECTION=$2 timeout 100 $S --depth 8000 --modes dense,fasa --prefill 64 --decode 128 --execution-provider $1 2>/dev/null \
      | sed "s/^{/{\"correction\":\"$2\",/" | tee -a $OUT/speed3.jsonl \
      | python3 -c 'import json,sys; [print("ep", j["execution_provider"], j["correction"], "gpu", j["gpu_layer_steps"]>0, j["mode"], round(j["decode_tok_s"],1), "prefill", round(j["prefill_tok_s"],1)) for j in map(json.loads, sys.stdin)]'
  done
done
