"""The Triton kernels against the float64 reference, forward and backward.

On a CPU-only machine they run in Triton's interpreter (set up in conftest.py); on a GPU
machine they run compiled. Sizes are odd on purpose: T is never a multiple of a tile.
"""

import pytest
import torch

import moda_cuda
from helpers import Case
from kernel_checks import check_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])

BASE = Case(B=2, T=37, Hq=4, Hk=2, D=16, L=5)
CASES = [
    BASE,
    BASE.but(L=0),
    BASE.but(L=1, causal=False),
    BASE.but(Hq=2, Hk=2, chunk=3),  # G = 1
    BASE.but(Hq=8, Hk=2, chunk=3, causal=False),  # G = 4
    BASE.but(Hq=4, Hk=1, T=1),
    BASE.but(seq=False),  # depth-only
    BASE.but(seq=False, chunk=3, causal=False, L=1),
    BASE.but(B=1, T=50, Hq=6, Hk=2, D=24, L=2, chunk=4),  # G = 3, D not a power of two
    BASE.but(B=1, T=19, Hq=4, Hk=4, D=32, L=7, chunk=19, causal=False),  # one chunk holds all of T
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case):
    check_backend(case, torch.float32, DEVICE, "triton")


@pytest.mark.parametrize("dtype", DTYPES[1:], ids=str)
@pytest.mark.parametrize("case", [BASE, BASE.but(seq=False, chunk=2)], ids=str)
def test_triton_half_precision(case, dtype):
    check_backend(case, dtype, DEVICE, "triton")


def test_triton_reads_strided_depth_views():
    case = BASE.but(L=3, chunk=2)
    check_backend(case, torch.float32, DEVICE, "triton", depth_slots=8)


def test_triton_gradients_are_deterministic():
    case = BASE.but(chunk=2)
    from helpers import make_inputs

    leaves = [None if t is None else t.requires_grad_() for t in make_inputs(case, torch.float32, DEVICE)]
    runs = []
    for deterministic in (False, True):
        out = moda_cuda.moda_attention(*leaves, depth_chunk=2, backend="triton", deterministic=deterministic)
        runs.append(torch.autograd.grad(out.square().sum(), leaves))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_triton_lse_gradient():
    """A loss on lse reaches the inputs through the kernels' delta term."""
    from helpers import make_inputs, rel_err

    case = BASE.but(T=21)
    inputs = make_inputs(case, torch.float32, DEVICE)
    grads = []
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out, lse = moda_cuda.moda_attention(*leaves, return_lse=True, backend=backend)
        grads.append(torch.autograd.grad(out.sum() + lse.square().sum(), leaves))
    for a, b in zip(*grads):
        assert rel_err(a, b) < 1e-5


def test_triton_reads_head_major_qkv_without_copies():
    """q/k/v as transposed views of [B, H, T, D] tensors (FlashAttention users' other layout)."""
    from helpers import make_inputs, rel_err

    case = BASE.but(T=21, L=2)
    q, k, v, dk, dv = make_inputs(case, torch.float32, DEVICE)
    qh, kh, vh = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qh.is_contiguous() and qh.stride(-1) == 1
    leaves = [x.clone().requires_grad_() for x in (q, k, v, dk, dv)]
    strided = [x.requires_grad_() for x in (qh, kh, vh)] + [dk.clone().requires_grad_(), dv.clone().requires_grad_()]
    want = moda_cuda.moda_attention(*leaves, backend="reference")
    got = moda_cuda.moda_attention(*strided, backend="triton")
    assert rel_err(got, want) < 1e-5
    g_want = torch.autograd.grad(want.square().sum(), leaves)
    g_got = torch.autograd.grad(got.square().sum(), strided)
    for a, b in zip(g_got, g_want):
        assert rel_err(a, b) < 1e-5
