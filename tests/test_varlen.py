"""Packed documents (``cu_seqlens``): every backend against the per-document float64 reference.

The contract: packing documents into batch 1 gives, for every document, exactly what the
dense op gives on that document alone (chunks restart at each document's first position).
On a CPU-only machine the Triton kernels run in Triton's interpreter (conftest.py), with
16-row tiles, so tiles straddle document boundaries at these sizes.
"""

import pytest
import torch

import moda_cuda
from helpers import Case, make_inputs, rel_err
from kernel_checks import TOLERANCE, poisoned_allocations
from moda_cuda.reference import moda_attention_ref, moda_attention_ref_backward

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Document lengths: empty ones, one-token ones, and ones longer than a tile.
LENGTHS = [5, 0, 18, 1, 40, 0, 7]


def _cu(lengths, device="cpu"):
    return torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32, device=device)


def _packed_inputs(case: Case, lengths, dtype, device, seed=0):
    return make_inputs(case.but(B=1, T=sum(lengths)), dtype, device, seed=seed)


def _kw(case):
    return dict(causal=case.causal, depth_chunk=case.chunk)


def _per_document(inputs, lengths, case):
    """The dense reference on each document alone, concatenated: (out, lse)."""
    outs, lses, start = [], [], 0
    for n in lengths:
        if n:
            views = [None if t is None else t[:, start:start + n] for t in inputs]
            o, s = moda_attention_ref(*views, return_lse=True, **_kw(case))
            outs.append(o)
            lses.append(s)
        start += n
    return torch.cat(outs, 1), torch.cat(lses, 2)


