"""GPU checks (marked ``cuda``): every variant, fp16/bf16, D in {64, 128, 256}, T up to 4096.

Each compares the forward and all five gradients with the float64 reference on fresh random
inputs, with output buffers poisoned (NaN) first.
"""

import pytest
import torch

import moda_cuda
from helpers import Case, make_inputs, rel_err
from kernel_checks import check_backend

pytestmark = pytest.mark.cuda

B = Case(B=2, T=1000, Hq=16, Hk=2, D=64, L=8)  # T not a multiple of any tile
VARIANTS = [
    B,
    B.but(causal=False),
    B.but(chunk=4),
    B.but(chunk=5, causal=False),
    B.but(seq=False),
    B.but(seq=False, chunk=3, causal=False),
    B.but(L=0),
    B.but(L=1, Hq=2, Hk=2),  # G = 1
    B.but(Hq=32, Hk=2, L=5),  # G = 16
    B.but(Hq=8, Hk=4, T=1),  # T = 1
    B.but(B=1, Hq=8, Hk=2, T=333, L=256),  # L = 256
    B.but(B=1, Hq=12, Hk=4, T=257, L=3),  # G = 3
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", VARIANTS, ids=str)
def test_variants(case, dtype):
    check_backend(case, dtype, "cuda", "triton")



@pytest.mark.parametrize("D", [64, 96, 128, 192, 256])
@pytest.mark.parametrize("causal", [True, False])
def test_head_dims(D, causal):
    check_backend(B.but(B=1, T=777, Hq=8, Hk=2, D=D, L=4, causal=causal), torch.bfloat16, "cuda", "triton")


@pytest.mark.parametrize("T", [1, 17, 129, 4096])
def test_lengths(T):
    check_backend(Case(B=1, T=T, Hq=8, Hk=1, D=128, L=16, chunk=2), torch.bfloat16, "cuda", "triton")


def test_long_sequence_paper_layout():
    check_backend(Case(B=1, T=4096, Hq=64, Hk=8, D=64, L=64), torch.bfloat16, "cuda", "triton")


def test_strided_depth_views():
    check_backend(B.but(L=6, chunk=2), torch.bfloat16, "cuda", "triton", depth_slots=24)


def test_float32_is_accurate():
    check_backend(B.but(T=300), torch.float32, "cuda", "triton")


def test_auto_picks_triton_on_cuda():
    inputs = make_inputs(B, torch.bfloat16, "cuda")
    shape = moda_cuda.check_inputs(*inputs, None, True, 1)
    from moda_cuda import dispatch

    assert dispatch.resolve("auto", inputs[0], shape, inputs).name == "triton"


def test_auto_falls_back_for_float64_on_cuda():
    check_backend(Case(T=40, D=16, L=2), torch.float32, "cuda", "auto")
    inputs = make_inputs(Case(T=40, D=16, L=2), torch.float64, "cuda")
    with pytest.warns(RuntimeWarning, match="triton backend skipped"):
        moda_cuda.moda_attention(*inputs)


def test_bitwise_deterministic_gradients():
    leaves = [t.requires_grad_() for t in make_inputs(B.but(chunk=3), torch.bfloat16, "cuda")]
    runs = []
    for deterministic in (False, True, False):  # the Triton backward never uses atomics
        out = moda_cuda.moda_attention(*leaves, depth_chunk=3, deterministic=deterministic)
        runs.append(torch.autograd.grad(out.float().square().sum(), leaves))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


def test_torch_compile_on_cuda():
    leaves = [t.requires_grad_() for t in make_inputs(B, torch.bfloat16, "cuda")]
    fn = torch.compile(lambda *x: moda_cuda.moda_attention(*x).float().square().sum(), fullgraph=True)
    eager = moda_cuda.moda_attention(*leaves).float().square().sum()
    got = fn(*leaves)
    assert torch.allclose(got, eager, rtol=1e-3)
    g1 = torch.autograd.grad(got, leaves)
    g2 = torch.autograd.grad(moda_cuda.moda_attention(*leaves).float().square().sum(), leaves)
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-2
