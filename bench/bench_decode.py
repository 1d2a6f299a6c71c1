"""Decode attention on one GPU: one new token per sequence against a full KV cache, bf16.

For each (B, cache length T), Hq=32, Hk=8, D=128, L=32:

* ours: ``moda_attention_with_kvcache`` (the Triton split-KV kernel; writes the new k/v),
  with the token's L depth rows, and without depth (L=0);
* SDPA decoding WITHOUT depth, flash and cuDNN backends (GQA by ``enable_gqa``, or by
  repeating the kv heads where a backend refuses it: then it reads G times the bytes);
* the naive MoDA decode: concatenate the token's depth rows to its cache, then SDPA (a copy
  of the whole cache per step);
* the memory roofline: the cache bytes a step must read over the device-to-device copy
  bandwidth measured in the same run (bytes read + written per second).

GPU time per step is the median of CUDA-graph replays (``triton.testing.do_bench_cudagraph``,
so launch overhead is not counted) over enough cache copies that they do not fit in L2.
Host time per eager call is measured apart, at a tiny shape (``host_overhead.per_call_us``):
N calls, one synchronization per round. The depth state a decode step holds (L rows per new
token per layer) is listed next to a cache of the depth rows of every position (T x L).
Ours is checked against the reference on the first sequence before timing.

    python bench/bench_decode.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

import moda_cuda
from bench_common import rel_err, run_metadata
from host_overhead import per_call_us

HEADS = dict(Hq=32, Hk=8, D=128, L=32)
BATCHES = (1, 8, 32)
CACHE_LENS = (4096, 32768)
DTYPE = torch.bfloat16
ELEM = 2  # bytes per bf16 element


def copy_bandwidth_GBps() -> float:
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / time."""
    import triton

    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median")
    del src, dst
    return 2 * (1 << 30) / (ms * 1e-3) / 1e9


def gpu_us(steps) -> float:
    """Median GPU time of one step, over CUDA-graph replays of all steps (one per cache copy)."""
    import triton

    def run():
        for step in steps:
            step()

    run()
    torch.cuda.synchronize()
    return triton.testing.do_bench_cudagraph(run, rep=100, return_mode="median") * 1e3 / len(steps)


class Case:
    """Inputs of ``copies`` decode steps at (B, T): our layout and SDPA's head-major one."""

    def __init__(self, B: int, T: int, copies: int, L: int = HEADS["L"], seed: int = 0):
        Hq, Hk, D = HEADS["Hq"], HEADS["Hk"], HEADS["D"]
        g = torch.Generator(device="cuda").manual_seed(seed)

        def r(*shape):
            return torch.randn(*shape, device="cuda", dtype=DTYPE, generator=g)

        self.B, self.T, self.L, self.copies = B, T, L, copies
        self.q = [r(B, 1, Hq, D) for _ in range(copies)]
        self.k_cache = [r(B, T, Hk, D) for _ in range(copies)]
        self.v_cache = [r(B, T, Hk, D) for _ in range(copies)]
        self.k = [r(B, 1, Hk, D) for _ in range(copies)]
        self.v = [r(B, 1, Hk, D) for _ in range(copies)]
        self.depth_k = [r(B, 1, L, Hk, D) for _ in range(copies)]
        self.depth_v = [r(B, 1, L, Hk, D) for _ in range(copies)]
        self.seqlens = torch.full((B,), T - 1, dtype=torch.int32, device="cuda")  # the new token fills the cache

    def ours(self, with_depth: bool = True):
        def step(i):
            depth = (self.depth_k[i], self.depth_v[i]) if with_depth else (None, None)
            return moda_cuda.moda_attention_with_kvcache(self.q[i], self.k_cache[i], self.v_cache[i], *depth,
                                                         k=self.k[i], v=self.v[i], cache_seqlens=self.seqlens)

        return [lambda i=i: step(i) for i in range(self.copies)]

    def head_major(self, i):
        """SDPA's layout of copy i: q [B, Hq, 1, D], caches [B, Hk, T, D], depth [B, Hk, L, D]."""
        return (self.q[i].transpose(1, 2).contiguous(), self.k_cache[i].transpose(1, 2).contiguous(),
                self.v_cache[i].transpose(1, 2).contiguous(), self.depth_k[i][:, 0].transpose(1, 2).contiguous(),
                self.depth_v[i][:, 0].transpose(1, 2).contiguous())


