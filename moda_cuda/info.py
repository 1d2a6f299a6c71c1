"""``moda_cuda.info()``: what this installation can run, and on which backend."""

from __future__ import annotations

import importlib.util
import os
import platform
from typing import Dict, Optional, Sequence, Tuple

import torch

from . import _cuda_ext, dispatch
from ._spec import check_inputs
from ._version import __version__


def _triton_version() -> str:
    if importlib.util.find_spec("triton") is None:
        return "not installed"
    import triton

    return triton.__version__


def _package_version() -> str:
    """The installed distribution's version (with its local tag, e.g. ``+cu130torch2.11``)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
    except ImportError:  # pragma: no cover
        return __version__
    try:
        installed = version("moda_cuda")
    except PackageNotFoundError:
        return __version__
    # A distribution of another checkout may be visible: trust it only if it is this version.
    return installed if installed.split("+")[0] == __version__ else __version__


def _cuda_extension() -> dict:
    if _cuda_ext.load() is None:
        return {"cuda extension": _cuda_ext.load_error(), "cuda extension archs": "-",
                "cuda extension built with": "-"}
    return {
        "cuda extension": "built",
        "cuda extension archs": ", ".join(_cuda_ext.compiled_archs()) or "-",
        "cuda extension built with": f"CUDA {_cuda_ext.cuda_version()}",
    }


SHAPE_NAMES = ("B", "T", "Hq", "Hk", "D", "L")
INFO_DTYPES = ("float16", "bfloat16", "float32", "float64")


def _meta_problem(shape: Sequence[int], dtype: str):
    B, T, Hq, Hk, D, L = shape
    meta = dict(device="meta", dtype=getattr(torch, dtype))
    try:
        q = torch.empty(B, T, Hq, D, **meta)
        k = torch.empty(B, T, Hk, D, **meta)
        dk = torch.empty(B, T, L, Hk, D, **meta)
    except (RuntimeError, OverflowError) as e:
        raise ValueError(f"the problem is too large for a tensor ({e})") from None
    return q, k, dk


def check_shape(shape: Sequence[int], dtype: str = "bfloat16") -> Tuple[int, ...]:
    """``shape = (B, T, Hq, Hk, D, L)`` as ``info`` takes it, validated; ValueError says which
    value is wrong (B, T, Hq, Hk and D are >= 1, L >= 0, Hq a multiple of Hk)."""
    if dtype not in INFO_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(INFO_DTYPES)}, got {dtype!r}")
    try:
        values = tuple(shape)
    except TypeError:
        raise ValueError(f"shape must be six integers B, T, Hq, Hk, D, L, got {shape!r}") from None
    if len(values) != len(SHAPE_NAMES):
        raise ValueError(f"shape must be six integers B, T, Hq, Hk, D, L, got {len(values)} values")
    for name, value in zip(SHAPE_NAMES, values):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        lowest = 0 if name == "L" else 1
        if value < lowest:
            raise ValueError(f"{name} must be >= {lowest}, got {value}")
    B, T, Hq, Hk, D, L = values
    if Hq % Hk:
        raise ValueError(f"Hq ({Hq}) must be a multiple of Hk ({Hk}): each kv head serves Hq / Hk query heads")
    q, k, dk = _meta_problem(values, dtype)
    check_inputs(q, k, k, dk, dk, None, True, 1)  # anything else the kernels' inputs must satisfy
    return values


def _backends_for(shape: Sequence[int], dtype: str) -> Dict[str, dispatch.Backend]:
    """The backend ``backend="auto"`` picks for each direction of a problem of this shape on
    this machine."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    q, k, dk = _meta_problem(shape, dtype)
    spec = check_inputs(q, k, k, dk, dk, None, True, 1)
    # The policy looks at q's device and dtype and at every tensor's extent: a one-element
    # tensor stands in for q on the real device, meta tensors for the rest of the problem.
    q_dev = torch.empty(1, device=device, dtype=q.dtype)
    return {d: dispatch.resolve("auto", q_dev, spec, (q, k, k, dk, dk), d) for d in dispatch.DIRECTIONS}


def info(print_it: bool = True, shape: Optional[Sequence[int]] = None, dtype: str = "bfloat16") -> dict:
    """Versions, devices and backends; printed as a short report unless ``print_it=False``.

    With ``shape = (B, T, Hq, Hk, D, L)`` it also says which backend runs that problem's
    forward (``backend for ...``: the one dispatch picks) and which implementation computes
    its gradients (``backward for ...``: the backend auto picks for the backward, and behind
    the cuda one its compiled backward, or Triton's with ``MODA_CUDA_BACKWARD=triton``).
    A shape that is no valid problem raises ValueError (see :func:`check_shape`).
    """
    if shape is not None:
        shape = check_shape(shape, dtype)
    report = {
        "moda_cuda": _package_version(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda or "none",
        "triton": _triton_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu only",
        "backends": {
            name: (b.unavailable() or "available") for name, b in dispatch.BACKENDS.items()
        },
        **_cuda_extension(),
        "MODA_BACKEND": os.environ.get(dispatch.ENV_VAR, "") or "(unset: auto)",
        "MODA_CUDA_BACKWARD": os.environ.get(dispatch.CUDA_BACKWARD_ENV, "") or "(unset: cuda)",
    }
    if shape is not None:
        picked = _backends_for(shape, dtype)
        report[f"backend for {tuple(shape)} {dtype}"] = picked["forward"].name
        report[f"backward for {tuple(shape)} {dtype}"] = picked["backward"].backward_name
    if print_it:
        width = max(map(len, report))
        for key, value in report.items():
            if isinstance(value, dict):
                print(key)
                for name, state in value.items():
                    print(f"  {name:<{width - 2}} {state}")
            else:
                print(f"{key:<{width}} {value}")
    return report
