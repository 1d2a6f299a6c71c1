"""Helpers every benchmark script here shares: timing, a forward+backward step, the relative
error, and the metadata that names a run (when, where, with what, and the command)."""

from __future__ import annotations

import os
import platform
import sys
import time

import torch

import moda_cuda


def bench_ms(fn) -> float:
    """Median milliseconds of ``fn()`` (``triton.testing.do_bench``)."""
    import triton

    return triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median")


def fwd_bwd_step(fn, inputs, grad_out):
    """``step()``: ``fn(*inputs)`` and the gradients of all ``inputs`` (None for one that does
    not reach the output, e.g. empty depth tensors at L = 0)."""
    def step():
        return torch.autograd.grad(fn(*inputs), inputs, grad_out, allow_unused=True)

    return step


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative L2 error of a against b, in float32."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run_metadata(script: str, argv=None) -> dict:
    """When, where and with what a benchmark ran, and the command that reproduces it."""
    return {
        "when": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "python": platform.python_version(),
        "moda_cuda": moda_cuda.__version__,
        "command": "python " + " ".join([os.path.relpath(script)] + (argv or sys.argv[1:])),
    }
