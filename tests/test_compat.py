"""moda_cuda.compat.parallel_moda: the reference MoDA package's layout and lse units."""

import math

import pytest
import torch

from brute import brute_moda
from helpers import rel_err
from moda_cuda.compat import parallel_moda


def _problem(B=2, T=7, Hk=2, G=3, D=8, L=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(B, T * G, Hk, D), r(B, T, Hk, D), r(B, T, Hk, D), r(B, T * L, Hk, D), r(B, T * L, Hk, D)


def _to_standard(q, G):
    """[B, T*G, Hk, D] -> [B, T, Hk*G, D], query head j*G + g <- row t*G + g of column j."""
    B, TG, Hk, D = q.shape
    T = TG // G
    out = torch.empty(B, T, Hk * G, D, dtype=q.dtype)
    for t in range(T):
        for g in range(G):
            for j in range(Hk):
                out[:, t, j * G + g] = q[:, t * G + g, j]
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_first", [False, True])
def test_parallel_moda_layout_and_lse(causal, head_first):
    B, T, Hk, G, D, L = 2, 7, 2, 3, 8, 2
    q, k, v, ck, cv = _problem(B, T, Hk, G, D, L)
    ref_out, ref_lse = brute_moda(_to_standard(q, G), k, v, ck.reshape(B, T, L, Hk, D), cv.reshape(B, T, L, Hk, D),
                                  causal=causal)
    args = (q, k, v, None, ck, cv)
    if head_first:
        args = tuple(None if x is None else x.transpose(1, 2) for x in args)
    out, lse = parallel_moda(*args, moda_group_num=G, is_causal=causal, head_first=head_first, need_lse=True)
    if head_first:
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    assert out.shape == q.shape and lse.shape == (B, T * G, Hk)
    for t in range(T):
        for g in range(G):
            for j in range(Hk):
                assert rel_err(out[:, t * G + g, j], ref_out[:, t, j * G + g]) < 1e-12
                expected = ref_lse[:, j * G + g, t] / math.log(2.0)
                assert torch.allclose(lse[:, t * G + g, j], expected, rtol=1e-12)


def test_parallel_moda_without_depth_and_without_lse():
    q, k, v, _, _ = _problem(G=2)
    out = parallel_moda(q, k, v, moda_group_num=2)
    ref, _ = brute_moda(_to_standard(q, 2), k, v, None, None)
    assert rel_err(out, ref.reshape(2, 7, 2, 2, 8).transpose(2, 3).reshape(q.shape)) < 1e-12


def test_parallel_moda_rejects_unsupported_arguments():
    q, k, v, ck, cv = _problem(G=1)
    with pytest.raises(ValueError, match="gated attention"):
        parallel_moda(q, k, v, g=torch.zeros(1), cached_k=ck, cached_v=cv)
    with pytest.raises(ValueError, match="cu_seqlens"):
        parallel_moda(q, k, v, cached_k=ck, cached_v=cv, cu_seqlens=torch.tensor([0, 7]))
    with pytest.raises(ValueError, match="not a multiple of moda_group_num=2"):
        parallel_moda(q, k, v, moda_group_num=2)
    with pytest.raises(ValueError, match="cached_k must be"):
        parallel_moda(q, k, v, cached_k=ck[:, :-1], cached_v=cv[:, :-1])
