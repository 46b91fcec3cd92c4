#!/usr/bin/env bash
# Baseline for our figures: llama.cpp's llama-bench on the default model, CPU only.
#   bench/llama_cpp.sh [OUT.json [more llama-bench args...]]
# Env: FASA_BENCH_THREADS (2), FASA_BENCH_DEPTHS (0,2048,8000), FASA_BENCH_REPS (3),
# FASA_BENCH_PROMPT (512; 0 = decode only), FASA_BENCH_NO_SETUP (1: skip scripts/setup, for
# callers that ran it already).
# The JSON goes to OUT.json, or to stdout; progress goes to stderr. llama.cpp is built once per
# version into <cache>/llama.cpp/<version>/ from the source that the PyPI sdist of llama-cpp-python
# vendors (vendor/llama.cpp): the package registries are all this project may reach.
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_PYTHON=0.3.36
SDIST_SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e

out="${1:--}"
extra=("${@:2}")

# Same cache rule as engine/src/paths.rs and scripts/setup; setup also fetches the model.
if [[ -n "${FASA_CACHE_DIR:-}" ]]; then cache="$FASA_CACHE_DIR"
elif [[ -n "${XDG_CACHE_HOME:-}" ]]; then cache="$XDG_CACHE_HOME/fasa"
else cache="${HOME:-}/.cache/fasa"; fi
[[ "${FASA_BENCH_NO_SETUP:-0}" == 1 ]] || bash scripts/setup >&2
model="${FASA_MODEL:-$cache/models/SmolLM2-135M-Instruct.Q4_1.gguf}"

dir="$cache/llama.cpp/$LLAMA_CPP_PYTHON"
bin="$dir/llama-bench"
if [[ -x "$bin" ]]; then
  echo "llama-bench $LLAMA_CPP_PYTHON: up to date ($bin)" >&2
else
  need=()
  command -v cmake >/dev/null || need+=(cmake)
  command -v c++ >/dev/null || need+=(g++)
  command -v make >/dev/null || need+=(make)
  if ((${#need[@]})); then
    sudo=(); [[ "$(id -u)" == 0 ]] || sudo=(sudo)
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >&2
  fi

  mkdir -p "$dir"
  tmp="$(mktemp -d "$dir/.build.XXXXXX")"
  trap 'rm -rf "$tmp"' EXIT
  # The package has no wheels; name it alone in --no-binary, or pip builds cmake and ninja from
  # source for the sdist's metadata step.
  python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python \
    "llama-cpp-python==$LLAMA_CPP_PYTHON" -d "$tmp" >&2
  sdist="$tmp/llama_cpp_python-$LLAMA_CPP_PYTHON.tar.gz"
  got="$(sha256sum "$sdist" | cut -d' ' -f1)"
  [[ "$got" == "$SDIST_SHA256" ]] || {
    echo "bench: llama-cpp-python $LLAMA_CPP_PYTHON sdist has sha256 $got, expected $SDIST_SHA256: not building it" >&2
    exit 1
  }
  mkdir "$tmp/src"
  tar -xzf "$sdist" -C "$tmp/src" --strip-components=3 "llama_cpp_python-$LLAMA_CPP_PYTHON/vendor/llama.cpp"

  # CPU only, tuned for this machine (GGML_NATIVE), static so the one binary is all we keep.
  # Nothing that downloads (OpenSSL/HTTPS, prebuilt web UI) and nothing but llama-bench is built.
  # nice: others' builds on the same 2 cores keep priority.
  start=$SECONDS
  nice -n 10 cmake -S "$tmp/src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DBUILD_SHARED_LIBS=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF -DGGML_CCACHE=OFF >&2
  nice -n 10 cmake --build "$tmp/build" --target llama-bench -j "$(nproc)" >&2
  install -m 0755 "$tmp/build/bin/llama-bench" "$bin.new"
  mv -f "$bin.new" "$bin"
  echo "llama-bench $LLAMA_CPP_PYTHON: built in $((SECONDS - start)) s ($bin)" >&2
fi

# Depths 0, 2048 and 8000 (near the model's 8192 context): decode speed as the KV cache grows,
# which is what sparse attention is about. 2 threads: the size of our CI and dev machines.
args=(-m "$model" -t "${FASA_BENCH_THREADS:-2}" -p "${FASA_BENCH_PROMPT:-512}" -n 128 -d "${FASA_BENCH_DEPTHS:-0,2048,8000}" -r "${FASA_BENCH_REPS:-3}" -o json "${extra[@]}")
if [[ "$out" == - ]]; then
  "$bin" "${args[@]}"
else
  "$bin" "${args[@]}" >"$out"
  echo "bench: wrote $out" >&2
fi
