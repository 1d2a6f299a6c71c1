"""Build of moda_cuda: the Python package, plus the CUDA extension ``moda_cuda._C`` when it can be built.

Metadata lives in pyproject.toml; this file adds the extension and the version. The extension
(Hopper kernels, CUTLASS/CuTe) is built when torch has CUDA, nvcc is found, the CUTLASS headers
are installed (``pip install nvidia-cutlass==4.2.0.0``) and ``TORCH_CUDA_ARCH_LIST`` (default
``9.0a``) names 9.0 or 9.0a. Otherwise the install is pure Python and says why.

Environment:
  MODA_SKIP_CUDA_BUILD=1   never build the extension
  MODA_FORCE_CUDA_BUILD=1  fail instead of skipping when the extension cannot be built
  TORCH_CUDA_ARCH_LIST     archs to build; only 9.0/9.0a (compiled as sm_90a) are used
  MAX_JOBS                 parallel compile jobs (ninja)

With the extension the version carries a local tag, e.g. ``0.1.0+cu130torch2.11``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
TRUE = ("1", "true", "yes", "on")


def _load_build_flags():
    # By path: importing the package would import torch and register the op.
    path = ROOT / "moda_cuda" / "_build_flags.py"
    spec = importlib.util.spec_from_file_location("_moda_build_flags", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _base_version() -> str:
    text = (ROOT / "moda_cuda" / "_version.py").read_text()
    return re.search(r"__version__\s*=\s*[\"']([^\"']+)[\"']", text).group(1)


def _say(message: str) -> None:
    print(f"moda_cuda: {message}", flush=True)


class _Skip(Exception):
    pass


def _cuda_extension(flags):
    """(extension, build_ext command, local version tag); raises _Skip with the reason."""
    if os.environ.get("MODA_SKIP_CUDA_BUILD", "").strip().lower() in TRUE:
        raise _Skip("MODA_SKIP_CUDA_BUILD is set")
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError as e:
        raise _Skip(f"torch is not importable at build time ({e})") from None
    if torch.version.cuda is None:
        raise _Skip(f"torch {torch.__version__} is built without CUDA")
    if cpp_extension.CUDA_HOME is None:
        raise _Skip("no CUDA toolkit found (put nvcc on PATH or set CUDA_HOME)")
    archs = flags.arch_list()
    if not flags.wants_hopper(archs):
        raise _Skip(f"TORCH_CUDA_ARCH_LIST={archs!r} has no 9.0/9.0a arch (the kernels are Hopper-only)")
    cutlass = flags.cutlass_include_dir()
    if cutlass is None:
        raise _Skip("CUTLASS headers not found (pip install nvidia-cutlass==4.2.0.0, or run scripts/setup.sh)")
    srcs = flags.sources(ROOT)
    missing = [name for name in ("api", "host", "instantiations") if not srcs[name]]
    if missing:
        raise _Skip(f"kernel sources missing under csrc/ ({', '.join(missing)})")

    ignored = flags.ignored_archs(archs)
    if ignored:
        _say(f"building sm_90a only; ignoring {', '.join(ignored)} from TORCH_CUDA_ARCH_LIST")
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    cuda_version = flags.nvcc_version(nvcc) or torch.version.cuda
    sources = [os.path.relpath(p, ROOT) for p in srcs["api"] + srcs["host"] + srcs["instantiations"]]
    extension = cpp_extension.CUDAExtension(
        name="moda_cuda._C",
        sources=sources,
        include_dirs=flags.include_dirs(ROOT, cutlass),
        extra_compile_args={"cxx": flags.cxx_flags(), "nvcc": flags.nvcc_flags()},
    )
    torch_mm = ".".join(re.match(r"(\d+)\.(\d+)", torch.__version__).groups())
    tag = f"cu{torch.version.cuda.replace('.', '')}torch{torch_mm}"
    _say(f"building the CUDA extension moda_cuda._C ({len(sources)} sources, sm_90a, nvcc {cuda_version}, "
         f"CUTLASS {cutlass})")
    return extension, cpp_extension.BuildExtension, tag


def main() -> None:
    flags = _load_build_flags()
    version = _base_version()
    ext_modules, cmdclass = [], {}
    try:
        extension, build_ext, tag = _cuda_extension(flags)
    except _Skip as skip:
        if os.environ.get("MODA_FORCE_CUDA_BUILD", "").strip().lower() in TRUE:
            sys.exit(f"moda_cuda: MODA_FORCE_CUDA_BUILD is set but the CUDA extension cannot be built: {skip}")
        _say(f"skipping the CUDA extension: {skip}; installing the pure-Python package "
             "(Triton and reference backends)")
    else:
        ext_modules, cmdclass = [extension], {"build_ext": build_ext}
        version = f"{version}+{tag}"
    setup(version=version, ext_modules=ext_modules, cmdclass=cmdclass, zip_safe=False)


main()
