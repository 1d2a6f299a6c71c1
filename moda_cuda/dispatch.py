"""Backend registry and selection: which implementation runs a given MoDA call.

Backends:

* ``triton`` -- the Triton kernels, forward and backward, on CUDA tensors.
* ``cuda`` -- the compiled Hopper kernels (``moda_cuda._C``, CUTLASS/CuTe), forward and
  backward; ``MODA_CUDA_BACKWARD=triton`` runs the Triton backward after the compiled forward
  instead (it reads the same ``lse``). Needs the extension built, a compute capability 9.0
  device, float16/bfloat16, D in {64, 128}, G in {1, 2, 4, 8, 16}, L <= 256 and TMA-friendly
  layouts (see ``_cuda_refuses``).
* ``reference`` -- pure PyTorch; serves every valid input.

``backend="auto"`` chooses each direction by its own measured speed (H200; README,
docs/performance.md). The forward: cuda, then triton, then the reference, except where the depth
part is a large share of the work (``cuda_depth_share``): there triton goes first. The
backward: cuda, then triton, then the reference, whichever forward ran (the compiled
backward measured faster on every benchmark shape, and reads any forward's ``out`` and
``lse``). The Triton kernels also serve what the compiled kernels do not (other head dims,
float32, other GPUs). Auto never fails on a valid input because a fast path does not cover
it: it takes the next one, and when that is the reference it warns once per reason (a
refusal that another fast path absorbs is silent). A backend named explicitly (argument or
``MODA_BACKEND``) that cannot serve the input raises.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import torch

from . import _cuda_ext
from ._spec import MAX_INT32, MoDAShape, effective_depth_chunk
from .reference import moda_attention_ref, moda_attention_ref_backward

ENV_VAR = "MODA_BACKEND"
_warned: set = set()


@dataclass(frozen=True, eq=False)
class Backend:
    """One implementation of the op. ``unavailable``/``refuses`` return a reason, or None.

    ``backward_by`` says which implementation is behind ``backward`` when that can be another
    backend's (the cuda backend's backward is Triton's with MODA_CUDA_BACKWARD=triton).

    Compared and hashed by identity (each backend is one object): the auto order is part of
    every cached call's key (``eager``), and a field-wise hash would hash six fields of each
    backend on every call.
    """

    name: str
    unavailable: Callable[[], Optional[str]]
    refuses: Callable[[torch.Tensor, MoDAShape, Tuple[Optional[torch.Tensor], ...]], Optional[str]]
    forward: Callable
    backward: Callable
    backward_by: Optional[Callable[[], str]] = None

    @property
    def backward_name(self) -> str:
        """Which implementation computes the gradients of this backend's forward."""
        return self.backward_by() if self.backward_by is not None else self.name


# ----------------------------------------------------------------------------- reference


def _packed(documents) -> dict:
    return {} if documents is None else dict(cu_seqlens=documents.cu_seqlens, max_seqlen=documents.max_seqlen)


def _ref_forward(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, documents=None):
    return moda_attention_ref(q, k, v, depth_k, depth_v, scale=scale, causal=causal, depth_chunk=depth_chunk,
                              return_lse=True, **_packed(documents))


def _ref_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk,
                  deterministic, documents=None):
    return moda_attention_ref_backward(grad_out, q, k, v, depth_k, depth_v, out, lse, scale=scale, causal=causal,
                                       depth_chunk=depth_chunk, grad_lse=grad_lse, **_packed(documents))


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


def _int32_offsets_refuse(tensors) -> Optional[str]:
    for t in tensors:
        # The Triton kernels offset the batch in int64 and everything inside one batch entry in
        # int32: the inputs' spans, and the outputs and gradients they allocate contiguous (as
        # large as an input's elements, whatever its strides: an expanded input spans less).
        if t is not None and (sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:])) > MAX_INT32
                              or math.prod(t.shape[1:]) > MAX_INT32):
            return "one batch entry spans more than 2**31 elements (int32 offsets)"
    return None


