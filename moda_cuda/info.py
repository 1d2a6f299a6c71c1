"""``moda_cuda.info()``: what this installation can run, and on which backend."""

from __future__ import annotations

import importlib.util
import platform

import torch

from . import dispatch
from ._version import __version__


def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed"
    import triton

    return triton.__version__


def info(print_it: bool = True) -> dict:
    """Versions, devices and backends; printed as a short report unless ``print_it=False``."""
    report = {
        "moda_cuda": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "triton": _triton_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu only",
        "backends": {
            name: (b.unavailable() or "available") for name, b in dispatch.BACKENDS.items()
        },
        "MODA_BACKEND": dispatch.os.environ.get(dispatch.ENV_VAR, "") or "(unset: auto)",
    }
    if print_it:
        width = max(map(len, report))
        for key, value in report.items():
            if isinstance(value, dict):
                print(f"{key:<{width}}")
                for name, state in value.items():
                    print(f"  {name:<{width - 2}} {state}")
            else:
                print(f"{key:<{width}} {value}")
    return report
