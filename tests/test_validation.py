"""Bad inputs fail early with a message that says what was wrong and what is allowed."""

import pytest
import torch

import moda_cuda
from helpers import Case, make_inputs

CASE = Case(T=6, Hq=4, Hk=2, D=8, L=2)


def call(q, k, v, dk, dv, **kw):
    return moda_cuda.moda_attention(q, k, v, dk, dv, **kw)


def test_wrong_rank():
    q, k, v, dk, dv = make_inputs(CASE)
    with pytest.raises(ValueError, match=r"q must have shape \[B, T, Hq, D\]"):
        call(q[0], k, v, dk, dv)
    with pytest.raises(ValueError, match=r"k and v must have shape \[B, T, Hk, D\]"):
        call(q, k[0], v[0], dk, dv)
    with pytest.raises(ValueError, match=r"depth_k and depth_v must have shape \[B, T, L, Hk, D\]"):
        call(q, k, v, dk[:, :, 0], dv[:, :, 0])


def test_mismatched_shapes():
    q, k, v, dk, dv = make_inputs(CASE)
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        call(q, k, v[:, :, :1], dk, dv)
    with pytest.raises(ValueError, match="to match q"):
        call(q, k[:, :5], v[:, :5], dk, dv)
    with pytest.raises(ValueError, match="to match q"):
        call(q, k, v, dk[..., :4], dv[..., :4])
    with pytest.raises(ValueError, match="depth_k has 1 kv heads but k has 2"):
        call(q, k, v, dk[:, :, :, :1], dv[:, :, :, :1])
    with pytest.raises(ValueError, match="depth_k and depth_v must have the same shape"):
        call(q, k, v, dk, dv[:, :, :1])


def test_heads_not_divisible():
    q, k, v, dk, dv = make_inputs(CASE.but(Hq=3, Hk=2))
    with pytest.raises(ValueError, match=r"q heads \(3\) must be a positive multiple of kv heads \(2\)"):
        call(q, k, v, dk, dv)


def test_dtype_and_device_mismatch():
    q, k, v, dk, dv = make_inputs(CASE)
    with pytest.raises(TypeError, match="k has dtype torch.float16 but q has torch.float32"):
        call(q, k.half(), v, dk, dv)
    with pytest.raises(TypeError, match="depth_v has dtype torch.float64"):
        call(q, k, v, dk, dv.double())
    with pytest.raises(TypeError, match="q must be float16, bfloat16, float32 or float64"):
        call(q.to(torch.int32), k, v, dk, dv)
    meta_k = k.to("meta")
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        call(q, meta_k, v, dk, dv)


def test_depth_chunk_and_scale_and_causal():
    q, k, v, dk, dv = make_inputs(CASE)
    with pytest.raises(ValueError, match="depth_chunk must be >= 1, got 0"):
        call(q, k, v, dk, dv, depth_chunk=0)
    with pytest.raises(TypeError, match="depth_chunk must be an int"):
        call(q, k, v, dk, dv, depth_chunk=1.5)
    with pytest.raises(ValueError, match="scale must be finite"):
        call(q, k, v, dk, dv, scale=float("nan"))
    with pytest.raises(TypeError, match="scale must be a float or None"):
        call(q, k, v, dk, dv, scale="0.1")
    with pytest.raises(TypeError, match="causal must be a bool"):
        call(q, k, v, dk, dv, causal=1)


def test_half_pairs_and_nothing_to_attend():
    q, k, v, dk, dv = make_inputs(CASE)
    with pytest.raises(ValueError, match="k and v must be given together"):
        call(q, k, None, dk, dv)
    with pytest.raises(ValueError, match="depth_k and depth_v must be given together"):
        call(q, k, v, dk, None)
    with pytest.raises(ValueError, match="nothing to attend to"):
        call(q, None, None, None, None)
    with pytest.raises(TypeError, match="k must be a torch.Tensor or None"):
        call(q, k.tolist(), v, dk, dv)
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        call(q.tolist(), k, v, dk, dv)


def test_empty_sizes():
    q, k, v, dk, dv = make_inputs(CASE)
    with pytest.raises(ValueError, match="non-empty"):
        call(q[:, :0], k[:, :0], v[:, :0], dk[:, :0], dv[:, :0])


def test_op_validates_too():
    q, k, v, dk, dv = make_inputs(CASE)
    with pytest.raises(ValueError, match="depth_chunk must be >= 1"):
        torch.ops.moda.attention(q, k, v, dk, dv, None, True, 0)
