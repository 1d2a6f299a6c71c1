"""Attention with a KV cache (decoding) against the training op at the same positions."""

import pytest
import torch

import moda_cuda
from helpers import rel_err
from moda_cuda.reference import moda_attention_ref


def _problem(B, T, Hq, Hk, D, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    depth = (r(B, T, L, Hk, D), r(B, T, L, Hk, D)) if L else (None, None)
    return r(B, T, Hq, D), r(B, T, Hk, D), r(B, T, Hk, D), *depth


def _rows(x, lens, S):
    """The S positions after each sequence's cached ones: [B, S, ...]."""
    return None if x is None else torch.stack([x[b, n:n + S] for b, n in enumerate(lens)])


def _cache(k, lens, Tmax):
    """A cache holding the first lens[b] keys of each sequence, NaN elsewhere (never cleared)."""
    cache = torch.full((k.shape[0], Tmax) + tuple(k.shape[2:]), float("nan"), dtype=k.dtype)
    for b, n in enumerate(lens):
        cache[b, :n] = k[b, :n]
    return cache


@pytest.mark.parametrize("S", [1, 4, 17])
@pytest.mark.parametrize("L", [0, 1, 5])
@pytest.mark.parametrize("Hq, Hk", [(4, 4), (8, 1)], ids=["G1", "G8"])
def test_decode_equals_the_training_op(S, L, Hq, Hk):
    lens = [0, 7, 30 - S]  # mixed and odd lengths; the last sequence fills the cache
    B, T, D, Tmax = 3, 30, 16, 30
    q, k, v, dk, dv = _problem(B, T, Hq, Hk, D, L)
    full, full_lse = moda_attention_ref(q, k, v, dk, dv, return_lse=True)
    k_cache, v_cache = _cache(k, lens, Tmax), _cache(v, lens, Tmax)
    cache_seqlens = torch.tensor(lens, dtype=torch.int32)
    out, lse = moda_cuda.moda_attention_with_kvcache(
        _rows(q, lens, S), k_cache, v_cache, _rows(dk, lens, S), _rows(dv, lens, S), k=_rows(k, lens, S),
        v=_rows(v, lens, S), cache_seqlens=cache_seqlens, return_lse=True)
    assert rel_err(out, _rows(full, lens, S)) < 1e-13
    assert rel_err(lse, torch.stack([full_lse[b, :, n:n + S] for b, n in enumerate(lens)])) < 1e-13
    # The new keys were written exactly at cache_seqlens[b] .. + S, nothing else was touched.
    for b, n in enumerate(lens):
        assert torch.equal(k_cache[b, :n + S], k[b, :n + S]) and torch.equal(v_cache[b, :n + S], v[b, :n + S])
        assert torch.isnan(k_cache[b, n + S:]).all() and torch.isnan(v_cache[b, n + S:]).all()


def test_keys_already_in_the_cache():
    lens, S = [3, 9], 2
    q, k, v, dk, dv = _problem(2, 12, 4, 2, 8, 2)
    full = moda_attention_ref(q, k, v, dk, dv)
    written = [n + S for n in lens]
    out = moda_cuda.moda_attention_with_kvcache(_rows(q, lens, S), _cache(k, written, 16), _cache(v, written, 16),
                                                _rows(dk, lens, S), _rows(dv, lens, S),
                                                cache_seqlens=torch.tensor(lens, dtype=torch.int32))
    assert rel_err(out, _rows(full, lens, S)) < 1e-13


def test_decode_step_under_torch_compile():
    lens, S = [2, 5], 1
    q, k, v, dk, dv = (x.float() for x in _problem(2, 8, 4, 2, 8, 2))
    args = dict(cache_seqlens=torch.tensor(lens, dtype=torch.int32))

    def step(qn, kc, vc, dkn, dvn, kn, vn):
        return moda_cuda.moda_attention_with_kvcache(qn, kc, vc, dkn, dvn, k=kn, v=vn, **args) * 2.0

    inputs = [_rows(q, lens, S), _cache(k, lens, 8), _cache(v, lens, 8), _rows(dk, lens, S), _rows(dv, lens, S),
              _rows(k, lens, S), _rows(v, lens, S)]
    eager_caches = [t.clone() for t in inputs[1:3]]
    eager = step(inputs[0], *eager_caches, *inputs[3:])
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(*inputs)
    assert torch.allclose(got, eager, rtol=1e-6)
    assert torch.equal(inputs[1].nan_to_num(7.0), eager_caches[0].nan_to_num(7.0))  # the cache write happened


@pytest.mark.parametrize("change, message", [
    (dict(cache_seqlens=torch.tensor([1, 2])), "cache_seqlens must be int32"),
    (dict(cache_seqlens=torch.tensor([1], dtype=torch.int32)), r"cache_seqlens must be int32 \[B=2\]"),
    (dict(cache_seqlens=torch.tensor([[1, 9], [2, 9]], dtype=torch.int32)[:, 0]), "cache_seqlens must be contiguous"),
    (dict(scale=float("nan")), "scale must be finite"),
    (dict(scale=float("inf")), "scale must be finite"),
    (dict(k=None), "k and v must be given together"),
    (dict(depth_v=None), "depth_k and depth_v must be given together"),
    (dict(depth_chunk=2), "depth_chunk must be 1"),
    (dict(k_cache=torch.zeros(2, 16, 3, 8, dtype=torch.float64)), "one \\[B, Tmax, Hk, D\\] shape"),
    (dict(q=torch.zeros(2, 2, 3, 8, dtype=torch.float64)), "multiple of kv heads"),
    (dict(q=torch.zeros(2, 17, 4, 8, dtype=torch.float64)), "do not fit a cache"),
    (dict(k=torch.zeros(2, 3, 2, 8, dtype=torch.float64), v=torch.zeros(2, 3, 2, 8, dtype=torch.float64)),
     r"k and v must be \[B=2, S=2"),
    (dict(backend="cuda"), "has no KV-cache attention"),
    (dict(backend="triton"), "cannot run this KV-cache call: dtype torch.float64"),
])
def test_bad_inputs_raise(change, message):
    q, k, v, dk, dv = _problem(2, 8, 4, 2, 8, 2)
    args = dict(q=q[:, :2], k_cache=torch.zeros(2, 16, 2, 8, dtype=torch.float64),
                v_cache=torch.zeros(2, 16, 2, 8, dtype=torch.float64), depth_k=dk[:, :2], depth_v=dv[:, :2],
                k=k[:, :2], v=v[:, :2], cache_seqlens=torch.tensor([1, 2], dtype=torch.int32))
    args.update(change)
    if "k_cache" in change:
        args["v_cache"] = torch.zeros(2, 16, 2, 8, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=message):
        moda_cuda.moda_attention_with_kvcache(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"),
                                              args.pop("depth_k"), args.pop("depth_v"), **args)