def sdpa_steps(case: Case, backend, naive_depth: bool = False):
    """SDPA decode steps through one backend (no depth), or the naive MoDA decode (the depth
    rows concatenated to the cache per step). Returns (steps, note)."""
    from torch.nn.attention import sdpa_kernel

    G = HEADS["Hq"] // HEADS["Hk"]
    tensors = [case.head_major(i) for i in range(case.copies)]

    def attend(q, k, v, gqa):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

    def make(gqa):
        def step(i):
            q, k, v, dk, dv = tensors[i]
            if naive_depth:
                k, v = torch.cat([k, dk], dim=2), torch.cat([v, dv], dim=2)
            return attend(q, k, v, gqa)

        return [lambda i=i: step(i) for i in range(case.copies)]

    try:
        steps = make(True)
        steps[0]()
        return steps, "enable_gqa"
    except RuntimeError:  # the backend takes no GQA: repeat the kv heads (G times the bytes read)
        tensors = [(q, k.repeat_interleave(G, 1), v.repeat_interleave(G, 1), dk.repeat_interleave(G, 1),
                    dv.repeat_interleave(G, 1)) for q, k, v, dk, dv in tensors]
        steps = make(False)
        steps[0]()
        return steps, f"kv heads repeated x{G}"


def check_ours(case: Case) -> float:
    """Relative L2 error of ours against the reference (float32 math) on sequence 0."""
    from moda_cuda.kvcache import attention_with_kvcache_ref

    kc, vc = case.k_cache[0][:1].clone(), case.v_cache[0][:1].clone()
    out = moda_cuda.moda_attention_with_kvcache(case.q[0][:1], kc, vc, case.depth_k[0][:1], case.depth_v[0][:1],
                                                k=case.k[0][:1], v=case.v[0][:1], cache_seqlens=case.seqlens[:1])
    ref, _ = attention_with_kvcache_ref(case.q[0][:1].float(), kc.float(), vc.float(), case.depth_k[0][:1].float(),
                                        case.depth_v[0][:1].float(), case.seqlens[:1], None)
    return rel_err(out, ref)


def depth_memory(B: int, T: int) -> dict:
    """Bytes per layer: the KV cache, the depth rows a decode step holds, a T x L depth cache."""
    Hk, D, L = HEADS["Hk"], HEADS["D"], HEADS["L"]
    row = 2 * Hk * D * ELEM  # one position's k and v
    return {"kv_cache_MB": B * T * row / 1e6, "depth_per_step_MB": B * L * row / 1e6,
            "naive_depth_cache_MB": B * T * L * row / 1e6}


def bench_shape(B: int, T: int, bw_GBps: float, l2_bytes: int) -> dict:
    from torch.nn.attention import SDPBackend

    Hk, D, L = HEADS["Hk"], HEADS["D"], HEADS["L"]
    cache_bytes = 2 * B * T * Hk * D * ELEM
    step_bytes = cache_bytes + 2 * B * L * Hk * D * ELEM  # + the depth rows (q, out, new k/v: negligible)
    copies = max(1, math.ceil(3 * l2_bytes / cache_bytes))
    case = Case(B, T, copies)
    rows, notes = [], {}
    roofline_us = step_bytes / (bw_GBps * 1e9) * 1e6

    def record(impl, steps_or_error, note=""):
        row = {"B": B, "T": T, "impl": impl, "us": None, "note": note}
        if isinstance(steps_or_error, str):
            row["note"] = steps_or_error
        else:
            try:
                row["us"] = gpu_us(steps_or_error)
            except Exception as exc:  # a baseline that cannot run is reported, not fatal
                row["note"] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        if row["us"]:
            row["GBps"] = step_bytes / (row["us"] * 1e-6) / 1e9
            row["roofline_fraction"] = roofline_us / row["us"]
        rows.append(row)
        us = row["us"]
        print(f"  B={B:<3} T={T:<6} {impl:<34} {us if us else float('nan'):9.1f} us  {row['note']}", flush=True)

    notes["ours_vs_reference_rel_err"] = check_ours(case)
    record("moda_attention_with_kvcache (L=32)", case.ours(True))
    record("moda_attention_with_kvcache (L=0)", case.ours(False))
    for label, backend, naive in (("sdpa flash (no depth)", SDPBackend.FLASH_ATTENTION, False),
                                  ("sdpa cudnn (no depth)", SDPBackend.CUDNN_ATTENTION, False),
                                  ("naive: cat depth + sdpa flash", SDPBackend.FLASH_ATTENTION, True)):
        try:
            steps, note = sdpa_steps(case, backend, naive)
            record(label, steps, note)
        except Exception as exc:
            record(label, f"failed: {type(exc).__name__}: {str(exc)[:120]}")
        torch.cuda.empty_cache()
    rows.append({"B": B, "T": T, "impl": "memory roofline", "us": roofline_us, "GBps": bw_GBps,
                 "roofline_fraction": 1.0, "note": f"{step_bytes / 1e6:.1f} MB at the copy bandwidth"})
    sdpa = [r["us"] for r in rows if r["impl"].startswith("sdpa") and r["us"]]
    for r in rows:
        r["vs_best_sdpa"] = r["us"] / min(sdpa) if sdpa and r["us"] else None
    del case
    torch.cuda.empty_cache()
    return {"B": B, "T": T, "copies": copies, "step_bytes": step_bytes, "rows": rows, "checks": notes,
            "depth_memory_per_layer": depth_memory(B, T)}


