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
    with the scalars and constexprs appended, without a key; the grid padded to 3-D. (The
    fake compiled kernel is nothing the extension's launcher can describe.)"""
    kernel, x, y = FakeKernel(), torch.zeros(64), torch.ones(64)
    launcher = _launch.Launcher(kernel, (5,), dict(BLOCK=16, FLAG=True), (7, 0.5), num_warps=4)
    launcher(x)
    launcher(y)
    launcher(x)
    assert kernel.calls == [("jit", (5,), (x, 7, 0.5), dict(BLOCK=16, FLAG=True, num_warps=4)),
                            ("compiled", (5, 1, 1), (y, 7, 0.5, 16, True)),
                            ("compiled", (5, 1, 1), (x, 7, 0.5, 16, True))]
    assert launcher.native is False


class DescribedCompiled(FakeCompiled):
    """A compiled kernel as Triton 3.6 describes it: the signature after specialisation (an
    integer equal to 1 becomes a constexpr and leaves the parameters), its launcher's
    scratch sizes, its metadata and its loaded function."""

    def __init__(self, calls, signature, scratch=0):
        super().__init__(calls)
        self.src = type("Src", (), {"signature": signature})()
        self.run = type("Run", (), {"global_scratch_size": scratch, "profile_scratch_size": 0})()
        self.metadata = type("Meta", (), {"num_warps": 4, "num_ctas": 1, "shared": 1024})()
        self.function = 0xF00D


class TwoTensorKernel(FakeKernel):
    arg_names = ["X", "Y", "n", "one", "scale", "BLOCK"]

    def __init__(self, signature, scratch=0):
        super().__init__()
        self.signature, self.scratch = signature, scratch

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append(("jit", grid, args, kwargs))
            return DescribedCompiled(self.calls, self.signature, self.scratch)

        return run


@pytest.fixture
def extension(monkeypatch):
    """A stand-in for the extension: its KernelLaunch records how it was built and called."""
    from moda_cuda import _cuda_ext

    class KernelLaunch:
        def __init__(self, function, grid, threads, shared_bytes, slots, tensor_slots, pdl):
            self.built = (function, grid, threads, shared_bytes, slots, tensor_slots, pdl)
            self.calls = []

        def __call__(self, tensors):
            self.calls.append(tensors)

    monkeypatch.setattr(_cuda_ext, "load", lambda: type("Ext", (), {"KernelLaunch": KernelLaunch})())
    monkeypatch.setattr(_launch.triton, "__version__", "3.6.0")


SIGNATURE = {"X": "*fp32", "Y": "*bf16", "n": "i32", "one": "constexpr", "scale": "fp32", "BLOCK": "constexpr"}


def test_a_launcher_goes_to_the_extension_from_its_third_call(compiled_path, extension):
    """The second call builds the extension's launch (a launcher used once never pays for it):
    one 8-byte slot per parameter in signature order, the tensors' slots left for each call,
    scalars in the kernel's ABI (fp32 as its bits), constexprs left out, two null scratch
    pointers last."""
    import struct

    kernel, x, y = TwoTensorKernel(SIGNATURE), torch.zeros(64), torch.ones(64)
    launcher = _launch.Launcher(kernel, (6, 2), dict(BLOCK=16), (-3, 1, 0.5), num_warps=4)
    for tensors in ((x, y), (y, x), (x, x)):
        launcher(*tensors)
    assert [c[0] for c in kernel.calls] == ["jit", "compiled"]
    fp32_half = struct.unpack("<I", struct.pack("<f", 0.5))[0]
    assert launcher.native.built == (0xF00D, (6, 2, 1), 128, 1024, [0, 0, 2**32 - 3, fp32_half, 0, 0], [0, 1],
                                     False)
    assert launcher.native.calls == [(x, x)]


@pytest.mark.parametrize("change", ["scratch", "bf16 scalar", "version", "hook"])
def test_what_the_extension_cannot_describe_stays_with_triton(compiled_path, extension, monkeypatch, change):
    signature, scratch = dict(SIGNATURE), 0
    if change == "scratch":
        scratch = 128
    elif change == "bf16 scalar":
        signature["scale"] = "bf16"
    elif change == "version":
        monkeypatch.setattr(_launch.triton, "__version__", "3.7.0")
    else:
        monkeypatch.setattr(_launch.triton.knobs.runtime.launch_enter_hook, "calls", [lambda *a: None])
    kernel, x = TwoTensorKernel(signature, scratch), torch.zeros(64)
    launcher = _launch.Launcher(kernel, (6,), dict(BLOCK=16), (-3, 1, 0.5))
    for _ in range(3):
        launcher(x, x)
    assert [c[0] for c in kernel.calls] == ["jit", "compiled", "compiled"] and launcher.native is False


def test_a_launcher_under_the_interpreter_always_binds(monkeypatch):
    monkeypatch.setattr(_launch, "INTERPRET", True)
    kernel, x = FakeKernel(), torch.zeros(64)
    launcher = _launch.Launcher(kernel, (5,), dict(BLOCK=16, FLAG=True), (7, 0.5))
    launcher(x)
    launcher(x)
    assert [c[0] for c in kernel.calls] == ["jit", "jit"]
