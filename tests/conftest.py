"""Shared test setup.

Without a GPU the Triton kernels run in Triton's interpreter (TRITON_INTERPRET=1), which
must be set before triton is first imported, hence here. Tests marked ``cuda`` need a GPU.
"""

import os

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
