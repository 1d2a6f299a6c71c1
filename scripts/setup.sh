#!/usr/bin/env bash
# Installs what moda_cuda's demo and tests need into the current Python environment, then the
# package itself (editable). Safe to run again: present packages are kept.
#
# The editable install builds the CUDA extension moda_cuda._C when torch has CUDA and nvcc is
# found (see setup.py; MODA_SKIP_CUDA_BUILD=1 skips it, MAX_JOBS bounds the parallel compiles).
#
# Without a CUDA GPU the Triton kernels are tested in Triton's interpreter, which needs
# numpy < 2.3; with a GPU the installed numpy is left alone (a missing one is installed as
# numpy < 2.3 either way). PYTHON names the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c "import sys; print(f'scripts/setup.sh: installing into the active Python environment {sys.prefix} '
                            f'(python {sys.executable}, {sys.version.split()[0]})')"

have() { "$PY" -c "import $1" >/dev/null 2>&1; }
have_cutlass() {
    "$PY" -c "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('cutlass_library') else 1)" \
        >/dev/null 2>&1
}
pip_install() {
    # nvidia-cutlass is installed without its requirements (its Python tools are not used), so
    # pip's conflict report after an install that touches a package it names (numpy, scipy)
    # would list them as missing: that report is left out once cutlass is present.
    local quiet=()
    have_cutlass && quiet=(--no-warn-conflicts)
    "$PY" -m pip install --quiet --disable-pip-version-check ${quiet[@]+"${quiet[@]}"} "$@"
}

# numpy before torch: torch imported without numpy warns "Failed to initialize NumPy". The
# pin suits both cases below (a present numpy is checked there).
have numpy || pip_install "numpy<2.3"
have torch || pip_install "torch==2.13.0"
have triton || pip_install "triton==3.6.0"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    "$PY" -c "import numpy, sys; sys.exit(0 if tuple(map(int, numpy.__version__.split('.')[:2])) < (2, 3) else 1)" \
        2>/dev/null || pip_install "numpy<2.3"
fi
have pytest || pip_install pytest
# The editable install below runs without build isolation: it needs a setuptools that builds
# wheels (>= 64, with wheel), which a fresh venv's bundled one may not be.
"$PY" -c "import setuptools, sys; sys.exit(0 if int(setuptools.__version__.split('.')[0]) >= 64 else 1)" \
    2>/dev/null && have wheel || pip_install -U "setuptools>=64" wheel
have matplotlib || pip_install matplotlib      # example loss curves (optional at run time)
have safetensors || pip_install safetensors    # saved models (MoDAForCausalLM.save_pretrained)
have sklearn || pip_install scikit-learn       # the ViT example's digits data (optional at run time)
# CUTLASS/CuTe headers for the CUDA extension's build and its compile-only test; after the
# installs above, which resolve dependencies (see pip_install).
have_cutlass || pip_install --no-deps "nvidia-cutlass==4.2.0.0"  # headers only: its Python tools are not used
pip_install --no-build-isolation --no-deps -e .
