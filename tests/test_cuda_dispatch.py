"""The cuda backend's policy, on any machine: availability, what it refuses and why, and
the glue around the extension (its forward's buffers, the Triton backward behind it).

``refuses`` is called on real tensors whose sizes, strides and pointers are what they are;
only the device check is replaced (CPU and meta tensors stand in for CUDA ones), so every
other condition is decided on honest numbers.
"""

import warnings

import pytest
import torch

import moda_cuda
from helpers import Case, as_double, make_inputs, rel_err
from kernel_checks import poisoned_allocations
from moda_cuda import _cuda_ext, dispatch
from moda_cuda._spec import MoDAShape
from moda_cuda.reference import moda_attention_ref, moda_attention_ref_backward

GOOD = Case(B=2, T=37, Hq=8, Hk=2, D=64, L=5)  # G = 4


def cuda_usable() -> bool:
    return dispatch.CUDA.unavailable() is None


@pytest.fixture
def hopper(monkeypatch):
    """Any device counts as a compute capability 9.0 CUDA device."""
    monkeypatch.setattr(dispatch, "_device_capability", lambda device: (9, 0))


def refuses(q, k, v, dk, dv):
    shape = moda_cuda.check_inputs(q, k, v, dk, dv, None, True, 1)
    return dispatch.CUDA.refuses(q, shape, (q, k, v, dk, dv))


def inputs(case=GOOD, dtype=torch.bfloat16, **kw):
    return make_inputs(case, dtype, "cpu", **kw)


# ----------------------------------------------------------------------------- availability


def test_registry_order_and_backward_names(monkeypatch):
    monkeypatch.delenv(dispatch.CUDA_BACKWARD_ENV, raising=False)
    assert list(dispatch.BACKENDS) == ["triton", "cuda", "reference"]
    # The compiled forward measures faster than Triton's on the H200: auto tries it first.
    assert dispatch._AUTO_ORDER == (dispatch.CUDA, dispatch.TRITON)
    assert dispatch.CUDA.backward_name == "cuda"  # the compiled backward, unless MODA_CUDA_BACKWARD=triton
    assert dispatch.TRITON.backward_name == "triton" and dispatch.REFERENCE.backward_name == "reference"


def test_cuda_backward_switch(monkeypatch):
    monkeypatch.delenv(dispatch.CUDA_BACKWARD_ENV, raising=False)
    assert dispatch.cuda_backward_by() == "cuda" and dispatch.CUDA.backward_name == "cuda"
    monkeypatch.setenv(dispatch.CUDA_BACKWARD_ENV, "triton")
    assert dispatch.CUDA.backward_name == "triton"
    monkeypatch.setenv(dispatch.CUDA_BACKWARD_ENV, "fast")
    with pytest.raises(ValueError, match="MODA_CUDA_BACKWARD='fast'; allowed: triton, cuda"):
        dispatch.cuda_backward_by()


def test_unavailable_says_why():
    reason = dispatch.CUDA.unavailable()
    if reason is None:
        pytest.skip("the cuda backend is usable on this machine")
    if _cuda_ext.load() is None:
        assert "moda_cuda._C" in reason and _cuda_ext.load_error() in reason
        if _cuda_ext.load_error() == _cuda_ext.NOT_BUILT:
            assert "not built" in reason
    elif not torch.cuda.is_available():
        assert reason == "no CUDA device"
    else:
        assert "compute capability" in reason and "9.0 (sm_90a)" in reason
    assert "cuda" not in moda_cuda.available_backends()


def test_extension_loader_when_not_built():
    if _cuda_ext.load() is not None:
        assert _cuda_ext.load_error() is None and _cuda_ext.compiled_archs()
        assert _cuda_ext.cuda_version()
        return
    assert _cuda_ext.load_error()
    assert _cuda_ext.compiled_archs() == [] and _cuda_ext.cuda_version() is None
    report = moda_cuda.info(print_it=False)
    assert report["cuda extension"] == _cuda_ext.load_error()
    assert report["backends"]["cuda"] == dispatch.CUDA.unavailable()


def test_explicit_cuda_backend_raises_with_the_reason():
    reason = dispatch.CUDA.unavailable()
    if reason is None:
        pytest.skip("the cuda backend is usable on this machine")
    with pytest.raises(ValueError, match="MoDA backend 'cuda' cannot run this input: ") as err:
        moda_cuda.moda_attention(*inputs(), backend="cuda")
    assert reason in str(err.value)


