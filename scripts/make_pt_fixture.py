#!/usr/bin/env python3
"""Writes a PyTorch-format checkpoint (zip + pickle, as torch.save does) without torch, to
test ditmoe's .pt loading in CI. The pickle references torch._utils._rebuild_tensor_v2 and
torch.FloatStorage exactly like torch.save output; stand-in modules make pickle emit those
names. Usage: make_pt_fixture.py IN.safetensors OUT.pt KEY   (KEY '' = top-level state dict)
"""
import collections, io, json, pickle, struct, sys, types, zipfile

def read_safetensors(path):
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    base = 8 + n
    out = collections.OrderedDict()
    for name, info in header.items():
        if name == "__metadata__":
            continue
        assert info["dtype"] == "F32", name
        a, b = info["data_offsets"]
        out[name] = (info["shape"], raw[base + a:base + b])
    return out

torch = types.ModuleType("torch"); utils = types.ModuleType("torch._utils")
class FloatStorage: pass
FloatStorage.__module__ = "torch"; torch.FloatStorage = FloatStorage
def _rebuild_tensor_v2(*a): pass
_rebuild_tensor_v2.__module__ = "torch._utils"; utils._rebuild_tensor_v2 = _rebuild_tensor_v2
sys.modules["torch"] = torch; sys.modules["torch._utils"] = utils

class Storage:
    def __init__(self, key, numel): self.key, self.numel = key, numel
class Tensor:
    def __init__(self, storage, shape): self.storage, self.shape = storage, shape
    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape): stride.insert(0, acc); acc *= d
        return (_rebuild_tensor_v2, (self.storage, 0, tuple(self.shape), tuple(stride), False, collections.OrderedDict()))

class Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", FloatStorage, obj.key, "cpu", obj.numel)
        return None

src, dst, key = sys.argv[1], sys.argv[2], sys.argv[3]
tensors = read_safetensors(src)
state, blobs = collections.OrderedDict(), {}
for i, (name, (shape, data)) in enumerate(tensors.items()):
    state[name] = Tensor(Storage(str(i), len(data) // 4), shape)
    blobs[str(i)] = data
obj = {key: state, "args": "fixture"} if key else state
buf = io.BytesIO(); Pickler(buf, protocol=2).dump(obj)
with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as z:
    z.writestr("archive/data.pkl", buf.getvalue())
    for k, data in blobs.items():
        z.writestr(f"archive/data/{k}", data)
    z.writestr("archive/version", "3\n")
