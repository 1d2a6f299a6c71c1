"""Eager calls of ``moda_attention`` without the op dispatcher: the same kernels, less host time.

Why this exists: ``torch.ops.moda.attention`` is a Python custom op. Every call through it
pays the dispatcher, the op's Python kernel and, with autograd, torch.library's autograd
wrapper and ``setup_context``; on top of that the call validates its inputs and picks a
backend twice (once at the public entry, once in the op). For the kernels of a small layer
that host time is most of the step (docs/performance.md, "Host time per call").

Outside ``torch.compile``, fake tensors, dispatch or torch-function modes and functorch
transforms, nobody needs the op object: :func:`attention` runs the backend directly through
one ``torch.autograd.Function`` (or none, where no input needs a gradient), and
:func:`with_kvcache` the decode kernel. Why the result is the op's result, bit for bit:

* the backend is chosen by the same ``dispatch.resolve`` with the same arguments, and runs
  the same ``forward`` / ``backward`` callables with the same scale;
* the outputs get the same dtype and contiguity treatment as in ``ops`` (``finish_forward``,
  ``finish_backward`` are shared), and the same checks run (``check_call``) before a key is
  cached;
* what is cached is only what is a pure function of the cache key: the validated sizes,
  the scale, and each direction's backend. The key holds every input of ``check_inputs`` and
  ``resolve`` that can vary between calls: each tensor's shape, strides, dtype, device and
  whether its data pointer is 16-byte aligned (the CUDA kernels' TMA condition), the
  options, the backend asked for, the two environment switches, and the auto order. A
  call that fails validation raises before anything is cached. Calls on CPU tensors are
  not cached (they run the reference, whose host time is irrelevant, and tests patch the
  machine's capabilities there).

``cu_seqlens`` is checked on every call (its values are read once per tensor version by
``packed_documents``, as in the op).
"""

from __future__ import annotations

import os

import torch
from torch.autograd.function import once_differentiable

from . import dispatch
from ._spec import MoDAShape, check_cu_seqlens, check_max_seqlen_alone, default_scale, packed_documents
from .kvcache_op import kvcache_backend, kvcache_runner, run_with_kvcache
from .ops import check_call, finish_backward, finish_forward



class Plan:
    """What a call's key determines: its sizes, scale, the backend name asked for, the
    forward's backend and (resolved at the first backward, as the op does it) the backward's.
    Holds no tensors."""

    __slots__ = ("shape", "scale", "requested", "forward_backend", "_backward_backend")

    def __init__(self, shape: MoDAShape, scale: float, requested: str, forward_backend: "dispatch.Backend"):
        self.shape, self.scale, self.requested, self.forward_backend = shape, scale, requested, forward_backend
        self._backward_backend = None

    def backward_backend(self, tensors) -> "dispatch.Backend":
        """The backward's backend, resolved on this call's tensors (any call of the key gives the same)."""
        if self._backward_backend is None:
            self._backward_backend = dispatch.resolve(self.requested, tensors[0], self.shape, tensors,
                                                      direction="backward")
        return self._backward_backend


_plans: dict = {}


def usable(q: torch.Tensor) -> bool:
    """True where the op object is not needed: plain eager tensors, no tracing or modes."""
    return (type(q) is torch.Tensor and not torch.compiler.is_compiling()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled()
            and torch._C._functorch.peek_interpreter_stack() is None)


# The two environment switches, read raw: os.environ.get encodes the name and decodes the
# value on every call, which is a sixth of a cached call's key (POSIX keeps bytes in _data).
_RAW_ENV = getattr(os.environ, "_data", None) if os.name == "posix" else None
_ENV_NAMES = (dispatch.ENV_VAR, dispatch.CUDA_BACKWARD_ENV)
_RAW_ENV_NAMES = tuple(os.fsencode(name) for name in _ENV_NAMES)


def _env_switches():
    if _RAW_ENV is not None:
        return _RAW_ENV.get(_RAW_ENV_NAMES[0]), _RAW_ENV.get(_RAW_ENV_NAMES[1])
    return os.environ.get(_ENV_NAMES[0]), os.environ.get(_ENV_NAMES[1])


def _key(tensors, options):
    """The cache key of a call on CUDA tensors (None: not cached). Flat, built inline: it is
    most of the host time of a cached call."""
    q = tensors[0]
    if not q.is_cuda:
        return None
    key = [options, _env_switches(), dispatch._AUTO_ORDER]
    for t in tensors:
        if t is None:
            key.append(None)
        elif type(t) is not torch.Tensor:  # a subclass: never cached (its layout may mean anything)
            return None
        else:  # the device of each tensor is checked against q's: it is part of the key too
            key.append((t.shape, t.stride(), t.dtype, t.device, t.data_ptr() % dispatch.TMA_ALIGN_BYTES == 0))
    return tuple(key)