def test_env_override_to_cuda_raises_with_the_reason(monkeypatch):
    if cuda_usable():
        pytest.skip("the cuda backend is usable on this machine")
    monkeypatch.setenv("MODA_BACKEND", "cuda")
    with pytest.raises(ValueError, match="backend 'cuda' cannot run this input"):
        moda_cuda.moda_attention(*inputs())


# ----------------------------------------------------------------------------- refuses


def test_refuses_non_cuda_tensors():
    assert refuses(*inputs()) == "inputs are on cpu; the CUDA kernels need CUDA tensors"


def test_refuses_other_compute_capabilities(monkeypatch):
    for cap in [(8, 0), (10, 0), (9, 1)]:
        monkeypatch.setattr(dispatch, "_device_capability", lambda device, cap=cap: cap)
        reason = refuses(*inputs())
        assert f"compute capability {cap[0]}.{cap[1]}" in reason and "9.0 (sm_90a) only" in reason


@pytest.mark.parametrize("case", [
    GOOD,
    GOOD.but(D=128),
    GOOD.but(Hq=2, Hk=2),  # G = 1
    GOOD.but(Hq=4, Hk=2),  # G = 2
    GOOD.but(Hq=16, Hk=2),  # G = 8
    GOOD.but(Hq=16, Hk=1),  # G = 16
    GOOD.but(L=0),
    GOOD.but(L=256, T=3),
    GOOD.but(seq=False),  # depth-only
    GOOD.but(T=1),
    GOOD.but(B=1, causal=False, chunk=7),
], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_accepts_the_compiled_cases(hopper, case, dtype):
    assert refuses(*inputs(case, dtype)) is None


def test_accepts_strided_views(hopper):
    # Depth as a slice of a deeper buffer, q/k/v as transposed head-major tensors.
    q, k, v, dk, dv = inputs(depth_slots=12)
    assert not dk.is_contiguous()
    qh, kh, vh = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in (q, k, v))
    assert not qh.is_contiguous()
    assert refuses(qh, kh, vh, dk, dv) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_refuses_dtype(hopper, dtype):
    assert refuses(*inputs(dtype=dtype)) == \
        f"dtype {dtype} is not supported by the CUDA kernel (float16, bfloat16 are)"


@pytest.mark.parametrize("D", [16, 32, 96, 192, 256])
def test_refuses_head_dim(hopper, D):
    assert refuses(*inputs(GOOD.but(D=D))) == f"head_dim {D} is not compiled for the CUDA kernel (64, 128 are)"


@pytest.mark.parametrize("Hq,Hk", [(6, 2), (12, 2), (32, 1), (10, 1)])
def test_refuses_group_size(hopper, Hq, Hk):
    assert refuses(*inputs(GOOD.but(Hq=Hq, Hk=Hk))) == \
        f"G = Hq/Hk = {Hq // Hk} is not compiled for the CUDA kernel (1, 2, 4, 8, 16 are)"


def test_refuses_depth_over_256(hopper):
    assert refuses(*inputs(GOOD.but(L=257, T=2))) == "depth L = 257 > 256, the CUDA kernel's maximum"


def test_refuses_non_contiguous_last_dim(hopper):
    q, k, v, dk, dv = inputs()
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # same values, last-dim stride Hq
    assert q_t.stride(-1) != 1
    assert refuses(q_t, k, v, dk, dv) == \
        f"q has stride {q_t.stride(-1)} in its last dim; the CUDA kernel needs it contiguous (TMA)"
    dv_t = dv.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert refuses(q, k, v, dk, dv_t).startswith("depth_v has stride")


def test_refuses_strides_not_a_multiple_of_8(hopper):
    q, k, v, dk, dv = inputs()
    wide = torch.zeros(*k.shape[:-1], k.shape[-1] + 4, dtype=k.dtype)  # rows 68 elements apart
    k_view = wide[..., : k.shape[-1]]
    assert k_view.stride(-1) == 1 and k_view.stride(-2) == 68
    reason = refuses(q, k_view, v, dk, dv)
    assert reason.startswith(f"k has strides {tuple(k_view.stride())}") and "multiple of 8 elements" in reason


