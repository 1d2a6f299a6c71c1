"""GPU checks (marked ``cuda``): every variant, fp16/bf16, D in {64, 128, 256}, T up to 4500.

Each compares the forward and all five gradients with the float64 reference on fresh random
inputs, with output buffers poisoned (NaN) first. Every check runs on the Triton backend and,
where the compiled kernels cover the case (fp16/bf16, D in {64, 128}, G in {1, 2, 4, 8, 16},
L <= 256), on the cuda backend too (its backward is the compiled one, or the Triton one with
MODA_CUDA_BACKWARD=triton; one test always runs the compiled one). The cuda runs skip when
the backend is unavailable (extension not built, not a compute capability 9.0 device), or
fail instead with MODA_REQUIRE_CUDA_EXT=1.
"""

import os
import warnings

import pytest
import torch

import moda_cuda
from helpers import Case, make_inputs, rel_err
from kernel_checks import check_backend
from moda_cuda import dispatch

pytestmark = pytest.mark.cuda


def cuda_covers(case, dtype) -> bool:
    """The cases the compiled kernels exist for (independent of dispatch's own constants)."""
    return (dtype in (torch.float16, torch.bfloat16) and case.D in (64, 128)
            and case.Hq // case.Hk in (1, 2, 4, 8, 16) and case.L <= 256)


def require_cuda_backend():
    reason = dispatch.CUDA.unavailable()
    if reason:
        if os.environ.get("MODA_REQUIRE_CUDA_EXT") == "1":
            pytest.fail(f"MODA_REQUIRE_CUDA_EXT=1 but the cuda backend is unavailable: {reason}")
        pytest.skip(f"cuda backend unavailable: {reason}")


def check(case, dtype, backend, **kw):
    if backend == "cuda":
        require_cuda_backend()
    check_backend(case, dtype, "cuda", backend, **kw)


def with_backends(params, dtype_of=lambda p: torch.bfloat16, case_of=lambda p: p):
    """Each parameter once per backend: triton always, cuda where the kernels cover it."""
    out = []
    for p in params:
        p = p if isinstance(p, tuple) else (p,)
        for backend in ("triton", "cuda"):
            if backend == "triton" or cuda_covers(case_of(p), dtype_of(p)):
                out.append(pytest.param(*p, backend, id=f"{'-'.join(map(str, p))}-{backend}"))
    return out

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


DTYPES = [torch.bfloat16, torch.float16]


@pytest.mark.parametrize("case,dtype,backend",
                         with_backends([(c, d) for c in VARIANTS for d in DTYPES], dtype_of=lambda p: p[1],
                                       case_of=lambda p: p[0]))
def test_variants(case, dtype, backend):
    check(case, dtype, backend)


def head_dim_case(D, causal):
    return B.but(B=1, T=777, Hq=8, Hk=2, D=D, L=4, causal=causal)


@pytest.mark.parametrize("D,causal,backend",
                         with_backends([(D, c) for D in (64, 96, 128, 192, 256) for c in (True, False)],
                                       case_of=lambda p: head_dim_case(*p)))
def test_head_dims(D, causal, backend):
    check(head_dim_case(D, causal), torch.bfloat16, backend)


def length_case(T):
    return Case(B=1, T=T, Hq=8, Hk=1, D=128, L=16, chunk=2)


@pytest.mark.parametrize("T,backend", with_backends([1, 17, 129, 4096], case_of=lambda p: length_case(*p)))
def test_lengths(T, backend):
    check(length_case(T), torch.bfloat16, backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_long_sequence_paper_layout(backend):
    check(Case(B=1, T=4096, Hq=64, Hk=8, D=64, L=64), torch.bfloat16, backend)


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_strided_depth_views(backend):
    check(B.but(L=6, chunk=2), torch.bfloat16, backend, depth_slots=24)


def test_cuda_reads_head_major_qkv_without_copies():
    """q/k/v as transposed views of [B, H, T, D] tensors: strides the TMA maps take as they are."""
    require_cuda_backend()
    case = B.but(T=300, L=3)
    q, k, v, dk, dv = make_inputs(case, torch.bfloat16, "cuda")
    strided = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v)] + [dk, dv]
    assert not strided[0].is_contiguous()
    shape = moda_cuda.check_inputs(*strided, None, True, 1)
    assert dispatch.CUDA.refuses(strided[0], shape, strided) is None
    want = moda_cuda.moda_attention(q, k, v, dk, dv, backend="triton")
    got = moda_cuda.moda_attention(*strided, backend="cuda")
    assert rel_err(got, want) < 2e-2