CASES = [
    Case(Hq=4, Hk=2, D=16, L=3),
    Case(Hq=4, Hk=2, D=16, L=3, chunk=3),
    Case(Hq=4, Hk=2, D=16, L=2, chunk=4, causal=False),
    Case(Hq=4, Hk=2, D=16, L=1, causal=False),
    Case(Hq=2, Hk=2, D=16, L=2, chunk=2),  # G = 1
    Case(Hq=4, Hk=1, D=16, L=2),  # G = Hq
    Case(Hq=4, Hk=2, D=16, L=3, chunk=2, seq=False),  # depth-only
    Case(Hq=4, Hk=2, D=16, L=0),  # no depth rows
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_reference_is_the_dense_op_per_document(case):
    inputs = _packed_inputs(case, LENGTHS, torch.float64, "cpu")
    out, lse = moda_attention_ref(*inputs, return_lse=True, cu_seqlens=_cu(LENGTHS), **_kw(case))
    want_out, want_lse = _per_document(inputs, LENGTHS, case)
    assert rel_err(out, want_out) < 1e-14 and rel_err(lse, want_lse) < 1e-14


def test_reference_backward_is_autograd_of_reference():
    case = Case(Hq=4, Hk=2, D=8, L=2, chunk=3)
    lengths = [4, 0, 9, 1]
    inputs = _packed_inputs(case, lengths, torch.float64, "cpu")
    leaves = [t.clone().requires_grad_() for t in inputs]
    out, lse = moda_attention_ref(*leaves, return_lse=True, cu_seqlens=_cu(lengths), **_kw(case))
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    want = torch.autograd.grad((out * g_out).sum() + (lse * g_lse).sum(), leaves)
    got = moda_attention_ref_backward(g_out, *inputs, out.detach(), lse.detach(), grad_lse=g_lse,
                                      cu_seqlens=_cu(lengths), **_kw(case))
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-13


def _check_backend(case, lengths, dtype, backend, device=DEVICE):
    inputs = _packed_inputs(case, lengths, dtype, device)
    leaves = [None if t is None else t.clone().requires_grad_() for t in inputs]
    cu = _cu(lengths, device)
    with poisoned_allocations():
        out, lse = moda_cuda.moda_attention(*leaves, cu_seqlens=cu, return_lse=True, backend=backend, **_kw(case))
    ref_in = [None if t is None else t.detach().double().cpu() for t in inputs]
    ref_out, ref_lse = moda_attention_ref(*ref_in, return_lse=True, cu_seqlens=_cu(lengths), **_kw(case))
    g = torch.Generator().manual_seed(1)
    g_out = torch.randn(out.shape, generator=g).to(device=device, dtype=dtype)
    with poisoned_allocations():
        got = torch.autograd.grad(out, [t for t in leaves if t is not None], g_out)
    want = moda_attention_ref_backward(g_out.double().cpu(), *ref_in, ref_out, ref_lse, cu_seqlens=_cu(lengths),
                                       **_kw(case))
    errors = {"out": rel_err(out, ref_out), "lse": rel_err(lse, ref_lse)}
    got = iter(got)
    for name, leaf, ref in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v"), leaves, want):
        if leaf is not None:
            errors[name] = rel_err(next(got), ref)
    bad = {k: v for k, v in errors.items() if not v < TOLERANCE[dtype]}
    assert not bad, f"{case} {lengths} {dtype}: errors over {TOLERANCE[dtype]}: {bad}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_triton_matches_reference(case):
    _check_backend(case, LENGTHS, torch.float32, "triton")


@pytest.mark.parametrize("lengths", [[1], [23], [0, 3, 0], [17, 16, 1]], ids=str)
def test_triton_odd_document_sets(lengths):
    _check_backend(Case(Hq=4, Hk=2, D=16, L=2, chunk=2), lengths, torch.float32, "triton")


@pytest.mark.parametrize("causal", [True, False])
def test_depth_chunk_past_the_length_is_one_chunk(causal):
    """Every depth_chunk >= T is one chunk. The backends cap it at T: the reference's blocks are
    C x C L (a chunk of 2^31 - 1 would ask for terabytes), and the kernels add C to positions
    in 32 bits (with a document starting at a > 0, a + C wrapped and hid the depth rows)."""
    lengths = [3, 5]
    case = Case(Hq=4, Hk=2, D=8, L=2, chunk=2**31 - 1, causal=causal)
    inputs = _packed_inputs(case, lengths, torch.float64, "cpu")
    for cu in (_cu(lengths), None):
        huge = moda_attention_ref(*inputs, cu_seqlens=cu, **_kw(case))
        assert torch.equal(huge, moda_attention_ref(*inputs, cu_seqlens=cu, **_kw(case.but(chunk=8))))
    _check_backend(case, lengths, torch.float32, "triton")
    _check_backend(case.but(seq=False), lengths, torch.float32, "triton")


@pytest.mark.parametrize("backend", ["reference", "triton", "cuda"])
def test_one_document_is_the_dense_op(backend):
    if backend not in moda_cuda.available_backends():
        pytest.skip(f"{backend} backend not available here")
    case = Case(T=29, Hq=4, Hk=2, D=16, L=3, chunk=2)
    if backend == "cuda":
        case = case.but(T=300, D=64)
    dtype = torch.bfloat16 if backend == "cuda" else torch.float32
    inputs = make_inputs(case, dtype, DEVICE)
    dense = moda_cuda.moda_attention(*inputs, return_lse=True, backend=backend, **_kw(case))
    packed = moda_cuda.moda_attention(*inputs, cu_seqlens=_cu([case.T], DEVICE), max_seqlen=case.T, return_lse=True,
                                      backend=backend, **_kw(case))
    for a, b in zip(packed, dense):
        assert rel_err(a, b) < 1e-6 if backend != "cuda" else torch.equal(a, b)  # the same kernels, bit for bit


def test_gradcheck_float64():
    case = Case(Hq=2, Hk=1, D=4, L=2, chunk=2)
    lengths = [3, 0, 4]
    leaves = tuple(t.clone().requires_grad_() for t in _packed_inputs(case, lengths, torch.float64, "cpu"))
    cu = _cu(lengths)

    def fn(*x):
        return moda_cuda.moda_attention(*x, cu_seqlens=cu, depth_chunk=2, return_lse=True)

    assert torch.autograd.gradcheck(fn, leaves)


def test_opcheck():
    case = Case(Hq=4, Hk=2, D=8, L=2)
    lengths = [3, 0, 6]
    leaves = [t.clone().requires_grad_() for t in _packed_inputs(case, lengths, torch.float32, "cpu")]
    torch.library.opcheck(torch.ops.moda.attention_varlen.default, (*leaves, _cu(lengths), 6, None, True, 2))


def test_torch_compile_fullgraph_matches_eager():
    case = Case(Hq=4, Hk=2, D=8, L=2)
    lengths = [4, 7]
    leaves = [t.clone().requires_grad_() for t in _packed_inputs(case, lengths, torch.float32, "cpu")]
    cu = _cu(lengths)

    def loss(*x):
        return moda_cuda.moda_attention(*x, cu_seqlens=cu, max_seqlen=7, depth_chunk=2).square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager = loss(*leaves)
    got = compiled(*leaves)
    assert torch.allclose(got, eager, rtol=1e-6)
    for a, b in zip(torch.autograd.grad(got, leaves), torch.autograd.grad(eager, leaves)):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("bad, message", [
    (lambda cu, q: cu.long(), "int32"),
    (lambda cu, q: cu[None], r"\[n_docs \+ 1\]"),
    (lambda cu, q: cu[:1], r"\[n_docs \+ 1\]"),
    (lambda cu, q: cu + 1, "start at 0"),
    (lambda cu, q: torch.tensor([0, 6, 4, 11], dtype=torch.int32), "non-decreasing"),
    (lambda cu, q: torch.tensor([0, 4, 10], dtype=torch.int32), "end at the packed length N = 11"),
    (lambda cu, q: [0, 4, 11], "torch.Tensor"),
])
def test_bad_cu_seqlens_raise_before_any_kernel(bad, message):
    case = Case(Hq=4, Hk=2, D=8, L=2)
    inputs = _packed_inputs(case, [4, 7], torch.float32, "cpu")
    with pytest.raises((ValueError, TypeError), match=message):
        moda_cuda.moda_attention(*inputs, cu_seqlens=bad(_cu([4, 7]), inputs[0]))


def test_bad_batch_and_max_seqlen_raise():
    case = Case(B=2, T=6, Hq=4, Hk=2, D=8, L=2)
    inputs = make_inputs(case, torch.float32, "cpu")
    with pytest.raises(ValueError, match="batch 1"):
        moda_cuda.moda_attention(*inputs, cu_seqlens=_cu([6]))
    inputs = _packed_inputs(case, [4, 7], torch.float32, "cpu")
    with pytest.raises(ValueError, match="smaller than the longest document"):
        moda_cuda.moda_attention(*inputs, cu_seqlens=_cu([4, 7]), max_seqlen=5)
    with pytest.raises(TypeError, match="max_seqlen"):
        moda_cuda.moda_attention(*inputs, cu_seqlens=_cu([4, 7]), max_seqlen=7.0)
    with pytest.raises(ValueError, match="without cu_seqlens"):
        moda_cuda.moda_attention(*inputs, max_seqlen=11)


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [Case(Hq=32, Hk=8, D=128, L=8, chunk=1), Case(Hq=16, Hk=2, D=64, L=4, chunk=4),
                                  Case(Hq=8, Hk=8, D=64, L=3, causal=False), Case(Hq=8, Hk=2, D=64, L=5, seq=False),
                                  Case(Hq=16, Hk=1, D=64, L=2, chunk=3, causal=False), Case(Hq=8, Hk=4, D=128, L=0),
                                  Case(Hq=16, Hk=2, D=64, L=4, chunk=2**31 - 1)],  # one chunk per document
                         ids=str)
