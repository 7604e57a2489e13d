#!/usr/bin/env bash
# The whole test suite (the README's test command). cudarc loads NVRTC at run time, so the venv's
# CUDA 12 NVRTC (installed by tools/setup.sh) goes on the library path for the CUDA compile tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
nvrtc=$(ls -d .venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib 2>/dev/null | head -n 1 || true)
if [ -n "$nvrtc" ]; then
  export LD_LIBRARY_PATH="$root/$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
exec cargo test --workspace "$@" -- --show-output