# CUDA caps a grid's y and z dimensions: the kernels put the kv heads and the batch there
# (the compiled forward and dQ kernel: y, z; Triton: B x Hk on y).
_GRID_YZ_MAX = 65535


def _triton_refuses(q: torch.Tensor, shape: MoDAShape, tensors) -> Optional[str]:
    if q.device.type != "cuda" and not (q.device.type == "cpu" and _interpreting()):
        return f"inputs are on {q.device.type}; the Triton kernels need CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not supported (float16, bfloat16, float32 are)"
    if shape.head_dim > 256:
        return f"head_dim {shape.head_dim} > 256"
    if shape.batch * shape.kv_heads > _GRID_YZ_MAX:
        return f"B x Hk = {shape.batch * shape.kv_heads} > {_GRID_YZ_MAX} (the kernels' grid dimension)"
    return _int32_offsets_refuse(tensors)


def _last_dim_contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    # Kernels read rows as contiguous vectors; any other stride is honoured without a copy.
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def _triton_forward(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, documents=None):
    from .triton_ref import moda_fwd

    q, k, v, depth_k, depth_v = map(_last_dim_contiguous, (q, k, v, depth_k, depth_v))
    return moda_fwd(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, documents)


def _triton_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk,
                     deterministic, documents=None):
    from .triton_ref import moda_bwd

    tensors = (grad_out, q, k, v, depth_k, depth_v, out)
    grad_out, q, k, v, depth_k, depth_v, out = map(_last_dim_contiguous, tensors)
    # The Triton backward is deterministic by construction (no atomics), whatever is asked.
    return moda_bwd(grad_out, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk, grad_lse=grad_lse,
                    documents=documents)


TRITON = Backend("triton", _triton_unavailable, _triton_refuses, _triton_forward, _triton_backward)

# ----------------------------------------------------------------------------- cuda
# What the compiled kernels (csrc/) accept; _cuda_refuses mirrors the checks of _C.fwd.

CUDA_CAPABILITY = (9, 0)  # sm_90a: wgmma and TMA
CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_HEAD_DIMS = (64, 128)
CUDA_GROUPS = (1, 2, 4, 8, 16)
CUDA_MAX_DEPTH = 256
TMA_ALIGN_BYTES = 16
_TMA_STRIDE_ELEMS = 8  # 16 bytes of float16/bfloat16
_TENSOR_NAMES = ("q", "k", "v", "depth_k", "depth_v")


@functools.lru_cache(maxsize=None)
def _cuda_capability_of(index: int) -> Tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _device_capability(device: torch.device) -> Optional[Tuple[int, int]]:
    """Compute capability of a CUDA device; None for any other device type."""
    if device.type != "cuda":
        return None
    return _cuda_capability_of(device.index if device.index is not None else torch.cuda.current_device())


def _capability_reason(cap: Tuple[int, int], where: str) -> Optional[str]:
    if tuple(cap) == CUDA_CAPABILITY:
        return None
    return (f"{where} has compute capability {cap[0]}.{cap[1]}; the CUDA kernels are compiled for "
            f"{CUDA_CAPABILITY[0]}.{CUDA_CAPABILITY[1]} (sm_90a) only")


def _cuda_unavailable() -> Optional[str]:
    if _cuda_ext.load() is None:
        return f"the CUDA extension moda_cuda._C is {_cuda_ext.load_error()}" \
            if _cuda_ext.load_error() == _cuda_ext.NOT_BUILT else f"moda_cuda._C {_cuda_ext.load_error()}"
    if not torch.cuda.is_available():
        return "no CUDA device"
    return _capability_reason(_device_capability(torch.device("cuda")), f"device {torch.cuda.get_device_name()}")


