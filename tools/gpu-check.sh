#!/usr/bin/env bash
# The GPU checks of issue 7, run on a machine with a GPU from the folder tools/gpu-pack.sh made:
# every CUDA kernel against its CPU twin (random, DINOv2-S shapes, conformance cases), the whole
# frame against the CPU frame, the zero-allocation count, kernel timings beside cuBLAS, the demo on
# both devices and edge-ad bench on both. Output goes to $1 (default: ./gpu-out). With
# EDGE_AD_GPU_TESTS_ONLY=1 only the two test executables run (a quick check of the kernels).
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-gpu-out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
# cudarc opens libnvrtc.so, libcublas.so (and for tract-cuda libcudart.so, libcudnn.so) by their
# unversioned names first: link the newest found (never the toolkit's link-time stubs).
libs=/tmp/edge-ad-cudalibs
mkdir -p "$libs"
for lib in libnvrtc libcublas libcublasLt libcudart libcudnn; do
  f=$(find /usr/local/cuda*/ /usr/lib/x86_64-linux-gnu /opt -name "$lib.so*" -type f -not -path "*/stubs/*" 2>/dev/null | sort -V | tail -n 1)
  # edge-ad's cudarc speaks the CUDA 12.2 API: CUDA 12's runtime (tools/gpu-pack.sh) where carried.
  if [ "$lib" = libcudart ] && [ -e .gpu/lib/libcudart.so.12 ]; then f=$root/.gpu/lib/libcudart.so.12; fi
  if [ -n "$f" ]; then
    ln -sf "$f" "$libs/$lib.so"
    export LD_LIBRARY_PATH="$libs:$(dirname "$f")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    echo "$lib: $f"
  else
    echo "$lib: not found"
  fi
done
export EDGE_AD_CUBIN_DIR=/tmp/edge-ad-cubins EDGE_AD_SHARED="$root/.gpu/shared"
export EDGE_AD_CONFORMANCE="$root/.gpu/shared/conformance/adpretrain" RUST_BACKTRACE=1
rm -f "$out/FAILED"
# A step's failure is noted in a file: steps run inside pipelines (subshells).
step() { echo "== $*"; "$@"; local r=$?; [ "$r" -eq 0 ] || { echo "FAILED ($r): $*"; echo "$*" >> "$out/FAILED"; }; }
step .gpu/bin/cuda-kernels --include-ignored --nocapture --test-threads=1 2>&1 | tee "$out/cuda-kernels.txt"
step .gpu/bin/cuda-conformance --nocapture --test-threads=1 2>&1 | tee "$out/cuda-conformance.txt"
if [ -n "${EDGE_AD_GPU_TESTS_ONLY:-}" ]; then
  [ ! -e "$out/FAILED" ]
  exit
fi
for d in cuda cpu; do
  step .gpu/bin/edge-ad demo --device "$d" --json --demo-dir demo --log info > "$out/demo-$d.json" 2> "$out/demo-$d.log"
done
python3 tools/gpu-compare.py demo "$out" image | tee "$out/demo-compare.txt"
# One bank (calibrated on the CPU) inspected on both devices: differences are the GPU path's alone
# (with the gpu-backbone build, tract-cuda's backbone included).
step .gpu/bin/edge-ad calibrate --model demo/efficientnet-lite0.toml --images demo/images/good --refs 4 \
  --out "$out/bank.eab" --device cpu > "$out/calibrate.log" 2>&1
for d in cuda cpu; do
  : > "$out/inspect-$d.json"
  for cat in demo/images/test/*/; do
    cat=$(basename "$cat")
    mkdir -p "$out/maps-$d/$cat"
    step .gpu/bin/edge-ad inspect --model demo/efficientnet-lite0.toml --bank "$out/bank.eab" --device "$d" \
      --json --dump "$out/maps-$d/$cat" demo/images/test/"$cat"/*.png >> "$out/inspect-$d.json" 2>> "$out/inspect-$d.log"
  done
done
python3 tools/gpu-compare.py inspect "$out" path --maps | tee "$out/inspect-compare.txt"
for d in cuda cpu; do
  step .gpu/bin/edge-ad bench --model demo/efficientnet-lite0.toml --images demo/images/good --refs 4 \
    --frames 100 --warmup 10 --device "$d" 2>&1 | tee "$out/bench-$d.txt"
done
[ ! -e "$out/FAILED" ]
