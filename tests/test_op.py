"""torch.ops.moda.attention: forward, autograd, opcheck, torch.compile, backend selection."""

import warnings

import pytest
import torch

import moda_cuda
from moda_cuda import dispatch
from brute import brute_moda
from helpers import Case, as_double, make_inputs, rel_err
from moda_cuda.reference import moda_attention_ref

OP_CASES = [
    Case(T=7, Hq=4, Hk=2, D=8, L=3),
    Case(T=9, Hq=4, Hk=1, D=8, L=2, chunk=3, causal=False),
    Case(T=8, Hq=2, Hk=2, D=8, L=3, seq=False),
    Case(T=6, Hq=2, Hk=1, D=8, L=0),
]


def _leaves(inputs):
    return [None if t is None else t.clone().requires_grad_() for t in inputs]


@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_op_matches_brute_force(case):
    q, k, v, dk, dv = make_inputs(case, torch.float64)
    out, lse = torch.ops.moda.attention(q, k, v, dk, dv, None, case.causal, case.chunk)
    ref_out, ref_lse = brute_moda(q, k, v, dk, dv, causal=case.causal, depth_chunk=case.chunk)
    assert rel_err(out, ref_out) < 1e-12 and rel_err(lse, ref_lse) < 1e-12


@pytest.mark.parametrize("case", OP_CASES, ids=str)
def test_gradcheck_float64(case):
    leaves = [t for t in _leaves(make_inputs(case, torch.float64)) if t is not None]
    if case.seq:
        def fn(q, k, v, dk, dv):
            return moda_cuda.moda_attention(q, k, v, dk, dv, causal=case.causal, depth_chunk=case.chunk,
                                            return_lse=True)
    else:
        def fn(q, dk, dv):
            return moda_cuda.moda_attention(q, None, None, dk, dv, causal=case.causal, depth_chunk=case.chunk,
                                            return_lse=True)
    assert torch.autograd.gradcheck(fn, tuple(leaves))


@pytest.mark.parametrize("case", OP_CASES[:3], ids=str)
def test_opcheck(case):
    inputs = make_inputs(case, torch.float32)
    torch.library.opcheck(torch.ops.moda.attention.default, (*inputs, 0.3, case.causal, case.chunk))
    leaves = _leaves(inputs)
    torch.library.opcheck(torch.ops.moda.attention.default, (*leaves, None, case.causal, case.chunk))
    torch.library.opcheck(torch.ops.moda.attention_with_backend.default,
                          (*leaves, None, case.causal, case.chunk, False, "reference"))


def test_torch_compile_fullgraph_matches_eager():
    case = Case(T=9, Hq=4, Hk=2, D=8, L=3, chunk=2)
    leaves = _leaves(make_inputs(case, torch.float32))

    def loss(q, k, v, dk, dv):
        return moda_cuda.moda_attention(q, k, v, dk, dv, depth_chunk=2).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager = loss(*leaves)
    grads = torch.autograd.grad(eager, leaves)
    got = compiled(*leaves)
    got_grads = torch.autograd.grad(got, leaves)
    assert torch.allclose(got, eager, rtol=1e-6)
    for a, b in zip(got_grads, grads):
        assert rel_err(a, b) < 1e-6


def test_torch_compile_inductor_matches_eager():
    case = Case(T=7, Hq=2, Hk=1, D=8, L=2)
    inputs = make_inputs(case, torch.float32)
    fn = torch.compile(lambda *x: moda_cuda.moda_attention(*x) * 2.0, fullgraph=True)
    assert torch.allclose(fn(*inputs), moda_cuda.moda_attention(*inputs) * 2.0, rtol=1e-6, atol=1e-6)


def test_lse_is_differentiable():
    case = Case(T=6, Hq=2, Hk=1, D=8, L=2)
    leaves = [t for t in _leaves(make_inputs(case, torch.float64))]
    assert torch.autograd.gradcheck(lambda *x: moda_cuda.moda_attention(*x, return_lse=True)[1], tuple(leaves))


def test_output_dtypes_and_shapes():
    case = Case(T=5, Hq=4, Hk=2, D=8, L=2)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        q, k, v, dk, dv = make_inputs(case, dtype)
        out, lse = moda_cuda.moda_attention(q, k, v, dk, dv, return_lse=True)
        assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
        assert lse.shape == (1, 4, 5) and lse.dtype == torch.float32


def test_explicit_scale_is_used():
    case = Case(T=6, Hq=2, Hk=1, D=8, L=2)
    inputs = make_inputs(case, torch.float64)
    out = moda_cuda.moda_attention(*inputs, scale=0.7)
    ref, _ = brute_moda(*inputs, scale=0.7)
    assert rel_err(out, ref) < 1e-12