def _plan(tensors, scale, causal, depth_chunk, deterministic, backend, cu_seqlens, max_seqlen) -> Plan:
    key = None
    # Options of a wrong type are never cached: True == 1 == 1.0 in a key, and the checks
    # must still refuse causal=1 or depth_chunk=True after a valid call cached its plan (nor
    # can an unhashable one be looked up: the checks say what is wrong with it).
    if type(causal) is bool and type(deterministic) is bool and type(depth_chunk) is int \
            and type(scale) in (type(None), int, float) and type(backend) is str:
        key = _key(tensors, (type(scale), scale, causal, depth_chunk, deterministic, backend, cu_seqlens is None))
    plan = _plans.get(key) if key is not None else None
    if plan is not None:
        return plan
    shape = check_call(*tensors, scale, causal, depth_chunk, deterministic, backend, cu_seqlens, max_seqlen)
    plan = Plan(shape, default_scale(shape.head_dim, scale), backend,
                dispatch.resolve(backend, tensors[0], shape, tensors))
    if key is not None:
        _plans[key] = plan
    return plan


def plan_call(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend, cu_seqlens=None,
              max_seqlen=None):
    """The call's :class:`Plan` and packed documents (None without ``cu_seqlens``); raises on an
    invalid call as the op's checks do."""
    tensors = (q, k, v, depth_k, depth_v)
    plan = _plan(tensors, scale, causal, depth_chunk, deterministic, backend, cu_seqlens, max_seqlen)
    documents = None
    if cu_seqlens is not None:
        check_cu_seqlens(q, cu_seqlens, max_seqlen)
        documents = packed_documents(cu_seqlens, plan.shape.seqlen, max_seqlen)
    else:  # (not part of the plan's key)
        check_max_seqlen_alone(cu_seqlens, max_seqlen)
    return plan, documents


def forward(plan: Plan, q, k, v, depth_k, depth_v, causal, depth_chunk, documents):
    """``(out, lse)`` by the plan's forward backend, as the op returns them."""
    out, lse = plan.forward_backend.forward(q, k, v, depth_k, depth_v, plan.scale, causal, depth_chunk, documents)
    return finish_forward(q, out, lse)


def _needs_grad(tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, depth_k, depth_v, plan, causal, depth_chunk, deterministic, documents):
        out, lse = forward(plan, q, k, v, depth_k, depth_v, causal, depth_chunk, documents)
        ctx.save_for_backward(q, k, v, depth_k, depth_v, out, lse)
        ctx.options = (plan, causal, depth_chunk, deterministic, documents)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, grad_lse):
        q, k, v, depth_k, depth_v, out, lse = ctx.saved_tensors
        plan, causal, depth_chunk, deterministic, documents = ctx.options
        if grad_out is None:  # only lse was used
            grad_out = torch.zeros_like(out)
        backend = plan.backward_backend((q, k, v, depth_k, depth_v))
        grads = backend.backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, plan.scale, causal,
                                 depth_chunk, deterministic, documents)
        return finish_backward(grads) + (None,) * 5


def attention(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend, cu_seqlens=None,
              max_seqlen=None):
    """``(out, lse)`` of the op, run directly (the caller checked :func:`usable`)."""
    plan, documents = plan_call(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend,
                                cu_seqlens, max_seqlen)
    if not _needs_grad((q, k, v, depth_k, depth_v)):  # inference: no autograd node to build
        return forward(plan, q, k, v, depth_k, depth_v, causal, depth_chunk, documents)
    return _Attention.apply(q, k, v, depth_k, depth_v, plan, causal, depth_chunk, deterministic, documents)


_decode_impls: dict = {}


def with_kvcache(q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale, depth_chunk, backend):
    """``(out, lse)`` of ``torch.ops.moda.attention_with_kvcache``, run directly (the caller
    checked :func:`usable`). A decode step repeats one layout for every token and layer, so
    its validation, backend choice and the kernel's launch arguments but the addresses (a
    pure function of the key, as for :func:`attention`; ``kvcache_op.kvcache_runner``) are cached;
    the cache is written by the kernel in place either way."""
    tensors = (q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens)
    key = None
    if type(depth_chunk) is int and (scale is None or type(scale) is float) and type(backend) is str:
        key = _key(tensors, ("kvcache", scale, depth_chunk, backend))
    run = _decode_impls.get(key) if key is not None else None
    if run is None:
        impl = kvcache_backend(q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale, depth_chunk,
                               backend)
        if key is None:
            return run_with_kvcache(impl, q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale)
        run = _decode_impls[key] = kvcache_runner(impl, q, k_cache, v_cache, depth_k, depth_v, k, v, scale)
    return run(q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens)
