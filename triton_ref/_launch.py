"""Launching a Triton kernel again without binding its arguments again.

``kernel[grid](*args)`` binds and specialises every argument on every call before it reaches
the compiled kernel's launcher: it classifies each integer (equal to 1, divisible by 16) and
each pointer (16-byte aligned), builds the specialisation key and looks the kernel up, on
every call, for every one of the decode kernel's 37 arguments. An eager decode call took 59 us
of host time on the H100 with that path, against SDPA's 16 us (``docs/performance.md``,
"Decoding"); a decode step of a 32-layer model pays it 32 times.

:func:`launch` keeps the compiled kernel of each *launch key*: the grid, the launch options,
the constexprs, every non-tensor argument's value and every tensor argument's dtype, device
and 16-byte alignment. Everything Triton specialises on is a function of that key, so the
kernel compiled for the first call of a key is the kernel Triton would pick for every later
call of it, and those go straight to its launcher (``CompiledKernel[grid](*args)``, which
takes every parameter in signature order, constexprs included, and still calls the launch
hooks profilers install). Under the interpreter, or where a Triton version returns no
compiled kernel, every call takes the plain path.
"""

from __future__ import annotations

import torch

from ._configs import INTERPRET

_MAX_KEYS = 1024  # distinct shapes seen; beyond that the table starts over
_compiled: dict = {}


def _key(kernel, grid, args, constexprs, options):
    return (kernel, grid, options, tuple(constexprs.values()),
            tuple((a.dtype, a.device, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else (type(a), a)
                  for a in args))


def launch(kernel, grid, args, constexprs: dict, **options):
    """``kernel[grid](*args, **constexprs, **options)``. ``args`` are the kernel's leading
    parameters, positional; ``constexprs`` the rest, in signature order. Returns the compiled
    kernel that later calls of this key go to (None: every call takes the plain path)."""
    if INTERPRET:
        kernel[grid](*args, **constexprs, **options)
        return None
    key = _key(kernel, grid, args, constexprs, tuple(options.items()))
    compiled = _compiled.get(key)
    if compiled is not None:
        compiled[grid + (1,) * (3 - len(grid))](*args, *constexprs.values())  # it reads all three
        return compiled
    compiled = kernel[grid](*args, **constexprs, **options)
    if not hasattr(compiled, "__getitem__") or list(kernel.arg_names[len(args):]) != list(constexprs):
        return None
    if len(_compiled) >= _MAX_KEYS:
        _compiled.clear()
    _compiled[key] = compiled
    return compiled


class Launcher:
    """:func:`launch` of one kernel, grid, constexprs and options, for callers that know every
    later call has the launch key of the first (the same argument dtypes, alignments and
    non-tensor values): after the first call it goes to the compiled kernel without
    computing the key. ``Launcher(kernel, grid, constexprs, **options)(*args)``."""

    __slots__ = ("kernel", "grid", "constexprs", "options", "compiled")

    def __init__(self, kernel, grid, constexprs: dict, **options):
        self.kernel, self.grid, self.constexprs, self.options = kernel, grid, constexprs, options
        self.compiled = None

    def __call__(self, *args) -> None:
        if self.compiled is not None:
            self.compiled(*args, *self.constexprs.values())
            return
        compiled = launch(self.kernel, self.grid, args, self.constexprs, **self.options)
        if compiled is not None:  # bound to the grid once (it reads the stream per call)
            self.compiled = compiled[self.grid + (1,) * (3 - len(self.grid))]
