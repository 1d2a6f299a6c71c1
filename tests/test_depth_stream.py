"""DepthStream: gradients equal the stack-per-layer formulation, reads never copy."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from moda_cuda import DepthStream, depth_stream, moda_attention

F64 = torch.float64
B, T, HQ, HK, D = 2, 7, 4, 2, 8



def _params(n_layers: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, HQ * D, generator=g, dtype=F64, requires_grad=True)
    w = [torch.randn(HQ * D, (HQ + 2 * HK) * D, generator=g, dtype=F64).mul_(0.3).requires_grad_() for _ in range(n_layers)]
    return x, w


def _layer(h, w, attend):
    """One toy layer: projections of h, MoDA over (own k/v, depth) by ``attend(q, k, v)``,
    residual. Returns (h, k, v)."""
    q, k, v = (h @ w).split([HQ * D, HK * D, HK * D], dim=-1)
    q, k, v = q.reshape(B, T, HQ, D), k.reshape(B, T, HK, D), v.reshape(B, T, HK, D)
    return h + attend(q, k, v).reshape(B, T, HQ * D), k, v


# How a stream layer attends: moda_attention over stream.read(), or stream.attention (the
# depth gradients summed in place).
STREAM_MODES = ("stream", "stream_attention")


def _run(mode: str, n_layers: int, causal: bool, chunk: int, ckpt: bool = False, chain: bool = True):
    """Forward+backward of a stack; returns grads of x, every weight and every appended k/v.

    ``chain=False`` feeds every layer the same input, so that the autograd engine is free to
    run the readers of a slot in any order relative to its producer's other consumers.
    """
    x, ws = _params(n_layers)
    stream = DepthStream(B, T, n_layers, HK, D, dtype=F64) if mode in STREAM_MODES else None
    ks, vs, outs = [], [], []
    h = x
    for i, w in enumerate(ws):
        if mode == "stream":
            def attend(q, k, v, i=i):
                return moda_attention(q, k, v, *stream.read(i), causal=causal, depth_chunk=chunk)
        elif mode == "stream_attention":
            def attend(q, k, v, i=i):
                return stream.attention(q, k, v, i, causal=causal, depth_chunk=chunk)
        if mode in STREAM_MODES:
            def body(h_in, w_in, i=i, attend=attend):
                h_out, k, v = _layer(h_in, w_in, attend)
                stream.append(k, v, slot=i)
                return h_out, k, v
        else:
            def body(h_in, w_in, prev_k=list(ks), prev_v=list(vs)):
                # Bound now: a checkpoint recompute must see the same previous layers.
                depth = (torch.stack(prev_k, dim=2), torch.stack(prev_v, dim=2)) if prev_k else (None, None)
                return _layer(h_in, w_in, lambda q, k, v: moda_attention(q, k, v, *depth, causal=causal,
                                                                         depth_chunk=chunk))
        inp = h if chain else x
        h_new, k, v = checkpoint(body, inp, w, use_reentrant=False) if ckpt else body(inp, w)
        k.retain_grad()
        v.retain_grad()
        ks.append(k)
        vs.append(v)
        outs.append(h_new)
        h = h_new
    loss = sum((o * torch.linspace(-1, 1, o.shape[-1], dtype=F64)).sin().sum() for o in outs)
    loss.backward()
    return [x.grad] + [w.grad for w in ws] + [k.grad for k in ks] + [v.grad for v in vs]


def _assert_same(got, want):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a is not None and b is not None, f"gradient {i} missing"
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"gradient {i} differs")


@pytest.mark.parametrize("mode", STREAM_MODES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("chunk", [1, 3])
def test_grads_equal_stack_per_layer(mode, causal, chunk):
    want = _run("stack", 4, causal, chunk)
    got = _run(mode, 4, causal, chunk)
    _assert_same(got, want)
    # Depth really contributes: the last layer's input gradients differ without it.
    assert any(g.abs().max() > 0 for g in got[1 + 4 : 1 + 4 + 3])


@pytest.mark.parametrize("mode", STREAM_MODES)
@pytest.mark.parametrize("chunk", [1, 3])
def test_grads_equal_without_chain(mode, chunk):
    _assert_same(_run(mode, 5, True, chunk, chain=False), _run("stack", 5, True, chunk, chain=False))


@pytest.mark.parametrize("mode", STREAM_MODES)
@pytest.mark.parametrize("chunk", [1, 3])
@pytest.mark.parametrize("early_stop", [True, False])
def test_activation_checkpointing_same_grads(mode, chunk, early_stop, monkeypatch):
    # Without early stop the recomputation runs each layer to its end, append included.
    replays = []
    real = depth_stream._in_backward
    monkeypatch.setattr(depth_stream, "_in_backward", lambda: replays.append(1) or real())
    want = _run("stack", 4, True, chunk)
    with set_checkpoint_early_stop(early_stop):
        _assert_same(_run(mode, 4, True, chunk, ckpt=True), want)
        _assert_same(_run("stack", 4, True, chunk, ckpt=True), want)
    assert len(replays) == (0 if early_stop else 4)


@pytest.mark.parametrize("mode", STREAM_MODES)
@pytest.mark.parametrize("region", ["layer", "attention"])
def test_reentrant_checkpointing_refused(mode, region):
    """use_reentrant=True runs the checkpointed forward without gradients and backpropagates
    its recomputation in a nested backward pass: the stream would give wrong depth gradients,
    so the backward raises instead, whether the region holds the append or only the read."""
    x, ws = _params(3)
    stream = DepthStream(B, T, 3, HK, D, dtype=F64)

    def attend_fn(i):
        if mode == "stream":
            return lambda q, k, v: moda_attention(q, k, v, *stream.read(i))
        return lambda q, k, v: stream.attention(q, k, v, i)

    h, outs = x, []
    for i, w in enumerate(ws):
        if region == "layer":
            def body(h_in, w_in, i=i):
                h_out, k, v = _layer(h_in, w_in, attend_fn(i))
                stream.append(k, v, slot=i)
                return h_out
            h = checkpoint(body, h, w, use_reentrant=True)
        else:
            def attend(q, k, v, i=i):
                return checkpoint(attend_fn(i), q, k, v, use_reentrant=True)
            h, k, v = _layer(h, w, attend)
            stream.append(k, v, slot=i)
        outs.append(h)
    with pytest.raises(RuntimeError, match="use_reentrant=False"):
        sum(o.sum() for o in outs).backward()


@pytest.mark.parametrize("implicit", ["read", "append"])
def test_checkpointed_region_needs_explicit_slots(implicit):
    """Recomputed in backward, a region would take the defaults of n and slot from the stream's
    length then (every layer's slots written), not from its forward's: that raises."""
    x, ws = _params(3)
    stream = DepthStream(B, T, 3, HK, D, dtype=F64)

    def body(h_in, w_in, i):
        n = None if implicit == "read" else i
        h_out, k, v = _layer(h_in, w_in, lambda q, k, v: stream.attention(q, k, v, n))
        stream.append(k, v, slot=None if implicit == "append" else i)
        return h_out

    h = x
    with set_checkpoint_early_stop(False):
        for i, w in enumerate(ws):
            h = checkpoint(body, h, w, i, use_reentrant=False)
        with pytest.raises(ValueError, match="explicit"):
            h.sum().backward()


@pytest.mark.parametrize("seed", range(8))
def test_irregular_reads_match_stack(seed):
    """Reads at any points (repeated, skipping slots, smaller after larger), some slots or
    values without grad: every appended tensor still gets the stack formulation's gradient."""
    g = torch.Generator().manual_seed(seed)
    n_slots = 6
    ks = [torch.randn(B, T, HK, D, generator=g, dtype=F64) for _ in range(n_slots)]
    vs = [torch.randn(B, T, HK, D, generator=g, dtype=F64) for _ in range(n_slots)]
    diff_k = [bool(torch.rand(1, generator=g) < 0.8) for _ in range(n_slots)]
    diff_v = [bool(torch.rand(1, generator=g) < 0.8) for _ in range(n_slots)]
    # After appending slot i (i.e. length i + 1), read these slot counts.
    plan = [torch.randint(0, i + 2, (int(torch.randint(0, 3, (1,), generator=g)),), generator=g).tolist()
            for i in range(n_slots)]
    qs = [torch.randn(B, T, HQ, D, generator=g, dtype=F64) for _ in range(sum(map(len, plan)))]

    def run(mode):
        k_in = [k.clone().requires_grad_(d) for k, d in zip(ks, diff_k)]
        v_in = [v.clone().requires_grad_(d) for v, d in zip(vs, diff_v)]
        k_used = [x * 1.5 if x.requires_grad else x for x in k_in]  # non-leaf, like a projection
        v_used = [x * 0.5 if x.requires_grad else x for x in v_in]
        s = DepthStream(B, T, n_slots, HK, D, dtype=F64)
        loss, q_iter, pick = 0, iter(qs), torch.Generator().manual_seed(seed)
        for i in range(n_slots):
            s.append(k_used[i], v_used[i])
            for n in plan[i]:
                if n == 0:
                    continue
                q = next(q_iter)
                if mode == "stack":
                    out = moda_attention(q, None, None, torch.stack(k_used[:n], 2), torch.stack(v_used[:n], 2),
                                         depth_chunk=2)
                elif torch.rand(1, generator=pick) < 0.5:  # the two ways to attend, mixed
                    out = s.attention(q, None, None, n, depth_chunk=2)
                else:
                    out = moda_attention(q, None, None, *s.read(n), depth_chunk=2)
                loss = loss + (out * out).sum()
        if not torch.is_tensor(loss) or not loss.requires_grad:
            return []
        loss.backward()
        return [x.grad for x in k_in + v_in]

    got, want = run("stream"), run("stack")
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def _filled(n: int, max_layers: int = 4, dtype=torch.float32):
    s = DepthStream(B, T, max_layers, HK, D, dtype=dtype)
    for _ in range(n):
        s.append(torch.randn(B, T, HK, D, dtype=dtype), torch.randn(B, T, HK, D, dtype=dtype))
    return s


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode, torch.enable_grad])
def test_reads_are_views_of_the_buffers(ctx):
    with ctx():
        s = DepthStream(B, T, 4, HK, D)
        for i in range(3):
            k = torch.randn(B, T, HK, D, requires_grad=torch.is_grad_enabled())
            s.append(k, k * 2)
            dk, dv = s.read()
            assert dk.shape == (B, T, i + 1, HK, D)
            assert dk.data_ptr() == s.k_buffer.data_ptr() and dv.data_ptr() == s.v_buffer.data_ptr()
            assert dk.stride() == s.k_buffer.stride()
            torch.testing.assert_close(dk[:, :, i], k.detach())
            torch.testing.assert_close(dv[:, :, i], 2 * k.detach())
        if not torch.is_grad_enabled():
            assert s._k_slots == [None] * 4  # nothing kept alive for autograd
    empty_k, _ = s.read(0)
    assert empty_k.shape == (B, T, 0, HK, D)