def _layout_refuses(name: str, t: torch.Tensor) -> Optional[str]:
    if t.stride(-1) != 1:
        return f"{name} has stride {t.stride(-1)} in its last dim; the CUDA kernel needs it contiguous (TMA)"
    if any(st == 0 and n > 1 for n, st in zip(t.shape, t.stride())):  # expanded: not known to TMA's encoder
        return f"{name} has a stride of 0 (an expanded tensor); the CUDA kernel's TMA maps take none"
    if any(st % _TMA_STRIDE_ELEMS != 0 for st in t.stride()[:-1]):
        return (f"{name} has strides {tuple(t.stride())}; the CUDA kernel needs every stride but the last to be a "
                f"multiple of {_TMA_STRIDE_ELEMS} elements (16 bytes, TMA)")
    # An empty depth tensor (L = 0) is never read: the kernel ignores its pointer.
    if t.numel() > 0 and t.data_ptr() % TMA_ALIGN_BYTES != 0:
        return f"{name}'s data pointer is not {TMA_ALIGN_BYTES}-byte aligned (TMA)"
    return None


def _cuda_refuses(q: torch.Tensor, shape: MoDAShape, tensors) -> Optional[str]:
    cap = _device_capability(q.device)
    if cap is None:
        return f"inputs are on {q.device.type}; the CUDA kernels need CUDA tensors"
    reason = _capability_reason(cap, f"device {q.device}")
    if reason:
        return reason
    if q.dtype not in CUDA_DTYPES:
        return f"dtype {q.dtype} is not supported by the CUDA kernel (float16, bfloat16 are)"
    if shape.head_dim not in CUDA_HEAD_DIMS:
        return (f"head_dim {shape.head_dim} is not compiled for the CUDA kernel "
                f"({', '.join(map(str, CUDA_HEAD_DIMS))} are)")
    if shape.group not in CUDA_GROUPS:
        return (f"G = Hq/Hk = {shape.group} is not compiled for the CUDA kernel "
                f"({', '.join(map(str, CUDA_GROUPS))} are)")
    if shape.depth > CUDA_MAX_DEPTH:
        return f"depth L = {shape.depth} > {CUDA_MAX_DEPTH}, the CUDA kernel's maximum"
    if shape.batch > _GRID_YZ_MAX or shape.kv_heads > _GRID_YZ_MAX:
        return f"B = {shape.batch} or Hk = {shape.kv_heads} > {_GRID_YZ_MAX} (the kernels' grid dimensions)"
    for name, t in zip(_TENSOR_NAMES, tensors):
        if t is not None:
            reason = _layout_refuses(name, t)
            if reason:
                return reason
    # The Triton backward (MODA_CUDA_BACKWARD=triton) offsets in int32: refuse what it cannot
    # take, so that either backward serves every input this backend accepts.
    return _int32_offsets_refuse(tensors)


def _document_bounds(documents):
    """(doc_start, doc_end) of packed documents, each position's, as the kernels read them."""
    return documents.bounds() if documents is not None else (None, None)


def _cuda_forward(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, documents=None):
    ext = _cuda_ext.load()
    B, T, Hq, D = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)  # (cheaper on the host than torch.empty)
    lse = torch.empty((B, Hq, T), device=q.device, dtype=torch.float32)
    ext.fwd(q, k, v, depth_k, depth_v, out, lse, float(scale), bool(causal), effective_depth_chunk(depth_chunk, T),
            *_document_bounds(documents))
    return out, lse


# The cuda backend's gradients come from the compiled backward (csrc/moda_bwd*.h: all five
# gradients), validated on the H200 (bench/validate_bwd.py, pytest -m cuda) and faster there
# than the Triton one (README). Where bwd_fuses_dq (csrc/moda_bwd_config.h) says so, its
# dK / dV kernel also accumulates dQ with fp32 atomics (run-to-run differences in dQ's last
# bits); elsewhere, and always with deterministic=True, dQ comes from a kernel of its own,
# with no atomics. MODA_CUDA_BACKWARD=triton selects the Triton backward instead, which
# reads the compiled forward's out and lse as they are.
CUDA_BACKWARD_ENV = "MODA_CUDA_BACKWARD"


