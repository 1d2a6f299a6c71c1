"""Depth stream vs stack-per-layer: memory and time of a deep MoDA stack, forward + backward.

Each of ``--layers`` layers derives q/k/v from the residual stream with cheap elementwise
maps, runs ``moda_attention`` over its own k/v plus the depth k/v of all earlier layers, and
adds the output back. Three variants share everything except how depth is supplied:

* ``stack``  -- ``torch.stack`` of every earlier layer's k/v, rebuilt in every layer (the
  reference vision code): O(L^2) copies, all kept alive for backward;
* ``stream`` -- :class:`moda_cuda.DepthStream`: one append per layer, strided views;
* ``none``   -- no depth at all, to measure what the depth state itself costs.

Reported per variant: median step time (``triton.testing.do_bench``; a plain timer without
Triton), peak allocated memory of a step above the inputs, and the memory still held after
the forward pass (what backward keeps). Depth-state memory = held(variant) - held(none),
next to the analytic size of the tensors each variant keeps.

    python bench/bench_depth_stream.py --out bench/results          # GPU, the issue's sizes
    python bench/bench_depth_stream.py --smoke --out /tmp/bench      # CPU, tiny sizes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

try:
    import moda_cuda
except ImportError:  # run from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import moda_cuda

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ("stream", "stack", "none")


class Stack:
    """Inputs of the benchmark: the first residual stream and per-layer q/k/v scales."""

    def __init__(self, a: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> None:
        gen = torch.Generator(device="cpu").manual_seed(0)
        B, T, Hq, Hk, D, L = a.batch, a.seqlen, a.q_heads, a.kv_heads, a.head_dim, a.layers

        def leaf(*shape, scale=1.0, offset=0.0):
            t = torch.randn(*shape, generator=gen) * scale + offset
            return t.to(device=device, dtype=dtype).requires_grad_()

        self.x0 = leaf(B, T, Hq, D)
        self.sq = leaf(L, Hq, D, scale=0.1, offset=1.0)
        self.sk = leaf(L, Hk, D, scale=0.1, offset=1.0)
        self.sv = leaf(L, Hk, D, scale=0.1, offset=1.0)
        self.args = a

    def leaves(self) -> List[torch.Tensor]:
        return [self.x0, self.sq, self.sk, self.sv]

    def forward(self, variant: str) -> torch.Tensor:
        a = self.args
        B, T, Hq, Hk, D = a.batch, a.seqlen, a.q_heads, a.kv_heads, a.head_dim
        G = Hq // Hk
        x = self.x0
        stream = moda_cuda.DepthStream(B, T, a.layers - 1, Hk, D, dtype=x.dtype, device=x.device) \
            if variant == "stream" and a.layers > 1 else None
        ks: List[torch.Tensor] = []
        vs: List[torch.Tensor] = []
        for l in range(a.layers):
            q = x * self.sq[l]
            kv = x.view(B, T, Hk, G, D).mean(3)
            k, v = kv * self.sk[l], kv * self.sv[l]
            dk = dv = None
            if variant == "stack" and ks:
                dk, dv = torch.stack(ks, dim=2), torch.stack(vs, dim=2)
            elif variant == "stream" and l > 0:
                dk, dv = stream.read(l)
            out = moda_cuda.moda_attention(q, k, v, dk, dv, causal=True, depth_chunk=a.depth_chunk, backend=a.backend)
            if variant == "stack" and l < a.layers - 1:
                ks.append(k)
                vs.append(v)
            elif variant == "stream" and l < a.layers - 1:
                stream.append(k, v)
            # Residual scaled by 1/layers: with a plain x + out, x roughly doubles per layer and
            # a deep bf16 stack overflows (loss ~1e19, NaN gradients) long before layer 32.
            x = x + out * (1.0 / a.layers)
        return x.float().square().mean()

    def step(self, variant: str) -> List[torch.Tensor]:
        return list(torch.autograd.grad(self.forward(variant), self.leaves()))


def time_ms(fn: Callable[[], object], device: torch.device, a: argparse.Namespace) -> float:
    """Median milliseconds per call: do_bench on CUDA, else ``a.reps`` timed calls."""
    reps = a.reps
    if device.type == "cuda":
        try:
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=a.warmup_ms, rep=a.rep_ms, return_mode="median"))
        except ImportError:
            pass
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def memory(stack: Stack, variant: str, device: torch.device) -> Dict[str, Optional[int]]:
    """Peak bytes of one step above the inputs, and bytes held between forward and backward."""
    if device.type != "cuda":
        return {"peak_bytes": None, "held_after_forward_bytes": None}
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = stack.forward(variant)
    torch.cuda.synchronize()
    held = torch.cuda.memory_allocated() - base
    grads = torch.autograd.grad(loss, stack.leaves())
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del loss, grads
    return {"peak_bytes": peak, "held_after_forward_bytes": held}


def analytic_depth_bytes(a: argparse.Namespace, variant: str, itemsize: int) -> int:
    """Bytes of depth k/v each variant keeps alive for backward (k and v; not the layers' own k/v)."""
    slot = a.batch * a.seqlen * a.kv_heads * a.head_dim * itemsize
    L = a.layers
    if variant == "stack":
        return 2 * slot * sum(range(1, L))  # layer l keeps its own [B, T, l, Hk, D] copies
    if variant == "stream":
        return 2 * slot * (L - 1)  # one [B, T, L-1, Hk, D] buffer each for k and v
    return 0


def kernel_profile(stack: Stack, variant: str, top: int = 6) -> List[Dict]:
    """CUDA time per kernel name over one no-grad forward of ``variant``, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad():
        stack.forward(variant)  # warm: compiles and autotunes outside the trace
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            stack.forward(variant)
            torch.cuda.synchronize()
    rows = [{"kernel": e.key[:70], "calls": e.count, "cuda_ms": e.device_time_total / 1e3}
            for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r["cuda_ms"])[:top]


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench/results"), help="folder for the JSON")
    p.add_argument("--name", default=None, help="JSON file stem (default depth_stream[_smoke])")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks the script, measures nothing")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--q-heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--depth-chunk", type=int, default=1)
    p.add_argument("--backend", default="auto")
    p.add_argument("--reps", type=int, default=10, help="timed calls without Triton (CPU)")
    p.add_argument("--warmup-ms", type=int, default=300, help="do_bench warmup budget (ms)")
    p.add_argument("--rep-ms", type=int, default=2000, help="do_bench measuring budget (ms)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--profile", action="store_true",
                   help="also print each variant's top CUDA kernels of one no-grad forward (torch.profiler)")
    a = p.parse_args(argv)
    if a.smoke:
        a.device = "cpu" if a.device == "auto" else a.device
        a.dtype = "fp32" if a.device == "cpu" else a.dtype
        a.layers, a.batch, a.seqlen, a.q_heads, a.kv_heads, a.head_dim, a.reps = 4, 1, 32, 4, 2, 16, 2
    if a.device == "auto":
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    return a


def main(argv: Optional[List[str]] = None) -> Dict:
    a = parse_args(argv)
    device, dtype = torch.device(a.device), DTYPES[a.dtype]
    variants = [v for v in a.variants.split(",") if v]
    if any(v not in VARIANTS for v in variants):
        raise SystemExit(f"--variants: choose from {', '.join(VARIANTS)}")
    stack = Stack(a, device, dtype)

    # The two depth implementations must agree before their speed means anything.
    check = {}
    if "stream" in variants and "stack" in variants:
        g_stream, g_stack = stack.step("stream"), stack.step("stack")
        check = {"max_rel_grad_diff": max(
            ((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
            for x, y in zip(g_stream, g_stack))}
        del g_stream, g_stack

    rows: Dict[str, Dict] = {}
    for v in variants:
        row = memory(stack, v, device)
        row["step_ms"] = time_ms(lambda: stack.step(v), device, a)
        with torch.no_grad():
            row["forward_ms"] = time_ms(lambda: stack.forward(v), device, a)
        row["depth_state_bytes_analytic"] = analytic_depth_bytes(a, v, dtype.itemsize)
        rows[v] = row
    if "none" in rows:
        for v, row in rows.items():
            held, base = row["held_after_forward_bytes"], rows["none"]["held_after_forward_bytes"]
            row["depth_state_bytes_measured"] = None if held is None else held - base

    profiles = {v: kernel_profile(stack, v) for v in variants} if a.profile and device.type == "cuda" else {}

    summary = {}
    if "stream" in rows and "stack" in rows:
        s, k = rows["stream"], rows["stack"]
        summary["speedup_step"] = k["step_ms"] / s["step_ms"]
        summary["speedup_forward"] = k["forward_ms"] / s["forward_ms"]
        if s.get("depth_state_bytes_measured"):
            summary["depth_state_memory_ratio_measured"] = k["depth_state_bytes_measured"] / s["depth_state_bytes_measured"]
        summary["depth_state_memory_ratio_analytic"] = k["depth_state_bytes_analytic"] / s["depth_state_bytes_analytic"]
        if s["peak_bytes"]:
            summary["peak_memory_ratio"] = k["peak_bytes"] / s["peak_bytes"]

    report = {
        "benchmark": "depth stream vs stack-per-layer, forward+backward",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "moda_cuda": getattr(moda_cuda, "__version__", "unknown"),
        "smoke": a.smoke,
        "shape": {"layers": a.layers, "batch": a.batch, "seqlen": a.seqlen, "q_heads": a.q_heads,
                  "kv_heads": a.kv_heads, "head_dim": a.head_dim, "depth_chunk": a.depth_chunk, "dtype": a.dtype},
        "backend": a.backend,
        "timer": "triton.testing.do_bench median" if device.type == "cuda" else "perf_counter median",
        "correctness": check,
        "variants": rows,
        "summary": summary,
        "kernel_profile": profiles,
    }
    name = a.name or ("depth_stream_smoke" if a.smoke else "depth_stream")
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"{name}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")

    mib = lambda b: "-" if b is None else f"{b / 2**20:,.1f}"  # noqa: E731
    print(f"{a.layers} layers, B={a.batch} T={a.seqlen} Hq={a.q_heads} Hk={a.kv_heads} D={a.head_dim} "
          f"{a.dtype} on {report['device']}")
    print(f"{'variant':>8} {'step ms':>9} {'fwd ms':>8} {'peak MiB':>9} {'held MiB':>9} {'depth MiB':>10} {'analytic':>9}")
    for v, r in rows.items():
        print(f"{v:>8} {r['step_ms']:9.2f} {r['forward_ms']:8.2f} {mib(r['peak_bytes']):>9} "
              f"{mib(r['held_after_forward_bytes']):>9} {mib(r.get('depth_state_bytes_measured')):>10} "
              f"{mib(r['depth_state_bytes_analytic']):>9}")
    for key, value in {**summary, **check}.items():
        print(f"{key}: {value:.3g}")
    for v, prof in profiles.items():
        print(f"{v}: " + "; ".join(f"{r['kernel']} x{r['calls']} {r['cuda_ms']:.2f} ms" for r in prof))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
