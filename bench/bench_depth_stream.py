"""Depth stream vs stack-per-layer: memory and time of a deep MoDA stack, forward + backward.

Each of ``--layers`` layers derives q/k/v from the residual stream with cheap elementwise
maps, runs ``moda_attention`` over its own k/v plus the depth k/v of all earlier layers, and
adds the output back. The variants share everything except how depth is supplied:

* ``stack``  -- ``torch.stack`` of every earlier layer's k/v, rebuilt in every layer (the
  reference vision code): O(L^2) copies, all kept alive for backward;
* ``stream`` -- :class:`moda_cuda.DepthStream`: one append per layer, strided views, and
  ``DepthStream.attention``, which sums the depth gradients of all readers in place;
* ``stream_read`` -- the same stream read with ``DepthStream.read`` and passed to
  ``moda_attention``: each layer's depth gradients are returned and summed by the stream;
* ``none``   -- no depth at all, to measure what the depth state itself costs.

Reported per variant: median step time (``triton.testing.do_bench``, or a plain timer without
Triton, in each of ``--rounds`` rounds; the median over rounds), peak allocated memory of a
step above the inputs, and the memory still held after the forward pass (what backward keeps). Depth-state memory = held(variant) - held(none),
next to the analytic size of the tensors each variant keeps.

    python bench/bench_depth_stream.py --out bench/results          # GPU, the benchmark's sizes
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
VARIANTS = ("stream", "stream_read", "stack", "none")


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
            if variant.startswith("stream") and a.layers > 1 else None
        ks: List[torch.Tensor] = []
        vs: List[torch.Tensor] = []
        options = dict(causal=True, depth_chunk=a.depth_chunk, backend=a.backend)
        for l in range(a.layers):
            q = x * self.sq[l]
            kv = x.view(B, T, Hk, G, D).mean(3)
            k, v = kv * self.sk[l], kv * self.sv[l]
            if variant == "stream" and l > 0:
                out = stream.attention(q, k, v, l, **options)  # depth gradients summed in place
            elif variant == "stream_read" and l > 0:
                out = moda_cuda.moda_attention(q, k, v, *stream.read(l), **options)
            elif variant == "stack" and ks:
                out = moda_cuda.moda_attention(q, k, v, torch.stack(ks, dim=2), torch.stack(vs, dim=2), **options)
            else:
                out = moda_cuda.moda_attention(q, k, v, None, None, **options)
            if variant == "stack" and l < a.layers - 1:
                ks.append(k)
                vs.append(v)
            elif stream is not None and l < a.layers - 1:
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


def host_ms(fn: Callable[[], object], device: torch.device, reps: int = 5) -> Optional[float]:
    """Median milliseconds the host spends issuing one call (no synchronization inside it):
    close to the step time, the step is bound by Python and launches rather than the GPU."""
    if device.type != "cuda":
        return None
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
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
    if variant.startswith("stream"):
        return 2 * slot * (L - 1)  # one [B, T, L-1, Hk, D] buffer each for k and v
    return 0


def kernel_profile(stack: Stack, variant: str, backward: bool, top: int = 8) -> List[Dict]:
    """CUDA time per kernel name over one step of ``variant`` (a no-grad forward, or forward +
    backward with ``backward``), largest first."""
    from torch.profiler import ProfilerActivity, profile

    def run() -> None:
        if backward:
            stack.step(variant)
        else:
            with torch.no_grad():
                stack.forward(variant)

    run()  # warm: compiles and autotunes outside the trace
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:70], "calls": e.count, "cuda_ms": e.device_time_total / 1e3}
            for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r["cuda_ms"])[:top]


def backends_used(a: argparse.Namespace) -> Dict[str, Dict[str, int]]:
    """How many of the stack's layers (layer l reads l depth slots) each implementation serves,
    per direction, as ``backend="auto"`` picks them on this machine."""
    from moda_cuda.info import _backends_for

    counts: Dict[str, Dict[str, int]] = {"forward": {}, "backward": {}}
    for l in range(a.layers):
        picked = _backends_for((a.batch, a.seqlen, a.q_heads, a.kv_heads, a.head_dim, l), str(DTYPES[a.dtype]).removeprefix("torch."))
        for direction, backend in picked.items():
            name = backend.name if direction == "forward" else backend.backward_name
            counts[direction][name] = counts[direction].get(name, 0) + 1
    return counts


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
    p.add_argument("--rounds", type=int, default=3, help="timing rounds over all variants (median reported)")
    p.add_argument("--profile", action="store_true",
                   help="also print each variant's top CUDA kernels of one no-grad forward and of one "
                        "forward+backward step (torch.profiler)")
    a = p.parse_args(argv)
    if a.smoke:
        a.device = "cpu" if a.device == "auto" else a.device
        a.dtype = "fp32" if a.device == "cpu" else a.dtype
        a.layers, a.batch, a.seqlen, a.q_heads, a.kv_heads, a.head_dim, a.reps, a.rounds = 4, 1, 32, 4, 2, 16, 2, 1
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
    if "stack" in variants:
        g_stack = stack.step("stack")
        for v in (v for v in variants if v.startswith("stream")):
            check[f"max_rel_grad_diff_{v}"] = max(
                ((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()
                for x, y in zip(stack.step(v), g_stack))
        del g_stack

    rows: Dict[str, Dict] = {}
    for v in variants:
        rows[v] = memory(stack, v, device)
        rows[v].update(step_ms_rounds=[], forward_ms_rounds=[], host_step_ms_rounds=[],
                       depth_state_bytes_analytic=analytic_depth_bytes(a, v, dtype.itemsize))
    # Rounds, each timing every variant, in an order rotated by one per round: a slow spell of
    # the machine then lands on different variants instead of on one. Medians over rounds.
    for r in range(a.rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            rows[v]["step_ms_rounds"].append(time_ms(lambda: stack.step(v), device, a))
            rows[v]["host_step_ms_rounds"].append(host_ms(lambda: stack.step(v), device))
            with torch.no_grad():
                rows[v]["forward_ms_rounds"].append(time_ms(lambda: stack.forward(v), device, a))
    for row in rows.values():
        row["step_ms"] = statistics.median(row["step_ms_rounds"])
        row["forward_ms"] = statistics.median(row["forward_ms_rounds"])
        host = [t for t in row["host_step_ms_rounds"] if t is not None]
        row["host_step_ms"] = statistics.median(host) if host else None
    if "none" in rows:
        for v, row in rows.items():
            held, base = row["held_after_forward_bytes"], rows["none"]["held_after_forward_bytes"]
            row["depth_state_bytes_measured"] = None if held is None else held - base

    profiles = {}
    if a.profile and device.type == "cuda":
        for v in variants:
            profiles[f"{v} forward"] = kernel_profile(stack, v, backward=False)
            profiles[f"{v} step"] = kernel_profile(stack, v, backward=True)

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
    if "stream_read" in rows and "stack" in rows:
        summary["speedup_step_stream_read"] = rows["stack"]["step_ms"] / rows["stream_read"]["step_ms"]

    report = {
        "benchmark": "depth stream vs stack-per-layer, forward+backward",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "moda_cuda": getattr(moda_cuda, "__version__", "unknown"),
        "smoke": a.smoke,
        "shape": {"layers": a.layers, "batch": a.batch, "seqlen": a.seqlen, "q_heads": a.q_heads,
                  "kv_heads": a.kv_heads, "head_dim": a.head_dim, "depth_chunk": a.depth_chunk, "dtype": a.dtype},
        "backend": a.backend,
        "backends_used": backends_used(a) if a.backend == "auto" else None,
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
    print(f"{'variant':>11} {'step ms':>9} {'fwd ms':>8} {'peak MiB':>9} {'held MiB':>9} {'depth MiB':>10} {'analytic':>9}")
    for v, r in rows.items():
        print(f"{v:>11} {r['step_ms']:9.2f} {r['forward_ms']:8.2f} {mib(r['peak_bytes']):>9} "
              f"{mib(r['held_after_forward_bytes']):>9} {mib(r.get('depth_state_bytes_measured')):>10} "
              f"{mib(r['depth_state_bytes_analytic']):>9}")
    if device.type == "cuda":
        print("host ms to issue a step: " + "; ".join(f"{v} {r['host_step_ms']:.2f}" for v, r in rows.items()))
    print("step ms per round: " + "; ".join(f"{v} " + ", ".join(f"{t:.2f}" for t in r["step_ms_rounds"])
                                            for v, r in rows.items()))
    if report["backends_used"]:
        print("layers per backend: " + "; ".join(
            f"{d} " + ", ".join(f"{n} {c}" for n, c in used.items()) for d, used in report["backends_used"].items()))
    for key, value in {**summary, **check}.items():
        print(f"{key}: {value:.3g}")
    for v, prof in profiles.items():
        print(f"{v}: " + "; ".join(f"{r['kernel']} x{r['calls']} {r['cuda_ms']:.2f} ms" for r in prof))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
