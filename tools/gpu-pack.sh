#!/usr/bin/env bash
# Stage what the GPU checks need into .gpu/ (ignored by git): the release edge-ad binary, the CUDA
# test binaries (stripped) and the conformance cases of ../shared. A lent GPU machine has no Rust
# toolchain and no ../shared; tools/gpu-check.sh runs there from this folder (carry ".gpu").
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
shared=${EDGE_AD_SHARED:-$root/../shared}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/bin .gpu/shared/conformance/adpretrain
cargo build --release -p edge-ad --features gpu-backbone
test_bin() { # crate, test target → path of the release test executable
  cargo test --release -p "$1" --test "$2" --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==sys.argv[1]: print(m["executable"])' "$2"
}
cp target/release/edge-ad .gpu/bin/edge-ad
cp "$(test_bin edge-ad-kernels cuda)" .gpu/bin/cuda-kernels
cp "$(test_bin edge-ad-tests conformance_cuda)" .gpu/bin/cuda-conformance
strip .gpu/bin/*
# tract-cuda is built for the CUDA 12.2 API (JetPack 6): bring CUDA 12's runtime (libcudart.so.12,
# PyPI) for GPU machines whose toolkit is CUDA 13, which dropped symbols that API calls.
mkdir -p .gpu/lib /tmp/edge-ad-cudart12
python3 -m pip download -q --no-deps --only-binary=:all: --platform manylinux2014_x86_64 \
  --python-version 3.11 nvidia-cuda-runtime-cu12==12.6.77 -d /tmp/edge-ad-cudart12
unzip -o -j -q /tmp/edge-ad-cudart12/nvidia_cuda_runtime_cu12-12.6.77-*.whl \
  nvidia/cuda_runtime/lib/libcudart.so.12 -d .gpu/lib
cp "$shared"/conformance/adpretrain/{a1,a2,b,c}_*.safetensors "$shared"/conformance/adpretrain/manifest.json \
  .gpu/shared/conformance/adpretrain/
du -sh .gpu