def cuda_backward_by() -> str:
    """``"cuda"`` (default) or ``"triton"``: which kernels compute the cuda backend's gradients."""
    choice = os.environ.get(CUDA_BACKWARD_ENV, "").strip() or "cuda"
    if choice not in ("triton", "cuda"):
        raise ValueError(f"{CUDA_BACKWARD_ENV}={choice!r}; allowed: triton, cuda")
    return choice


def _compiled_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk,
                       deterministic, depth_grads_into=None, documents=None, accumulate_depth_grads=True):
    ext = _cuda_ext.load()
    if _layout_refuses("grad_out", grad_out):
        grad_out = grad_out.contiguous()  # dO is loaded with TMA, like q
    # With depth_grads_into the kernel writes the depth gradients into those (any even strides),
    # adding them to what they hold where accumulate_depth_grads.
    outputs = (q, k, v) if depth_grads_into is not None else (q, k, v, depth_k, depth_v)
    grads = [torch.empty_like(t, memory_format=torch.contiguous_format) if t is not None else None for t in outputs]
    if depth_grads_into is not None:
        grads += depth_grads_into
    glse = None if grad_lse is None else grad_lse.float().contiguous()
    ext.bwd(q, k, v, depth_k, depth_v, out, lse, grad_out, glse, *grads, float(scale), bool(causal),
            effective_depth_chunk(depth_chunk, q.shape[1]), bool(deterministic),
            depth_grads_into is not None and bool(accumulate_depth_grads),
            *_document_bounds(documents))
    return tuple(grads)


def _cuda_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk,
                   deterministic, documents=None):
    if cuda_backward_by() == "cuda":
        return _compiled_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, scale, causal,
                                  depth_chunk, deterministic, documents=documents)
    reason = _triton_unavailable()
    if reason:
        raise RuntimeError(f"the cuda backend's backward runs the Triton kernels, which are unavailable: {reason}")
    return _triton_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk,
                            deterministic, documents)


CUDA = Backend("cuda", _cuda_unavailable, _cuda_refuses, _cuda_forward, _cuda_backward,
               backward_by=cuda_backward_by)


def backward_into_depth_sums(backend: Backend, grad_out, q, k, v, depth_k, depth_v, out, lse, scale, causal,
                             depth_chunk, deterministic, depth_grads_into, documents=None, accumulate=True):
    """``backend``'s gradients of q, k, v; those of depth_k and depth_v are added into the two
    tensors of ``depth_grads_into`` (shaped like depth_k, depth_v; any strides) instead of
    returned, or stored there where not ``accumulate``. The compiled backward writes them in its
    epilogue, so they never exist on their own; the other backends compute them and they are
    added (copied) here."""
    if backend is CUDA and cuda_backward_by() == "cuda":
        grads = _compiled_backward(grad_out, None, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk,
                                   deterministic, depth_grads_into, documents,
                                   accumulate_depth_grads=accumulate)
    else:
        grads = backend.backward(grad_out, None, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk,
                                 deterministic, documents)
        for into, grad in zip(depth_grads_into, grads[3:]):
            if accumulate:
                into.add_(grad)
            else:
                into.copy_(grad)
    return grads[:3]


# ----------------------------------------------------------------------------- selection

BACKENDS = {b.name: b for b in (TRITON, CUDA, REFERENCE)}
# Fast paths tried before the reference, fastest first (forward times on the H200: README).
_AUTO_ORDER = (CUDA, TRITON)

