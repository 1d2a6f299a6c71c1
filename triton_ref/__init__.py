"""The Triton kernels of moda_cuda, installed as ``moda_cuda.triton_ref``: the production
``triton`` backend (any CUDA GPU Triton supports), not a reference implementation (that is
``moda_cuda.reference``, the pure-PyTorch definition every backend is tested against).

* ``_fwd``, ``_bwd``: the autotuned training forward and backward (:func:`moda_fwd`,
  :func:`moda_bwd`); ``_common`` their shared index helpers, ``_configs`` the autotune spaces.
* ``decode``: the split-KV decode kernel of ``moda_attention_with_kvcache``.
* ``rotary``: the one-launch rotary embedding of the layers (and its autograd forms).
* ``_launch``: launching a compiled kernel again without rebinding its arguments.

Callers validate inputs first (``moda_cuda._spec.check_inputs``) and pass tensors whose last
dim is contiguous.
"""

from ._bwd import moda_bwd
from ._fwd import moda_fwd

__all__ = ["moda_fwd", "moda_bwd"]