def test_gpu_matches_reference(case, dtype, backend):
    if backend not in moda_cuda.available_backends():
        pytest.skip(f"{backend} backend not available here")
    # Documents of 1 .. 700 tokens: tiles of 64 / 128 rows hold several documents or part of one.
    lengths = [300, 1, 0, 129, 64, 700, 17, 3, 128, 256]
    _check_backend(case, lengths, dtype, backend, device="cuda")


@pytest.mark.cuda
def test_gpu_deterministic_backward_with_packed_documents():
    if "cuda" not in moda_cuda.available_backends():
        pytest.skip("cuda backend not available here")
    case = Case(Hq=16, Hk=2, D=64, L=4)
    lengths = [200, 0, 77, 500]
    inputs = _packed_inputs(case, lengths, torch.bfloat16, "cuda")
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in inputs]
        out = moda_cuda.moda_attention(*leaves, cu_seqlens=_cu(lengths, "cuda"), backend="cuda", deterministic=True)
        grads.append(torch.autograd.grad(out.float().square().sum(), leaves))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_depth_stream_attention_with_packed_documents():
    """DepthStream.attention (depth gradients summed in place) = the op on the stream's read."""
    from moda_cuda import DepthStream

    lengths, Hq, Hk, D = [6, 0, 11], 4, 2, 8
    N, cu = sum(lengths), _cu(lengths)
    g = torch.Generator().manual_seed(0)
    layers = [[torch.randn(1, N, h, D, generator=g, dtype=torch.float64, requires_grad=True) for h in (Hq, Hk, Hk)]
              for _ in range(3)]

    def run(in_place: bool):
        stream = DepthStream(1, N, 3, Hk, D, dtype=torch.float64)
        total = 0
        for q, k, v in layers:
            if in_place:
                out = stream.attention(q, k, v, depth_chunk=2, cu_seqlens=cu)
            else:
                out = moda_cuda.moda_attention(q, k, v, *stream.read(), depth_chunk=2, cu_seqlens=cu)
            stream.append(k, v)
            total = total + out.square().sum()
        return torch.autograd.grad(total, [t for layer in layers for t in layer])

    for a, b in zip(run(True), run(False)):
        assert rel_err(a, b) < 1e-12