# The compiled forward's sequence loop is faster than Triton's; its depth tiles are dense, as
# Triton's are: a consumer warpgroup multiplies its 64 rows (64 / G positions) by every depth
# row of those positions. The depth share below is those dense depth columns over the
# sequence keys a row reads (T / 2 on average, causal). Where it is large, the forward is
# mostly depth tiles, which nothing measured so far shows Triton doing faster:
#   H200, bf16, causal forward (docs/performance.md):
#     share 1/16 (T=16384, G=8, L=64, D=64)  cuda faster
#     share 1/8  (T=8192,  G=4, L=32, D=128) cuda faster
#     shares 0.13-0.24 (T=4096, G=4, L=17..31, D=64: the depth-stream benchmark's layers)
#                                            cuda faster: 10.28 against 12.03 ms for the
#                                            32-layer stack's forward (depth_stream/, at 5fe62d2)
#     share 1/4  (T=4096,  G=8, L=64, D=64)  cuda 0.465 against triton 0.664 ms
#   H100, bench/bench_sweep.py (Triton with its first config, MODA_TRITON_TUNING=off):
#     share 1/2  (B=4 T=4096 G=2 L=32 D=128)  cuda 0.976 against triton 1.346 ms
#     share 1/2  (B=4 T=4096 G=4 L=64 D=128)  cuda 2.079 against triton 2.651 ms
#     share 1    (B=4 T=4096 G=1 L=32 D=128)  cuda 0.810 against triton 1.172 ms
#     share 2    (B=4 T=4096 G=4 L=256 D=128) cuda 5.834 against triton 6.817 ms
#     share 2    (B=4 T=4096 G=1 L=64 D=64)   cuda 0.880 against triton 1.106 ms
# cuda's lead does not vanish as the share grows (30% at 1/4, 27-45% at 1/2 and 1, 17-26%
# at 2). So cuda up to share 2, the largest measured; above it triton, pending a measurement.
_CUDA_DEPTH_SHARE_LIMIT = 2.0


def cuda_depth_share(shape: MoDAShape) -> float:
    """Dense depth columns per query row of the compiled forward over its average sequence keys."""
    if not shape.has_seq:
        return float("inf")
    return (64 / shape.group) * shape.depth / max(shape.seqlen / 2, 1)


DIRECTIONS = ("forward", "backward")


# Below this many forward FLOPs the GPU runs a call in a few microseconds and the host time
# per call decides, even where the share rule would put Triton first (share > 2): measured
# on the H100 at B=1 T=64 Hq=8 Hk=2 D=64 L=4, the compiled forward costs 36 us of host time
# per call, Triton's 122 us (bench/host_overhead.py). 2 GFLOP is about 10 us of GPU time at
# a small kernel's 200 TFLOP/s, so a faster Triton kernel cannot win back its 85 us there.
_HOST_BOUND_FLOPS = 2e9


def forward_flops(shape: MoDAShape) -> float:
    """Useful forward FLOPs of a causal call: 4 * B * Hq * D * T * (T / 2 + L)."""
    pairs = shape.seqlen * ((shape.seqlen / 2 if shape.has_seq else 0) + shape.depth)
    return 4.0 * shape.batch * shape.q_heads * shape.head_dim * pairs


def _auto_order(shape: MoDAShape, direction: str = "forward") -> Tuple["Backend", ...]:
    """``_AUTO_ORDER``; for the forward, with the compiled forward moved last where its depth
    share is large (the compiled backward is the faster one at every measured share), unless
    the call is so small that host time decides."""
    if (direction == "backward" or cuda_depth_share(shape) <= _CUDA_DEPTH_SHARE_LIMIT
            or forward_flops(shape) < _HOST_BOUND_FLOPS):
        return _AUTO_ORDER
    return tuple(b for b in _AUTO_ORDER if b is not CUDA) + tuple(b for b in _AUTO_ORDER if b is CUDA)


def available_backends() -> list:
    """Names of the backends that can run on this machine, in auto's order of preference."""
    return [b.name for b in (*_AUTO_ORDER, REFERENCE) if b.unavailable() is None]


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


def resolve(requested: str, q: torch.Tensor, shape: MoDAShape, tensors, direction: str = "forward") -> Backend:
    """The backend that runs this call's ``direction`` (see the module docstring for the policy)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
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
    refusals = []
    for backend in _auto_order(shape, direction):
        if backend.unavailable() is not None:
            continue
        reason = backend.refuses(q, shape, tensors)
        if reason is None:
            return backend  # a faster path's refusal is no news when another fast path serves
        refusals.append((backend.name, reason))
    for name, reason in refusals:
        _warn_once((name, reason), f"moda_cuda: {name} backend skipped ({reason}); "
                                   "falling back to the reference implementation")
    return REFERENCE
