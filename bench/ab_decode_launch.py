"""Experiment: eager decode host time, the extension's KernelLaunch against Triton's launcher, one process (H100 log: bench/results/decode/ab_launch_h100.log). Run from the repository root."""
import sys, torch
sys.path.insert(0, "bench")
import moda_cuda
from moda_cuda import eager
from moda_cuda.triton_ref import _launch
from host_overhead import per_call_us
import torch.nn.functional as F
B, S, Hq, Hk, D, L, T = 1, 1, 32, 8, 128, 32, 256
dev = "cuda"; dt = torch.bfloat16
q = torch.randn(B, S, Hq, D, device=dev, dtype=dt)
kc = torch.randn(B, T, Hk, D, device=dev, dtype=dt); vc = torch.randn_like(kc)
k = torch.randn(B, S, Hk, D, device=dev, dtype=dt); v = torch.randn_like(k)
dk = torch.randn(B, S, L, Hk, D, device=dev, dtype=dt); dv = torch.randn_like(dk)
cs = torch.full((B,), 200, dtype=torch.int32, device=dev)
call = lambda: moda_cuda.moda_attention_with_kvcache(q, kc, vc, dk, dv, k=k, v=v, cache_seqlens=cs)
qt, kt = q.transpose(1, 2), kc.transpose(1, 2)
sdpa = lambda: F.scaled_dot_product_attention(qt, kt, kt, enable_gqa=True)
orig = _launch._native_launch
res = {}
for rep in range(3):
    for name in ("native", "triton"):
        _launch._native_launch = orig if name == "native" else (lambda *a: None)
        eager._decode_impls.clear()
        for _ in range(3): call()
        prep = next(iter(eager._decode_impls.values()))
        res.setdefault(name, []).append(per_call_us(call, 300, 5, torch.cuda.synchronize))
    res.setdefault("sdpa", []).append(per_call_us(sdpa, 300, 5, torch.cuda.synchronize))
print({k: [round(x, 1) for x in v] for k, v in res.items()})
print("native active:", type(prep).__name__, getattr(getattr(prep, "split", None), "native", "?"))
