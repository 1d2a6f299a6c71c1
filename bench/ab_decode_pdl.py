"""Experiment: the decode combine kernel as a programmatic dependent launch (PDL) or not, one process, CUDA-graph replays as bench_decode measures them (H100 log: bench/results/decode/ab_pdl_h100.log). Run from the repository root."""
import sys, math, torch
sys.path.insert(0, "bench")
import bench_decode as bd
from moda_cuda import eager
from moda_cuda.triton_ref import decode
from torch.nn.attention import SDPBackend
l2 = torch.cuda.get_device_properties(0).L2_cache_size
orig = decode._pdl
res = {}
for B, T in ((1, 4096), (8, 4096)):
    cache_bytes = 2 * B * T * 8 * 128 * 2
    case = bd.Case(B, T, max(1, math.ceil(3 * l2 / cache_bytes)))
    for rep in range(2):
        for pdl in (True, False):
            decode._pdl = (lambda d: orig(d)) if pdl else (lambda d: False)
            decode.decode_plan.cache_clear(); eager._decode_impls.clear()
            res.setdefault((B, T, "pdl" if pdl else "plain"), []).append(bd.gpu_us(case.ours(True)))
    steps, _ = bd.sdpa_steps(case, SDPBackend.CUDNN_ATTENTION)
    res[(B, T, "cudnn")] = [bd.gpu_us(steps)]
    del case; torch.cuda.empty_cache()
for k, v in res.items():
    print(k, [round(x, 2) for x in v], "median", round(sorted(v)[len(v) // 2], 2))
