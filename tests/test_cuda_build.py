"""Compile-only check of the CUDA sources (no GPU needed): nvcc on the host entry points and on
kernel instantiations (forward, backward, their schedule variants), with the flags
setup.py builds the extension with.

nvcc missing is a failure, not a skip (a kernel that does not compile must never pass
unnoticed); set MODA_ALLOW_NO_NVCC=1 to skip on a machine without the CUDA toolkit.
"""

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.nvcc


def _build_flags():
    # The checkout's flag list, loaded by path: the same file setup.py loads.
    spec = importlib.util.spec_from_file_location("_moda_build_flags", ROOT / "moda_cuda" / "_build_flags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flags = _build_flags()


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if nvcc is None and home and Path(home, "bin", "nvcc").is_file():
        nvcc = str(Path(home, "bin", "nvcc"))
    if nvcc is None:
        if os.environ.get("MODA_ALLOW_NO_NVCC") == "1":
            pytest.skip("nvcc not found (MODA_ALLOW_NO_NVCC=1)")
        pytest.fail("nvcc not found on PATH (or in CUDA_HOME): the CUDA sources cannot be compile-checked. "
                    "Install the CUDA toolkit, or set MODA_ALLOW_NO_NVCC=1 to skip this check.")
    return nvcc


def _cutlass() -> str:
    include = flags.cutlass_include_dir()
    if include is None:
        pytest.fail("CUTLASS headers not found (the nvidia-cutlass pip package): run scripts/setup.sh")
    return include


def _torch_nvcc_flags():
    # What torch's BuildExtension puts before ours (its __CUDA_NO_* macros, which ours undo).
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

    return list(COMMON_NVCC_FLAGS) + ["--compiler-options", "-fPIC"]


def _one_instantiation() -> Path:
    files = [Path(p) for p in flags.sources(ROOT)["instantiations"]]
    if not files:
        pytest.fail(f"no kernel instantiations found: {ROOT / 'csrc' / 'instantiations'}/*.cu")
    preferred = [f for f in files if re.search(r"fwd_bf16.*(?<!\d)64(?!\d)", f.name)]
    return (preferred or files)[0]


def _compile(source: Path, tmp_path: Path, include_root: Path = ROOT) -> None:
    nvcc, cutlass = _nvcc(), _cutlass()
    obj = tmp_path / (source.stem + ".o")
    includes = [f"-I{d}" for d in flags.include_dirs(include_root, cutlass)]
    cmd = [nvcc, *_torch_nvcc_flags(), *flags.nvcc_flags(), *includes, "-c", str(source), "-o", str(obj)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, (f"nvcc failed on {source} (rc {res.returncode}):\n"
                                 f"{' '.join(cmd)}\n{res.stderr[-20000:]}{res.stdout[-5000:]}")
    assert obj.is_file() and obj.stat().st_size > 0


def test_kernel_instantiation_compiles(tmp_path):
    _compile(_one_instantiation(), tmp_path)


@pytest.mark.parametrize("config, head_dim, assignments, instantiation", [
    ("FwdConfig", 64, "kConsumerWGs=2", "moda_fwd_bf16_hdim64.cu"),
    ("BwdConfig", 128, "kOverlapTiles=true", "moda_bwd_bf16_hdim128.cu"),
    ("BwdConfig", 64, "kDqOwnKeys=false", "moda_bwd_bf16_hdim64.cu"),
    ("BwdConfig", 128, "kFusedDq=true", "moda_bwd_bf16_hdim128.cu"),
    # the per-position depth kernel with the next item loading during the current one
    ("BwdConfig", 64, "kDepthStages=2,kDepthSlotRows=32", "moda_bwd_bf16_hdim64.cu"),
], ids=["two_consumer_warpgroups_d64", "dq_tile_overlap_d128", "fused_dq_head_dim_split_d64", "fused_dq_d128",
        "depth_kernel_two_stages_d64"])
def test_schedule_variants_compile(tmp_path, config, head_dim, assignments, instantiation):
    """Schedules that FwdConfig / BwdConfig can select but the shipped build does not at this
    head dim (the other head dim's choice, or measured slower here: csrc/moda_fwd_config.h,
    csrc/moda_bwd_config.h): compile them, so that they cannot rot unnoticed."""
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    launch = csrc / ("moda_fwd_config.h" if config == "FwdConfig" else "moda_bwd_config.h")
    text = launch.read_text()
    for assignment in assignments.split(","):
        field, value = assignment.split("=")
        pattern = re.compile(rf"(static constexpr [^\n]*\b{field} = )[^,;]+")
        if head_dim is None:
            text, n = pattern.subn(rf"\g<1>{value}", text)
        else:
            head, sep, rest = text.partition(f"struct {config}<{head_dim}>")
            body, end, tail = rest.partition("};")
            body, n = pattern.subn(rf"\g<1>{value}", body)
            text = head + sep + body + end + tail
        assert n >= 1, f"no {config} field {field} in {launch}"
    launch.write_text(text)
    _compile(csrc / "instantiations" / instantiation, tmp_path, include_root=tmp_path)


@pytest.mark.parametrize("entry", ["moda_fwd.cu", "moda_bwd.cu"])
def test_host_entry_points_compile(tmp_path, entry):
    host = [Path(h) for h in flags.sources(ROOT)["host"] if Path(h).name == entry]
    if not host:
        pytest.fail(f"{ROOT / 'csrc' / entry} not found")
    _compile(host[0], tmp_path)


def test_backward_instantiation_compiles(tmp_path):
    _compile(ROOT / "csrc" / "instantiations" / "moda_bwd_bf16_hdim64.cu", tmp_path)


def test_flags_target_hopper_only():
    assert flags.nvcc_flags().count(flags.GENCODE) == 1
    assert flags.wants_hopper("9.0a") and flags.wants_hopper("8.0;9.0+PTX") and flags.wants_hopper("9.0 10.0")
    assert not flags.wants_hopper("8.0;8.6") and not flags.wants_hopper("10.0a")
    assert flags.arch_list({}) == flags.arch_list({"TORCH_CUDA_ARCH_LIST": " "}) == "9.0a"
    assert flags.ignored_archs("8.0;9.0a") == ["8.0"]
