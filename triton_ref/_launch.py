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

:class:`Launcher` goes one step further for callers that repeat one launch (a prepared
decode layout): from its third call the extension's ``KernelLaunch`` (``csrc/kernel_launch.cpp``)
launches the compiled kernel with every non-tensor parameter bound, so a call costs the
tensors' addresses and one driver call, not Triton's launcher (a ``data_ptr()`` call and
a driver query per tensor, the current device and stream asked for from Python).
"""

from __future__ import annotations

import struct

import torch
import triton

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
    """:func:`launch` of one kernel, grid, constexprs, scalar arguments and options, for
    callers whose later calls have the launch key of the first (the same tensor dtypes,
    devices and alignments). ``Launcher(kernel, grid, constexprs, scalars, **options)(*tensors)``:
    the kernel's leading parameters are the tensors, then the scalars, then the constexprs.

    After the first call it goes to the compiled kernel without computing the key: through
    the extension's ``KernelLaunch`` (:func:`_native_launch`) where that can describe the
    kernel, else through Triton's launcher of the compiled kernel."""

    __slots__ = ("kernel", "grid", "constexprs", "scalars", "options", "compiled", "runner", "native")

    def __init__(self, kernel, grid, constexprs: dict, scalars: tuple = (), **options):
        self.kernel, self.grid, self.constexprs, self.scalars, self.options = kernel, grid, constexprs, scalars, options
        self.compiled = self.runner = self.native = None

    def __call__(self, *tensors) -> None:
        if self.native:
            self.native(tensors)
            return
        if self.runner is not None:
            if self.native is None:  # at the second call: a launcher used once is not worth building
                self.native = _native_launch(self.compiled, self.kernel, self.grid, tensors, self.scalars) or False
            self.runner(*tensors, *self.scalars, *self.constexprs.values())
            return
        compiled = launch(self.kernel, self.grid, tensors + self.scalars, self.constexprs, **self.options)
        if compiled is not None:  # bound to the grid once (it reads the stream per call)
            self.compiled, self.runner = compiled, compiled[self.grid + (1,) * (3 - len(self.grid))]


# How each scalar parameter type of a Triton signature is laid out in its 8-byte slot.
_SCALAR_FORMATS = {"i32": "<i", "u32": "<I", "i64": "<q", "u64": "<Q", "fp32": "<f", "fp64": "<d"}
# Triton versions whose kernels take the parameters KernelLaunch writes: one per
# non-constexpr argument in signature order, then this many scratch pointers.
_SCRATCH_POINTERS = {(3, 6): 2}


def _hooked(hook) -> bool:
    """Whether a launch hook would run (Triton 3.6 keeps an empty chain of hooks where none is installed)."""
    return hook is not None and bool(getattr(hook, "calls", True))


def _native_launch(compiled, kernel, grid, tensors, scalars):
    """The extension's ``KernelLaunch`` of ``compiled`` with ``scalars`` bound (launched with
    ``tensors`` in order), or None where it cannot describe the launch: no extension, a
    Triton version whose kernel ABI it does not know, a kernel that needs scratch memory,
    clusters or a cooperative launch, a launch hook installed (profilers: they
    get every launch through Triton's launcher), or an argument it cannot pack. A programmatic
    dependent launch (``launch_pdl``) stays one."""
    try:
        from .._cuda_ext import load
    except ImportError:
        return None
    ext, knobs = load(), getattr(triton, "knobs", None)
    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    n_scratch = _SCRATCH_POINTERS.get(version)
    run = getattr(compiled, "run", None)
    if (ext is None or not hasattr(ext, "KernelLaunch") or n_scratch is None or run is None or knobs is None
            or _hooked(knobs.runtime.launch_enter_hook) or _hooked(knobs.runtime.launch_exit_hook)
            or getattr(compiled.metadata, "num_ctas", 1) != 1 or getattr(run, "launch_cooperative_grid", False)
            or getattr(run, "global_scratch_size", 0)
            or getattr(run, "profile_scratch_size", 0)):
        return None
    values = tensors + scalars
    slots, tensor_slots = [], []
    for name, ty in compiled.src.signature.items():
        if ty == "constexpr":
            continue
        index = kernel.arg_names.index(name)
        if index >= len(values):
            return None
        value = values[index]
        if isinstance(ty, str) and ty.startswith("*"):
            if index >= len(tensors) or not isinstance(value, torch.Tensor):
                return None
            tensor_slots.append(len(slots))
            slots.append(0)
        elif ty in _SCALAR_FORMATS and not isinstance(value, torch.Tensor):
            slots.append(int.from_bytes(struct.pack(_SCALAR_FORMATS[ty], value).ljust(8, b"\0"), "little"))
        else:
            return None
    if len(tensor_slots) != len(tensors):
        return None
    slots += [0] * n_scratch
    meta = compiled.metadata
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    return ext.KernelLaunch(compiled.function, grid3, 32 * meta.num_warps, meta.shared, slots, tensor_slots,
                            bool(getattr(run, "launch_pdl", False)))
