"""``python -m moda_cuda [demo|info]``.

``demo`` (the default) builds a MoDA problem, runs it forward and backward on the best
backend present, checks it against the float64 reference and prints backend, error, timing.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import moda_cuda
from moda_cuda import dispatch
from moda_cuda._spec import check_inputs
from moda_cuda.info import INFO_DTYPES, check_shape
from moda_cuda.reference import moda_attention_ref


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def _median_ms(fn, device: torch.device) -> float:
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def demo(args: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    B, T, Hq, Hk, D, L = (2, 2048, 16, 4, 64, 16) if cuda else (1, 256, 8, 2, 64, 8)
    if args.seqlen is not None:
        T = args.seqlen
    gen = torch.Generator(device=device).manual_seed(args.seed)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen).requires_grad_()

    q, k, v = rand(B, T, Hq, D), rand(B, T, Hk, D), rand(B, T, Hk, D)
    depth_k, depth_v = rand(B, T, L, Hk, D), rand(B, T, L, Hk, D)
    inputs = (q, k, v, depth_k, depth_v)
    shape = check_inputs(*inputs, None, True, 1)
    backend = dispatch.resolve("auto", q, shape, inputs).name

    out = moda_cuda.moda_attention(*inputs)
    grad_out = torch.randn(out.shape, device=device, dtype=dtype, generator=gen)
    grads = torch.autograd.grad(out, inputs, grad_out)

    ref_in = [x.detach().double().requires_grad_() for x in inputs]
    ref = moda_attention_ref(*ref_in)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.double())
    fwd_err = _rel_err(out, ref)
    grad_err = max(_rel_err(g, r) for g, r in zip(grads, ref_grads))

    fwd_ms = _median_ms(lambda: moda_cuda.moda_attention(*inputs), device)
    step_ms = _median_ms(lambda: torch.autograd.grad(moda_cuda.moda_attention(*inputs), inputs, grad_out), device)
    print(f"MoDA demo on {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(f"  shape      B={B} T={T} Hq={Hq} Hk={Hk} D={D} L={L} {str(dtype).replace('torch.', '')} causal")
    print(f"  backend    {backend}  (available: {', '.join(moda_cuda.available_backends())})")
    print(f"  rel. L2 error vs float64 reference: out {fwd_err:.2e}, worst grad {grad_err:.2e}")
    print(f"  time       forward {fwd_ms:.3f} ms, forward+backward {step_ms:.3f} ms (median)")
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    ok = fwd_err < tol and grad_err < tol
    print("  result     " + ("OK" if ok else f"FAILED (tolerance {tol})"))
    return 0 if ok else 1


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the examples' step counts use it too)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"wants an integer >= 1, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"wants an integer, got {text!r}") from None
    if not -(2**63) <= value < 2**64:  # what torch.Generator.manual_seed takes
        raise argparse.ArgumentTypeError(f"wants an integer in [-2**63, 2**64), got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moda_cuda", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="run and check a MoDA problem (default)")
    d.add_argument("--seqlen", type=positive_int, default=None,
                   help="override T (default: 2048 on a GPU, 256 on the CPU)")
    d.add_argument("--seed", type=_seed, default=0, help="seed of the random inputs (default: 0)")
    i = sub.add_parser("info", help="versions, devices and backends")
    i.add_argument("--shape", default=None,
                   help="B,T,Hq,Hk,D,L: also say which backend runs this problem (B, T, Hq, Hk, D >= 1, "
                        "L >= 0, Hq a multiple of Hk)")
    i.add_argument("--dtype", default="bfloat16", choices=INFO_DTYPES, help="dtype of that problem (default: bfloat16)")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("demo", "info", "-h", "--help"):
        argv = ["demo", *argv]  # the demo is the default command, with its options
    args = parser.parse_args(argv)
    if args.command == "info":
        shape = None
        if args.shape is not None:
            try:
                values = [int(x) for x in args.shape.split(",")]
            except ValueError:
                i.error(f"argument --shape: wants six integers B,T,Hq,Hk,D,L, got {args.shape!r}")
            try:
                shape = check_shape(values, args.dtype)
            except ValueError as e:
                i.error(f"argument --shape: {args.shape!r}: {e}")
        moda_cuda.info(shape=shape, dtype=args.dtype)
        return 0
    return demo(args)


if __name__ == "__main__":
    raise SystemExit(main())