def test_no_grad_forward_matches_stack():
    s = DepthStream(B, T, 3, HK, D, dtype=F64)
    ks = [torch.randn(B, T, HK, D, dtype=F64) for _ in range(3)]
    q = torch.randn(B, T, HQ, D, dtype=F64)
    with torch.no_grad():
        for k in ks:
            s.append(k, -k)
        got = moda_attention(q, ks[0], ks[0], *s.read(), depth_chunk=2)
    stacked = torch.stack(ks, dim=2)
    torch.testing.assert_close(got, moda_attention(q, ks[0], ks[0], stacked, -stacked, depth_chunk=2))


def test_next_slot_is_written_in_place_and_appended_without_a_copy(monkeypatch):
    s = DepthStream(B, T, 2, HK, D, dtype=F64)
    first = torch.randn(B, T, HK, D, dtype=F64)
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, src: copies.append(1) or real_copy(self, src))
    with torch.no_grad():
        k_view, v_view = s.next_slot()
        k_view.copy_(first)
        v_view.copy_(-first)
        copies.clear()
        assert s.append(k_view, v_view) == 0 and copies == []  # the views are the slot: nothing copied
        s.append(first * 2, first * 3)  # anything else is copied
        assert len(copies) == 2
        depth_k, depth_v = s.read()
        with pytest.raises(ValueError, match="full"):
            s.next_slot()
    torch.testing.assert_close(depth_k, torch.stack([first, first * 2], dim=2))
    torch.testing.assert_close(depth_v, torch.stack([-first, first * 3], dim=2))


