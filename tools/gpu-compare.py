"""Compare one run of edge-ad on both devices (tools/gpu-check.sh): verdicts, scores and, when
dumped, the maps of the `cuda` run against the `cpu` run.

usage: gpu-compare.py NAME DIR KEY [--maps]
reads DIR/NAME-cuda.json and DIR/NAME-cpu.json (one JSON object per part, keyed by KEY), and with
--maps DIR/maps-cpu/*/*.safetensors against DIR/maps-cuda/... (needs numpy and safetensors).
"""
import glob
import json
import sys


def parts(path, key):
    out = {}
    for line in open(path):
        try:
            o = json.loads(line)
        except ValueError:
            continue  # the script's own "== command" lines
        if "score" in o and key in o:
            out[o[key]] = o
    return out


def main():
    name, d, key = sys.argv[1:4]
    cuda, cpu = (parts(f"{d}/{name}-{dev}.json", key) for dev in ("cuda", "cpu"))
    both = sorted(set(cuda) & set(cpu))
    if not both:
        sys.exit(f"{name}: no part scored on both devices")
    worst = max(abs(cuda[k]["score"] - cpu[k]["score"]) / abs(cpu[k]["score"]) for k in both)
    same = sum(cuda[k].get("verdict") == cpu[k].get("verdict") for k in both)
    msg = f"{name}: {len(both)} parts, verdicts equal {same}/{len(both)}, worst score rel diff cuda vs cpu {worst:.2e}"
    if "--maps" in sys.argv:
        try:
            import numpy as np
            from safetensors.numpy import load_file

            errs = []
            for f in glob.glob(f"{d}/maps-cpu/*/*.safetensors"):
                a = load_file(f)["map"]
                b = load_file(f.replace("maps-cpu", "maps-cuda"))["map"]
                errs.append(float(np.abs(a - b).max() / np.abs(a).max()))
            msg += f"; maps max rel err {max(errs):.2e} over {len(errs)} maps"
        except Exception as e:  # a machine without numpy/safetensors still gets the scores
            msg += f"; maps not compared ({e})"
    print(msg)


main()