def test_causal_lm_on_packed_documents_is_the_lm_per_document():
    from moda_cuda.layers import MoDAConfig, MoDAForCausalLM

    torch.manual_seed(0)
    model = MoDAForCausalLM(MoDAConfig(d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=40,
                                       max_seq_len=16)).double()
    lengths = [7, 0, 12, 1]
    docs = [torch.randint(0, 40, (1, n)) for n in lengths if n]
    ids = torch.cat(docs, 1)  # 20 tokens: longer than max_seq_len, each document shorter
    packed = model(ids, cu_seqlens=_cu(lengths)).logits
    alone = torch.cat([model(d).logits for d in docs], 1)
    assert rel_err(packed, alone) < 1e-12
    params = list(model.parameters())
    g_packed = torch.autograd.grad(packed.square().sum(), params)
    g_alone = torch.autograd.grad(alone.square().sum(), params)
    for a, b in zip(g_packed, g_alone):
        assert rel_err(a, b) < 1e-6  # RMSNorm computes in float32: its weights' sums round there
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(ids, cu_seqlens=_cu([20]))
    # The offsets' values are checked before the rotary tables are sized by max_seqlen.
    with pytest.raises(ValueError, match="smaller than the longest document"):
        model(ids, cu_seqlens=_cu(lengths), max_seqlen=3)
    with pytest.raises(ValueError, match="without cu_seqlens"):
        model(ids[:, :8], max_seqlen=8)


def test_offsets_are_read_once_per_tensor_and_again_after_a_change(monkeypatch):
    from moda_cuda import _spec

    reads = []
    real = _spec._read_documents
    monkeypatch.setattr(_spec, "_read_documents", lambda cu, n: reads.append(1) or real(cu, n))
    case = Case(Hq=4, Hk=2, D=8, L=2)
    leaves = [t.clone().requires_grad_() for t in _packed_inputs(case, [4, 7], torch.float32, "cpu")]
    cu = _cu([4, 7])
    for _ in range(3):
        moda_cuda.moda_attention(*leaves, cu_seqlens=cu).sum().backward()
    assert len(reads) == 1
    cu[1] = 5  # in place: a new version, read again
    moda_cuda.moda_attention(*leaves, cu_seqlens=cu)
    assert len(reads) == 2
    cu[2] = 10
    with pytest.raises(ValueError, match="end at the packed length"):
        moda_cuda.moda_attention(*leaves, cu_seqlens=cu)
