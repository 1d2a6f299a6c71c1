"""Shared-memory budget of the Triton configs (pure Python, no GPU)."""

import pytest

triton = pytest.importorskip("triton")

from moda_cuda.triton_ref import _configs  # noqa: E402


def _cfg(m, n, warps, stages):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)


def test_budget_counts_the_padded_head_dim():
    # Measured on the H200: the forward with (128, 64, 8 warps, 3 stages) at D = 192 asks for
    # 262,144 bytes of shared memory (tiles padded to D = 256), over the 232,448 allowed.
    assert not _configs._fits(_cfg(128, 64, 8, 3), 192, "M")
    assert _configs._fits(_cfg(128, 64, 8, 3), 128, "M")


@pytest.mark.parametrize("head_dim", [16, 64, 96, 128, 192, 256])
@pytest.mark.parametrize("held", ["M", "N"])  # query rows held (forward, dQ) or keys (dK/dV)
def test_some_config_fits_every_head_dim(held, head_dim):
    candidates = [_cfg(m, n, w, s) for (m, n, w, s) in [
        (128, 64, 8, 3), (64, 32, 4, 2), (32, 32, 4, 2), (16, 64, 4, 3)]]
    assert any(_configs._fits(c, head_dim, held) for c in candidates)
