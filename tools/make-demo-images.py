#!/usr/bin/env python3
"""Generate the demo images (deterministic; the project's own, free to redistribute).

Parts: a brushed metal plate, 256×192, grey, with two drilled holes, per-part variation in
brightness, streaks, noise and a ±2 px hole position jitter. Defects drawn on test parts:
scratch (thin dark line), spot (dark blob), stain (bright smear), crack (jagged dark polyline).

usage: .venv/bin/python tools/make-demo-images.py [OUT_DIR]   (default demo/images)
"""
import pathlib, sys

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else pathlib.Path(__file__).resolve().parent.parent / "demo/images"
W, H = 256, 192

def plate(rng):
    y = np.arange(H)[:, None]
    x = np.arange(W)[None, :]
    streaks = np.convolve(rng.normal(0, 6, H + 20), np.ones(5) / 5, mode="same")[10:H + 10][:, None]
    base = 128 + rng.normal(0, 4) + streaks + 10 * np.cos((x - W / 2) / W * np.pi) - 6 * ((y - H / 2) / H) ** 2
    img = base + rng.normal(0, 3.0, (H, W))
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "L")
    d = ImageDraw.Draw(im)
    for cx in (64, 192):
        jx, jy = rng.integers(-2, 3, 2)
        r = 14
        d.ellipse([cx + jx - r, 96 + jy - r, cx + jx + r, 96 + jy + r], fill=35, outline=200)
    return im.filter(ImageFilter.GaussianBlur(0.6))

def defect(im, kind, rng):
    d = ImageDraw.Draw(im)
    if kind == "scratch":
        x0, y0 = rng.integers(20, 110), rng.integers(20, 60)
        d.line([x0, y0, x0 + rng.integers(60, 110), y0 + rng.integers(60, 110)], fill=70, width=2)
    elif kind == "spot":
        cx, cy = rng.integers(100, 160), rng.integers(30, 160)
        d.ellipse([cx - 6, cy - 5, cx + 6, cy + 5], fill=55)
    elif kind == "stain":
        cx, cy = rng.integers(90, 170), rng.integers(40, 150)
        layer = Image.new("L", im.size, 0)
        ImageDraw.Draw(layer).ellipse([cx - 18, cy - 10, cx + 18, cy + 10], fill=70)
        layer = layer.filter(ImageFilter.GaussianBlur(4))
        im = Image.fromarray(np.clip(np.asarray(im, np.int16) + np.asarray(layer, np.int16), 0, 255).astype(np.uint8), "L")
    elif kind == "crack":
        x, y = rng.integers(110, 150), rng.integers(10, 40)
        pts = [(x, y)]
        for _ in range(10):
            x += rng.integers(-6, 7); y += rng.integers(8, 14)
            pts.append((x, y))
        d.line(pts, fill=40, width=2)
    return im

def main():
    rng = np.random.default_rng(20261125)
    for sub in ("good", "test/good", "test/scratch", "test/spot", "test/stain", "test/crack"):
        (OUT / sub).mkdir(parents=True, exist_ok=True)
    for i in range(8):
        plate(rng).save(OUT / f"good/plate_{i:02d}.png", optimize=True)
    for i in range(3):
        plate(rng).save(OUT / f"test/good/plate_{i:02d}.png", optimize=True)
    for kind in ("scratch", "spot", "stain", "crack"):
        for i in range(2):
            defect(plate(rng), kind, rng).save(OUT / f"test/{kind}/plate_{i:02d}.png", optimize=True)
    print(f"wrote demo images under {OUT}")

if __name__ == "__main__":
    main()
