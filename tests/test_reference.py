"""The vectorised reference against a brute-force loop, in float64."""

import pytest
import torch

from brute import brute_moda
from helpers import Case, make_inputs, rel_err
from moda_cuda.reference import moda_attention_ref, moda_attention_ref_backward

CASES = [
    Case(B=2, T=7, Hq=4, Hk=2, D=8, L=3),
    Case(T=9, Hq=4, Hk=1, D=8, L=2, chunk=3, causal=False),
    Case(T=10, Hq=2, Hk=2, D=4, L=0),
    Case(T=8, Hq=4, Hk=2, D=8, L=3, chunk=4, seq=False),
    Case(T=5, Hq=3, Hk=3, D=8, L=2, chunk=2, causal=False, seq=False),
    Case(T=6, Hq=2, Hk=1, D=8, L=2, chunk=7),
    Case(T=1, Hq=4, Hk=4, D=8, L=5),
    Case(T=11, Hq=6, Hk=2, D=8, L=1, chunk=3),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_matches_brute_force(case):
    q, k, v, dk, dv = make_inputs(case, torch.float64)
    out, lse = moda_attention_ref(q, k, v, dk, dv, causal=case.causal, depth_chunk=case.chunk, return_lse=True)
    ref_out, ref_lse = brute_moda(q, k, v, dk, dv, causal=case.causal, depth_chunk=case.chunk)
    assert rel_err(out, ref_out) < 1e-12
    assert rel_err(lse, ref_lse) < 1e-12


@pytest.mark.parametrize("case", CASES, ids=str)
def test_analytic_backward_matches_autograd(case):
    inputs = make_inputs(case, torch.float64, seed=1)
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    out, lse = moda_attention_ref(*leaves, causal=case.causal, depth_chunk=case.chunk, return_lse=True)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    (out * g_out).sum().add((lse * g_lse).sum()).backward()
    grads = moda_attention_ref_backward(g_out, *inputs, out.detach(), lse.detach(), causal=case.causal,
                                        depth_chunk=case.chunk, grad_lse=g_lse)
    for leaf, grad in zip(leaves, grads):
        if leaf is None:
            assert grad is None
        else:
            expected = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
            assert rel_err(grad, expected) < 1e-12


def test_reference_reads_strided_depth_views():
    case = Case(T=9, L=3, chunk=2)
    q, k, v, dk, dv = make_inputs(case, torch.float64, depth_slots=6)
    assert not dk.is_contiguous()
    out = moda_attention_ref(q, k, v, dk, dv, depth_chunk=2)
    ref_out, _ = brute_moda(q, k, v, dk.contiguous(), dv.contiguous(), depth_chunk=2)
    assert rel_err(out, ref_out) < 1e-12


def test_depth_only_with_no_depth_sees_nothing():
    case = Case(T=5, L=0, seq=False)
    q, _, _, dk, dv = make_inputs(case, torch.float64)
    out, lse = moda_attention_ref(q, None, None, dk, dv, return_lse=True)
    assert torch.equal(out, torch.zeros_like(q))
    assert torch.isneginf(lse).all()


def test_low_precision_inputs_compute_in_float32():
    case = Case(T=13)
    inputs = make_inputs(case, torch.bfloat16)
    out = moda_attention_ref(*inputs)
    ref, _ = brute_moda(*inputs)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ref) < 1e-2
