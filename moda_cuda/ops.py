"""``torch.ops.moda``: the MoDA attention operator, its fake implementation and its autograd.

* ``moda::attention`` -- the public op; ``backend="auto"`` policy (``MODA_BACKEND`` honoured).
* ``moda::attention_with_backend`` -- the same op with the backend named, used when a caller
  asks for one explicitly (``moda_attention(..., backend="triton")``).
* ``moda::attention_backward`` -- gradients of both: by the backend named, or with "auto" by
  the backend auto picks for the backward (``dispatch``), which need not be the forward's.
* ``moda::attention_varlen`` / ``moda::attention_varlen_backward`` -- the same for documents
  packed into batch 1 (``cu_seqlens``, ``max_seqlen`` as in flash-attn's varlen API).

The decode op, ``moda::attention_with_kvcache``, is registered by ``kvcache_op``.

``deterministic=True`` asks for bitwise-repeatable gradients: the compiled backward then
computes dQ without atomics; the Triton and reference backwards are deterministic by
construction, so for them it changes nothing.

The kernels are registered for CPU and CUDA; each resolves its backend at run time, so
``torch.compile`` sees one opaque op with a fake implementation and no graph break.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import dispatch
from ._spec import (MoDAShape, check_cu_seqlens, check_inputs, check_max_seqlen_alone, default_scale, lse_dtype,
                    packed_documents)

_ARGS = "Tensor q, Tensor? k, Tensor? v, Tensor? depth_k, Tensor? depth_v, float? scale=None, " \
        "bool causal=True, int depth_chunk=1, bool deterministic=False"
_FWD_OUT = "(Tensor out, Tensor lse)"
_BWD_SCHEMA = (
    "(Tensor grad_out, Tensor grad_lse, Tensor q, Tensor? k, Tensor? v, Tensor? depth_k, Tensor? depth_v, "
    "Tensor out, Tensor lse, float? scale, bool causal, int depth_chunk, bool deterministic, str backend) -> "
    "(Tensor grad_q, Tensor grad_k, Tensor grad_v, Tensor grad_depth_k, Tensor grad_depth_v)"
)

torch.library.define("moda::attention", f"({_ARGS}) -> {_FWD_OUT}")
torch.library.define("moda::attention_with_backend", f"({_ARGS}, str backend='auto') -> {_FWD_OUT}")
torch.library.define("moda::attention_backward", _BWD_SCHEMA)
_PACKED = "Tensor cu_seqlens, int? max_seqlen"
torch.library.define("moda::attention_varlen",
                     "(Tensor q, Tensor? k, Tensor? v, Tensor? depth_k, Tensor? depth_v, " + _PACKED + "=None, "
                     "float? scale=None, bool causal=True, int depth_chunk=1, bool deterministic=False, "
                     f"str backend='auto') -> {_FWD_OUT}")
torch.library.define("moda::attention_varlen_backward",
                     _BWD_SCHEMA.replace("Tensor lse, ", f"Tensor lse, {_PACKED}, "))


def _problem(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, cu_seqlens, max_seqlen):
    """The validated sizes of a call and its packed documents (None without cu_seqlens)."""
    shape = check_inputs(q, k, v, depth_k, depth_v, scale, causal, depth_chunk)
    if cu_seqlens is None:
        return shape, None
    check_cu_seqlens(q, cu_seqlens, max_seqlen)
    return shape, packed_documents(cu_seqlens, shape.seqlen, max_seqlen)


def _forward(q, k, v, depth_k, depth_v, scale=None, causal=True, depth_chunk=1, deterministic=False, backend="auto",
             cu_seqlens=None, max_seqlen=None):
    shape, docs = _problem(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, cu_seqlens, max_seqlen)
    impl = dispatch.resolve(backend, q, shape, (q, k, v, depth_k, depth_v))
    out, lse = impl.forward(q, k, v, depth_k, depth_v, default_scale(shape.head_dim, scale), causal, depth_chunk,
                            docs)
    return finish_forward(q, out, lse)


def finish_forward(q: torch.Tensor, out: torch.Tensor, lse: torch.Tensor):
    """Outputs contiguous whatever the backend (the fake implementation promises it), lse in
    float32 (float64 for float64 inputs). A conversion that changes nothing is not called:
    ``Tensor.to`` costs a microsecond of host time even then."""
    want = lse_dtype(q.dtype)
    return out.contiguous(), (lse if lse.dtype == want else lse.to(want)).contiguous()


def finish_backward(grads):
    """Gradients contiguous; an absent input's gradient stays None."""
    return tuple(None if g is None else g.contiguous() for g in grads)


