#!/usr/bin/env bash
# Installs what moda_cuda's demo and tests need into the current Python environment, then the
# package itself (editable). Safe to run again: present packages are kept.
#
# The editable install builds the CUDA extension moda_cuda._C when torch has CUDA and nvcc is
# found (see setup.py; MODA_SKIP_CUDA_BUILD=1 skips it, MAX_JOBS bounds the parallel compiles).
#
# Without a CUDA GPU the Triton kernels are tested in Triton's interpreter, which needs
# numpy < 2.3; with a GPU the installed numpy is left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
pip_install() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

have torch || pip_install "torch==2.13.0"
have triton || pip_install "triton==3.6.0"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" -c "import numpy, sys; sys.exit(0 if tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 3) else 1)" \
        2>/dev/null || pip_install "numpy<2.3"
fi
have pytest || pip_install pytest
# CUTLASS/CuTe headers for the CUDA extension's build and its compile-only test.
"$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('cutlass_library') else 1)" \
    || pip_install --no-deps "nvidia-cutlass==4.2.0.0"  # headers only: its Python tools are not used
have matplotlib || pip_install matplotlib      # example loss curves (optional at run time)
have sklearn || pip_install scikit-learn       # the ViT example's digits data (optional at run time)
pip_install --no-build-isolation --no-deps -e .
