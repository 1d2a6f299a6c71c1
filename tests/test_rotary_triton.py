"""The one-launch rotary kernel (``triton_ref.rotary``) against ``apply_rotary``'s PyTorch ops:
bit for bit, for every dtype, both table forms, odd head counts, strided inputs and
positions that do not fill the last program. Runs in
the Triton interpreter on the CPU; the ``cuda`` test checks the compiled kernel and that
``apply_rotary`` takes it on the GPU."""

import pytest
import torch

from moda_cuda import rotary as rotary_policy
from moda_cuda.rotary import apply_rotary, rotary_tables
from moda_cuda.triton_ref.rotary import rotary


def _pytorch(x, cos, sin):
    """apply_rotary's own arithmetic: its PyTorch ops, on the CPU (where the fused kernel is
    never taken; float32 products and sums round the same on every device)."""
    with torch.no_grad():
        return apply_rotary(x.cpu(), (cos.cpu(), sin.cpu())).to(x.device)


def _pytorch_grad(x, cos, sin, grad):
    """The gradient autograd forms through apply_rotary's PyTorch ops (on the CPU)."""
    x = x.detach().cpu().requires_grad_()
    apply_rotary(x, (cos.cpu(), sin.cpu())).backward(grad.cpu())
    return x.grad.to(grad.device)