def test_refuses_misaligned_pointers(hopper):
    q, k, v, dk, dv = inputs()
    flat = torch.zeros(q.numel() + 1, dtype=q.dtype)
    q_off = flat[1:].view(q.shape)  # 2 bytes past an aligned allocation, contiguous
    assert q_off.data_ptr() % 16 != 0 and q_off.is_contiguous()
    assert refuses(q_off, k, v, dk, dv) == "q's data pointer is not 16-byte aligned (TMA)"
    flat = torch.zeros(dk.numel() + 8, dtype=dk.dtype)
    dk_off = flat[8:].view(dk.shape)  # 16 bytes past: aligned
    assert refuses(q, k, v, dk_off, dv) is None
    flat = torch.zeros(dk.numel() + 4, dtype=dk.dtype)
    assert refuses(q, k, v, dk, flat[4:].view(dk.shape)) == "depth_v's data pointer is not 16-byte aligned (TMA)"


def test_empty_depth_pointer_is_not_checked(hopper):
    q, k, v, _, _ = inputs()
    empty = torch.zeros(2 * 37 * 2 * 64 + 1, dtype=q.dtype)[1:1].view(2, 37, 0, 2, 64)  # L = 0, odd address
    assert refuses(q, k, v, empty, empty) is None


def test_refuses_what_the_triton_backward_cannot_take(hopper):
    # One batch entry over 2**31 elements: meta tensors, nothing allocated.
    meta = dict(device="meta", dtype=torch.bfloat16)
    q = torch.empty(1, 2**19, 64, 128, **meta)
    k = torch.empty(1, 2**19, 8, 128, **meta)
    assert refuses(q, k, k, None, None) == "one batch entry spans more than 2**31 elements (int32 offsets)"
    # An input expanded to that size spans little, but its gradient would be allocated whole.
    assert dispatch._int32_offsets_refuse((q[:, :1].expand(q.shape),)) is not None


def test_refuses_expanded_inputs(hopper):
    q, k, v, dk, dv = inputs()
    shared = k[:1].expand(k.shape)  # one sequence's keys for the whole batch
    assert refuses(q, shared, v, dk, dv) == ("k has a stride of 0 (an expanded tensor); the CUDA kernel's TMA maps "
                                              "take none")


def test_refuses_grids_past_the_launch_limits(hopper, monkeypatch):
    q, k = torch.zeros(65536, 1, 2, 64, dtype=torch.bfloat16), torch.zeros(65536, 1, 1, 64, dtype=torch.bfloat16)
    assert refuses(q, k, k, None, None) == "B = 65536 or Hk = 1 > 65535 (the kernels' grid dimensions)"
    monkeypatch.setattr(dispatch, "_interpreting", lambda: True)  # CPU tensors count for Triton
    shape = moda_cuda.check_inputs(q, k, k, None, None, None, True, 1)
    assert dispatch.TRITON.refuses(q, shape, (q, k, k, None, None)) == \
        "B x Hk = 65536 > 65535 (the kernels' grid dimension)"


def test_first_refusal_wins_in_a_fixed_order(hopper):
    # float32 and D = 96 and G = 3: the dtype is named first.
    assert refuses(*inputs(GOOD.but(D=96, Hq=6, Hk=2), torch.float32)).startswith("dtype torch.float32")


# ----------------------------------------------------------------------------- auto policy


def _spec(T, Hq, Hk, L, has_seq=True):
    return MoDAShape(batch=1, seqlen=T, q_heads=Hq, kv_heads=Hk, head_dim=64, depth=L, has_seq=has_seq)


@pytest.mark.parametrize("spec, share", [
    (_spec(16384, 64, 8, 64), 1 / 16),
    (_spec(8192, 32, 8, 32), 1 / 8),
    (_spec(4096, 64, 8, 64), 1 / 4),
    (_spec(4096, 64, 8, 0), 0.0),
    (_spec(1, 16, 16, 4), 256.0),  # T = 1: one key, 64 dense depth columns
    (_spec(4096, 64, 8, 64, has_seq=False), float("inf")),
], ids=str)
def test_cuda_depth_share(spec, share):
    assert dispatch.cuda_depth_share(spec) == pytest.approx(share)


