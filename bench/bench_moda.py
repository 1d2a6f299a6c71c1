"""MoDA speed on one GPU, side by side with the baselines, in one run.

For each shape: this package's backends (forward, forward+backward), FlexAttention with a
MoDA block mask, and SDPA (cuDNN, flash) on the same shape WITHOUT depth (plain causal GQA
attention: the speed of light for the sequence part). GPU-event timing through
``triton.testing.do_bench`` (median), after warm-up. Outputs are checked before timing: ours
against the reference (float32 arithmetic, on one kv head's query heads) and against
FlexAttention.

    python bench/bench_moda.py --out bench/results            # the README table
    python bench/bench_moda.py --shapes small --out /tmp/b    # a quick look

Useful FLOPs = 4 * B * Hq * D * (T (T + 1) / 2 + T * L) for the causal forward; the
forward+backward counts 3.5x that.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import moda_cuda
from bench_common import bench_ms, fwd_bwd_step, rel_err, run_metadata
from moda_cuda.reference import moda_attention_ref


@dataclass(frozen=True)
class Shape:
    B: int
    T: int
    Hq: int
    Hk: int
    D: int
    L: int

    @property
    def G(self) -> int:
        return self.Hq // self.Hk

    def label(self) -> str:
        return f"B={self.B} T={self.T} Hq={self.Hq} Hk={self.Hk} D={self.D} L={self.L}"

    def flops(self) -> float:
        return 4.0 * self.B * self.Hq * self.D * (self.T * (self.T + 1) / 2 + self.T * self.L)


SHAPES = {
    "benchmark": [Shape(1, 16384, 64, 8, 64, 64), Shape(1, 8192, 32, 8, 128, 32), Shape(1, 4096, 64, 8, 64, 64)],
    "small": [Shape(1, 2048, 16, 4, 64, 16)],
}
# The benchmark shapes and the same without depth: the difference is what the depth part costs.
SHAPES["probe"] = SHAPES["benchmark"] + [Shape(s.B, s.T, s.Hq, s.Hk, s.D, 0) for s in SHAPES["benchmark"]]


def make_inputs(s: Shape, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()

    return r(s.B, s.T, s.Hq, s.D), r(s.B, s.T, s.Hk, s.D), r(s.B, s.T, s.Hk, s.D), \
        r(s.B, s.T, s.L, s.Hk, s.D), r(s.B, s.T, s.L, s.Hk, s.D)


# ----------------------------------------------------------------------------- baselines


def flex_moda(s: Shape):
    """FlexAttention MoDA: GQA folded into query rows, keys = [sequence ; flattened depth]."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    T, G, L = s.T, s.G, s.L

    def mask_mod(b, h, qi, ki):
        t = qi // G
        return ((ki < T) & (ki <= t)) | ((ki >= T) & ((ki - T) // L == t))

    block_mask = create_block_mask(mask_mod, B=None, H=None, Q_LEN=T * G, KV_LEN=T + T * L, device="cuda",
                                   _compile=True)  # the dense mask would not fit in memory
    flex = torch.compile(flex_attention, dynamic=False)

    def to_flex(q, k, v, dk, dv):
        qf = q.reshape(s.B, T, s.Hk, G, s.D).permute(0, 2, 1, 3, 4).reshape(s.B, s.Hk, T * G, s.D)
        kf = torch.cat([k.transpose(1, 2), dk.permute(0, 3, 1, 2, 4).reshape(s.B, s.Hk, T * L, s.D)], dim=2)
        vf = torch.cat([v.transpose(1, 2), dv.permute(0, 3, 1, 2, 4).reshape(s.B, s.Hk, T * L, s.D)], dim=2)
        return [x.detach().requires_grad_() for x in (qf, kf, vf)]

    def from_flex(o):
        return o.reshape(s.B, s.Hk, T, G, s.D).permute(0, 2, 1, 3, 4).reshape(s.B, T, s.Hq, s.D)

    def run(qf, kf, vf):
        return flex(qf, kf, vf, block_mask=block_mask)

    return to_flex, run, from_flex


def sdpa_plain(backend):
    """Causal GQA attention without depth through one SDPA backend."""
    from torch.nn.attention import sdpa_kernel

    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    return run


# ----------------------------------------------------------------------------- one shape


def kernel_breakdown(fn, inputs, grad_out, steps: int = 5):
    """Mean GPU time per kernel over a few forward+backward steps (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    step = fwd_bwd_step(fn, inputs, grad_out)
    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    rows = {}
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and ev.device_time_total > 0:
            rows[ev.key[:60]] = ev.device_time_total / steps / 1e3
    return dict(sorted(rows.items(), key=lambda kv: -kv[1]))


def bench_shape(s: Shape, backends, check: bool, breakdown: bool = False, fwd_only: bool = False,
                baselines: bool = True):
    from torch.nn.attention import SDPBackend

    def step_ms(fn, inputs, grad):  # forward+backward time, unless only forwards are timed
        return None if fwd_only else bench_ms(fwd_bwd_step(fn, inputs, grad))

    inputs = make_inputs(s)
    grad_out = torch.randn(s.B, s.T, s.Hq, s.D, device="cuda", dtype=torch.bfloat16)
    rows = []

    def record(name, fwd_ms, step_ms, note=""):
        rows.append({"impl": name, "fwd_ms": fwd_ms, "fwd_bwd_ms": step_ms,
                     "fwd_tflops": s.flops() / fwd_ms / 1e9 if fwd_ms else None,
                     "fwd_bwd_tflops": 3.5 * s.flops() / step_ms / 1e9 if step_ms else None, "note": note})
        print(f"  {name:<28} fwd {fwd_ms or float('nan'):8.3f} ms   fwd+bwd {step_ms or float('nan'):8.3f} ms  {note}",
              flush=True)

    flex_out = None
    if baselines:
        try:
            to_flex, flex_run, from_flex = flex_moda(s)
            f_in = to_flex(*inputs)
            flex_out = from_flex(flex_run(*f_in)).detach()
            f_grad = grad_out.reshape(s.B, s.T, s.Hk, s.G, s.D).permute(0, 2, 1, 3, 4).reshape(s.B, s.Hk, -1, s.D)
            record("flex_attention MoDA", bench_ms(lambda: flex_run(*f_in)), step_ms(flex_run, f_in, f_grad))
        except Exception as exc:  # a baseline that cannot run is reported, not fatal
            record("flex_attention MoDA", None, None, f"failed: {type(exc).__name__}: {str(exc)[:120]}")

    errors = {}
    for name in backends:
        def fn(*x, _b=name.split("+")[0], _det=name.endswith("+deterministic")):
            return moda_cuda.moda_attention(*x, backend=_b, deterministic=_det)

        out = fn(*inputs).detach()
        if check:
            # Reference on the query heads of kv head 0 (the full problem's logits would not fit).
            sub = [inputs[0][:, :, : s.G], inputs[1][:, :, :1], inputs[2][:, :, :1], inputs[3][:, :, :, :1],
                   inputs[4][:, :, :, :1]]
            ref = moda_attention_ref(*[x.detach() for x in sub])
            errors[name] = {"vs_reference_kv_head0": rel_err(out[:, :, : s.G], ref)}
            if flex_out is not None:
                errors[name]["vs_flex"] = rel_err(out, flex_out)
        record(f"moda_cuda[{name}]", bench_ms(lambda: fn(*inputs)), step_ms(fn, inputs, grad_out),
               " ".join(f"{k}={v:.1e}" for k, v in errors.get(name, {}).items()))
        if breakdown:
            kernels = kernel_breakdown(fn, inputs, grad_out)
            rows[-1]["kernels_ms"] = kernels
            for kname, ms in list(kernels.items())[:8]:
                print(f"      {ms:8.3f} ms  {kname}")

    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in inputs[:3])
    gt = grad_out.transpose(1, 2)
    sdpa = (("sdpa cudnn (no depth)", SDPBackend.CUDNN_ATTENTION),
            ("sdpa flash (no depth)", SDPBackend.FLASH_ATTENTION)) if baselines else ()
    for label, backend in sdpa:
        run = sdpa_plain(backend)
        try:
            run(qt, kt, vt)
            record(label, bench_ms(lambda: run(qt, kt, vt)), step_ms(run, (qt, kt, vt), gt))
        except Exception as exc:
            record(label, None, None, f"failed: {type(exc).__name__}: {str(exc)[:120]}")
    return {"shape": asdict(s), "flops_fwd": s.flops(), "results": rows, "errors": errors}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory for the raw JSON")
    parser.add_argument("--shapes", choices=sorted(SHAPES), default="benchmark")
    parser.add_argument("--backends", default="triton",
                        help="comma-separated moda_cuda backends; '+deterministic' asks for bitwise-repeatable "
                             "gradients")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    parser.add_argument("--breakdown", action="store_true", help="also report GPU time per kernel")
    parser.add_argument("--fwd-only", action="store_true", help="time forwards only")
    parser.add_argument("--no-baselines", action="store_true", help="skip FlexAttention and SDPA")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_moda.py needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True
    backends = [b for b in args.backends.split(",") if b]
    report = {**run_metadata(__file__, argv), "shapes": []}
    for s in SHAPES[args.shapes]:
        print(s.label(), flush=True)
        report["shapes"].append(bench_shape(s, backends, check=not args.no_check, breakdown=args.breakdown,
                                            fwd_only=args.fwd_only, baselines=not args.no_baselines))
        torch.cuda.empty_cache()

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"bench_moda_{args.shapes}.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwrote {path}\n")
    print(format_table(report))
    return 0


def format_table(report) -> str:
    """Markdown table: ms and TFLOP/s per implementation, and ours relative to each baseline."""
    lines = ["| shape | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | "
             "time vs moda_cuda (fwd / fwd+bwd) |",
             "|---|---|---|---|---|---|---|"]
    fmt = lambda x, p: "-" if x is None else f"{x:.{p}f}"  # noqa: E731
    ratio = lambda a, b: "-" if not (a and b) else f"{a / b:.2f}x"  # noqa: E731
    for entry in report["shapes"]:
        s = Shape(**entry["shape"])
        ours = next((r for r in entry["results"] if r["impl"].startswith("moda_cuda")), None)
        for r in entry["results"]:
            rel = "" if ours is None else f"{ratio(r['fwd_ms'], ours['fwd_ms'])} / " \
                                          f"{ratio(r['fwd_bwd_ms'], ours['fwd_bwd_ms'])}"
            lines.append(f"| {s.label()} | {r['impl']} | {fmt(r['fwd_ms'], 3)} | {fmt(r['fwd_tflops'], 0)} | "
                         f"{fmt(r['fwd_bwd_ms'], 3)} | {fmt(r['fwd_bwd_tflops'], 0)} | {rel} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
