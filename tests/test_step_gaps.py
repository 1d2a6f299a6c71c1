"""bench/step_gaps.py's split of profiled kernels into steps, kernel time and gaps (the
profiling itself needs a GPU)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import step_gaps  # noqa: E402

FLUSH = "vectorized_elementwise_kernel<bitwise_not_kernel_cuda>"


def test_steps_split_at_the_flush_and_gaps_add_up():
    # Two steps (us): fwd 0-100, gap 5, bwd 105-305; then fwd 1000-1100, gap 15, bwd 1115-1315.
    events = [(-50, -10, FLUSH), (0, 100, "moda_fwd_kernel"), (105, 305, "moda_bwd_dkdv_kernel"),
              (900, 950, FLUSH), (1000, 1100, "moda_fwd_kernel"), (1115, 1315, "moda_bwd_dkdv_kernel")]
    steps = step_gaps.split_steps(sorted(events), "bitwise_not")
    assert [[n for _, _, n in s] for s in steps] == [["moda_fwd_kernel", "moda_bwd_dkdv_kernel"]] * 2
    row = step_gaps.analyse(steps)
    assert row["steps"] == 2
    assert row["span_ms"] == pytest.approx(0.310)      # (305 + 315) / 2 us
    assert row["kernels_ms"] == pytest.approx(0.300)
    assert row["gaps"] == [["moda_fwd_kernel", "moda_bwd_dkdv_kernel", pytest.approx(0.010)]]
    assert row["per_kernel_ms"] == {"moda_bwd_dkdv_kernel": pytest.approx(0.2), "moda_fwd_kernel": pytest.approx(0.1)}


def test_kernels_before_the_first_flush_are_not_a_step():
    steps = step_gaps.split_steps([(0, 10, "warm-up"), (20, 30, FLUSH), (40, 50, "moda_fwd_kernel")], "bitwise_not")
    assert steps == [[(40, 50, "moda_fwd_kernel")]]
