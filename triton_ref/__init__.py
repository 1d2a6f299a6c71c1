"""Autotuned Triton kernels for MoDA (forward and backward), installed as ``moda_cuda.triton_ref``.

The portable fast path: any CUDA GPU Triton supports. Callers validate inputs first
(``moda_cuda._spec.check_inputs``) and pass tensors whose last dim is contiguous.
"""

from ._bwd import moda_bwd
from ._fwd import moda_fwd

__all__ = ["moda_fwd", "moda_bwd"]