def test_auto_order_moves_cuda_last_where_the_depth_share_is_large():
    assert dispatch._auto_order(_spec(16384, 64, 8, 64)) == (dispatch.CUDA, dispatch.TRITON)
    assert dispatch._auto_order(_spec(8192, 32, 8, 32)) == (dispatch.CUDA, dispatch.TRITON)
    assert dispatch._auto_order(_spec(4096, 32, 8, 31)) == (dispatch.CUDA, dispatch.TRITON)  # share 0.242
    assert dispatch._auto_order(_spec(4096, 64, 8, 64)) == (dispatch.CUDA, dispatch.TRITON)  # share 1/4
    assert dispatch._auto_order(_spec(2048, 64, 8, 64)) == (dispatch.CUDA, dispatch.TRITON)  # share 1/2
    assert dispatch._auto_order(_spec(1024, 64, 8, 64)) == (dispatch.CUDA, dispatch.TRITON)  # share 1
    assert dispatch._auto_order(_spec(512, 64, 8, 64)) == (dispatch.CUDA, dispatch.TRITON)  # at the bound, 2
    assert dispatch._auto_order(_spec(512, 64, 8, 128)) == (dispatch.TRITON, dispatch.CUDA)  # share 4, 3.2 GFLOP
    assert dispatch._auto_order(_spec(4096, 64, 8, 64, has_seq=False)) == (dispatch.TRITON, dispatch.CUDA)


def test_auto_order_keeps_cuda_first_where_host_time_decides():
    """Tiny calls (under 2 GFLOP forward) take the backend with the least host time per call,
    whatever the depth share: here shares 4 and 8, where a large call would take Triton."""
    tiny = MoDAShape(batch=1, seqlen=64, q_heads=8, kv_heads=2, head_dim=64, depth=4, has_seq=True)
    assert dispatch.cuda_depth_share(tiny) == pytest.approx(2.0)
    assert dispatch.forward_flops(tiny) == pytest.approx(4 * 8 * 64 * 64 * (32 + 4))
    assert dispatch._auto_order(tiny) == (dispatch.CUDA, dispatch.TRITON)
    assert dispatch._auto_order(_spec(128, 16, 2, 64)) == (dispatch.CUDA, dispatch.TRITON)
    assert dispatch._auto_order(_spec(512, 64, 8, 128)) == (dispatch.TRITON, dispatch.CUDA)  # share 4, 3.2 GFLOP


@pytest.mark.parametrize("spec", [_spec(16384, 64, 8, 64), _spec(4096, 64, 8, 64),
                                  _spec(4096, 64, 8, 64, has_seq=False), _spec(1, 16, 16, 4)], ids=str)
def test_auto_order_of_the_backward_is_cuda_first_at_every_depth_share(spec):
    """The compiled backward measured faster on every benchmark shape, whichever forward ran."""
    assert dispatch._auto_order(spec, "backward") == (dispatch.CUDA, dispatch.TRITON)


def test_resolve_rejects_an_unknown_direction():
    q = inputs()[0]
    shape = moda_cuda.check_inputs(*inputs(), None, True, 1)
    with pytest.raises(ValueError, match="direction must be one of"):
        dispatch.resolve("auto", q, shape, (), direction="sideways")



