#!/usr/bin/env python3
"""Time the DINOv2-S backbone with onnxruntime, taps as outputs, to compare with tract.

Same model file, same taps (models/dinov2-s.toml), same input size, same thread count as
`edge-ad bench --threads N` (onnxruntime intra-op threads = N, inter-op = 1, sequential).
Prints one JSON line: {"runtime": "onnxruntime", "threads": N, "backbone_ms": median, ...}.

usage: .venv/bin/python tools/ort_backbone_bench.py [--threads 2] [--frames 30] [--onnx PATH]
"""
import argparse, json, pathlib, statistics, time, tomllib

import numpy as np
import onnx
import onnxruntime as ort

root = pathlib.Path(__file__).resolve().parent.parent
ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--frames", type=int, default=30)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--model", default=str(root / "models/dinov2-s.toml"))
ap.add_argument("--onnx")
a = ap.parse_args()

desc = tomllib.loads(pathlib.Path(a.model).read_text())
onnx_path = a.onnx or str(pathlib.Path(a.model).parent / desc["onnx"])
taps = [t["output"] for t in desc["taps"]]
m = onnx.load(onnx_path)
del m.graph.output[:]
for t in taps:
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(t))
so = ort.SessionOptions()
so.intra_op_num_threads = a.threads
so.inter_op_num_threads = 1
so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
h, w = desc["input"]["size"]
x = np.random.default_rng(0).standard_normal((1, 3, h, w), dtype=np.float32)
name = sess.get_inputs()[0].name
for _ in range(a.warmup):
    sess.run(taps, {name: x})
times = []
for _ in range(a.frames):
    t = time.perf_counter()
    sess.run(taps, {name: x})
    times.append((time.perf_counter() - t) * 1e3)
print(json.dumps({"runtime": "onnxruntime " + ort.__version__, "threads": a.threads, "frames": a.frames,
                  "backbone_ms": statistics.median(times), "min_ms": min(times)}))
