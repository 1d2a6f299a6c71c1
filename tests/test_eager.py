"""The eager path of ``moda_attention`` (``moda_cuda.eager``): the registered op's results and
gradients bit for bit, its plan cache keyed on everything that decides a plan, and the op
itself wherever tracing or modes need it."""

import pytest
import torch

import moda_cuda
from helpers import Case, make_inputs
from moda_cuda import dispatch, eager

CASES = [Case(T=19, L=3), Case(T=1, L=0), Case(T=8, seq=False), Case(B=2, T=13, chunk=4, causal=False)]


def _grads(fn, inputs, return_lse=False):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out, lse = fn(*leaves)
    g = torch.Generator().manual_seed(1)
    loss = (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()
    if return_lse:
        loss = loss + (lse * torch.randn(lse.shape, generator=g, dtype=lse.dtype)).sum()
    loss.backward()
    return [out, lse] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("return_lse", [False, True])
def test_eager_equals_the_op(case, return_lse):
    inputs = make_inputs(case, torch.float64)
    kw = dict(causal=case.causal, depth_chunk=case.chunk)

    def through_eager(*x):
        assert eager.usable(x[0])
        return moda_cuda.moda_attention(*x, return_lse=True, **kw)

    def through_op(*x):
        return torch.ops.moda.attention(*x, None, case.causal, case.chunk)

    for a, b in zip(_grads(through_eager, inputs, return_lse), _grads(through_op, inputs, return_lse)):
        assert torch.equal(a, b)


def test_only_lse_used():
    """The gradient through lse alone (the output's gradient is absent, not zeros materialised)."""
    inputs = [t.requires_grad_() for t in make_inputs(Case(T=9), torch.float64)]
    _, lse = moda_cuda.moda_attention(*inputs, return_lse=True)
    grads_eager = torch.autograd.grad(lse.sum(), inputs)
    _, lse = torch.ops.moda.attention(*inputs)
    for a, b in zip(grads_eager, torch.autograd.grad(lse.sum(), inputs)):
        assert torch.equal(a, b)


def test_not_usable_where_the_op_is_needed():
    q = torch.zeros(1, 2, 2, 4)
    assert eager.usable(q)
    assert not eager.usable(torch.nn.Parameter(q))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        assert not eager.usable(mode.from_tensor(q))
    with torch.overrides.TorchFunctionMode():
        assert not eager.usable(q)
    assert torch.func.vmap(lambda x: torch.tensor(eager.usable(x)))(q[None]).item() is False


@pytest.fixture
def pretend_cuda(monkeypatch):
    """CPU tensors stand in for CUDA ones, so that calls are planned and cached."""
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(eager, "_plans", {})
    resolved = []
    real = dispatch.resolve

    def counting(*args, **kwargs):
        resolved.append(kwargs.get("direction", "forward"))
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch, "resolve", counting)
    return resolved


@pytest.mark.filterwarnings("ignore:moda_cuda. triton backend skipped")
def test_plans_are_cached_per_key(pretend_cuda, monkeypatch):
    inputs = make_inputs(Case(T=11), torch.float64)
    first = moda_cuda.moda_attention(*inputs)
    assert pretend_cuda == ["forward"] and len(eager._plans) == 1
    assert torch.equal(moda_cuda.moda_attention(*inputs), first)
    assert pretend_cuda == ["forward"]  # the second call resolved nothing
    # Everything that decides a plan is in its key: each of these plans anew.
    moda_cuda.moda_attention(*inputs, causal=False)
    moda_cuda.moda_attention(*inputs, scale=0.5)
    moda_cuda.moda_attention(*[t.transpose(1, 2).contiguous().transpose(1, 2) for t in inputs[:3]], *inputs[3:])
    moda_cuda.moda_attention(*make_inputs(Case(T=12), torch.float64))
    monkeypatch.setenv(dispatch.ENV_VAR, "reference")
    moda_cuda.moda_attention(*inputs)
    assert len(eager._plans) == 6 and pretend_cuda.count("forward") == 6
    # The backward's backend is resolved at the first backward of a key, then cached.
    leaves = [t.requires_grad_() for t in inputs]
    for _ in range(2):
        moda_cuda.moda_attention(*leaves).sum().backward()
    assert pretend_cuda.count("backward") == 1