def test_available_backends_and_reference_always_present():
    names = moda_cuda.available_backends()
    assert "reference" in names
    assert names[-1] == "reference"


def test_explicit_reference_backend():
    inputs = make_inputs(Case(T=5, D=8), torch.float32)
    out = moda_cuda.moda_attention(*inputs, backend="reference")
    assert rel_err(out, moda_attention_ref(*as_double(inputs))) < 1e-6


def test_unknown_backend_raises():
    inputs = make_inputs(Case(T=5, D=8), torch.float32)
    with pytest.raises(ValueError, match="unknown MoDA backend 'fastest'"):
        moda_cuda.moda_attention(*inputs, backend="fastest")
    with pytest.raises(TypeError, match="backend must be a str"):
        moda_cuda.moda_attention(*inputs, backend=None)


def test_explicit_backend_that_cannot_serve_raises():
    # float64 is outside the Triton kernels' dtypes: asking for them explicitly must fail loudly.
    inputs = make_inputs(Case(T=5, D=8), torch.float64)
    with pytest.raises(ValueError, match="backend 'triton' cannot run this input"):
        moda_cuda.moda_attention(*inputs, backend="triton")


def test_env_override(monkeypatch):
    inputs = make_inputs(Case(T=5, D=8), torch.float64)
    monkeypatch.setenv("MODA_BACKEND", "triton")
    with pytest.raises(ValueError, match="backend 'triton' cannot run"):
        moda_cuda.moda_attention(*inputs)
    monkeypatch.setenv("MODA_BACKEND", "reference")
    moda_cuda.moda_attention(*inputs)
    monkeypatch.setenv("MODA_BACKEND", "nope")
    with pytest.raises(ValueError, match="unknown MoDA backend 'nope'"):
        moda_cuda.moda_attention(*inputs)


def test_auto_falls_back_and_warns_once(monkeypatch):
    """A fast path that refuses an input hands it to the reference with one warning."""
    refusing = dispatch.Backend("fast", lambda: None, lambda q, s, t: "not this shape",
                                dispatch.REFERENCE.forward, dispatch.REFERENCE.backward)
    monkeypatch.setattr(dispatch, "_AUTO_ORDER", (refusing,))
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    case = Case(T=5, D=8)
    shape = moda_cuda.check_inputs(*make_inputs(case), None, True, 1)
    q = make_inputs(case)[0]
    with pytest.warns(RuntimeWarning, match="fast backend skipped \\(not this shape\\)"):
        assert dispatch.resolve("auto", q, shape, ()) is dispatch.REFERENCE
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("auto", q, shape, ()) is dispatch.REFERENCE


def test_info_reports_backends(capsys):
    report = moda_cuda.info()
    assert report["backends"]["reference"] == "available"
    assert "reference" in capsys.readouterr().out


@pytest.mark.parametrize("backend", ["auto", "reference", "triton"])
def test_depth_only_without_depth_through_the_op(backend):
    """Nothing is visible: out 0, lse -inf, zero gradients, whichever backend was asked for."""
    case = Case(T=5, D=8, L=0, seq=False)
    q, _, _, dk, dv = make_inputs(case, torch.float32)
    leaves = [t.requires_grad_() for t in (q, dk, dv)]
    out, lse = moda_cuda.moda_attention(leaves[0], None, None, leaves[1], leaves[2], return_lse=True, backend=backend)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), leaves)
    assert all(torch.equal(g, torch.zeros_like(t)) for g, t in zip(grads, leaves))


def test_backward_op_checks_the_forward_results_it_is_given():
    """Called directly (autograd passes the forward's own), the backward op refuses an lse or
    out of another shape before any kernel: an lse laid out [B, T, Hq] has the right number of
    elements and would give wrong gradients silently."""
    case = Case(T=6, Hq=4, Hk=2, D=8, L=2)
    q, k, v, dk, dv = make_inputs(case, torch.float64)
    out, lse = torch.ops.moda.attention(q, k, v, dk, dv)
    g = torch.ones_like(out)
    args = (None, True, 1, False, "auto")
    torch.ops.moda.attention_backward(g, torch.zeros_like(lse), q, k, v, dk, dv, out, lse, *args)
    with pytest.raises(ValueError, match=r"lse must be \[1, 4, 6\]"):
        torch.ops.moda.attention_backward(g, torch.zeros_like(lse), q, k, v, dk, dv, out,
                                          lse.transpose(1, 2).contiguous(), *args)
    with pytest.raises(ValueError, match="out must be"):
        torch.ops.moda.attention_backward(g, torch.zeros_like(lse), q, k, v, dk, dv, out[:, :-1], lse, *args)
