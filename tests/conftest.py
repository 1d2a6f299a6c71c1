"""Shared test setup.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1), which
must be set before triton is first imported, hence here. Tests marked ``cuda`` need a GPU.

``MODA_TEST_INSTALLED=1`` (scripts/check_wheel.sh) asserts that the moda_cuda under test is
an installed copy, not this checkout's sources. Nothing here puts the checkout on sys.path;
pytest adds only this directory (for helpers.py and kernel_checks.py).
"""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


def pytest_configure(config):
    if os.environ.get("MODA_TEST_INSTALLED") != "1":
        return
    import moda_cuda

    checkout = Path(__file__).resolve().parents[1]
    where = Path(moda_cuda.__file__).resolve()
    if checkout in where.parents:
        raise pytest.UsageError(f"MODA_TEST_INSTALLED=1 but moda_cuda is imported from the checkout ({where}); "
                                "run pytest from outside it, against an installed moda_cuda")