def test_cuda_refuses_misaligned_input_explicitly():
    require_cuda_backend()
    q, k, v, dk, dv = make_inputs(B, torch.bfloat16, "cuda")
    q_off = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")[1:].view(q.shape).copy_(q)
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this input: q's data pointer is not 16-byte"):
        moda_cuda.moda_attention(q_off, k, v, dk, dv, backend="cuda")
    out = moda_cuda.moda_attention(q_off, k, v, dk, dv)  # auto: Triton takes it, silently
    assert rel_err(out, moda_cuda.moda_attention(q, k, v, dk, dv, backend="triton")) < 1e-2


def test_float32_is_accurate():
    check_backend(B.but(T=300), torch.float32, "cuda", "triton")


@pytest.mark.parametrize("case, cuda_first", [
    (Case(B=1, T=2048, Hq=16, Hk=2, D=64, L=4), True),  # depth share 1/32
    (Case(B=1, T=256, Hq=16, Hk=2, D=64, L=64), True),  # depth share 4, 0.2 GFLOP: host time decides
    (Case(B=1, T=1024, Hq=16, Hk=8, D=64, L=64), False),  # depth share 4, 2.4 GFLOP
], ids=str)
def test_auto_picks_the_fastest_backend_on_cuda(case, cuda_first):
    """The compiled forward where it is built and the depth share is at most 2 (it measures
    faster there) or the call is tiny (less host time), else Triton."""
    inputs = make_inputs(case, torch.bfloat16, "cuda")
    shape = moda_cuda.check_inputs(*inputs, None, True, 1)
    fastest = dispatch.CUDA if cuda_first and dispatch.CUDA.unavailable() is None else dispatch.TRITON
    assert dispatch.resolve("auto", inputs[0], shape, inputs) is fastest


def test_cuda_backend_on_h200():
    """With the extension built, a compute capability 9.0 device can run the compiled forward."""
    require_cuda_backend()
    assert torch.cuda.get_device_capability() == (9, 0)
    inputs = make_inputs(B, torch.bfloat16, "cuda")
    shape = moda_cuda.check_inputs(*inputs, None, True, 1)
    assert dispatch.resolve("cuda", inputs[0], shape, inputs) is dispatch.CUDA
    assert dispatch.CUDA.backward_name == os.environ.get(dispatch.CUDA_BACKWARD_ENV, "cuda")
    report = moda_cuda.info(print_it=False, shape=(1, 16384, 64, 8, 64, 64))
    assert report["backend for (1, 16384, 64, 8, 64, 64) bfloat16"] == "cuda"
    assert report["backward for (1, 16384, 64, 8, 64, 64) bfloat16"] == dispatch.CUDA.backward_name
    # Depth share 2 (the limit): the compiled forward; 4: Triton's forward, compiled backward.
    report = moda_cuda.info(print_it=False, shape=(1, 512, 64, 8, 64, 64))
    assert report["backend for (1, 512, 64, 8, 64, 64) bfloat16"] == "cuda"
    report = moda_cuda.info(print_it=False, shape=(1, 512, 64, 8, 64, 128))
    assert report["backend for (1, 512, 64, 8, 64, 128) bfloat16"] == "triton"
    assert report["backward for (1, 512, 64, 8, 64, 128) bfloat16"] == dispatch.CUDA.backward_name
    assert report["cuda extension"] == "built" and "sm_90a" in report["cuda extension archs"]


