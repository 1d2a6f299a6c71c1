"""Gradients of the compiled backward (``_C.bwd``: dQ, dK, dV, d depth_k, d depth_v) against
the float64 reference, over validate_fwd.py's cases, as a table per mode: the default
(dQ accumulated by the dK / dV kernel with atomics where ``bwd_fuses_dq`` says so, else from
the dQ kernel) and ``deterministic``.

The kernels are called directly, whatever dispatch would pick. Fresh random inputs and dO
(and, every other case, a random gradient for lse), gradient buffers filled with NaN before
the call, relative L2 error per gradient. Exits non-zero when any case is over tolerance.

    python bench/validate_bwd.py
    python bench/validate_bwd.py --small     # two small cases (for compute-sanitizer)
    python bench/validate_bwd.py --modes deterministic
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

import moda_cuda
from moda_cuda import _cuda_ext
from moda_cuda.reference import moda_attention_ref

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import Case, as_double, make_inputs, rel_err  # noqa: E402
from validate_fwd import CASES, SMALL, run_table  # noqa: E402

NAMES = ("q", "k", "v", "depth_k", "depth_v")


def reference_grads(inputs, dout, grad_lse, case: Case):
    leaves = [t.detach().requires_grad_() if t is not None else None for t in as_double(inputs)]
    out, lse = moda_attention_ref(*leaves, causal=case.causal, depth_chunk=case.chunk, return_lse=True)
    loss = (out * dout.double()).sum()
    if grad_lse is not None:
        loss = loss + (torch.nan_to_num(lse, neginf=0.0) * grad_lse.double()).sum()
    wanted = [t for t in leaves if t is not None and t.numel() > 0]
    grads = iter(torch.autograd.grad(loss, wanted))
    return [next(grads) if t is not None and t.numel() > 0 else None for t in leaves]


MODES = {"fused": False, "deterministic": True}  # mode -> the kernels' deterministic flag


def run_case(case: Case, slots, dtype, seed: int, with_grad_lse: bool, deterministic: bool):
    ext = _cuda_ext.load()
    if ext is None:
        raise RuntimeError(f"moda_cuda._C: {_cuda_ext.load_error()}")
    q, k, v, dk, dv = inputs = make_inputs(case, dtype, "cuda", seed=seed, depth_slots=slots)
    out, lse = moda_cuda.moda_attention(*inputs, return_lse=True, backend="cuda", causal=case.causal,
                                        depth_chunk=case.chunk)
    g = torch.Generator(device="cuda").manual_seed(seed + 1000)
    dout = torch.randn(out.shape, generator=g, device="cuda").to(dtype)
    grad_lse = torch.randn(lse.shape, generator=g, device="cuda") if with_grad_lse else None
    grads = [torch.full(t.shape, float("nan"), dtype=dtype, device="cuda") if t is not None else None
             for t in inputs]
    ext.bwd(q, k, v, dk, dv, out, lse, dout, grad_lse, *grads, case.D ** -0.5, case.causal, case.chunk,
            deterministic)
    refs = reference_grads(inputs, dout, grad_lse, case)
    return {name: rel_err(got, ref) for name, got, ref in zip(NAMES, grads, refs) if ref is not None}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true")
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    a = p.parse_args()
    failures = 0
    for mode in a.modes.split(","):
        if mode not in MODES:
            p.error(f"unknown mode {mode!r}; allowed: {', '.join(MODES)}")
        print(f"mode: {mode}")
        # Every other case also sends a gradient into lse.
        failures += run_table(SMALL if a.small else CASES, a.dtypes, list(NAMES),
                              lambda case, slots, dtype, i: run_case(case, slots, dtype, seed=i,
                                                                     with_grad_lse=i % 2 == 1,
                                                                     deterministic=MODES[mode]))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
