"""Host time per call: moda_attention against SDPA at a tiny shape, where the GPU work is
negligible and what is measured is the Python, dispatcher and launch path of one call.

Each timing is the median over ``--rounds`` rounds of ``--calls`` eager calls, divided by the
calls, with the GPU synchronized only around each round (what a model's layers see: the host
runs ahead of the GPU as long as it is faster). Forward runs under ``torch.no_grad()``;
forward+backward is ``autograd.grad`` of the output, also timed as its two halves (the forward
with gradients on, and the backward alone through a graph kept with ``retain_graph``). On a GPU the forward+backward's GPU
time per call is reported beside it (torch.profiler): a host time close to it means the
loop waited for the GPU; the profiler's table of host-side ops of each forward+backward is
written beside the JSON (``profile_<implementation>.txt``). Prints a table and writes JSON.

    python bench/host_overhead.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import moda_cuda

SHAPE = dict(B=1, T=64, Hq=8, Hk=2, D=64, L=4)


def per_call_us(fn, calls: int, rounds: int, sync) -> float:
    for _ in range(calls):  # warm-up: compiles, autotuning, caches
        fn()
    sync()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(times)


def profile_step(fn, calls: int):
    """GPU time per call (kernels, memsets and copies, from torch.profiler): where it comes
    near the host time, the loop was bound by the GPU, not by the host. Also the profiler's
    table of host-side ops by self CPU time (absolute values inflated by the profiler; the
    split between the forward, the autograd engine and the backward node is what it shows)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in averages)
    return device_us / calls, averages.table(sort_by="self_cpu_time_total", row_limit=30)


def cuda_parts(q, k, v, dk, dv, grad, calls: int, rounds: int, sync) -> list:
    """Where the cuda backend's host time goes: the cached plan lookup, and the compiled
    kernels' bindings called with preallocated outputs (their C++ checks, TMA descriptors and
    launches). Empty where the compiled kernels are not available."""
    from moda_cuda import _cuda_ext, dispatch, eager

    if dispatch.CUDA.unavailable() is not None:
        return []
    ext = _cuda_ext.load()
    scale = q.shape[-1] ** -0.5
    with torch.no_grad():
        out, lse = dispatch.CUDA.forward(q, k, v, dk, dv, scale, True, 1)
        grads = [torch.empty_like(t) for t in (q, k, v, dk, dv)]

        def plan():
            eager.plan_call(q, k, v, dk, dv, None, True, 1, False, "cuda")

        def fwd():
            ext.fwd(q, k, v, dk, dv, out, lse, scale, True, 1)

        def bwd():
            ext.bwd(q, k, v, dk, dv, out, lse, grad, None, *grads, scale, True, 1, False)

        return [{"part": name, "us": per_call_us(fn, calls, rounds, sync)}
                for name, fn in (("plan lookup (cached)", plan), ("compiled forward binding", fwd),
                                 ("compiled backward binding", bwd))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the raw JSON")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--backends", default="auto,cuda,triton")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    s = SHAPE
    g = torch.Generator(device=device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=g).requires_grad_()

    q, k, v = r(s["B"], s["T"], s["Hq"], s["D"]), r(s["B"], s["T"], s["Hk"], s["D"]), r(s["B"], s["T"], s["Hk"], s["D"])
    dk, dv = r(s["B"], s["T"], s["L"], s["Hk"], s["D"]), r(s["B"], s["T"], s["L"], s["Hk"], s["D"])
    grad = torch.randn_like(q)
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    gt = grad.transpose(1, 2)

    def sdpa():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)

    cases = {"sdpa (no depth)": (sdpa, (qt, kt, vt), gt)}
    for name in args.backends.split(","):
        if name != "auto" and name not in moda_cuda.available_backends():
            continue
        cases[f"moda_attention[{name}]"] = (
            lambda _b=name: moda_cuda.moda_attention(q, k, v, dk, dv, backend=_b), (q, k, v, dk, dv), grad)

    rows = []
    for label, (fn, leaves, g_out) in cases.items():
        def forward(_fn=fn):
            with torch.no_grad():
                _fn()

        def step(_fn=fn, _leaves=leaves, _g=g_out):
            torch.autograd.grad(_fn(), _leaves, _g)

        # The two halves of a step apart: the forward with gradients on (it builds the
        # autograd node; the graph is dropped), and the backward alone, through one graph
        # kept with retain_graph.
        graph = fn()

        def backward(_out=graph, _leaves=leaves, _g=g_out):
            torch.autograd.grad(_out, _leaves, _g, retain_graph=True)

        fwd, both = per_call_us(forward, args.calls, args.rounds, sync), per_call_us(step, args.calls, args.rounds, sync)
        fwd_grad, bwd = per_call_us(fn, args.calls, args.rounds, sync), per_call_us(backward, args.calls, args.rounds, sync)
        del graph
        gpu = None
        if device == "cuda":
            gpu, table = profile_step(step, args.calls)
            os.makedirs(args.out, exist_ok=True)
            name = "".join(c if c.isalnum() else "_" for c in label).strip("_")
            with open(os.path.join(args.out, f"profile_{name}.txt"), "w") as f:
                f.write(f"{label}: forward+backward, {args.calls} calls under torch.profiler\n{table}\n")
        rows.append({"impl": label, "forward_us": fwd, "forward_backward_us": both, "forward_backward_gpu_us": gpu,
                     "forward_with_grad_us": fwd_grad, "backward_us": bwd})
        print(f"  {label:<28} forward {fwd:8.1f} us   forward+backward {both:8.1f} us"
              + (f" (GPU {gpu:.1f} us)" if gpu is not None else "")
              + f"   apart: forward with grad {fwd_grad:.1f}, backward {bwd:.1f} us", flush=True)

    parts = cuda_parts(q, k, v, dk, dv, grad, args.calls, args.rounds, sync) if "cuda" in args.backends.split(",") \
        else []
    for row in parts:
        print(f"  part of cuda: {row['part']:<40} {row['us']:8.1f} us", flush=True)

    os.makedirs(args.out, exist_ok=True)
    meta = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
            "torch": torch.__version__, "python": platform.python_version(), "shape": SHAPE,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "calls": args.calls, "rounds": args.rounds}
    path = os.path.join(args.out, "host_overhead.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows, "cuda_parts": parts}, f, indent=1)
    print(f"wrote {path}")
    print("\n| implementation | forward us/call | forward+backward us/call | its GPU time us/call "
          "| forward with grad | backward alone |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        gpu = row["forward_backward_gpu_us"]
        print(f"| {row['impl']} | {row['forward_us']:.1f} | {row['forward_backward_us']:.1f} | "
              f"{'-' if gpu is None else f'{gpu:.1f}'} | {row['forward_with_grad_us']:.1f} | {row['backward_us']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