def _fake_forward(q, k, v, depth_k, depth_v, scale=None, causal=True, depth_chunk=1, deterministic=False,
                  backend="auto"):
    B, T, Hq, D = q.shape
    return q.new_empty((B, T, Hq, D)), q.new_empty((B, Hq, T), dtype=lse_dtype(q.dtype))


def _varlen_forward(q, k, v, depth_k, depth_v, cu_seqlens, max_seqlen=None, scale=None, causal=True, depth_chunk=1,
                    deterministic=False, backend="auto"):
    return _forward(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend, cu_seqlens,
                    max_seqlen)


def _fake_varlen_forward(q, k, v, depth_k, depth_v, cu_seqlens, *args, **kwargs):
    return _fake_forward(q, k, v, depth_k, depth_v)


def _check_forward_results(q, grad_out, grad_lse, out, lse) -> None:
    """The forward's results and their gradients, as the backward op is called with them
    directly (autograd passes the forward's own): shapes and devices, before any kernel."""
    B, T, Hq, _ = q.shape
    for name, t, shape in (("out", out, q.shape), ("grad_out", grad_out, q.shape), ("lse", lse, (B, Hq, T)),
                           ("grad_lse", grad_lse, (B, Hq, T))):
        if t is None or t.numel() == 0 and name == "grad_lse":  # (the schema's stand-in for none)
            continue
        if tuple(t.shape) != tuple(shape) or t.device != q.device:
            raise ValueError(f"{name} must be {list(shape)} on q's device {q.device}, got {list(t.shape)} on "
                             f"{t.device}")


def _backward_impl(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk,
                   deterministic, backend, cu_seqlens=None, max_seqlen=None):
    shape, docs = _problem(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, cu_seqlens, max_seqlen)
    _check_forward_results(q, grad_out, grad_lse, out, lse)
    # "auto" picks the backward on its own speed: it may differ from the forward's backend
    # (every backward reads any forward's out and lse, which share one convention).
    impl = dispatch.resolve(backend, q, shape, (q, k, v, depth_k, depth_v), direction="backward")
    sc = default_scale(shape.head_dim, scale)
    grads = impl.backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, sc, causal, depth_chunk,
                          deterministic, docs)
    # The schema returns Tensors only: an absent input gets an empty placeholder.
    return tuple(q.new_empty(0) if g is None else g for g in finish_backward(grads))


def _varlen_backward_impl(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, cu_seqlens, max_seqlen, scale,
                          causal, depth_chunk, deterministic, backend):
    return _backward_impl(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk,
                          deterministic, backend, cu_seqlens, max_seqlen)


def resolve_and_backward_into_depth_sums(grad_out, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk,
                                         deterministic, backend, cu_seqlens=None, max_seqlen=None, *,
                                         depth_grads_into, accumulate=True):
    """Gradients of q, k, v of one call (None for an absent k, v); the depth gradients are
    added (stored, where not ``accumulate``) into ``depth_grads_into`` instead (see
    ``dispatch.backward_into_depth_sums``), by the backend ``backend`` names for this call.
    For :class:`moda_cuda.DepthStream`, which sums its readers' depth gradients in place."""
    shape, docs = _problem(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, cu_seqlens, max_seqlen)
    impl = dispatch.resolve(backend, q, shape, (q, k, v, depth_k, depth_v), direction="backward")
    return dispatch.backward_into_depth_sums(impl, grad_out, q, k, v, depth_k, depth_v, out, lse,
                                             default_scale(shape.head_dim, scale), causal, depth_chunk,
                                             deterministic, depth_grads_into, docs, accumulate=accumulate)


def _fake_backward(grad_out, grad_lse, q, k, v, depth_k, depth_v, *args):
    like = (q, k, v, depth_k, depth_v)
    return tuple(q.new_empty(0) if t is None else t.new_empty(t.shape) for t in like)


