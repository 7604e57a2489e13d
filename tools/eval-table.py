#!/usr/bin/env python3
"""Turn `edge-ad eval --json` output (one object per line, stdin) into the markdown tables of
docs/results.md: one row per combination, then per-defect-type image AUROC."""
import json
import sys

rows = [json.loads(l) for l in sys.stdin if l.strip().startswith("{")]
print("| fit | select | levels | tiles/frame | image AUROC | pixel AUROC | AUPRO@0.3 | image F1-max |")
print("|---|---|---|---|---|---|---|---|")
for r in rows:
    o = r["overall"]
    lv = ",".join(map(str, r["levels"]))
    if r["level_choice"].startswith("auto"):
        lv = f"auto → {lv}"
    print(f"| {r['fit']} | {r['selection']} | {lv} | {r['tiles_per_frame']:.2f} | "
          f"{o['image_auroc']:.3f} | {o['pixel_auroc']:.3f} | {o['aupro']:.3f} | {o['image_f1_max']:.3f} |")
types = [k for k, _ in rows[0]["per_type"]] if rows else []
print()
print("Image AUROC per defect type (each type against test/good):")
print()
print("| fit | select | levels | " + " | ".join(types) + " |")
print("|---|---|---|" + "---|" * len(types))
for r in rows:
    lv = ",".join(map(str, r["levels"]))
    cells = " | ".join(f"{m['image_auroc']:.3f}" for _, m in r["per_type"])
    print(f"| {r['fit']} | {r['selection']} | {lv} | {cells} |")
