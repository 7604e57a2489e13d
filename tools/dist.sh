#!/usr/bin/env bash
# Build the arm64 release for Jetson boxes (JetPack 5.1 and 6), from this x86-64 machine:
#   dist/edge-ad_<version>_arm64.deb      (dpkg: conffiles, maintainer scripts)
#   dist/edge-ad_<version>_arm64.tar.gz   (the same tree, for boxes without dpkg)
# One binary for both JetPacks: linked against glibc 2.31 (Ubuntu 20.04, JetPack 5) with
# cargo-zigbuild, which JetPack 6's glibc 2.35 runs too. CUDA is loaded at run time (cudarc
# dynamic loading), so the build needs none. Needs tools/setup.sh's cross tools (cargo-zigbuild
# and ziglang in .venv; Debian's arm64 headers for the V4L2 bindings); tools/dist-check.sh
# proves the result under qemu.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-dist}

target=aarch64-unknown-linux-gnu
glibc=2.31
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
[ -n "$version" ] || { echo "dist: no version in Cargo.toml" >&2; exit 1; }
export PATH="$root/.venv/bin:$PATH"
command -v cargo-zigbuild >/dev/null || { echo "dist: cargo-zigbuild missing (run tools/setup.sh)" >&2; exit 1; }
# v4l2-sys generates its bindings with bindgen: give clang the arm64 kernel and libc headers.
export BINDGEN_EXTRA_CLANG_ARGS="--sysroot=/usr/aarch64-linux-gnu -I/usr/aarch64-linux-gnu/include"

echo "dist: building edge-ad $version for $target (glibc $glibc)"
cargo zigbuild --locked --quiet --profile dist --target "$target.$glibc" -p edge-ad
bin="target/$target/dist/edge-ad"

name="edge-ad_${version}_arm64"
stage="target/dist-stage/$name"
rm -rf "$stage"
mkdir -p "$stage" "$out"
install -D -m 0755 "$bin" "$stage/usr/bin/edge-ad"
install -D -m 0755 packaging/install-system.sh "$stage/usr/share/edge-ad/install-system.sh"
install -D -m 0644 packaging/edge-ad.service "$stage/lib/systemd/system/edge-ad.service"
install -D -m 0644 packaging/60-edge-ad.rules "$stage/lib/udev/rules.d/60-edge-ad.rules"
# The bundled demo: model description, backbone and images (find_demo_dir looks in
# <bin>/../share/edge-ad/demo).
install -D -m 0644 demo/efficientnet-lite0.toml "$stage/usr/share/edge-ad/demo/efficientnet-lite0.toml"
install -D -m 0644 demo/efficientnet-lite0-ad.onnx "$stage/usr/share/edge-ad/demo/efficientnet-lite0-ad.onnx"
(cd demo && find images -type f -name '*.png' | sort) | while read -r f; do
    install -D -m 0644 "demo/$f" "$stage/usr/share/edge-ad/demo/$f"
done
install -D -m 0644 models/dinov2-s.toml "$stage/usr/share/edge-ad/models/dinov2-s.toml"
for d in README.md docs/*.md; do
    install -D -m 0644 "$d" "$stage/usr/share/doc/edge-ad/$(basename "$d")"
done
# One example config per board profile, written by the binary itself (under qemu where the
# build machine is not arm64), as conffiles: an upgrade keeps an edited one.
run_bin() {
    if [ "$(uname -m)" = aarch64 ]; then "$bin" "$@"; else qemu-aarch64 -L /usr/aarch64-linux-gnu "$bin" "$@"; fi
}
mkdir -p "$stage/etc/edge-ad/examples"
for p in boards/profiles/*.toml; do
    b=$(basename "$p" .toml)
    run_bin example-config --board "$b" > "$stage/etc/edge-ad/examples/$b.toml"
done
chmod 0644 "$stage"/etc/edge-ad/examples/*.toml

# The plain tree, for boxes without dpkg (then run /usr/share/edge-ad/install-system.sh).
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$stage" -czf "$out/$name.tar.gz" .

mkdir -p "$stage/DEBIAN"
install -m 0755 packaging/deb/postinst packaging/deb/prerm packaging/deb/postrm "$stage/DEBIAN/"
(cd "$stage" && find etc -type f | sort | sed 's|^|/|') > "$stage/DEBIAN/conffiles"
size_kb=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<EOF
Package: edge-ad
Version: $version
Architecture: arm64
Maintainer: edge-ad developers <dev@edge-ad.invalid>
Installed-Size: $size_kb
Depends: libc6 (>= 2.31), passwd
Section: misc
Priority: optional
Description: line-side visual anomaly inspection for NVIDIA Jetson
 A camera, a few good parts and a PLC: edge-ad calibrates a reference bank
 from good parts and inspects every triggered part (OK/NG within a deadline,
 fail-safe), reporting over GPIO, serial and Modbus. Runs on JetPack 5.1 and 6
 (CUDA used when present).
EOF
dpkg-deb --root-owner-group -Zxz --build "$stage" "$out/$name.deb" >/dev/null
echo "dist: $out/$name.deb ($(du -h "$out/$name.deb" | cut -f1)), $out/$name.tar.gz ($(du -h "$out/$name.tar.gz" | cut -f1)), binary $(du -h "$bin" | cut -f1)"
