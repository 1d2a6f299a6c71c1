"""moda_cuda.compat: the original MoDA package's entry points, layout and lse units."""

import math

import pytest
import torch

from brute import brute_moda
from helpers import Case, as_double, make_inputs, rel_err
from kernel_checks import TOLERANCE, poisoned_allocations
from moda_cuda.compat import DEFAULT_BT, parallel_fda, parallel_moda, parallel_moda_chunk_visible
from moda_cuda.reference import moda_attention_ref, moda_attention_ref_backward


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
    with pytest.raises(ValueError, match="cu_seqlens must be an int32 or int64"):
        parallel_moda(q, k, v, cached_k=ck, cached_v=cv, cu_seqlens=torch.tensor([0.0, 7.0]))
    with pytest.raises(ValueError, match="not a multiple of moda_group_num=2"):
        parallel_moda(q, k, v, moda_group_num=2)
    with pytest.raises(ValueError, match="cached_k must be"):
        parallel_moda(q, k, v, cached_k=ck[:, :-1], cached_v=cv[:, :-1])
    # Keys with another number of kv heads than q's would be another, valid GQA problem.
    wide = lambda x: torch.cat([x, x], dim=2)  # noqa: E731
    with pytest.raises(ValueError, match="k must have q's"):
        parallel_moda(q, wide(k), wide(v), cached_k=ck, cached_v=cv)
    with pytest.raises(ValueError, match="cached_k must have q's"):
        parallel_moda(q, k, v, cached_k=wide(ck), cached_v=wide(cv))
    with pytest.raises(ValueError, match="no rows"):
        parallel_moda(q[:, :0], k[:, :0], v[:, :0], cached_k=ck[:, :0], cached_v=cv[:, :0])


# --- parallel_moda_chunk_visible and parallel_fda -------------------------------------------

GRAD_NAMES = ("dq", "dk", "dv", "dcached_k", "dcached_v")


def _folded_leaves(B, T, Hk, G, D, L, seq=True, dtype=torch.float64, seed=0):
    """Time-major folded inputs (q [B, T*G, Hk, D], k, v or None, cached_k/v [B, T*L, Hk, D])."""
    q, k, v, ck, cv = (t.to(dtype).requires_grad_() for t in _problem(B, T, Hk, G, D, L, seed))
    return (q, k, v, ck, cv) if seq else (q, None, None, ck, cv)


def _lse_to_standard(lse, G):
    """Folded base-2 lse [B, T*G, Hk] -> [B, Hq, T]."""
    return _to_standard(lse.unsqueeze(-1), G)[..., 0].transpose(1, 2)


def _check_against_brute(fn, G, T, depth_chunk, head_first=False, seq=True, Hk=2, D=8, L=2, dtype=torch.float64,
                         tol=1e-10, **kw):
    """fn's out, base-2 lse and the gradients of every input against the loop-by-loop reference."""
    B = 2 if T < 20 else 1
    leaves = _folded_leaves(B, T, Hk, G, D, L, seq=seq, dtype=dtype)
    q, k, v, ck, cv = leaves
    args = tuple(None if x is None else (x.transpose(1, 2) if head_first else x) for x in leaves)
    out, lse = fn(args[0], *args[1:3], cached_k=args[3], cached_v=args[4], moda_group_num=G, head_first=head_first,
                  need_lse=True, **kw)
    if head_first:
        out, lse = out.transpose(1, 2), lse.transpose(1, 2)
    assert out.shape == q.shape and lse.shape == (B, T * G, Hk)
    ref_out, ref_lse = brute_moda(_to_standard(q, G), k, v, ck.reshape(B, T, L, Hk, D), cv.reshape(B, T, L, Hk, D),
                                  causal=True, depth_chunk=depth_chunk)
    assert rel_err(_to_standard(out, G), ref_out) < tol
    assert rel_err(_lse_to_standard(lse, G), ref_lse / math.log(2.0)) < tol
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    names = [n for n, x in zip(GRAD_NAMES, leaves) if x is not None]
    wrt = [x for x in leaves if x is not None]
    got = torch.autograd.grad(out, wrt, grad_out.to(dtype))
    want = torch.autograd.grad(ref_out, wrt, _to_standard(grad_out, G))
    for name, a, b in zip(names, got, want):
        assert rel_err(a, b) < tol, name


# (G, customized_BT, T): C = BT // G; T > C crosses a chunk boundary, T <= C is one chunk.
CHUNK_CASES = [
    (1, 64, 7), (1, 128, 13), (1, 64, 69),
    (2, 64, 37), (2, 128, 13),
    (4, 64, 21), (4, 128, 7),
    (8, 64, 13), (8, 128, 21),
]


