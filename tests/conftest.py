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


@pytest.fixture(autouse=True)
def poisoned_depth_grad_sums(monkeypatch):
    """DepthStream's gradient sums start as NaN in every test, not as whatever the allocator
    returns (they are not zeroed: moda_cuda/depth_stream.py): a slot read before anything
    was stored or added into it shows up in every gradient it reaches."""
    from moda_cuda import depth_stream

    monkeypatch.setattr(depth_stream._DepthGradSums, "_allocate",
                        lambda self: torch.full(**self._like, fill_value=float("nan")))


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
