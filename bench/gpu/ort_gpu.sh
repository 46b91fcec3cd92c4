#!/usr/bin/env bash
# ONNX Runtime with its CUDA execution provider, for the device's CUDA-provider test
# (engine/tests/cuda_ep.rs). The PyPI onnxruntime-gpu wheel is 256 MB, its CUDA provider library
# 284 MB, over what one device call carries (64 MiB), so it travels in parts over consecutive
# calls to the same warm machine.
#   here:       bash bench/gpu/ort_gpu.sh stage     -> .dev/ortgpu/p1, p2, ... (git-ignored)
#   the device: bash bench/gpu/ort_gpu.sh unpack    (each call, with carry [".dev/ortgpu/pN"]);
#               once every part is there it writes /tmp/ortgpu/ and prints "ready: <dir>".
# To fit, the provider's fat binaries keep only their sm_90 (H200) machine code: the other
# architectures' payloads are zeroed in place (sizes and headers unchanged; the CUDA runtime
# decompresses only the entry it picks for the device), so xz packs them to nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
VER=${ORT_GPU_VERSION:-1.31.1}
KEEP_SM=${ORT_GPU_KEEP_SM:-90}
DEST=${ORT_GPU_STAGE:-.dev/ortgpu}
PART=${ORT_GPU_PART_MB:-44}
case "${1:-}" in
stage)
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 -d "$work" "onnxruntime-gpu==$VER"
  (cd "$work" && unzip -q -o ./*.whl 'onnxruntime/capi/libonnxruntime*' -d x)
  lib="$work/x/onnxruntime/capi"
  python3 - "$lib/libonnxruntime_providers_cuda.so" "$KEEP_SM" <<'EOF'
import struct, sys
path, keep = sys.argv[1], {int(a) for a in sys.argv[2].split(',')}
d = bytearray(open(path, 'rb').read())
# Fat binary: magic 0xBA55ED50, version u16 (1), header size u16 (16), entries' size u64; each
# entry: kind u16 (1 PTX, 2 ELF), version u16, header size u32, payload size u64, ..., sm u32 at 28.
magic, i, kept, zeroed = struct.pack('<I', 0xBA55ED50), 0, 0, 0
while (i := d.find(magic, i)) >= 0:
    ver, hs, size = struct.unpack_from('<HHQ', d, i + 4)
    if ver != 1 or hs != 16:
        i += 4
        continue
    p, end = i + hs, i + hs + size
    while p < end:
        kind, _, ehs, psize = struct.unpack_from('<HHIQ', d, p)
        sm = struct.unpack_from('<I', d, p + 28)[0]
        if kind == 2 and sm not in keep:
            d[p + ehs:p + ehs + psize] = bytes(psize)
            zeroed += psize
        else:
            kept += psize
        p += ehs + psize
    i = end
open(path, 'wb').write(d)
print(f"fat binaries: kept {kept / 1e6:.1f} MB (sm {sorted(keep)} and PTX), zeroed {zeroed / 1e6:.1f} MB")
EOF
  rm -rf "$DEST"; mkdir -p "$DEST"
  tar -C "$lib" -cf - libonnxruntime.so."$VER" libonnxruntime_providers_shared.so libonnxruntime_providers_cuda.so \
    | xz -6 -T2 > "$work/ortgpu.tar.xz"
  (cd "$work" && sha256sum ortgpu.tar.xz > ortgpu.sha256 && split -b "${PART}M" -d -a 1 ortgpu.tar.xz part)
  n=0
  for f in "$work"/part*; do n=$((n + 1)); mkdir -p "$DEST/p$n"; mv "$f" "$DEST/p$n/"; done
  for k in $(seq 1 $n); do cp "$work/ortgpu.sha256" "$DEST/p$k/"; echo "$n" > "$DEST/p$k/parts"; done
  du -sh "$DEST"/p*
  ;;
unpack)
  parts=/tmp/ortgpu-parts; mkdir -p "$parts"
  for p in "$DEST"/p*/; do [ -f "$p/parts" ] && cp "$p"/part[0-9]* "$p/ortgpu.sha256" "$p/parts" "$parts/"; done
  have=$(ls "$parts"/part[0-9]* 2>/dev/null | wc -l); want=$(cat "$parts/parts" 2>/dev/null || echo '?')
  echo "ort-gpu parts here: $have of $want"
  if [ "$have" = "$want" ] && [ ! -f /tmp/ortgpu/libonnxruntime_providers_cuda.so ]; then
    (cd "$parts" && cat part[0-9]* > ortgpu.tar.xz && sha256sum -c ortgpu.sha256)
    mkdir -p /tmp/ortgpu
    python3 -c 'import lzma, sys, tarfile; tarfile.open(fileobj=lzma.open(sys.argv[1])).extractall(sys.argv[2])' "$parts/ortgpu.tar.xz" /tmp/ortgpu
  fi
  [ -f /tmp/ortgpu/libonnxruntime_providers_cuda.so ] && echo "ready: /tmp/ortgpu"
  ;;
*) echo "usage: $0 stage | unpack" >&2; exit 2 ;;
esac