@pytest.mark.parametrize("G,BT,T", CHUNK_CASES)
def test_chunk_visible_matches_brute(G, BT, T):
    _check_against_brute(parallel_moda_chunk_visible, G, T, BT // G, customized_BT=BT)


@pytest.mark.parametrize("head_first", [False, True])
def test_chunk_visible_default_bt_is_128(head_first):
    assert DEFAULT_BT == 128
    _check_against_brute(parallel_moda_chunk_visible, 8, 21, 128 // 8, head_first=head_first)


def test_chunk_visible_head_first_with_custom_bt():
    _check_against_brute(parallel_moda_chunk_visible, 4, 13, 16 // 4, head_first=True, customized_BT=16)


def test_chunk_visible_float32():
    _check_against_brute(parallel_moda_chunk_visible, 4, 13, 8, dtype=torch.float32, tol=TOLERANCE[torch.float32],
                         customized_BT=32)


def test_chunk_visible_without_depth_is_causal_attention():
    q, k, v, _, _ = _problem(G=2)
    out = parallel_moda_chunk_visible(q, k, v, moda_group_num=2, customized_BT=4)
    assert rel_err(out, parallel_moda(q, k, v, moda_group_num=2)) < 1e-12


@pytest.mark.parametrize("G,T", [(1, 7), (2, 13), (4, 7), (8, 13)])
def test_fda_matches_brute(G, T):
    _check_against_brute(parallel_fda, G, T, 1, seq=False)


def test_fda_head_first_float32():
    _check_against_brute(parallel_fda, 2, 7, 1, seq=False, head_first=True, dtype=torch.float32,
                         tol=TOLERANCE[torch.float32])


@pytest.mark.parametrize("fn,chunk", [(parallel_moda_chunk_visible, 3), (parallel_fda, 1)])
def test_gradients_through_base2_lse(fn, chunk):
    """The lse cotangent reaches every input (against the float64 reference's autograd)."""
    B, T, Hk, G, D, L = 2, 7, 2, 2, 8, 2
    seq = fn is not parallel_fda
    leaves = _folded_leaves(B, T, Hk, G, D, L, seq=seq)
    q, k, v, ck, cv = leaves
    kw = dict(customized_BT=chunk * G) if seq else {}
    out, lse = fn(q, k, v, cached_k=ck, cached_v=cv, moda_group_num=G, need_lse=True, **kw)
    ref_out, ref_lse = moda_attention_ref(_to_standard(q, G), k, v, ck.reshape(B, T, L, Hk, D),
                                          cv.reshape(B, T, L, Hk, D), depth_chunk=chunk, return_lse=True)
    gen = torch.Generator().manual_seed(2)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    grad_lse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    wrt = [x for x in leaves if x is not None]
    got = torch.autograd.grad((out, lse), wrt, (grad_out, grad_lse))
    want = torch.autograd.grad((ref_out, ref_lse), wrt, (_to_standard(grad_out, G),
                                                          _lse_to_standard(grad_lse, G) / math.log(2.0)))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-10


def test_tuning_keywords_are_ignored():
    q, k, v, ck, cv = _problem(G=2)
    tuning = dict(num_warps=4, num_stages=2, BS=32, BK=64, BV=64)
    for fn, kv, kw in ((parallel_moda_chunk_visible, (k, v), dict(customized_BT=8)), (parallel_fda, (None, None), {})):
        plain = fn(q, *kv, cached_k=ck, cached_v=cv, moda_group_num=2, **kw)
        tuned = fn(q, *kv, cached_k=ck, cached_v=cv, moda_group_num=2, **kw, **tuning)
        assert torch.equal(plain, tuned)


def test_chunk_visible_and_fda_reject_unsupported_arguments():
    q, k, v, ck, cv = _problem(G=2)
    both = ((parallel_moda_chunk_visible, (k, v)), (parallel_fda, (None, None)))
    for fn, kv in both:
        name = fn.__name__
        with pytest.raises(ValueError, match=f"{name}: gated attention"):
            fn(q, *kv, g=torch.zeros(1), cached_k=ck, cached_v=cv, moda_group_num=2)
        with pytest.raises(ValueError, match=f"{name}: cu_seqlens must be an int32 or int64"):
            fn(q, *kv, cached_k=ck, cached_v=cv, moda_group_num=2, cu_seqlens=[0, 7])
        with pytest.raises(ValueError, match="not a multiple of moda_group_num=4"):
            fn(q, *kv, cached_k=ck, cached_v=cv, moda_group_num=4)
        with pytest.raises(ValueError, match="moda_group_num must be a positive int"):
            fn(q, *kv, cached_k=ck, cached_v=cv, moda_group_num=0)
        with pytest.raises(ValueError, match="cached_v must be"):
            fn(q, *kv, cached_k=ck, cached_v=cv[:, :-1], moda_group_num=2)
    for BT in (0, -8, 7, 2.0, True):
        with pytest.raises(ValueError, match="customized_BT must be a positive int multiple of moda_group_num=2"):
            parallel_moda_chunk_visible(q, k, v, cached_k=ck, cached_v=cv, moda_group_num=2, customized_BT=BT)
    with pytest.raises(ValueError, match="always causal"):
        parallel_moda_chunk_visible(q, k, v, cached_k=ck, cached_v=cv, moda_group_num=2, is_causal=False)
    with pytest.raises(ValueError, match="k and v must be None"):
        parallel_fda(q, k, v, cached_k=ck, cached_v=cv, moda_group_num=2)
    with pytest.raises(ValueError, match="k and v must be None"):
        parallel_fda(q, k, None, cached_k=ck, cached_v=cv, moda_group_num=2)
    with pytest.raises(ValueError, match="needs cached_k and cached_v"):
        parallel_fda(q, moda_group_num=2)


@pytest.mark.parametrize("offsets_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("fn_name", ["moda", "chunk_visible", "fda"])
def test_cu_seqlens_packs_documents(fn_name, offsets_dtype):
    """Packed documents (batch 1, token offsets) give each document's own result."""
    G, L, lengths = 2, 2, [5, 0, 9, 3]
    T = sum(lengths)
    q, k, v, ck, cv = (x[:1] for x in _problem(B=1, T=T, G=G, L=L))
    fn, kv, kw = {"moda": (parallel_moda, (k, v), {}),
                  "chunk_visible": (parallel_moda_chunk_visible, (k, v), dict(customized_BT=3 * G)),
                  "fda": (parallel_fda, (None, None), {})}[fn_name]
    cu = torch.tensor([0, 5, 5, 14, 17], dtype=offsets_dtype)
    out, lse = fn(q, *kv, cached_k=ck, cached_v=cv, moda_group_num=G, need_lse=True, cu_seqlens=cu, **kw)
    for a, b in ((0, 5), (5, 14), (14, 17)):
        rows = slice(a * G, b * G)
        doc_kv = tuple(None if x is None else x[:, a:b] for x in kv)
        want_out, want_lse = fn(q[:, rows], *doc_kv, cached_k=ck[:, a * L:b * L], cached_v=cv[:, a * L:b * L],
                                moda_group_num=G, need_lse=True, **kw)
        assert rel_err(out[:, rows], want_out) < 1e-12 and rel_err(lse[:, rows], want_lse) < 1e-12


# --- on the GPU: bfloat16 against the float64 reference -------------------------------------

def _fold_q(x, G):
    B, T, Hq, D = x.shape
    return x.reshape(B, T, Hq // G, G, D).transpose(2, 3).reshape(B, T * G, Hq // G, D)


GPU_CASES = ([("chunk_visible", G, BT) for G, BT in ((1, 64), (2, 128), (4, 64), (8, 64), (8, 128), (8, None))]
             + [("fda", G, None) for G in (1, 2, 4, 8)])


@pytest.mark.cuda
@pytest.mark.parametrize("fn_name,G,BT", GPU_CASES)
def test_bf16_on_gpu_against_float64_reference(fn_name, G, BT):
    seq = fn_name == "chunk_visible"
    case = Case(B=2, T=999, Hq=2 * G, Hk=2, D=64, L=8, seq=seq,
                chunk=((BT or DEFAULT_BT) // G) if seq else 1)  # T not a multiple of any chunk
    inputs = make_inputs(case, torch.bfloat16, "cuda", seed=3)
    q, k, v, dk, dv = (None if t is None else t.contiguous().requires_grad_() for t in inputs)
    B, T, L, Hk, D = dk.shape
    fn, kw = (parallel_moda_chunk_visible, dict(customized_BT=BT)) if seq else (parallel_fda, {})
    with poisoned_allocations():
        out, lse = fn(_fold_q(q, G), k, v, cached_k=dk.flatten(1, 2), cached_v=dv.flatten(1, 2), moda_group_num=G,
                      need_lse=True, **kw)
    ref_in = as_double(inputs)
    ref_out, ref_lse = moda_attention_ref(*ref_in, depth_chunk=case.chunk, return_lse=True)
    tol = TOLERANCE[torch.bfloat16]
    errors = {"out": rel_err(out, _fold_q(ref_out, G)),
              "lse": rel_err(lse, _fold_q(ref_lse.transpose(1, 2).unsqueeze(-1), G)[..., 0] / math.log(2.0))}
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to("cuda", torch.bfloat16)
    leaves = [t for t in (q, k, v, dk, dv) if t is not None]
    with poisoned_allocations():
        got = torch.autograd.grad(out, leaves, grad_out)
    g_std = grad_out.double().reshape(B, T, G, Hk, D).transpose(2, 3).reshape(B, T, Hk * G, D)
    want = [w for w in moda_attention_ref_backward(g_std, *ref_in, ref_out, ref_lse, depth_chunk=case.chunk)
            if w is not None]
    for name, a, b in zip([n for n, x in zip(GRAD_NAMES, (q, k, v, dk, dv)) if x is not None], got, want):
        errors[name] = rel_err(a, b)
    bad = {n: e for n, e in errors.items() if not e < tol}
    assert not bad, f"{fn_name} G={G} BT={BT}: errors over {tol}: {bad}"