def host_times(calls: int, rounds: int) -> dict:
    """Host time per eager call at B=1, T=256 (GPU work negligible), ours against SDPA."""
    from torch.nn.attention import SDPBackend

    case = Case(1, 256, 1)
    q, k, v, dk, dv = case.head_major(0)
    ours, ours_flat = case.ours(True)[0], case.ours(False)[0]

    def sdpa_flash():
        with torch.nn.attention.sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    def sdpa_plain():
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    out = {}
    for name, fn in (("moda_attention_with_kvcache (L=32)", ours), ("moda_attention_with_kvcache (L=0)", ours_flat),
                     ("sdpa (no depth, default backend)", sdpa_plain),
                     ("sdpa flash (no depth, inside sdpa_kernel)", sdpa_flash)):
        out[name] = per_call_us(fn, calls, rounds, torch.cuda.synchronize)
        print(f"  host {name:<42} {out[name]:7.1f} us/call", flush=True)
    return out


def format_table(report) -> str:
    fmt = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    lines = ["| B | T | implementation | us/step | GB/s | of roofline | vs best SDPA | note |",
             "|---|---|---|---|---|---|---|---|"]
    for shape in report["shapes"]:
        for r in shape["rows"]:
            lines.append(f"| {r['B']} | {r['T']} | {r['impl']} | {fmt(r['us'], 1)} | {fmt(r.get('GBps'), 0)} | "
                         f"{fmt(r.get('roofline_fraction'), 2)} | {fmt(r.get('vs_best_sdpa'), 2)} | {r['note']} |")
    lines += ["", "| host time per eager call | us |", "|---|---|"]
    lines += [f"| {name} | {us:.1f} |" for name, us in report["host_us_per_call"].items()]
    lines += ["", "| B | T | KV cache MB/layer | depth rows per step MB/layer | T x L depth cache MB/layer |",
              "|---|---|---|---|---|"]
    for shape in report["shapes"]:
        m = shape["depth_memory_per_layer"]
        lines.append(f"| {shape['B']} | {shape['T']} | {m['kv_cache_MB']:.1f} | {m['depth_per_step_MB']:.3f} | "
                     f"{m['naive_depth_cache_MB']:.0f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the raw JSON (bench_decode.json)")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)), help="comma-separated batch sizes")
    parser.add_argument("--cache-lens", default=",".join(map(str, CACHE_LENS)), help="comma-separated cache lengths")
    parser.add_argument("--calls", type=int, default=300, help="eager calls per round of the host-time measurement")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the host-time measurement")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_decode.py needs a CUDA GPU", file=sys.stderr)
        return 2
    props = torch.cuda.get_device_properties(0)
    l2_bytes = getattr(props, "L2_cache_size", 50 << 20)
    bw = copy_bandwidth_GBps()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {bw:.0f} GB/s, L2 {l2_bytes >> 20} MiB", flush=True)
    report = {
        **run_metadata(__file__, argv),
        "heads": HEADS,
        "dtype": str(DTYPE),
        "copy_bandwidth_GBps": bw,
        "shapes": [],
    }
    for B in map(int, args.batches.split(",")):
        for T in map(int, args.cache_lens.split(",")):
            report["shapes"].append(bench_shape(B, T, bw, l2_bytes))
    report["host_us_per_call"] = host_times(args.calls, args.rounds)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_decode.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {path}\n")
    print(format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
