"""``torch.ops.moda.attention_with_kvcache``: new tokens against a KV cache (decoding). The
new keys/values are written into the caches in place; not differentiable. Validation and
reference: ``kvcache``; on CUDA the Triton split-KV kernel (``triton_ref/decode.py``).

:func:`kvcache_backend`, :func:`run_with_kvcache` and :func:`kvcache_runner` are shared with
the eager path (``eager.with_kvcache``), which caches a layout's runner.
"""

from __future__ import annotations

import functools

import torch

from ._spec import default_scale, lse_dtype
from .kvcache import attention_with_kvcache_ref, check_kvcache_inputs, decode_backend, write_new_keys

torch.library.define("moda::attention_with_kvcache",
                     "(Tensor q, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor? depth_k, Tensor? depth_v, Tensor? k, "
                     "Tensor? v, Tensor cache_seqlens, float? scale=None, int depth_chunk=1, str backend='auto') "
                     "-> (Tensor out, Tensor lse)")
_moda_decode = None


def _decode_kernel():
    """The Triton decode launcher, imported at its first use (kept: no import per call)."""
    global _moda_decode
    if _moda_decode is None:
        from .triton_ref.decode import moda_decode

        _moda_decode = moda_decode
    return _moda_decode


def kvcache_backend(q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale=None, depth_chunk=1,
                    backend="auto") -> str:
    """Validate a decode call (raises before any kernel) and name what runs it: "triton" or
    "reference". A pure function of the inputs' shapes, strides, dtypes and devices, the
    options and ``MODA_BACKEND``: the eager path caches it per layout."""
    check_kvcache_inputs(q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale, depth_chunk)
    return decode_backend(backend, q, k_cache, v_cache)


def run_with_kvcache(impl, q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale=None):
    """A validated decode call by ``impl`` (:func:`kvcache_backend`'s answer)."""
    if impl == "triton":
        return _decode_kernel()(q, k_cache, v_cache, k, v, depth_k, depth_v, cache_seqlens,
                                default_scale(q.shape[-1], scale))
    if k is not None:
        write_new_keys(k_cache, v_cache, k, v, cache_seqlens)
    out, lse = attention_with_kvcache_ref(q, k_cache, v_cache, depth_k, depth_v, cache_seqlens, scale)
    return out.contiguous(), lse.to(lse_dtype(q.dtype)).contiguous()


def kvcache_runner(impl, q, k_cache, v_cache, depth_k, depth_v, k, v, scale=None):
    """``run(q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens) -> (out, lse)`` for
    validated calls laid out as these inputs (shapes, strides, dtypes, devices, 16-byte
    alignment: the eager path's cache key), by ``impl`` (:func:`kvcache_backend`'s answer).
    The Triton kernel's launches are worked out once (``PreparedDecode``)."""
    if impl != "triton":
        return functools.partial(run_with_kvcache, impl, scale=scale)
    from .triton_ref.decode import prepare_decode

    prepared = prepare_decode(q, k_cache, v_cache, k, v, depth_k, depth_v, default_scale(q.shape[-1], scale))

    def run(q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens):
        return prepared(q, k_cache, v_cache, k, v, depth_k, depth_v, cache_seqlens)

    return run


def with_kvcache(q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale=None, depth_chunk=1,
                  backend="auto"):
    # The one validation of a call through the op (the public function leaves it to the op,
    # and the fake implementation runs it when traced).
    impl = kvcache_backend(q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale, depth_chunk, backend)
    return run_with_kvcache(impl, q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale)


def _fake_with_kvcache(q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale=None, depth_chunk=1,
                       backend="auto"):
    check_kvcache_inputs(q, k_cache, v_cache, depth_k, depth_v, k, v, cache_seqlens, scale, depth_chunk)
    B, S, Hq, D = q.shape
    return q.new_empty((B, S, Hq, D)), q.new_empty((B, Hq, S), dtype=lse_dtype(q.dtype))


torch.library.register_kernel("moda::attention_with_kvcache", ("cpu", "cuda"), with_kvcache)
torch.library.register_fake("moda::attention_with_kvcache")(_fake_with_kvcache)