def test_auto_pairs_a_triton_forward_with_the_compiled_backward(monkeypatch):
    """Where the depth share sends auto's forward to Triton, its backward is still the
    compiled one (faster on every benchmark shape), reading the Triton forward's out and lse:
    all five gradients against the float64 reference."""
    require_cuda_backend()
    monkeypatch.setenv(dispatch.CUDA_BACKWARD_ENV, "cuda")
    case = Case(B=1, T=1024, Hq=16, Hk=8, D=64, L=64, chunk=2)  # depth share 4, 2.4 GFLOP
    inputs = make_inputs(case, torch.bfloat16, "cuda")
    shape = moda_cuda.check_inputs(*inputs, None, True, case.chunk)
    assert dispatch.resolve("auto", inputs[0], shape, inputs) is dispatch.TRITON
    assert dispatch.resolve("auto", inputs[0], shape, inputs, direction="backward") is dispatch.CUDA
    check_backend(case, torch.bfloat16, "cuda", "auto")


def test_auto_takes_triton_where_cuda_refuses():
    """D = 96 is not compiled: Triton serves it, with no warning."""
    inputs = make_inputs(head_dim_case(96, True), torch.bfloat16, "cuda")
    shape = moda_cuda.check_inputs(*inputs, None, True, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("auto", inputs[0], shape, inputs) is dispatch.TRITON


def test_auto_falls_back_for_float64_on_cuda():
    check_backend(Case(T=40, D=16, L=2), torch.float32, "cuda", "auto")
    inputs = make_inputs(Case(T=40, D=16, L=2), torch.float64, "cuda")
    with pytest.warns(RuntimeWarning, match="triton backend skipped"):
        moda_cuda.moda_attention(*inputs)


def test_bitwise_deterministic_gradients():
    """deterministic=True: the same bits on every run. The default (where the compiled backward
    accumulates dQ with atomics): dK, dV and the depth gradients still the same bits, dQ equal
    up to the order of its fp32 additions."""
    leaves = [t.requires_grad_() for t in make_inputs(B.but(chunk=3), torch.bfloat16, "cuda")]

    def grads(deterministic):
        out = moda_cuda.moda_attention(*leaves, depth_chunk=3, deterministic=deterministic)
        return torch.autograd.grad(out.float().square().sum(), leaves)

    exact = grads(True)
    for a, b in zip(exact, grads(True)):
        assert torch.equal(a, b)
    first, second = grads(False), grads(False)
    for a, b in zip(first[1:], second[1:]):
        assert torch.equal(a, b)
    for a, b in zip(first, exact):
        assert rel_err(a, b) < 1e-2


@pytest.mark.parametrize("case", [c for c in VARIANTS if cuda_covers(c, torch.bfloat16)], ids=str)
def test_deterministic_compiled_backward_variants(case, monkeypatch):
    """The compiled backward's deterministic mode (dQ from its own kernel, no atomics) on every
    variant the kernels cover: forward and all five gradients against the float64 reference."""
    require_cuda_backend()
    monkeypatch.setenv(dispatch.CUDA_BACKWARD_ENV, "cuda")
    check_backend(case, torch.bfloat16, "cuda", "cuda", deterministic=True)


@pytest.mark.parametrize("case", [B.but(chunk=3), B.but(causal=False, L=0), B.but(D=128, seq=False), B,
                                  B.but(Hq=32, Hk=2, L=70), B.but(B=1, T=4500, L=4)], ids=str)
def test_compiled_backward_is_exact_and_bitwise_repeatable(case, monkeypatch):
    """The compiled backward (forced, whatever MODA_CUDA_BACKWARD the environment sets): all
    five gradients against the float64 reference, and with deterministic=True the same bits
    on a second run (no atomics anywhere). depth_chunk = 1 runs the per-position depth kernel
    after the sequence kernels (the fifth case: two head tiles, a position's 70 rows in two
    items); depth_chunk = 3 the key-stationary kernel's depth boxes. The default mode fuses dQ
    into the key-stationary kernel at G = 8 only past T = 4096 (bwd_fuses_dq): the last case."""
    require_cuda_backend()
    monkeypatch.setenv(dispatch.CUDA_BACKWARD_ENV, "cuda")
    check_backend(case, torch.bfloat16, "cuda", "cuda")
    leaves = [None if t is None else t.requires_grad_() for t in make_inputs(case, torch.bfloat16, "cuda")]
    present = [t for t in leaves if t is not None]
    kw = dict(causal=case.causal, depth_chunk=case.chunk, backend="cuda", deterministic=True)
    runs = [torch.autograd.grad(moda_cuda.moda_attention(*leaves, **kw).float().square().sum(), present)
            for _ in range(2)]
    for a, b in zip(*runs):
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


# Packed documents (batch 1): an empty one, one of a single token, lengths off the tiles.
_DOCUMENTS = [0, 300, 300, 301, 777, 1000]


@pytest.mark.parametrize("case", [B.but(chunk=3), B.but(D=128, seq=False), B.but(Hk=16, L=5, causal=False),
                                  B.but(B=1, chunk=2), B.but(B=1, D=128)], ids=str)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("accumulate", [True, False], ids=["add", "store"])
def test_compiled_backward_adds_depth_grads_into_strided_sums(case, deterministic, accumulate, monkeypatch):
    """The compiled backward's modes for DepthStream.attention: q, k, v gradients as the
    ordinary backward's, and the depth gradients added to what strided views of larger
    buffers already hold (or stored there, overwriting it), the slots past L untouched.
    Batch-1 cases run packed documents."""
    from moda_cuda._spec import packed_documents

    require_cuda_backend()
    monkeypatch.setenv(dispatch.CUDA_BACKWARD_ENV, "cuda")
    q, k, v, dk, dv = make_inputs(case, torch.bfloat16, "cuda", depth_slots=case.L + 3)
    scale, args = case.D ** -0.5, (case.causal, case.chunk)
    documents = None
    if case.B == 1:
        documents = packed_documents(torch.tensor(_DOCUMENTS, dtype=torch.int32, device="cuda"), case.T, None)
    out, lse = dispatch.CUDA.forward(q, k, v, dk, dv, scale, *args, documents)
    dout = torch.randn_like(out)
    want = dispatch.CUDA.backward(dout, None, q, k, v, dk, dv, out, lse, scale, *args, True, documents)
    # Old values of the gradients' own magnitude: a missing or doubled gradient is a large error,
    # rounding the bfloat16 sums a small one.
    buffers = [grad.float().std() * torch.randn(dk.shape[:2] + (case.L + 3,) + dk.shape[3:], device="cuda")
               for grad in want[3:]]
    buffers = [b.bfloat16() for b in buffers]
    before = [b.clone() for b in buffers]
    into = [b[:, :, :case.L] for b in buffers]
    got = dispatch.backward_into_depth_sums(dispatch.CUDA, dout, q, k, v, dk, dv, out, lse, scale, *args,
                                            deterministic, into, documents, accumulate=accumulate)
    for name, a, b in zip("qkv", got, want[:3]):
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel_err(a, b) < 1e-2, name
    for buf, old, grad in zip(buffers, before, want[3:]):
        assert torch.equal(buf[:, :, case.L:], old[:, :, case.L:])
        expected = old[:, :, :case.L].float() + grad.float() if accumulate else grad.float()
        assert rel_err(buf[:, :, :case.L], expected) < 1e-2
        assert grad.abs().amax() > 0


def test_depth_stream_attention_on_cuda_matches_stack():
    """A few layers reading a DepthStream through DepthStream.attention (the compiled backward
    adds the depth gradients into the stream's sums) against the stack-per-layer formulation."""
    require_cuda_backend()
    Bt, T, Hq, Hk, D, n_layers = 2, 300, 8, 2, 64, 4
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(Bt, T, Hq, D, generator=g).cuda().bfloat16().requires_grad_()
    scales = torch.randn(n_layers, 3, D, generator=g).mul(0.1).add(1).cuda().bfloat16().requires_grad_()

    def run(stacked):
        stream = moda_cuda.DepthStream(Bt, T, n_layers, Hk, D, dtype=torch.bfloat16, device="cuda")
        x, ks, vs = x0, [], []
        for l in range(n_layers):
            kv = x.view(Bt, T, Hk, Hq // Hk, D).mean(3)
            q, k, v = x * scales[l, 0], kv * scales[l, 1], kv * scales[l, 2]
            if stacked:
                depth = (torch.stack(ks, 2), torch.stack(vs, 2)) if ks else (None, None)
                out = moda_cuda.moda_attention(q, k, v, *depth, depth_chunk=2, backend="cuda")
                ks.append(k)
                vs.append(v)
            else:
                out = stream.attention(q, k, v, depth_chunk=2, backend="cuda")
                stream.append(k, v)
            x = x + out * 0.25
        return torch.autograd.grad(x.float().square().mean(), (x0, scales))

    for a, b in zip(run(stacked=False), run(stacked=True)):
        assert rel_err(a, b) < 1e-2


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_qkv_as_views_of_one_projection(backend):
    """The layers' layout: q and v views of one GEMM's [B, T, Hq + 2 Hk, D] output (strides
    unlike k's), k contiguous (rotated), depth views of a larger stream buffer. The output
    and all five gradients equal those of contiguous copies bit for bit (deterministic), and
    the float64 reference's within bf16 error."""
    if backend == "cuda":
        require_cuda_backend()
    from moda_cuda.reference import moda_attention_ref

    case = Case(B=4, T=1024, Hq=8, Hk=2, D=64, L=6)
    q, k, v, dk, dv = make_inputs(case, torch.bfloat16, "cuda", seed=3, depth_slots=14)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(4)).to("cuda", torch.bfloat16)

    def run(fused: bool):
        qkv = torch.cat([q, k, v], dim=2).requires_grad_()  # one projection's output
        k_leaf = k.clone().requires_grad_()
        dk_buf, dv_buf = (t._base.clone().requires_grad_() for t in (dk, dv))
        q_in, _, v_in = qkv.split((case.Hq, case.Hk, case.Hk), dim=2)
        if not fused:
            q_in, v_in = q_in.contiguous(), v_in.contiguous()
        out = moda_cuda.moda_attention(q_in, k_leaf, v_in, dk_buf[:, :, :case.L], dv_buf[:, :, :case.L],
                                       backend=backend, deterministic=True)
        grads = torch.autograd.grad(out, (qkv, k_leaf, dk_buf, dv_buf), grad_out)
        d_q, _, d_v = grads[0].split((case.Hq, case.Hk, case.Hk), dim=2)
        return out, d_q, grads[1], d_v, grads[2][:, :, :case.L], grads[3][:, :, :case.L]

    fused, plain = run(True), run(False)
    for got, want in zip(fused, plain):
        assert torch.equal(got, want)
    leaves = [t.double().requires_grad_() for t in (q, k, v, dk, dv)]
    ref = moda_attention_ref(*leaves)
    want = (ref,) + torch.autograd.grad(ref, leaves, grad_out.double())
    for name, got, w in zip(("out", "dq", "dk", "dv", "ddepth_k", "ddepth_v"), fused, want):
        assert rel_err(got, w) < 2e-2, name


def test_expanded_inputs_take_a_backend_that_reads_them():
    """Keys shared by the whole batch (an expand, stride 0) and a gradient with a stride 0 (from
    a sum over positions): auto runs them where they are read as such (the compiled kernels'
    TMA maps take no stride 0: Triton, and a contiguous copy of the gradient), against the
    float64 reference."""
    from moda_cuda.reference import moda_attention_ref

    require_cuda_backend()
    case = Case(B=3, T=200, Hq=8, Hk=2, D=64, L=4)
    q, k, v, dk, dv = make_inputs(case, torch.bfloat16, "cuda")
    k, v = k[:1].expand(k.shape), v[:1].expand(v.shape)
    assert dispatch.CUDA.refuses(q, moda_cuda.check_inputs(q, k, v, dk, dv, None, True, 1), (q, k, v, dk, dv))
    leaves = [t.detach().requires_grad_() for t in (q, k, v, dk, dv)]
    out = moda_cuda.moda_attention(*leaves)
    out.sum(dim=1).square().sum().backward()  # dO of stride 0 over positions
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, dk, dv)]
    want = moda_attention_ref(*ref)
    want.sum(dim=1).square().sum().backward()
    assert rel_err(out, want) < 1e-2
    for got, exp in zip(leaves, ref):
        assert rel_err(got.grad, exp.grad) < 2e-2
