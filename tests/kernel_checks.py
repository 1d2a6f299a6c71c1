"""One check used by the Triton-kernel and CUDA test files: a backend against the float64
reference, forward and all five gradients, with every output buffer poisoned first."""

import contextlib

import torch

import moda_cuda
from helpers import as_double, make_inputs, rel_err
from moda_cuda.reference import moda_attention_ref, moda_attention_ref_backward

TOLERANCE = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 2e-2}


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty / empty_like return NaN-filled floats, so an unwritten element shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t

    torch.empty = lambda *a, **k: poison(empty(*a, **k))
    torch.empty_like = lambda *a, **k: poison(empty_like(*a, **k))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def check_backend(case, dtype, device, backend, seed=0, depth_slots=None, grads=True, deterministic=False):
    inputs = make_inputs(case, dtype, device, seed=seed, depth_slots=depth_slots)
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs] if depth_slots is None else \
        [None if t is None else t.requires_grad_() for t in inputs]
    kw = dict(causal=case.causal, depth_chunk=case.chunk)
    with poisoned_allocations():
        out, lse = moda_cuda.moda_attention(*leaves, return_lse=True, backend=backend, deterministic=deterministic,
                                            **kw)
    ref_in = as_double(inputs)
    ref_out, ref_lse = moda_attention_ref(*ref_in, return_lse=True, **kw)
    tol = TOLERANCE[dtype]
    errors = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}
    if grads:
        g = torch.Generator(device="cpu").manual_seed(seed + 1)
        grad_out = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
        with poisoned_allocations():
            got = torch.autograd.grad(out, [t for t in leaves if t is not None], grad_out)
        want = moda_attention_ref_backward(grad_out.double(), *ref_in, ref_out, ref_lse, **kw)
        got = iter(got)
        for name, leaf, ref in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v"), leaves, want):
            if leaf is not None:
                errors[name] = rel_err(next(got), ref)
    bad = {k: v for k, v in errors.items() if not v < tol}
    assert not bad, f"{case} {dtype}: errors over {tol}: {bad}"
    return errors