class _WriteInto(torch.autograd.Function):
    """``view.copy_(x)``, returning the view with x's history (as the layers' RotaryIntoSlot)."""

    @staticmethod
    def forward(ctx, x, view):
        view.copy_(x)
        return view.detach()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def test_next_slot_with_grad_keeps_the_history_of_what_writes_it(monkeypatch):
    """With gradients, a slot written through next_slot() by an autograd Function that returns
    the views is appended without a copy; the views also serve as a layer's own k/v, saved by
    its backward while later appends write the buffers; every gradient equals the one of plain
    appends."""
    g = torch.Generator().manual_seed(3)
    ks = [torch.randn(B, T, HK, D, generator=g, dtype=F64) for _ in range(3)]
    qs = [torch.randn(B, T, HQ, D, generator=g, dtype=F64) for _ in range(3)]
    same = []
    real_same_view = depth_stream._same_view
    monkeypatch.setattr(depth_stream, "_same_view", lambda a, b: same.append(real_same_view(a, b)) or same[-1])

    def run(in_place):
        leaves = [k.clone().requires_grad_() for k in ks]
        s, loss = DepthStream(B, T, 3, HK, D, dtype=F64), 0
        for i, (k, q) in enumerate(zip(leaves, qs)):
            k, v = k * 1.5, k.sin()
            if in_place:
                k_view, v_view = s.next_slot()
                k, v = _WriteInto.apply(k, k_view), _WriteInto.apply(v, v_view)
            out = s.attention(q, k, v, i, depth_chunk=2) if i else moda_attention(q, k, v)
            s.append(k, v, slot=i)
            loss = loss + (out * out).sum()
        loss.backward()
        return [k.grad for k in leaves]

    want = run(False)
    same.clear()
    got = run(True)
    assert same == [True] * 6  # every append found its views written: nothing copied
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_reset_invalidates_slot_views_written_with_grad():
    """A layer attends with the slot views it wrote (next_slot under grad): after a reset and
    a refill, a backward through that graph fails instead of reading the new contents, even
    where it crosses no depth read."""
    s = DepthStream(B, T, 2, HK, D, dtype=F64)
    k = torch.randn(B, T, HK, D, dtype=F64, requires_grad=True)
    q = torch.randn(B, T, HQ, D, dtype=F64)
    k_view, v_view = s.next_slot()
    k_slot, v_slot = _WriteInto.apply(k * 2, k_view), _WriteInto.apply(k.cos(), v_view)
    out = moda_attention(q, k_slot, v_slot)
    s.append(k_slot, v_slot)
    s.reset()
    s.append(torch.zeros(B, T, HK, D, dtype=F64), torch.zeros(B, T, HK, D, dtype=F64))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


