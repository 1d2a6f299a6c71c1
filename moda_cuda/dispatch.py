"""Backend registry and selection: which implementation runs a given MoDA call.

Order of preference for ``backend="auto"``: the Triton kernels for CUDA tensors, then the
pure-PyTorch reference, which serves every valid input. ``auto`` never fails on a valid input
because a fast path does not cover it: it falls back and warns once per reason. A backend
named explicitly (argument or ``MODA_BACKEND``) that cannot serve the input raises.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from ._spec import MoDAShape
from .reference import moda_attention_ref, moda_attention_ref_backward

ENV_VAR = "MODA_BACKEND"
_MAX_INT32 = 2**31 - 1
_warned: set = set()


@dataclass(frozen=True)
class Backend:
    """One implementation of the op. ``unavailable``/``refuses`` return a reason, or None."""

    name: str
    unavailable: Callable[[], Optional[str]]
    refuses: Callable[[torch.Tensor, MoDAShape, Tuple[Optional[torch.Tensor], ...]], Optional[str]]
    forward: Callable
    backward: Callable


# ----------------------------------------------------------------------------- reference


def _ref_forward(q, k, v, depth_k, depth_v, scale, causal, depth_chunk):
    return moda_attention_ref(q, k, v, depth_k, depth_v, scale=scale, causal=causal, depth_chunk=depth_chunk,
                              return_lse=True)


def _ref_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk,
                  deterministic):
    return moda_attention_ref_backward(grad_out, q, k, v, depth_k, depth_v, out, lse, scale=scale, causal=causal,
                                       depth_chunk=depth_chunk, grad_lse=grad_lse)


REFERENCE = Backend("reference", lambda: None, lambda q, shape, tensors: None, _ref_forward, _ref_backward)

# ----------------------------------------------------------------------------- triton


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_unavailable() -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if not (torch.cuda.is_available() or _interpreting()):
        return "no CUDA device (and TRITON_INTERPRET=1 is not set)"
    return None


def _triton_refuses(q: torch.Tensor, shape: MoDAShape, tensors) -> Optional[str]:
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _interpreting()):
        return f"inputs are on {q.device.type}; the Triton kernels need CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32 are)"
    if shape.head_dim > 256:
        return f"head_dim {shape.head_dim} > 256"
    for t in tensors:
        # Kernels offset the batch in int64 and everything inside one batch entry in int32.
        if t is not None and sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) > _MAX_INT32:
            return "one batch entry spans more than 2**31 elements (int32 offsets)"
    return None


def _last_dim_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Kernels read rows as contiguous vectors; any other stride is honoured without a copy.
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _triton_forward(q, k, v, depth_k, depth_v, scale, causal, depth_chunk):
    from .triton_ref import moda_fwd

    q, k, v, depth_k, depth_v = map(_last_dim_contiguous, (q, k, v, depth_k, depth_v))
    return moda_fwd(q, k, v, depth_k, depth_v, scale, causal, depth_chunk)


def _triton_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk,
                     deterministic):
    from .triton_ref import moda_bwd

    tensors = (grad_out, q, k, v, depth_k, depth_v, out)
    grad_out, q, k, v, depth_k, depth_v, out = map(_last_dim_contiguous, tensors)
    # The Triton backward is deterministic by construction (no atomics), whatever is asked.
    return moda_bwd(grad_out, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk, grad_lse=grad_lse)


TRITON = Backend("triton", _triton_unavailable, _triton_refuses, _triton_forward, _triton_backward)

# ----------------------------------------------------------------------------- selection

BACKENDS = {b.name: b for b in (TRITON, REFERENCE)}
_AUTO_ORDER = (TRITON,)  # fast paths tried before the reference, fastest first


def available_backends() -> list:
    """Names of the backends that can run on this machine, fastest first."""
    return [name for name, b in BACKENDS.items() if b.unavailable() is None]


def _named(name: str) -> Backend:
    if name not in BACKENDS:
        allowed = ", ".join(["auto", *BACKENDS])
        raise ValueError(f"unknown MoDA backend {name!r}; allowed: {allowed}")
    return BACKENDS[name]


def check_backend_name(name: str) -> None:
    if name != "auto":
        _named(name)


def _warn_once(key: Tuple[str, str], message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def resolve(requested: str, q: torch.Tensor, shape: MoDAShape, tensors) -> Backend:
    """The backend that runs this call (see the module docstring for the policy)."""
    if requested == "auto":
        requested = os.environ.get(ENV_VAR, "").strip() or "auto"
    if requested != "auto":
        _named(requested)  # an unknown name is an error even where no kernel would run
    if not shape.has_keys:  # depth-only with L = 0: nothing visible, the reference's zeros / -inf
        return REFERENCE
    if requested != "auto":
        backend = _named(requested)
        reason = backend.unavailable() or backend.refuses(q, shape, tensors)
        if reason:
            raise ValueError(f"MoDA backend {requested!r} cannot run this input: {reason}")
        return backend
    if not q.is_cuda:  # the fast paths are GPU kernels (the Triton interpreter is for testing only)
        return REFERENCE
    for backend in _AUTO_ORDER:
        if backend.unavailable() is not None:
            continue
        reason = backend.refuses(q, shape, tensors)
        if reason is None:
            return backend
        _warn_once((backend.name, reason), f"moda_cuda: {backend.name} backend skipped ({reason}); "
                                           "falling back to the reference implementation")
    return REFERENCE