_DEFAULTS = (None, True, 1, False, "auto")  # scale, causal, depth_chunk, deterministic, backend


def _setup_context(ctx, inputs, output):
    # Inputs: the five tensors, for the varlen op cu_seqlens and max_seqlen, then the options.
    packed = 2 if ctx.varlen else 0
    q, k, v, depth_k, depth_v = inputs[:5]
    ctx.packed_args = tuple(inputs[5:5 + packed]) + (None,) * (packed - len(inputs[5:5 + packed]))
    options = tuple(inputs[5 + packed:]) + _DEFAULTS[max(len(inputs) - 5 - packed, 0):]
    ctx.scale, ctx.causal, ctx.depth_chunk, ctx.deterministic, ctx.backend = options
    out, lse = output
    ctx.save_for_backward(q, k, v, depth_k, depth_v, out, lse)
    ctx.n_inputs = len(inputs)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, depth_k, depth_v, out, lse = ctx.saved_tensors
    op = torch.ops.moda.attention_varlen_backward if ctx.varlen else torch.ops.moda.attention_backward
    grads = op(grad_out, grad_lse, q, k, v, depth_k, depth_v, out, lse, *ctx.packed_args, ctx.scale, ctx.causal,
               ctx.depth_chunk, ctx.deterministic, ctx.backend)
    grads = tuple(None if t is None else g for g, t in zip(grads, (q, k, v, depth_k, depth_v)))
    return grads + (None,) * (ctx.n_inputs - 5)


def _context_setup(varlen: bool):
    def setup(ctx, inputs, output):
        ctx.varlen = varlen
        _setup_context(ctx, inputs, output)

    return setup


for _name, _impl, _fake, _varlen in (("attention", _forward, _fake_forward, False),
                                     ("attention_with_backend", _forward, _fake_forward, False),
                                     ("attention_varlen", _varlen_forward, _fake_varlen_forward, True)):
    torch.library.register_kernel(f"moda::{_name}", ("cpu", "cuda"), _impl)
    torch.library.register_fake(f"moda::{_name}")(_fake)
    torch.library.register_autograd(f"moda::{_name}", _backward, setup_context=_context_setup(_varlen))
for _name, _impl in (("attention_backward", _backward_impl), ("attention_varlen_backward", _varlen_backward_impl)):
    torch.library.register_kernel(f"moda::{_name}", ("cpu", "cuda"), _impl)
    torch.library.register_fake(f"moda::{_name}")(_fake_backward)


def check_call(q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic, backend, cu_seqlens=None,
               max_seqlen=None) -> MoDAShape:
    """Raise on an invalid call before any kernel runs (the public entry points' checks; the
    values of cu_seqlens are read where the op runs, so that a traced call needs none).
    Returns the call's sizes."""
    shape = check_inputs(q, k, v, depth_k, depth_v, scale, causal, depth_chunk)
    if cu_seqlens is not None:
        check_cu_seqlens(q, cu_seqlens, max_seqlen)
    check_max_seqlen_alone(cu_seqlens, max_seqlen)
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    dispatch.check_backend_name(backend)
    if not isinstance(deterministic, bool):
        raise TypeError(f"deterministic must be a bool, got {type(deterministic).__name__}")
    return shape


def attention_op(q, k, v, depth_k, depth_v, scale: Optional[float], causal: bool, depth_chunk: int,
                 deterministic: bool, backend: str, cu_seqlens=None, max_seqlen: Optional[int] = None):
    """Call the op that matches ``backend`` ("auto" -> the public ``moda::attention``) and
    ``cu_seqlens`` (given -> ``moda::attention_varlen``)."""
    if cu_seqlens is not None:
        return torch.ops.moda.attention_varlen(q, k, v, depth_k, depth_v, cu_seqlens, max_seqlen, scale, causal,
                                               depth_chunk, deterministic, backend)
    args = (q, k, v, depth_k, depth_v, scale, causal, depth_chunk, deterministic)
    if backend == "auto":
        return torch.ops.moda.attention(*args)
    return torch.ops.moda.attention_with_backend(*args, backend)
