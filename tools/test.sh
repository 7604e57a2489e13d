#!/usr/bin/env bash
# The whole test suite (the README's test command), then the arm64 package built and checked
# under qemu (tools/dist.sh, tools/dist-check.sh). cudarc loads NVRTC at run time, so the venv's
# CUDA 12 NVRTC (installed by tools/setup.sh) goes on the library path for the CUDA compile tests.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
nvrtc=$(ls -d .venv/lib/python3*/site-packages/nvidia/cuda_nvrtc/lib 2>/dev/null | head -n 1 || true)
if [ -n "$nvrtc" ]; then
  export LD_LIBRARY_PATH="$root/$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
cargo test --workspace "$@" -- --show-output
# The arm64 release, built and proven under qemu (EDGE_AD_SKIP_DIST=1 skips it locally).
if [ -z "${EDGE_AD_SKIP_DIST:-}" ]; then
  bash tools/dist.sh
  bash tools/dist-check.sh
else
  echo "SKIPPED: arm64 release checks (EDGE_AD_SKIP_DIST set)"
fi
