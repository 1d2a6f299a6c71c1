"""``triton_ref._launch.launch``: the compiled kernel of a launch key serves later calls of the
key, with the same arguments in signature order; anything Triton specialises on makes a new key.
Fake kernels stand in for Triton's (the GPU tests run the real ones)."""

import pytest
import torch

from moda_cuda.triton_ref import _launch


class FakeCompiled:
    """Like Triton's CompiledKernel[grid]: it reads grid[0], grid[1] and grid[2]."""

    def __init__(self, calls):
        self.calls = calls

    def __getitem__(self, grid):
        grid = (grid[0], grid[1], grid[2])
        return lambda *args: self.calls.append(("compiled", grid, args))


class FakeKernel:
    arg_names = ["X", "n", "scale", "BLOCK", "FLAG"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return FakeCompiled(self.calls)

        return run


@pytest.fixture
def compiled_path(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", False)
    monkeypatch.setattr(_launch, "_compiled", {})


def test_later_calls_of_a_key_go_to_the_compiled_kernel(compiled_path):
    kernel, x = FakeKernel(), torch.zeros(64)
    for _ in range(3):
        _launch.launch(kernel, (4, 1, 1), (x, 7, 0.5), dict(BLOCK=16, FLAG=True), num_warps=4)
    assert kernel.calls[0] == ("jit", (4, 1, 1), (x, 7, 0.5), dict(BLOCK=16, FLAG=True, num_warps=4))
    assert kernel.calls[1:] == [("compiled", (4, 1, 1), (x, 7, 0.5, 16, True))] * 2
    _launch.launch(kernel, (5,), (x, 7, 0.5), dict(BLOCK=16, FLAG=True), num_warps=4)  # a 1-D grid: padded to 3-D
    _launch.launch(kernel, (5,), (x, 7, 0.5), dict(BLOCK=16, FLAG=True), num_warps=4)
    assert kernel.calls[-1] == ("compiled", (5, 1, 1), (x, 7, 0.5, 16, True))


@pytest.mark.parametrize("change", ["grid", "int", "float type", "constexpr", "option", "dtype", "alignment"])
def test_what_triton_specialises_on_makes_a_new_key(compiled_path, change):
    kernel, x = FakeKernel(), torch.zeros(64)
    base = dict(grid=(4,), args=(x, 7, 0.5), constexprs=dict(BLOCK=16, FLAG=True), options=dict(num_warps=4))
    changed = dict(base, **{
        "grid": dict(grid=(5,)), "int": dict(args=(x, 16, 0.5)), "float type": dict(args=(x, 7, 1)),
        "constexpr": dict(constexprs=dict(BLOCK=32, FLAG=True)), "option": dict(options=dict(num_warps=8)),
        "dtype": dict(args=(x.half(), 7, 0.5)), "alignment": dict(args=(x[1:], 7, 0.5)),
    }[change])
    for call in (base, changed):
        _launch.launch(kernel, call["grid"], call["args"], call["constexprs"], **call["options"])
    assert [c[0] for c in kernel.calls] == ["jit", "jit"]


def test_constexprs_out_of_signature_order_are_never_cached(compiled_path):
    kernel, x = FakeKernel(), torch.zeros(64)
    for _ in range(2):
        _launch.launch(kernel, (1,), (x, 7, 0.5), dict(FLAG=True, BLOCK=16))
    assert [c[0] for c in kernel.calls] == ["jit", "jit"]


def test_the_interpreter_always_binds(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", True)
    kernel, x = FakeKernel(), torch.zeros(64)
    for _ in range(2):
        _launch.launch(kernel, (1,), (x, 7, 0.5), dict(BLOCK=16, FLAG=True))
    assert [c[0] for c in kernel.calls] == ["jit", "jit"]


def test_a_launcher_binds_the_compiled_kernel_once(compiled_path):
    """Launcher: the first call through launch (Triton's binding), then the compiled kernel
    with the constexprs appended, without a key; the grid padded to 3-D."""
    kernel, x, y = FakeKernel(), torch.zeros(64), torch.ones(64)
    launcher = _launch.Launcher(kernel, (5,), dict(BLOCK=16, FLAG=True), num_warps=4)
    launcher(x, 7, 0.5)
    launcher(y, 7, 0.5)
    launcher(x, 7, 0.5)
    assert kernel.calls == [("jit", (5,), (x, 7, 0.5), dict(BLOCK=16, FLAG=True, num_warps=4)),
                            ("compiled", (5, 1, 1), (y, 7, 0.5, 16, True)),
                            ("compiled", (5, 1, 1), (x, 7, 0.5, 16, True))]


def test_a_launcher_under_the_interpreter_always_binds(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", True)
    kernel, x = FakeKernel(), torch.zeros(64)
    launcher = _launch.Launcher(kernel, (5,), dict(BLOCK=16, FLAG=True))
    launcher(x, 7, 0.5)
    launcher(x, 7, 0.5)
    assert [c[0] for c in kernel.calls] == ["jit", "jit"]