def _inputs(B, T, H, D, dtype, table_dtype, per_sequence, device="cpu", strided=False, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, T, H + (3 if strided else 0), D, generator=g, device=device).to(dtype)
    if strided:  # a head slice of a wider projection, as q/k/v splits are
        x = x[:, :, 1:H + 1]
    cos, sin = rotary_tables(D, 40, device=device)
    if per_sequence:  # decoding: each sequence at its own positions
        positions = torch.tensor([[7 + b + t for t in range(T)] for b in range(B)], device=device)
    else:
        positions = torch.arange(T, device=device)
    return x, cos[positions].to(table_dtype), sin[positions].to(table_dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("table_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["tables [T, D/2]", "tables [B, T, D/2]"])
# Positions per program: 16 (one partial program), 1, 8, and 32 (two programs, the last partial).
@pytest.mark.parametrize("B, T, H, D, strided", [(2, 5, 3, 16, False), (1, 1, 8, 64, True), (3, 2, 1, 6, True),
                                                 (2, 20, 2, 64, True)])
def test_bit_for_bit_the_pytorch_ops(dtype, table_dtype, per_sequence, B, T, H, D, strided):
    x, cos, sin = _inputs(B, T, H, D, dtype, table_dtype, per_sequence, strided=strided)
    got = rotary(x, cos, sin)
    assert got.dtype == dtype and got.is_contiguous()
    want = _pytorch(x, cos, sin)
    if dtype == torch.bfloat16:
        # The interpreter converts float32 to bfloat16 by truncation, the GPU (and PyTorch) to
        # nearest: here each element is one of the two roundings of the same float32 result
        # (the GPU test below checks bit for bit).
        exact = _pytorch(x.float(), cos, sin)
        truncated = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
        assert torch.equal(want, exact.to(dtype))
        assert ((got == want) | (got == truncated)).all()
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_into_a_depth_slot(dtype):
    """``out``: a strided view (a depth slot of a [B, T, L, H, D] buffer) is written in place,
    the other slots untouched."""
    x, cos, sin = _inputs(2, 3, 2, 8, dtype, torch.float32, True)
    buffer = torch.full((2, 3, 4, 2, 8), 7.0, dtype=dtype)
    got = rotary(x, cos, sin, out=buffer[:, :, 2])
    assert got.data_ptr() == buffer[:, :, 2].data_ptr()
    assert torch.equal(buffer[:, :, 2], _pytorch(x, cos, sin))
    assert (buffer[:, :, [0, 1, 3]] == 7.0).all()
    with torch.no_grad():  # apply_rotary's PyTorch path writes out the same way
        other = torch.zeros_like(buffer)
        apply_rotary(x, (cos, sin), out=other[:, :, 1])
    assert torch.equal(other[:, :, 1], buffer[:, :, 2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_copied_beside_the_keys(dtype):
    """``copy = (v, v_slot)``: the values land in their slot unchanged in the same launch (a
    strided source, as the value half of a fused projection is), the other slots untouched;
    apply_rotary's PyTorch path does the same."""
    x, cos, sin = _inputs(2, 3, 2, 8, dtype, torch.float32, True)
    v = torch.randn(2, 3, 5, 8).to(dtype)[:, :, 1:3]
    keys, values = torch.full((2, 2, 3, 4, 2, 8), 7.0, dtype=dtype)
    rotary(x, cos, sin, out=keys[:, :, 1], copy=(v, values[:, :, 1]))
    assert torch.equal(values[:, :, 1], v)
    assert (values[:, :, [0, 2, 3]] == 7.0).all() and (keys[:, :, [0, 2, 3]] == 7.0).all()
    with torch.no_grad():
        other = torch.zeros_like(values)
        rotated = apply_rotary(x, (cos, sin), copy=(v, other[:, :, 2]))
    assert torch.equal(other[:, :, 2], v)
    assert torch.equal(rotated, _pytorch(x, cos, sin))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per_sequence", [False, True], ids=["tables [T, D/2]", "tables [B, T, D/2]"])
def test_training_form_is_pytorchs_forward_and_gradient_bit_for_bit(dtype, per_sequence):
    """FusedRotary (the differentiable form): forward, and the gradient as the rotation by
    the negated angles, equal to autograd through the PyTorch ops."""
    from moda_cuda.triton_ref.rotary import FusedRotary

    x, cos, sin = _inputs(2, 5, 3, 16, dtype, torch.float32, per_sequence, strided=True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    leaf = x.detach().requires_grad_()
    y = FusedRotary.apply(leaf, cos, sin, False)
    assert torch.equal(y.detach(), _pytorch(x, cos, sin))
    y.backward(grad.transpose(1, 2).contiguous().transpose(1, 2))  # a strided gradient
    assert leaf.grad.dtype == dtype
    assert torch.equal(leaf.grad, _pytorch_grad(x, cos, sin, grad))


def test_training_form_is_differentiable_twice():
    """The gradient is FusedRotary again: a gradient of the gradient (create_graph) is
    autograd's through the PyTorch ops, bit for bit, and functorch's grad takes the ops."""
    from moda_cuda.triton_ref.rotary import FusedRotary

    x, cos, sin = _inputs(2, 4, 3, 8, torch.float32, torch.float32, True)
    weights = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    results = []
    for rotate in (lambda t: FusedRotary.apply(t, cos, sin, False), lambda t: apply_rotary(t, (cos, sin))):
        leaf, grad_out = x.clone().requires_grad_(), torch.ones_like(x).requires_grad_()
        (grad_x,) = torch.autograd.grad(rotate(leaf), leaf, grad_out, create_graph=True)
        assert grad_x.requires_grad
        (grad_x * weights).sum().backward()
        results.append((grad_x.detach(), grad_out.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


def test_empty_input():
    x, cos, sin = _inputs(2, 3, 2, 8, torch.float32, torch.float32, False)
    assert rotary(x[:0], cos, sin).shape == (0, 3, 2, 8)


def test_apply_rotary_keeps_pytorch_ops_where_the_kernel_does_not_serve():
    x, cos, sin = _inputs(2, 4, 2, 8, torch.float32, torch.float32, False)
    assert not rotary_policy.fused_rotary_serves(x, (cos, sin))  # CPU
    with torch.no_grad():
        assert torch.equal(apply_rotary(x, (cos, sin)), _pytorch(x, cos, sin))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_on_gpu_apply_rotary_takes_the_kernel(dtype):
    x, cos, sin = _inputs(4, 3, 8, 64, dtype, torch.float32, True, device="cuda", strided=True)
    assert rotary_policy.fused_rotary_serves(x, (cos, sin))
    assert not rotary_policy.fused_rotary_serves(x, (cos[:1], sin[:1]))  # tables of another batch: PyTorch broadcasts
    # With gradients: the differentiable form, PyTorch's forward and gradient bit for bit.
    leaf = x.detach().requires_grad_()
    y = apply_rotary(leaf, (cos, sin))
    assert type(y.grad_fn).__name__ == "FusedRotaryBackward"
    assert torch.equal(y.detach(), _pytorch(x, cos, sin))
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(leaf.grad, _pytorch_grad(x, cos, sin, grad))
    with torch.no_grad():
        assert torch.equal(apply_rotary(x, (cos, sin)), _pytorch(x, cos, sin))
        slots = torch.zeros(4, 3, 5, 8, 64, dtype=dtype, device="cuda")
        values = torch.zeros_like(slots)
        v = torch.randn_like(x)
        apply_rotary(x, (cos, sin), out=slots[:, :, 3], copy=(v, values[:, :, 3]))
    assert torch.equal(slots[:, :, 3], _pytorch(x, cos, sin))
    assert torch.equal(values[:, :, 3], v) and (values[:, :, [0, 1, 2, 4]] == 0).all()