def test_slots_appended_without_grad_get_none():
    s = DepthStream(B, T, 3, HK, D)
    k0 = torch.randn(B, T, HK, D)
    s.append(k0, k0)  # constant slot
    k1 = torch.randn(B, T, HK, D, requires_grad=True)
    s.append(k1, k1.detach())  # only its key is differentiable
    dk, dv = s.read()
    assert dk.requires_grad and not dv.requires_grad
    (dk * torch.arange(2.0).view(1, 1, 2, 1, 1)).sum().backward()
    torch.testing.assert_close(k1.grad, torch.ones_like(k1))


def test_reset_reuses_buffers_and_invalidates_old_graphs():
    s = DepthStream(B, T, 2, HK, D)
    ptr = s.k_buffer.data_ptr()
    k = torch.randn(B, T, HK, D, requires_grad=True)
    s.append(k, k)
    q = torch.randn(B, T, HQ, D)
    out = moda_attention(q, None, None, *s.read())
    s.reset()
    assert s.length == 0 and s.k_buffer.data_ptr() == ptr
    s.append(torch.zeros(B, T, HK, D), torch.zeros(B, T, HK, D))  # overwrites what `out` read
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    # The new generation works normally.
    k2 = torch.randn(B, T, HK, D, requires_grad=True)
    s.append(k2, k2)
    moda_attention(q, None, None, *s.read()).sum().backward()
    assert k2.grad is not None and k2.grad.abs().sum() > 0


def test_appends_after_a_read_do_not_break_backward():
    s = DepthStream(B, T, 3, HK, D, dtype=F64)
    k = torch.randn(B, T, HK, D, dtype=F64, requires_grad=True)
    s.append(k, k)
    q = torch.randn(B, T, HQ, D, dtype=F64)
    out = moda_attention(q, None, None, *s.read())
    s.append(torch.randn(B, T, HK, D, dtype=F64), torch.randn(B, T, HK, D, dtype=F64))
    s.append(torch.randn(B, T, HK, D, dtype=F64), torch.randn(B, T, HK, D, dtype=F64))
    out.sum().backward()
    kk = k.detach().clone().requires_grad_()
    moda_attention(q, None, None, kk[:, :, None], kk[:, :, None]).sum().backward()
    torch.testing.assert_close(k.grad, kk.grad)


