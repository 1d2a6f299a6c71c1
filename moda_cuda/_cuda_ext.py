"""The compiled extension ``moda_cuda._C`` (Hopper kernels), imported lazily, once.

``load()`` returns the module, or None when it is not there or does not import;
``load_error()`` then says why.
"""

from __future__ import annotations

import importlib
from typing import List, Optional

NOT_BUILT = "not built (MODA_SKIP_CUDA_BUILD or no nvcc at install time)"

_tried = False
_module = None
_error: Optional[str] = None


def load():
    """``moda_cuda._C``, or None (see :func:`load_error`)."""
    global _tried, _module, _error
    if not _tried:
        _tried = True
        try:
            _module = importlib.import_module("moda_cuda._C")
        except ModuleNotFoundError as e:
            _error = NOT_BUILT if e.name == "moda_cuda._C" else f"import failed: {e}"
        except (ImportError, OSError) as e:  # e.g. built against another torch or CUDA runtime
            _error = f"import failed: {e}"
    return _module


def load_error() -> Optional[str]:
    """Why :func:`load` returns None; None when the extension is loaded."""
    load()
    return _error


def compiled_archs() -> List[str]:
    """GPU archs the extension holds kernels for (empty when it is not loaded)."""
    ext = load()
    return list(ext.compiled_archs()) if ext is not None else []


def cuda_version() -> Optional[str]:
    """CUDA version the extension was compiled with (None when it is not loaded)."""
    ext = load()
    return str(ext.cuda_version()) if ext is not None else None
