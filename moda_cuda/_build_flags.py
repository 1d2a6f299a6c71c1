"""Compiler flags and sources of the CUDA extension ``moda_cuda._C``.

One list shared by ``setup.py`` and the compile-only test (``tests/test_cuda_build.py``), so
that the test compiles the kernels exactly as the build does. Plain Python, no torch import:
both callers load this file by path, without importing the package.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
from pathlib import Path
from typing import List, Optional

# The kernels use wgmma and TMA: Hopper only, and only the arch-specific sm_90a target.
DEFAULT_ARCH_LIST = "9.0a"
HOPPER_ARCHS = ("9.0", "9.0a")
GENCODE = "-gencode=arch=compute_90a,code=sm_90a"
COMPILED_ARCHS = ("sm_90a",)

CXX_FLAGS = ["-O3", "-std=c++17"]

NVCC_FLAGS = [
    "-O3",
    "-std=c++17",
    "--expt-relaxed-constexpr",
    "--expt-extended-lambda",
    "--use_fast_math",
    "-lineinfo",
    "-DNDEBUG",
    # torch's extension build defines the __CUDA_NO_* macros; CUTLASS needs the operators.
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__",
    "-U__CUDA_NO_BFLOAT162_CONVERSIONS__",
]


def arch_list(env: Optional[dict] = None) -> str:
    """``TORCH_CUDA_ARCH_LIST``, or the default (9.0a) when unset or empty."""
    env = os.environ if env is None else env
    return env.get("TORCH_CUDA_ARCH_LIST", "").strip() or DEFAULT_ARCH_LIST


def _arch_entries(archs: str) -> List[str]:
    return [a.replace("+PTX", "").strip() for a in re.split(r"[;,\s]+", archs) if a.strip()]


def wants_hopper(archs: str) -> bool:
    """True when the arch list names 9.0 or 9.0a (the only archs the kernels exist for)."""
    return any(a in HOPPER_ARCHS for a in _arch_entries(archs))


def ignored_archs(archs: str) -> List[str]:
    """Entries of the arch list that are not built (every arch but 9.0/9.0a)."""
    return [a for a in _arch_entries(archs) if a not in HOPPER_ARCHS]


def define_flags() -> List[str]:
    """``MODA_COMPILED_ARCHS``: a string literal (comma-separated) that ``_C.compiled_archs()``
    reports. Passed to the C++ compiler and to nvcc alike."""
    return [f'-DMODA_COMPILED_ARCHS="{",".join(COMPILED_ARCHS)}"']


def nvcc_flags() -> List[str]:
    """Every nvcc flag of the build (besides include dirs and torch's own)."""
    return NVCC_FLAGS + [GENCODE] + define_flags()


def cxx_flags() -> List[str]:
    return CXX_FLAGS + define_flags()


def cutlass_include_dir() -> Optional[str]:
    """CUTLASS/CuTe headers of the ``nvidia-cutlass`` pip package, or None when absent."""
    try:
        spec = importlib.util.find_spec("cutlass_library")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        include = Path(location) / "source" / "include"
        if (include / "cutlass" / "cutlass.h").is_file() and (include / "cute").is_dir():
            return str(include)
    return None


def sources(root) -> dict:
    """The extension's sources under ``root/csrc`` (absent files are simply not listed).

    ``api``: the torch binding and the launcher of Triton's compiled kernels (C++ compiler);
    ``host``: the entry points (checks, choice of instantiation) of the forward and the
    backward; ``instantiations``: one kernel instantiation per file, sorted, so that ninja
    compiles them in parallel.
    """
    csrc = Path(root) / "csrc"
    api = [csrc / "moda_api.cpp", csrc / "kernel_launch.cpp"]
    host = [csrc / "moda_fwd.cu", csrc / "moda_bwd.cu"]
    return {
        "api": [str(a) for a in api if a.is_file()],
        "host": [str(h) for h in host if h.is_file()],
        "instantiations": sorted(str(p) for p in (csrc / "instantiations").glob("*.cu")),
    }


def include_dirs(root, cutlass: str) -> List[str]:
    return [str(Path(root) / "csrc"), cutlass]


def nvcc_version(nvcc: str) -> Optional[str]:
    """``"13.0"`` from ``nvcc --version``, or None when nvcc cannot be run."""
    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", text)
    return f"{match.group(1)}.{match.group(2)}" if match else None