def test_auto_passes_a_cuda_refusal_to_triton_silently(monkeypatch):
    """A fast path's refusal is silent when the next fast path serves; warnings only for the reference."""
    calls = []

    def backend(name, reason):
        return dispatch.Backend(name, lambda: None, lambda q, s, t: calls.append(name) or reason,
                                dispatch.REFERENCE.forward, dispatch.REFERENCE.backward)

    first, second = backend("first", "D not compiled"), backend("second", None)
    monkeypatch.setattr(dispatch, "_AUTO_ORDER", (first, second))
    monkeypatch.setattr(dispatch, "_warned", set())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    q = inputs()[0]
    shape = moda_cuda.check_inputs(*inputs(), None, True, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dispatch.resolve("auto", q, shape, ()) is second
    assert calls == ["first", "second"]
    monkeypatch.setattr(dispatch, "_AUTO_ORDER", (first, backend("third", "fp32")))
    with pytest.warns(RuntimeWarning) as record:
        assert dispatch.resolve("auto", q, shape, ()) is dispatch.REFERENCE
    messages = [str(w.message) for w in record]
    assert any("first backend skipped (D not compiled)" in m for m in messages)
    assert any("third backend skipped (fp32)" in m for m in messages)


# ----------------------------------------------------------------------------- glue


class FakeExtension:
    """Stands in for moda_cuda._C: records the call and fills out/lse from the reference."""

    def __init__(self):
        self.calls = []

    def fwd(self, q, k, v, depth_k, depth_v, out, lse, scale, causal, depth_chunk, doc_start=None, doc_end=None):
        assert doc_start is None and doc_end is None  # dense problems only here (tests/test_varlen.py: packed)
        self.calls.append(dict(out=out, lse=lse, scale=scale, causal=causal, depth_chunk=depth_chunk,
                               k=k, depth_k=depth_k))
        assert torch.isnan(out).all() and torch.isnan(lse).all()  # allocated with (poisoned) torch.empty
        ref_out, ref_lse = moda_attention_ref(q, k, v, depth_k, depth_v, scale=scale, causal=causal,
                                              depth_chunk=depth_chunk, return_lse=True)
        out.copy_(ref_out)
        lse.copy_(ref_lse)


@pytest.mark.parametrize("case", [GOOD.but(chunk=3, causal=False), GOOD.but(seq=False, chunk=2)], ids=str)
def test_forward_buffers_and_triton_backward(monkeypatch, case):
    """The cuda forward hands the extension contiguous out [B,T,Hq,D] / lse [B,Hq,T] float32 buffers;
    with MODA_CUDA_BACKWARD=triton its backward is the Triton backward fed with that out and lse
    (Triton's interpreter on CPU)."""
    if dispatch._triton_unavailable():
        pytest.skip(f"Triton backward unavailable: {dispatch._triton_unavailable()}")
    monkeypatch.setenv(dispatch.CUDA_BACKWARD_ENV, "triton")
    fake = FakeExtension()
    monkeypatch.setattr(_cuda_ext, "load", lambda: fake)
    q, k, v, dk, dv = make_inputs(case, torch.float16, "cpu")
    scale = 0.3
    with poisoned_allocations():
        out, lse = dispatch.CUDA.forward(q, k, v, dk, dv, scale, case.causal, case.chunk)
    (call,) = fake.calls
    B, T, Hq, D = q.shape
    assert call["out"] is out and out.shape == (B, T, Hq, D) and out.dtype == q.dtype and out.is_contiguous()
    assert call["lse"] is lse and lse.shape == (B, Hq, T) and lse.dtype == torch.float32 and lse.is_contiguous()
    assert (type(call["scale"]), type(call["causal"]), type(call["depth_chunk"])) == (float, bool, int)
    assert call["scale"] == scale and call["causal"] == case.causal and call["depth_chunk"] == case.chunk
    assert (call["k"] is None) == (not case.seq) and call["depth_k"] is dk

    g = torch.Generator().manual_seed(1)
    grad_out = torch.randn(out.shape, generator=g).to(q.dtype)
    grad_lse = torch.randn(lse.shape, generator=g)
    kw = dict(scale=scale, causal=case.causal, depth_chunk=case.chunk)
    with poisoned_allocations():
        got = dispatch.CUDA.backward(grad_out, grad_lse, q, k, v, dk, dv, out, lse, scale, case.causal, case.chunk,
                                     False)
    ref_in = as_double((q, k, v, dk, dv))
    ref_out, ref_lse = moda_attention_ref(*ref_in, return_lse=True, **kw)
    want = moda_attention_ref_backward(grad_out.double(), *ref_in, ref_out, ref_lse, grad_lse=grad_lse.double(),
                                       **kw)
    for name, a, b in zip(("dq", "dk", "dv", "ddepth_k", "ddepth_v"), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel_err(a, b) < 5e-3, name


def test_backward_without_triton_says_so(monkeypatch):
    monkeypatch.setenv(dispatch.CUDA_BACKWARD_ENV, "triton")
    monkeypatch.setattr(dispatch, "_triton_unavailable", lambda: "triton is not installed")
    q, k, v, dk, dv = inputs()
    with pytest.raises(RuntimeError, match="backward runs the Triton kernels, which are unavailable: triton is not"):
        dispatch.CUDA.backward(q, None, q, k, v, dk, dv, q, None, 0.1, True, 1, False)