@pytest.mark.parametrize("n", [0, 1, 3])
def test_attention_equals_moda_attention_over_read(n):
    """Values and gradients of stream.attention are those of moda_attention over read(n),
    with sequence keys or depth only, and it validates its arguments like moda_attention."""
    g = torch.Generator().manual_seed(n)
    slots = [torch.randn(B, T, HK, D, generator=g, dtype=F64, requires_grad=True) for _ in range(3)]
    q, k, v = (torch.randn(B, T, h, D, generator=g, dtype=F64, requires_grad=True) for h in (HQ, HK, HK))
    for seq in ([k, v], [None, None]):
        if seq[0] is None and n == 0:
            continue  # depth-only attention needs depth rows
        grads = []
        for use_attention in (True, False):
            s = DepthStream(B, T, 3, HK, D, dtype=F64)
            for x in slots:
                s.append(x * 2, x - 1)
            out = s.attention(q, *seq, n, depth_chunk=2) if use_attention else \
                moda_attention(q, *seq, *s.read(n), depth_chunk=2)
            inputs = [q] + [x for x in seq if x is not None] + slots[:n]
            grads.append((out, torch.autograd.grad((out * out.cos()).sum(), inputs)))
        (out_a, grads_a), (out_b, grads_b) = grads
        torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
        _assert_same(list(grads_a), list(grads_b))
    s = _filled(2)
    q32 = torch.randn(B, T, HQ, D)
    with pytest.raises(ValueError, match="depth_chunk"):
        s.attention(q32, None, None, depth_chunk=0)
    with pytest.raises(ValueError, match="unknown MoDA backend"):
        s.attention(q32, None, None, backend="nope")
    with pytest.raises(TypeError, match="deterministic"):
        s.attention(q32, None, None, deterministic=1)
    with pytest.raises(ValueError, match="only 2 are written"):
        s.attention(q32, None, None, 3)


def test_attention_retain_graph_backward_twice():
    """Each backward pass sums the depth gradients from zero."""
    s = DepthStream(B, T, 2, HK, D, dtype=F64)
    k = torch.randn(B, T, HK, D, dtype=F64, requires_grad=True)
    s.append(k * 1.5, k)
    s.append(k.detach(), k * 0.5)
    q = torch.randn(B, T, HQ, D, dtype=F64)
    loss = s.attention(q, None, None).square().sum() + s.attention(q, None, None, 1).sum()
    (first,) = torch.autograd.grad(loss, k, retain_graph=True)
    (second,) = torch.autograd.grad(loss, k)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    assert first.abs().sum() > 0


def test_bad_inputs():
    with pytest.raises(ValueError, match="max_layers"):
        DepthStream(1, 4, 0, 1, 8)
    with pytest.raises(TypeError, match="seqlen"):
        DepthStream(1, 4.0, 2, 1, 8)
    with pytest.raises(TypeError, match="dtype"):
        DepthStream(1, 4, 2, 1, 8, dtype=torch.int32)
    s = _filled(2, max_layers=2)
    good = torch.randn(B, T, HK, D)
    with pytest.raises(ValueError, match="full"):
        s.append(good, good)
    s = _filled(1)
    with pytest.raises(ValueError, match="shape"):
        s.append(torch.randn(B, T, HK + 1, D), good)
    with pytest.raises(ValueError, match="shape"):
        s.append(good, torch.randn(B, T, D))
    with pytest.raises(TypeError, match="dtype"):
        s.append(good.double(), good)
    with pytest.raises(TypeError, match="torch.Tensor"):
        s.append(good, None)
    with pytest.raises(ValueError, match="already written"):
        s.append(good, good, slot=0)
    with pytest.raises(ValueError, match="out of order"):
        s.append(good, good, slot=3)
    with pytest.raises(ValueError, match="only 1 are written"):
        s.read(2)
    with pytest.raises(TypeError, match="int"):
        s.read(1.0)
    assert s.length == 1 and len(s) == 1 and "length=1" in repr(s)