def test_invalid_calls_raise_and_are_not_cached(pretend_cuda):
    q, k, v, dk, dv = make_inputs(Case(T=7), torch.float64)
    with pytest.raises(ValueError, match="depth_chunk must be >= 1"):
        moda_cuda.moda_attention(q, k, v, dk, dv, depth_chunk=0)
    with pytest.raises(TypeError, match="deterministic must be a bool"):
        moda_cuda.moda_attention(q, k, v, dk, dv, deterministic=1)
    with pytest.raises(TypeError, match="k has dtype torch.float32"):
        moda_cuda.moda_attention(q, k.float(), v.float(), dk, dv)
    assert eager._plans == {}
    moda_cuda.moda_attention(q, k, v, dk, dv)
    # A valid call cached; a call differing only in a tensor's dtype is planned (and refused) anew.
    with pytest.raises(TypeError, match="depth_k has dtype torch.float32"):
        moda_cuda.moda_attention(q, k, v, dk.float(), dv.float())
    # Options equal to cached ones but of the wrong type (True == 1) are still refused.
    moda_cuda.moda_attention(q, k, v, dk, dv, scale=1.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        moda_cuda.moda_attention(q, k, v, dk, dv, causal=1)
    with pytest.raises(TypeError, match="depth_chunk must be an int"):
        moda_cuda.moda_attention(q, k, v, dk, dv, depth_chunk=True)
    with pytest.raises(TypeError, match="scale must be a float or None"):
        moda_cuda.moda_attention(q, k, v, dk, dv, scale=True)
    # Unhashable options are never looked up: the checks say what is wrong with them.
    with pytest.raises(TypeError, match="scale must be a float or None"):
        moda_cuda.moda_attention(q, k, v, dk, dv, scale=[1.0])
    with pytest.raises(TypeError, match="backend must be a str"):
        moda_cuda.moda_attention(q, k, v, dk, dv, backend=["auto"])
    with pytest.raises(ValueError, match="without cu_seqlens"):  # not part of a cached plan's key
        moda_cuda.moda_attention(q, k, v, dk, dv, max_seqlen=7)


def test_without_gradients_no_autograd_node_is_built():
    """Under no_grad (or with no input needing a gradient) the backend runs without a node:
    the same numbers, no grad_fn."""
    inputs = make_inputs(Case(T=10, L=2), torch.float64)
    expected, expected_lse = torch.ops.moda.attention(*inputs)
    out, lse = moda_cuda.moda_attention(*inputs, return_lse=True)
    assert out.grad_fn is None and torch.equal(out, expected) and torch.equal(lse, expected_lse)
    with torch.no_grad():
        out = moda_cuda.moda_attention(*[t.requires_grad_() for t in inputs])
    assert out.grad_fn is None and not out.requires_grad and torch.equal(out, expected)
    assert moda_cuda.moda_attention(*inputs).grad_fn is not None  # the leaves now need gradients


def test_decode_calls_are_validated_once_per_layout(pretend_cuda, monkeypatch):
    monkeypatch.setattr(eager, "_decode_impls", {})
    checked = []
    real = eager.kvcache_backend
    monkeypatch.setattr(eager, "kvcache_backend", lambda *a: checked.append(1) or real(*a))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, h, 8, generator=g, dtype=torch.float64) for h in (4, 2, 2))
    dk, dv = (torch.randn(2, 1, 3, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    k_cache, v_cache = torch.zeros(2, 6, 2, 8, dtype=torch.float64), torch.zeros(2, 6, 2, 8, dtype=torch.float64)
    lens = torch.tensor([0, 4], dtype=torch.int32)

    def step(**kw):
        return moda_cuda.moda_attention_with_kvcache(q, k_cache, v_cache, dk, dv, k=k, v=v, cache_seqlens=lens,
                                                     backend="reference", **kw)

    first = step()
    assert torch.equal(step(), first) and len(checked) == 1  # the second call validated nothing
    step(scale=0.5)
    assert len(checked) == 2 and len(eager._decode_impls) == 2
    for _ in range(2):  # an invalid call raises every time and is never cached
        with pytest.raises(ValueError, match="depth_chunk must be 1"):
            step(depth_chunk=2)
    assert len(eager._decode_impls) == 2


def test_decode_layouts_keep_their_prepared_kernel_launches(pretend_cuda, monkeypatch):
    """The eager decode path caches the Triton kernel's launches per layout
    (kvcache_op.kvcache_runner): repeated calls with fresh values give the op's results."""
    monkeypatch.setattr(eager, "_decode_impls", {})
    g = torch.Generator().manual_seed(0)

    def inputs():
        q, k, v = (torch.randn(2, 1, h, 16, generator=g) for h in (4, 2, 2))
        dk, dv = (torch.randn(2, 1, 3, 2, 16, generator=g) for _ in range(2))
        caches = [torch.randn(2, 20, 2, 16, generator=g) for _ in range(2)]
        return q, caches, dk, dv, k, v, torch.tensor([3, 11], dtype=torch.int32)

    for _ in range(3):
        q, caches, dk, dv, k, v, lens = inputs()
        op_caches = [c.clone() for c in caches]
        want = torch.ops.moda.attention_with_kvcache(q, *op_caches, dk, dv, k, v, lens, None, 1, "triton")
        got = moda_cuda.moda_attention_with_kvcache(q, *caches, dk, dv, k=k, v=v, cache_seqlens=lens,
                                                    return_lse=True, backend="triton")
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert torch.equal(caches[0], op_caches[0]) and torch.equal(caches[1], op_caches[1])
    assert len(eager._decode_impls) == 1
