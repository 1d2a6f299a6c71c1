"""Where a forward+backward step's time goes between its kernels (a diagnostic).

bench_moda.py's step time (do_bench median, L2 flushed before each step) can exceed the sum
of the step's kernel times from its per-kernel breakdown. This script runs the same step the
same way, records every kernel with torch.profiler, and splits each step's span (first
kernel start to last kernel end, the flush excluded) into kernel time and idle gaps, listing
the largest gaps with the kernels on either side. Kernel times measured here next to the
breakdown's (5 steps, no flush) also show whether a kernel runs slower in a long series.

    python bench/step_gaps.py --out DIR [--steps 20] [--backend cuda]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_moda import SHAPES, _bench, _fwd_bwd, make_inputs  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import moda_cuda  # noqa: E402


def kernel_events(prof):
    """(start_us, end_us, name) of every GPU kernel, in start order."""
    out = []
    for ev in prof.events():
        if ev.device_type.name == "CUDA" and ev.time_range.elapsed_us() > 0:
            out.append((ev.time_range.start, ev.time_range.end, ev.name))
    return sorted(out)


def split_steps(events, flush_name: str):
    """Group kernels into steps: each step starts after a flush kernel."""
    steps, cur = [], None
    for start, end, name in events:
        if flush_name in name:
            if cur:
                steps.append(cur)
            cur = []
        elif cur is not None:
            cur.append((start, end, name))
    if cur:
        steps.append(cur)
    return steps


def analyse(steps):
    """Means over the steps: span and kernel time (ms), the largest gaps by the pair of kernels
    around them (ms per step), and each kernel's time (ms)."""
    spans, busy, gaps = [], [], []
    per_kernel = collections.defaultdict(list)
    for ks in steps:
        spans.append(ks[-1][1] - ks[0][0])
        busy.append(sum(e - s for s, e, _ in ks))
        for (s0, e0, n0), (s1, e1, n1) in zip(ks, ks[1:]):
            gaps.append((s1 - e0, n0[:48], n1[:48]))
        for s, e, n in ks:
            per_kernel[n[:60]].append(e - s)
    mean = lambda xs: sum(xs) / max(1, len(xs))  # noqa: E731
    gap_sum = collections.defaultdict(float)
    for g, a, b in gaps:
        gap_sum[(a, b)] += g / len(steps)
    return {
        "steps": len(steps),
        "span_ms": mean(spans) / 1e3,
        "kernels_ms": mean(busy) / 1e3,
        "gaps": sorted(([a, b, round(g / 1e3, 4)] for (a, b), g in gap_sum.items()), key=lambda r: -r[2])[:8],
        "per_kernel_ms": {n: round(mean(v) / 1e3, 4) for n, v in sorted(per_kernel.items(), key=lambda kv: -mean(kv[1]))},
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--backend", default="cuda")
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flush = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device="cuda")
    report = []
    for s in SHAPES["issue"]:
        inputs = make_inputs(s)
        grad = torch.randn_like(inputs[0])
        fn = lambda *x: moda_cuda.moda_attention(*x, backend=args.backend)  # noqa: E731
        step = _fwd_bwd(fn, inputs, grad)
        bench_ms = _bench(step)
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                torch.bitwise_not(flush, out=flush)  # flushes L2 as do_bench does; its kernel marks a step's start
                step()
            torch.cuda.synchronize()
        events = kernel_events(prof)
        row = {"shape": s.label(), "do_bench_ms": bench_ms, **analyse(split_steps(events, "bitwise_not"))}
        report.append(row)
        print(f"{s.label()}: do_bench {bench_ms:.3f} ms; profiled span {row['span_ms']:.3f} ms, "
              f"kernels {row['kernels_ms']:.3f} ms, gaps {row['span_ms'] - row['kernels_ms']:.3f} ms")
        for a, b, g in row["gaps"][:5]:
            print(f"    gap {g:.4f} ms  {a}  ->  {b}")
        for n, t in list(row["per_kernel_ms"].items())[:6]:
            print(f"    {t:8.3f} ms  {n}")
    (out / "step_gaps.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
